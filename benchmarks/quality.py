"""Retrieval quality on ../shared/PROTOCOL.md (MovieLens 100K, leave-last-out, full corpus, training items
excluded) for the package's model configurations, with and without the logQ / streaming-frequency
correction and with mixed negatives.

    .venv/bin/python benchmarks/quality.py [--data-dir ../shared/data/ml-100k] [--epochs 10] [--only NAME ...]

Prints the table and writes benchmarks/results/quality_ml100k.md (+ .json and a .png bar chart).
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

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
from tfrec_recall.config import load_config  # noqa: E402
from tfrec_recall.data import leave_last_out, read_movielens_100k  # noqa: E402
from tfrec_recall.metrics import full_corpus_metrics  # noqa: E402

MIXED = {"negatives": "mixed", "num_negatives": 2048}
LOGQ = {"logq_correction": True}
CONFIGS = [
    ("TwoTower, ids only", "two_tower", {}),
    ("TwoTower, ids only + logQ", "two_tower", LOGQ),
    ("TwoTower, side features (SENet)", "two_tower_features", {}),
    ("TwoTower, side features (SENet) + logQ", "two_tower_features", LOGQ),
    ("YouTubeDNN user tower", "youtube_dnn", {}),
    ("YouTubeDNN user tower + logQ", "youtube_dnn", LOGQ),
    ("TwoTower, side features, mixed negatives + logQ", "two_tower_features", {**MIXED, **LOGQ}),
    ("YouTubeDNN, mixed negatives", "youtube_dnn", MIXED),
    ("YouTubeDNN, mixed negatives + logQ", "youtube_dnn", {**MIXED, **LOGQ}),
    ("YouTubeDNN, recency pooling, mixed negatives, lr 3e-3", "youtube_dnn",
     {**MIXED, "pooling": "recency", "learning_rate": 0.003}),
]
COLUMNS = ["HR@10", "HR@50", "HR@100", "NDCG@10", "MRR", "Coverage@100"]


def most_popular(split):
    items = split.data.items
    index = {item: i for i, item in enumerate(items)}
    counts = split.train["item_id"].value_counts().reindex(items, fill_value=0).to_numpy(dtype=np.float32)
    queries = np.ones((len(split.test), 1), np.float32)
    positives = [[index[i]] for i in split.test["item_id"]]
    exclude = [[index[i] for i in split.train_items[u]] for u in split.test["user_id"]]
    return full_corpus_metrics(queries, counts[:, None], positives, exclude)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    parser.add_argument("--out", default=str(HERE / "results" / "quality_ml100k"))
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "u.data").is_file():
        print(f"MovieLens 100K is absent at {args.data_dir}; nothing to benchmark", file=sys.stderr)
        return 2
    from tfrec_recall import train as training

    split = leave_last_out(read_movielens_100k(args.data_dir), history_length=50)
    print(split.describe())
    rows = [("Most popular (reference)", most_popular(split), 0.0)]
    for name, preset, overrides in CONFIGS:
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        config = load_config(preset, overrides={"epochs": args.epochs, **overrides})
        start = time.perf_counter()
        result = training.train(config, split, evaluate_every=0, verbose=0)
        print(f"{name}: " + ", ".join(f"{c}={result.metrics[c]:.4f}" for c in COLUMNS)
              + f", train {result.train_seconds:.0f} s (total {time.perf_counter() - start:.0f} s)", flush=True)
        rows.append((name, result.metrics, result.train_seconds))

    header = "| configuration | " + " | ".join(COLUMNS) + " | training s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, metrics, seconds in rows:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.3f}" for c in COLUMNS)
                     + f" | {seconds:.0f} |")
    table = "\n".join(lines)
    note = (f"ML-100K, PROTOCOL.md (943 test users, full corpus of {len(split.data.items)} items, training items "
            f"excluded); {args.epochs} epochs, batch 512, Adam 1e-3, temperature 0.05, L2-normalised 64-d "
            "outputs (unless the row says otherwise); mixed = in-batch plus 2048 uniform corpus negatives per step. One run each on this "
            "2-core CPU machine, seed 0.\nReference (PROTOCOL.md): TFRS tutorial two-tower HR@10/50/100 "
            "0.062/0.257/0.388; EASE 0.139/0.394/0.555.\n\nCommand: `.venv/bin/python benchmarks/quality.py`\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("# Retrieval quality on MovieLens 100K\n\n" + note + "\n" + table + "\n")
    out.with_suffix(".json").write_text(json.dumps([{"configuration": n, "metrics": m, "train_seconds": s}
                                                    for n, m, s in rows], indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(table)
    return 0


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))
    for offset, key in zip((-0.27, 0.0, 0.27), ("HR@10", "HR@50", "HR@100")):
        ax.barh(y + offset, [r[1][key] for r in rows], height=0.25, label=key)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.394, color="grey", ls="--", lw=0.8)
    ax.text(0.396, -0.75, "EASE HR@50", fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("hit rate (ML-100K, leave-last-out, full corpus)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
