"""Does the current code reproduce the quality table? Re-trains seed 0 of every row's chosen configuration
(benchmarks/results/quality_ml100k.json, selected on validation) exactly as benchmarks/quality.py does, and puts
its validation and test metrics beside the logged seed-0 run (benchmarks/results/quality_runs.jsonl).

Training is deterministic per seed on one machine, so a refactor that keeps the models' arithmetic shows
differences at the level of float noise; the table's own seed-to-seed sd is the scale of "within noise".

    .venv/bin/python benchmarks/reproduce.py [--data-dir ../shared/data/ml-100k] [--only NAME ...]

Writes benchmarks/results/reproduce_ml100k.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (the benchmark's own run(), same arguments)

METRICS = ("HR@10", "HR@50", "HR@100", "NDCG@10")


def chosen_rows(results: Path, only) -> list:
    rows = [r for r in json.loads(results.read_text()) if r.get("preset")]
    return [r for r in rows if not only or any(o.lower() in r["name"].lower() for o in only)]


def logged_seed0(log: quality.RunLog, row: dict, max_epochs: int) -> dict:
    record = log.get(row["name"], row["overrides"], 0, max_epochs, row["preset"])
    if record is None:
        raise SystemExit(f"no logged seed-0 run of {row['name']!r} with {row['overrides']} in {log.path}")
    return record


def compare(rows, split, max_epochs: int) -> list:
    log = quality.RunLog(HERE / "results" / "quality_runs.jsonl", fresh=False)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = quality.RunLog(Path(tmp) / "runs.jsonl", fresh=True)
        for row in rows:
            before = logged_seed0(log, row, max_epochs)
            now = quality.run(fresh, split, row["name"], row["preset"], row["overrides"], 0, max_epochs)
            sd = {m: row["summary"][m][1] for m in METRICS if m in row["summary"]}
            out.append({"row": row["name"], "before": before, "now": now, "seed_sd": sd})
    return out


def markdown(results, command: str) -> str:
    head = ["# Reproduction of the quality table (seed 0, current code)", "",
            f"Command: `{command}`", "",
            "Each row's chosen configuration (validation-selected, benchmarks/results/quality_ml100k.md) re-trained "
            "with seed 0 and compared with the logged seed-0 run; `sd` is the row's seed-to-seed sd in the table.", "",
            "| configuration | best epoch (logged / now) | valid HR@50 (logged / now) | "
            + " | ".join(f"test {m} (logged / now, sd)" for m in METRICS) + " |",
            "|---" * (3 + len(METRICS)) + "|"]
    for r in results:
        b, n = r["before"], r["now"]
        cells = [f"{b['test'][m]:.3f} / {n['test'][m]:.3f} ({r['seed_sd'].get(m, float('nan')):.3f})" for m in METRICS]
        head.append(f"| {r['row']} | {b['best_epoch']} / {n['best_epoch']} | {b['valid']['HR@50']:.3f} / "
                    f"{n['valid']['HR@50']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(head) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="only rows whose name contains one of these")
    parser.add_argument("--out", default=str(HERE / "results" / "reproduce_ml100k"))
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "u.data").is_file():
        print(f"MovieLens 100K is absent at {args.data_dir}; nothing to reproduce", file=sys.stderr)
        return 2
    split = quality.leave_last_out(quality.read_movielens_100k(args.data_dir), history_length=50)
    results = compare(chosen_rows(HERE / "results" / "quality_ml100k.json", args.only), split, args.max_epochs)
    command = ".venv/bin/python benchmarks/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(args.out + ".md").write_text(markdown(results, command.strip()))
    Path(args.out + ".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
