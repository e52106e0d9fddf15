"""Serving agrees with offline evaluation: HR@K of the exported SavedModel against ``evaluate`` on ML-100K.

    PYTHONPATH=. .venv/bin/python benchmarks/export_agreement.py [--data-dir ../shared/data/ml-100k] [--k 100]

1. Trains the default preset (``tfrec_recall.config.DEFAULT_PRESET``, the configuration selected on validation,
   with its own epochs and early stopping on validation HR@50) on ML-100K, leave-last-out.
2. Offline: ``tfrec_recall.evaluate`` on the test rows (exact, full corpus, the user's training items
   excluded, tie-aware expected ranks).
3. Served: exports with each index of ``INDEXES`` (``export.make_index``), loads each
   with ``tf.saved_model.load`` and calls its ``serve_with_exclusions`` signature on the same test users with
   each user's full training history (what the offline protocol excludes) as ``exclude_item_ids``; HR@K is
   whether a test item is among the first K returned ids. For contrast, the brute-force export's
   ``serving_default`` (which excludes only the 50-item history feature) is measured too.

Writes benchmarks/results/export_agreement.md and .json. Exits 2 with a message when ML-100K is absent.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tfrec_recall  # noqa: E402,F401  (selects tf-keras before TensorFlow)
import tensorflow as tf  # noqa: E402

from tfrec_recall._validation import require_positive_int  # noqa: E402
from tfrec_recall.data.schema import ITEM_ID, USER_ID  # noqa: E402

KS = (10, 50, 100)
TOLERANCE = 0.005  # on HR@50, brute force
# label -> make_index arguments: what `--index NAME` gives (ivf / scann fall back to exact search below
# export.EXACT_SEARCH_BELOW candidates), and the approximate indexes forced over this corpus, untuned (the
# previous defaults) and tuned to recall 0.95 at the export's k.
INDEXES = {
    "brute_force": ("brute_force", {}),
    "ivf (default)": ("ivf", {}),
    "scann (default)": ("scann", {}),
    "ivf forced, untuned": ("ivf", {"exact_search_below": 0, "target_recall": None}),
    "ivf forced, tuned to 0.95": ("ivf", {"exact_search_below": 0}),
    "scann forced, untuned": ("scann", {"exact_search_below": 0, "target_recall": None}),
    "scann forced, tuned to 0.95": ("scann", {"exact_search_below": 0}),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "ml-100k"),
                        help="MovieLens 100K directory (u.data, u.item, u.user)")
    parser.add_argument("--k", type=int, default=max(KS), help="the exports' k (>= the largest cut-off)")
    parser.add_argument("--batch-size", type=int, default=64, help="test users per signature call")
    parser.add_argument("--out", default=str(HERE / "results" / "export_agreement"))
    args = parser.parse_args(argv)
    require_positive_int("--k", args.k)
    require_positive_int("--batch-size", args.batch_size)
    if args.k < max(KS):
        parser.error(f"--k must be >= {max(KS)} (the largest cut-off), got {args.k}")
    return args


def evaluation_queries(model, split):
    """Per test user (in evaluate's order): query features, positives, and the offline exclusions (training
    items minus the user's positives, as metrics.full_corpus_metrics removes them)."""
    from tfrec_recall.features import feature_arrays
    rows = split.test
    positives = rows.groupby(USER_ID, sort=False)[ITEM_ID].agg(list)
    users = rows.drop_duplicates(USER_ID).reset_index(drop=True)
    features = feature_arrays(users, split.data, model.query_tower.encoder.specs)
    truth = [set(positives[u]) for u in users[USER_ID]]
    exclude = [[i for i in split.train_items.get(u, []) if i not in truth[n]] for n, u in enumerate(users[USER_ID])]
    return features, truth, exclude


def served_hit_rates(signature, features: Dict[str, np.ndarray], truth: List[set],
                     exclude, batch_size: int) -> Dict[str, float]:
    """HR@K from the signature's top-k lists (``exclude`` None: the signature takes no exclusion input)."""
    hits = {k: 0 for k in KS}
    for start in range(0, len(truth), batch_size):
        stop = min(start + batch_size, len(truth))
        inputs = {name: tf.constant(value[start:stop]) for name, value in features.items()}
        if exclude is not None:
            rows = exclude[start:stop]
            width = max(len(r) for r in rows)
            inputs["exclude_item_ids"] = tf.constant(
                np.array([r + [""] * (width - len(r)) for r in rows], dtype=object).reshape(len(rows), width))
        ids = signature(**inputs)["item_ids"].numpy().astype(str)
        for row, user in zip(ids, range(start, stop)):
            for k in KS:
                hits[k] += bool(truth[user] & set(row[:k]))
    return {f"HR@{k}": hits[k] / len(truth) for k in KS}


def measure_export(name: str, model, candidates, queries, args, work: Path) -> List[dict]:
    """Exports with the index ``INDEXES[name]``, reloads it and measures its signatures."""
    from tfrec_recall.export import export_retrieval_model, make_index
    features, truth, exclude = queries
    kind, options = INDEXES[name]
    index = make_index(kind, args.k, len(candidates[0]), **options)
    path = export_retrieval_model(model, candidates, index=index, export_dir_base=work / str(len(list(work.iterdir()))),
                                  k=args.k)
    manifest = json.loads(tf.io.gfile.GFile(str(path / "assets" / "manifest.json")).read())
    loaded = tf.saved_model.load(str(path))
    out = []
    plans = [("serve_with_exclusions", exclude)] + ([("serving_default", None)] if name == "brute_force" else [])
    for signature, rows in plans:
        start = time.perf_counter()
        metrics = served_hit_rates(loaded.signatures[signature], features, truth, rows, args.batch_size)
        out.append({"index": name, "signature": signature, "metrics": metrics, "index_parameters": manifest["index"],
                    "index_recall": manifest.get("index_recall"),
                    "seconds": time.perf_counter() - start})
        print(f"{name} {signature}: {metrics}", flush=True)
    return out


def run(args) -> dict:
    from tfrec_recall import training
    from tfrec_recall.config import DEFAULT_PRESET, load_config
    from tfrec_recall.data.registry import load_dataset, make_split
    config = load_config(DEFAULT_PRESET)
    split = make_split(load_dataset("ml-100k", args.data_dir), "leave_last_out", config.history_length)
    print(split.describe(), flush=True)
    result = training.train(config, split, verbose=0)
    model = result.model
    offline = training.evaluate(model, split, "test", KS)
    print(f"offline: {offline}", flush=True)
    candidates = (split.data.items, training.embed(model.candidate_tower,
                                                   training.corpus_arrays(split, model.candidate_tower.encoder.specs)))
    queries = evaluation_queries(model, split)
    work = Path(tempfile.mkdtemp(prefix="export-agreement-"))
    try:
        served = [row for name in INDEXES for row in measure_export(name, model, candidates, queries, args, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"preset": DEFAULT_PRESET, "config": config.to_dict(), "best_epoch": result.best_epoch,
            "epochs_run": len(result.history["loss"]), "test_users": len(queries[1]),
            "candidates": int(len(split.data.items)), "k": args.k,
            "offline": {f"HR@{k}": offline[f"HR@{k}"] for k in KS}, "served": served}


def report(results: dict, command: str) -> str:
    offline = results["offline"]
    lines = ["# Exported model vs offline evaluation on ML-100K", "", f"Command: `{command}`", "",
             f"Default preset `{results['preset']}` (selected on validation), trained with its early stopping "
             f"(best epoch {results['best_epoch']} of {results['epochs_run']}); {results['test_users']} test users, "
             f"{results['candidates']} candidates, exports with k = {results['k']}. Offline = "
             "`tfrec_recall.evaluate` (exact, full corpus, training items excluded, expected rank under "
             "random tie-breaking). Served = the SavedModel loaded with `tf.saved_model.load`, HR@K from its "
             "top-k list; `serve_with_exclusions` gets each user's full training history as `exclude_item_ids`.",
             "", "| path | " + " | ".join(f"HR@{k}" for k in KS) + " | " + " | ".join(f"Δ HR@{k}" for k in KS)
             + " |", "|---|" + "---|" * (2 * len(KS))]
    lines.append("| offline `evaluate` | " + " | ".join(f"{offline[f'HR@{k}']:.4f}" for k in KS) + " |"
                 + " - |" * len(KS))
    for row in results["served"]:
        m = row["metrics"]
        lines.append(f"| {row['index']}, `{row['signature']}` | " + " | ".join(f"{m[f'HR@{k}']:.4f}" for k in KS)
                     + " | " + " | ".join(f"{m[f'HR@{k}'] - offline[f'HR@{k}']:+.4f}" for k in KS) + " |")
    bf = next(r for r in results["served"] if r["index"] == "brute_force" and r["signature"] == "serve_with_exclusions")
    gap = abs(bf["metrics"]["HR@50"] - offline["HR@50"])
    lines += ["", f"Brute force with exclusions: |Δ HR@50| = {gap:.4f} "
              f"({'within' if gap <= TOLERANCE else 'OUTSIDE'} the {TOLERANCE} tolerance).", "",
              "Index parameters and the recall measured at build (manifest `index_recall`):", ""]
    lines += [f"- {r['index']}: `{json.dumps(r['index_parameters'], sort_keys=True)}`; recall "
              f"`{json.dumps(r['index_recall'], sort_keys=True)}`"
              for r in results["served"] if r["signature"] == "serve_with_exclusions"]
    lines += ["", "Notes: the offline metric is tie-aware (a positive tied with other candidates takes its expected "
              "rank); a served top-k list breaks ties by the index's order and carries no tie information. With a "
              "trained model's continuous scores exact ties are rare, so the two agree up to them. "
              "`serving_default` excludes only the history feature (the last 50 training items), so items seen "
              "earlier take places in the top k: the gap in its row is the reason for `serve_with_exclusions`. "
              "`ivf` / `scann` asked for with default sizes over this 1682-item corpus give exact search "
              "(export.EXACT_SEARCH_BELOW); the forced rows build the approximate index anyway, with the previous "
              "fixed defaults (untuned) and tuned at build time to recall 0.95 at k against exact search on "
              "queries drawn near the corpus. Approximate indexes lose more with exclusions than their recall "
              "suggests: for users with long histories the probed lists / leaves are largely excluded items."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not tf.io.gfile.exists(str(Path(args.data_dir) / "u.data")):
        print(f"MovieLens 100K is absent at {args.data_dir} (no u.data); skipping the export agreement benchmark",
              file=sys.stderr)
        return 2
    command = "PYTHONPATH=. python benchmarks/export_agreement.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    results = run(args)
    results["command"] = command.strip()
    text = report(results, results["command"])
    out = Path(args.out)
    tf.io.gfile.makedirs(str(out.parent))
    with tf.io.gfile.GFile(str(out.with_suffix(".md")), "w") as f:
        f.write(text)
    with tf.io.gfile.GFile(str(out.with_suffix(".json")), "w") as f:
        f.write(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
