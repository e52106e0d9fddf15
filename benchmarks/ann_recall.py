"""Recall of the approximate indexes at their defaults and tuned to a target recall, and the corpus size below
which exact search is as good a choice (``tfrec_recall.export.EXACT_SEARCH_BELOW``).

Data (not benchmarks/serving.py's, which is L2-normalised with queries next to corpus rows): ``centres``
N(0, I) centres in d=64, equally likely, points = centre + ``noise`` x N(0, I), not normalised (maximum inner
product search, where norms differ); the queries are fresh draws from the same mixture (not corpus rows).
For IVF and ScaNN as ``make_index`` sizes them (IVF: 2 sqrt(n) lists, 1 % probed;
ScaNN: sqrt(n) leaves, 10 % searched, 100 re-scored), without tuning and tuned to recall 0.95 at k=100 and at
k=10: recall@10 and recall@100 against exact search, build seconds (tuning included), single-query p50 ms, and
the chosen probes / leaves. The fallback section times BruteForce against both indexes tuned at k=100 for
smaller corpora in the same process.

    PYTHONPATH=. python benchmarks/ann_recall.py --num-candidates 1000000 --out benchmarks/results/ann_recall
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import tfrec_recall  # noqa: F401  (selects tf-keras before TensorFlow)
import tensorflow as tf

from tfrec_recall.export import make_index
from tfrec_recall.retrievers.tuning import exact_top_k, recall_at_k


def mixture(n: int, num_queries: int, d: int = 64, centres: int = 1000, noise: float = 0.5, seed: int = 0):
    """(candidates [n, d], queries [num_queries, d]) from one seeded Gaussian mixture of equal weights."""
    rng = np.random.Generator(np.random.PCG64(seed))
    means = rng.standard_normal((centres, d))

    def draw(count):
        x = means[rng.integers(0, centres, size=count)] + noise * rng.standard_normal((count, d))
        return x.astype(np.float32)

    return draw(n), draw(num_queries)


def p50_ms(index, queries: np.ndarray, k: int, repeats: int = 200) -> float:
    """Median ms of one single-query call of the traced search."""
    search = tf.function(lambda q: index(q, k=k), input_signature=[tf.TensorSpec([1, queries.shape[1]])])
    for row in range(5):
        search(queries[row:row + 1])
    times = []
    for row in range(repeats):
        start = time.perf_counter()
        search(queries[row % len(queries):row % len(queries) + 1])
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def built(kind: str, k: int, target, x: np.ndarray):
    """A make_index index of ``kind`` for k (no fallback), built over x; (index, build seconds)."""
    index = make_index(kind, k, len(x), target_recall=target, exact_search_below=0)
    start = time.perf_counter()
    index.index(np.arange(len(x)).astype(str), x)
    return index, time.perf_counter() - start


def setting(index) -> dict:
    config = getattr(index, "config", None)
    if config is not None:
        return {"leaves": config.num_leaves, "leaves_to_search": config.num_leaves_to_search,
                "reorder": config.num_reordering_candidates}
    return {"lists": getattr(index, "num_lists", None), "probes": getattr(index, "num_probes", None)}


def recall_row(kind: str, k: int, target, x, queries, exact) -> dict:
    index, seconds = built(kind, k, target, x)
    _, found = index(tf.constant(queries), k=k)
    found = found.numpy().astype(int)
    row = {"index": kind, "tuned_k": k if target is not None else None, "target_recall": target,
           "recall@10": recall_at_k(exact[:, :10], found[:, :10]),
           "recall@100": recall_at_k(exact, found) if k >= 100 else None, "build_s": seconds,
           "p50_ms": p50_ms(index, queries, k), **setting(index),
           "tuning_measured_recall": (index.recall_report() or {}).get("measured_recall")}
    print(json.dumps(row), flush=True)
    return row


def fallback_rows(sizes, k: int = 100):
    """Single-query p50 of BruteForce and of IVF / ScaNN tuned to 0.95 at k, per corpus size."""
    rows = []
    for n in sizes:
        x, queries = mixture(n, 300, seed=1)
        row = {"num_candidates": n}
        for kind in ("brute_force", "ivf", "scann"):
            index, seconds = built(kind, k, 0.95, x)
            row[f"{kind}_p50_ms"] = p50_ms(index, queries, k)
            row[f"{kind}_build_s"] = seconds
        row["ivf_speedup"] = row["brute_force_p50_ms"] / row["ivf_p50_ms"]
        row["scann_speedup"] = row["brute_force_p50_ms"] / row["scann_p50_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def threshold(rows, speedup: float = 2.0):
    """Smallest measured size from which on both indexes are at least ``speedup`` times faster than exact."""
    fast = [min(r["ivf_speedup"], r["scann_speedup"]) >= speedup for r in rows]
    for i, row in enumerate(rows):
        if all(fast[i:]):
            return row["num_candidates"]
    return None


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(args, command: str, rows, fallback, limit) -> str:
    lines = ["# Recall of the approximate indexes: defaults and tuned to a target recall", "",
             f"Command: `{command}`", "",
             f"Candidates: {args.num_candidates:,} x 64, {args.centres} equally likely N(0, I) centres, noise "
             f"{args.noise}, not normalised (seed {args.seed}); {args.num_queries} fresh queries from the same "
             "mixture. Recall against exact top-100 (TF matmul). One run on this 2-core machine.", "",
             "| index | tuned at k | target | recall@10 | recall@100 | build s (with tuning) | single-query p50 ms "
             "| lists / leaves | probes / leaves searched | reorder | recall measured by the tuning |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["index"], r["tuned_k"] or "— (untuned)", r["target_recall"], r["recall@10"], r["recall@100"],
                 r["build_s"], r["p50_ms"], r.get("lists", r.get("leaves")),
                 r.get("probes", r.get("leaves_to_search")), r.get("reorder"), r["tuning_measured_recall"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "## Fallback threshold (exact search below it)", "",
              "Single-query p50 ms at k=100, BruteForce vs IVF and ScaNN sized by make_index and tuned to 0.95, "
              "same process, same mixture (seed 1), 300 queries.", "",
              "| candidates | brute_force ms | ivf ms | scann ms | ivf speed-up | scann speed-up | ivf build s "
              "| scann build s |", "|---|---|---|---|---|---|---|---|"]
    for r in fallback:
        cells = [f"{r['num_candidates']:,}", r["brute_force_p50_ms"], r["ivf_p50_ms"], r["scann_p50_ms"],
                 r["ivf_speedup"], r["scann_speedup"], r["ivf_build_s"], r["scann_build_s"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", f"Threshold: the smallest measured size from which on both indexes answer at least 2x faster "
                  f"than BruteForce: **{_cell(limit)}** candidates (tfrec_recall.export.EXACT_SEARCH_BELOW)."]
    return "\n".join(lines) + "\n"


def write(out: str, text: str, payload: dict) -> None:
    tf.io.gfile.makedirs(os.path.dirname(out) or ".")
    with tf.io.gfile.GFile(out + ".md", "w") as f:
        f.write(text)
    with tf.io.gfile.GFile(out + ".json", "w") as f:
        f.write(json.dumps(payload, indent=2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-candidates", type=int, default=1_000_000)
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--centres", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fallback-sizes", default="5000,10000,20000,50000,100000,200000")
    parser.add_argument("--skip-main", action="store_true", help="only the fallback threshold")
    parser.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    args = parser.parse_args(argv)
    command = "PYTHONPATH=. python benchmarks/ann_recall.py " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:])
    sizes = [int(s) for s in args.fallback_sizes.split(",") if s]
    fallback = fallback_rows(sizes)
    limit = threshold(fallback)
    rows = []
    if not args.skip_main:
        x, queries = mixture(args.num_candidates, args.num_queries, centres=args.centres, noise=args.noise,
                             seed=args.seed)
        exact = exact_top_k(queries, x, 100)
        for kind in ("ivf", "scann"):
            for k, target in ((100, None), (100, 0.95), (10, 0.95)):
                rows.append(recall_row(kind, k, target, x, queries, exact))
    write(args.out, markdown(args, command, rows, fallback, limit),
          {"command": command, "arguments": vars(args), "rows": rows, "fallback": fallback, "threshold": limit})


if __name__ == "__main__":
    main()
