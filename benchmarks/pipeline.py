"""Time of one local TFX pipeline run (LocalDagRunner, Beam DirectRunner, SQLite ML Metadata), per component,
on the synthetic default and on MovieLens 100K (../shared), each in a fresh pipeline root (no cache).

    .venv/bin/python benchmarks/pipeline.py [--work-dir DIR] [--only synthetic|ml-100k] [--epochs N]
        [--side-features]

Prints the table and writes benchmarks/results/pipeline.md and pipeline.json (with --side-features: the datasets'
user and item tables joined in by the pipeline and the default preset's side features on,
pipeline_side_features.md / .json). The work directory (artifacts, metadata, serving directory) is a new temporary
directory unless --work-dir is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
warnings.filterwarnings("ignore", category=FutureWarning)

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
from pipelines.cli import builtin_side_inputs, materialise  # noqa: E402
from pipelines.pipeline import create_pipeline  # noqa: E402
from pipelines.runners import executions, metadata_path, run_local  # noqa: E402

ML100K = HERE.parent.parent / "shared" / "data" / "ml-100k"


def run(name: str, work: Path, epochs: int, side_features: bool):
    root = work / name
    data = materialise(name, str(root), str(ML100K) if name == "ml-100k" else None)
    side = builtin_side_inputs(name, str(root)) if side_features else {}
    pipeline = create_pipeline(pipeline_name=f"bench-{name}", pipeline_root=str(root / "root"),
                               data_root=data, serving_dir=str(root / "serving"),
                               id_type="int" if name == "ml-100k" else "string", config={"epochs": epochs},
                               metadata_path=metadata_path(str(root / "root")), **side)
    start = time.time()
    run_local(pipeline)
    total = time.time() - start
    records = executions(metadata_path(str(root / "root")))
    evaluation = json.loads(Path(next(e for e in records if e.component == "RetrievalEvaluator")
                                 .outputs["evaluation"]["uri"], "metrics.json").read_text())
    rows = [(e.component, e.state, e.seconds) for e in records]
    return {"dataset": name, "epochs": epochs, "total_seconds": total, "components": rows,
            "blessed": evaluation["blessed"], "test": evaluation["metrics"]["test"],
            "eval_hr50": evaluation["metrics"]["eval"]["HR@50"],
            "popularity_eval_hr50": evaluation["popularity_metrics"]["eval"]["HR@50"],
            "pushed": sorted(p.name for p in (root / "serving").iterdir())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir")
    parser.add_argument("--only", choices=("synthetic", "ml-100k"), action="append")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--side-features", action="store_true",
                        help="join the datasets' side tables in the pipeline and train with them")
    args = parser.parse_args()
    names = args.only or ["synthetic", "ml-100k"]
    if "ml-100k" in names and not ML100K.is_dir():
        print(f"skipping ml-100k: {ML100K} not found")
        names.remove("ml-100k")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="tfrec-pipeline-bench-"))
    results = [run(name, work, args.epochs, args.side_features) for name in names]
    components = [c for c, _, _ in results[0]["components"]]
    lines = ["| component | " + " | ".join(f"{r['dataset']} (s)" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for component in components:
        cells = []
        for r in results:
            seconds = {c: s for c, _, s in r["components"]}
            cells.append(f"{seconds.get(component, float('nan')):.1f}")
        lines.append(f"| {component} | " + " | ".join(cells) + " |")
    lines.append("| **whole run (wall clock)** | " + " | ".join(f"**{r['total_seconds']:.0f}**" for r in results) + " |")
    lines.append("")
    for r in results:
        t = r["test"]
        lines.append(f"- {r['dataset']}: at most {args.epochs} epochs, validation HR@50 {r['eval_hr50']:.3f} against "
                     f"most-popular {r['popularity_eval_hr50']:.3f}, blessed {r['blessed']}, pushed versions "
                     f"{r['pushed']}; test HR@10/50/100 = {t['HR@10']:.3f} / {t['HR@50']:.3f} / {t['HR@100']:.3f}")
    table = "\n".join(lines)
    print(table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem, flag = ("pipeline_side_features", " --side-features") if args.side_features else ("pipeline", "")
    command = " ".join(["--only " + n for n in (args.only or [])] + [f"--epochs {args.epochs}"]) + flag
    (out / f"{stem}.md").write_text(
        f"# Local pipeline run, per component\n\n`.venv/bin/python benchmarks/pipeline.py {command}` (2-core CPU, "
        "no cache, LocalDagRunner + DirectRunner + SQLite MLMD; times from ML Metadata, create to last update)."
        + ("\nThe datasets' user and item tables are joined onto the split examples (JoinSideFeatures) and the "
           "default preset trains with them." if args.side_features else "") + "\n\n" + table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
