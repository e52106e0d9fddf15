"""Deep Retrieval (Gao et al. 2020) on MovieLens 100K: the structure grid next to brute force on the same
user encoder, with every choice made on the validation split.

    .venv/bin/python benchmarks/deep_retrieval.py [--data-dir ../shared/data/ml-100k] [--max-epochs 30]
    .venv/bin/python benchmarks/deep_retrieval.py --report-only

Each grid point (D layers in {2, 3}, K codes in {32, 100}, J paths per item in {1, 3}) trains the baseline
preset (youtube_dnn_mixed) with ``deep_retrieval: true`` (an M-step after every epoch, path-size penalty
alpha = ALPHA, serving beam B = BEAM) with seed 0, early stopping on validation HR@50 through the beam-search
index (patience 3, best epoch restored). Every trained model is measured three ways on validation and test:
beam search + the jointly trained reranker, beam search ranked by path probability (no reranker), and brute
force over the same towers (the two-tower model the user encoder also is); with the number of items the
reranker scores per query. The grid point with the best validation HR@50 (with the reranker) is then trained
with seeds 1 and 2; the report gives its test metrics as mean +- sd over seeds 0-2. Test numbers of the other
grid points are logged but not used for any choice.

Finished runs go to benchmarks/results/deep_retrieval_runs.jsonl (a rerun skips them); the report is
benchmarks/results/deep_retrieval.md / .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
from quality import NotRun, RunLog, grid_points  # noqa: E402
from tfrec_recall.config import load_config  # noqa: E402
from tfrec_recall.data import leave_last_out, read_movielens_100k  # noqa: E402

PRESET = "youtube_dnn_mixed"
ROW = "Deep Retrieval"
GRID = {"dr_layers": [2, 3], "dr_codes": [32, 100], "dr_paths": [1, 3]}
ALPHA = 1e-4  # fixed beforehand (not tuned): the penalty increment alpha * |c|^3 is ~12 at 50 items on a path
BEAM = 20  # paths searched per query in training's model selection and the tables
BEAMS = (5, 10, 20, 50, 100)  # serving beam widths measured on the same trained model (no retraining)
SEEDS = (0, 1, 2)
SELECTION = "HR@50"
KS = (10, 50, 100)
WAYS = ("reranked", "path_probability", "brute_force")


def measure(model, config, split, which: str) -> dict:
    """``which``'s metrics three ways (module docstring) and the mean number of items scored per query."""
    from tfrec_recall.evaluation import evaluate
    from tfrec_recall.evaluation.evaluate import corpus_arrays, embed
    from tfrec_recall.features import feature_arrays
    from tfrec_recall.retrievers.deep_retrieval import items_scored
    from tfrec_recall.training.deep_retrieval import deep_retrieval_index
    items = np.asarray(split.data.items).astype(str)
    vectors = embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.input_specs))
    rows = split.valid if which == "valid" else split.test
    queries = model(feature_arrays(rows, split.data, model.query_tower.input_specs), training=False).numpy()
    out = {"brute_force": evaluate(model, split, which, KS), "beams": {}}
    for way, rerank in (("reranked", True), ("path_probability", False)):
        index = deep_retrieval_index(model, items, vectors, beam_width=config.dr_beam_width, rerank=rerank,
                                     max_k=len(items))
        out[way] = evaluate(model, split, which, KS, retriever=index)
    out["items_scored"] = float(items_scored(index, queries).mean())
    out["unreachable_items"] = index.unreachable
    for beam in BEAMS:  # the reranked recall / cost curve of the same model
        index = deep_retrieval_index(model, items, vectors, beam_width=beam, max_k=len(items))
        metrics = evaluate(model, split, which, KS, retriever=index)
        out["beams"][str(beam)] = {**{m: metrics[m] for m in ("HR@50", "HR@100")},
                                   "items_scored": float(items_scored(index, queries).mean())}
    return out


def run(log: RunLog, split, overrides: dict, seed: int, max_epochs: int) -> dict:
    done = log.get(ROW, overrides, seed, max_epochs)
    if done is not None:
        return done
    if log.report_only:
        raise NotRun(f"{overrides} seed {seed}")
    from tfrec_recall import training
    config = load_config(PRESET, overrides={"deep_retrieval": True, "dr_alpha": ALPHA, "dr_beam_width": BEAM,
                                            **overrides, "seed": seed, "epochs": max_epochs, "patience": 3,
                                            "selection_metric": SELECTION})
    start = time.perf_counter()
    result = training.train(config, split, verbose=0)
    record = {"row": ROW, "preset": PRESET, "overrides": overrides, "seed": seed, "max_epochs": max_epochs,
              "best_epoch": result.best_epoch, "epochs_run": len(result.history["loss"]),
              "history": {k: result.history[k] for k in ("path_structure", "path_bound", "paths_used",
                                                           "max_path_size", "unreachable_items")},
              "valid": measure(result.model, config, split, "valid"),
              "test": measure(result.model, config, split, "test"),
              "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - start}
    log.add(record)
    v = record["valid"]
    print(f"  {overrides} seed {seed}: valid {SELECTION} reranked {v['reranked'][SELECTION]:.4f}, by path "
          f"probability {v['path_probability'][SELECTION]:.4f}, brute force {v['brute_force'][SELECTION]:.4f}; "
          f"{v['items_scored']:.0f} items scored ({record['wall_seconds']:.0f} s)", flush=True)
    return record


def _mean_sd(values) -> str:
    values = [float(v) for v in values]
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


SCALE_POINTER = ("At 1,000,000 items (synthetic), items scored per query and p50 latency against brute force and "
                 "IVF: `benchmarks/results/deep_retrieval_scale.md` (`benchmarks/deep_retrieval_scale.py`).")


def write_report(grid_records, chosen, seeds_records, split, out: Path, command: str) -> None:
    """The grid on validation, then the chosen point's test metrics over the seeds."""
    lines = ["| D | K | J | K^D | valid HR@50 reranked | by path probability | brute force (same towers) | items "
             "scored per query | max items on a path | epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in grid_records:
        o, v = r["overrides"], r["valid"]
        lines.append(f"| {o['dr_layers']} | {o['dr_codes']} | {o['dr_paths']} | {o['dr_codes'] ** o['dr_layers']:,} | "
                     + " | ".join(f"{v[w][SELECTION]:.3f}" for w in WAYS)
                     + f" | {v['items_scored']:.0f} | {int(r['history']['max_path_size'][-1])} | "
                     f"{r['best_epoch']} of {r['epochs_run']} |")
    test = ["| way | " + " | ".join(f"test {m}" for m in ("HR@10", "HR@50", "HR@100")) + " | items scored |",
            "|---|---|---|---|---|"]
    scored = _mean_sd([r["test"]["items_scored"] for r in seeds_records])
    for way in WAYS:
        test.append(f"| {way.replace('_', ' ')} | " + " | ".join(
            _mean_sd([r["test"][way][m] for r in seeds_records]) for m in ("HR@10", "HR@50", "HR@100"))
            + f" | {scored if way != 'brute_force' else len(split.data.items)} |")
    best = seeds_records[0]
    curve = ["| beam width B | valid HR@50 | valid HR@100 | items scored per query |", "|---|---|---|---|"]
    curve += [f"| {b} | {v['HR@50']:.3f} | {v['HR@100']:.3f} | {v['items_scored']:.0f} |"
              for b, v in best["valid"]["beams"].items()]
    curve.append(f"| brute force | {best['valid']['brute_force']['HR@50']:.3f} | "
                 f"{best['valid']['brute_force']['HR@100']:.3f} | {len(split.data.items)} |")
    text = ("# Deep Retrieval on MovieLens 100K\n\n"
            f"Preset `{PRESET}` with `deep_retrieval: true`: the M-step after every epoch (candidate beam 10, "
            f"alpha = {ALPHA}, fixed beforehand), served by beam search of width B = {BEAM}. Each model is "
            "measured three ways: beam search + the jointly trained reranker (the two-tower score), beam search "
            "ranked by path probability, and brute force over the same towers. "
            f"{len(split.test)} test users, {len(split.data.items)} items, training items excluded.\n\n"
            f"## Grid (seed 0, validation {SELECTION}; the choice is made on the reranked column)\n\n"
            + "\n".join(lines)
            + f"\n\nChosen on validation: D = {chosen['dr_layers']}, K = {chosen['dr_codes']}, "
            f"J = {chosen['dr_paths']}."
            f"\n\n## Beam width: recall against items scored (chosen point, seed 0, validation)\n\n"
            + "\n".join(curve)
            + f"\n\n## Test, chosen point, B = {BEAM}, seeds {', '.join(map(str, SEEDS))} (mean ± sd)\n\n"
            + "\n".join(test)
            + f"\n\nCommand: `{command}`\n\n{SCALE_POINTER}\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"grid": grid_records, "chosen": chosen,
                                                    "seeds": seeds_records}, indent=2))
    print(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "results" / "deep_retrieval"))
    parser.add_argument("--report-only", action="store_true", help="train nothing: report from the run log")
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "u.data").is_file():
        print(f"MovieLens 100K is absent at {args.data_dir}; nothing to benchmark", file=sys.stderr)
        return 2
    split = leave_last_out(read_movielens_100k(args.data_dir), history_length=50)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = RunLog(out.parent / "deep_retrieval_runs.jsonl", fresh=False, report_only=args.report_only)
    try:
        grid = [run(log, split, point, 0, args.max_epochs) for point in grid_points(GRID)]
        best = max(grid, key=lambda r: r["valid"]["reranked"][SELECTION])["overrides"]
        seeds = [run(log, split, best, seed, args.max_epochs) for seed in SEEDS]
    except NotRun as missing:
        print(f"not reported: the run log lacks {missing}", file=sys.stderr)
        return 1
    write_report(grid, best, seeds, split, out, "benchmarks/deep_retrieval.py --max-epochs "
                 f"{args.max_epochs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
