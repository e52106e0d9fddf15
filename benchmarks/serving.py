"""Index and serving benchmark.

    .venv/bin/python benchmarks/serving.py [--sizes 100000 1000000] [--grpc-seconds 30] [--skip-quality]

For brute force, IVF and ScaNN over clustered, L2-normalised candidates (d=64) at each size: build seconds,
SavedModel size, in-process single-query p50/p99, batch-256 throughput, recall@10 against exact search; at the
largest size, end-to-end gRPC p50/p99 and QPS through `tfrec-recall serve` on loopback under 1, 8 and 32
concurrent clients; and the quality cost of each index on ML-100K (HR@50 through the exported model).
Writes benchmarks/results/serving.md and .json.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tfrec_recall  # noqa: E402,F401  (selects tf-keras before TensorFlow)
import tensorflow as tf  # noqa: E402

from tfrec_recall.retrievers import IVF, BruteForce, ScaNN, ScaNNConfig  # noqa: E402


def clustered(n, d=64, clusters=2000, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.integers(0, n, 1000)] + 0.1 * rng.normal(size=(1000, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.array([f"c{i}" for i in range(n)]), x, queries.astype(np.float32)


def make_indexes(n):
    lists = int(round(np.sqrt(n) * 2))  # 632 at 100K, 2000 at 1M
    return {
        "brute_force": BruteForce(max_k=100),
        "brute_force_fp16": BruteForce(max_k=100, storage_dtype="float16"),
        "ivf": IVF(max_k=100, num_lists=lists, num_probes=max(12, lists // 100), kmeans_iterations=10,
                   kmeans_sample_size=100_000),
        "scann": ScaNN(ScaNNConfig().tree(num_leaves=int(np.sqrt(n)), num_leaves_to_search=max(10, int(np.sqrt(n)) // 20))
                       .score_ah(2).reorder(100), max_k=100),
    }


class VectorModule(tf.Module):
    """A SavedModel over an index taking query vectors: what the gRPC benchmark serves."""

    def __init__(self, index, dim, k=10):
        super().__init__()
        self.index = index
        self.serve = tf.function(lambda query: dict(zip(("scores", "item_ids"), index(query, k=k))),
                                 input_signature=[tf.TensorSpec([None, dim], tf.float32, name="query")])


def save(index, dim, path):
    options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"] if isinstance(index, ScaNN) else None)
    module = VectorModule(index, dim)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve}, options=options)
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def latency(fn, queries, repeats=300):
    fn(queries[:1])
    times = []
    for i in range(repeats):
        q = queries[i % len(queries)][None, :]
        start = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(fn, queries, batch=256, rounds=5):
    block = queries[:batch]
    fn(block)
    start = time.perf_counter()
    for _ in range(rounds):
        fn(block)
    return batch * rounds / (time.perf_counter() - start)


def grpc_load(port, queries, clients, seconds):
    from tfrec_recall.serving.client import GrpcClient
    latencies, lock, stop = [], threading.Lock(), time.time() + seconds

    def worker(offset):
        client = GrpcClient(f"127.0.0.1:{port}", "bench", timeout=30)
        i, mine = offset, []
        while time.time() < stop:
            start = time.perf_counter()
            client.predict({"query": queries[i % len(queries)][None, :]})
            mine.append((time.perf_counter() - start) * 1000)
            i += clients
        with lock:
            latencies.extend(mine)
        client.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), len(latencies) / elapsed


def start_server(base):
    process = subprocess.Popen([sys.executable, "-m", "tfrec_recall.cli", "serve", "--model-dir", str(base),
                                "--model-name", "bench", "--port", "0", "--workers", "32"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError("server did not start")


def quality_cost(data_dir, epochs):
    from tfrec_recall import training
    from tfrec_recall.config import load_config
    from tfrec_recall.data import leave_last_out, read_movielens_100k
    from tfrec_recall.export import export_retrieval_model
    from tfrec_recall.features import feature_arrays
    split = leave_last_out(read_movielens_100k(data_dir), history_length=50)
    config = load_config("youtube_dnn_mixed", overrides={"epochs": epochs})
    result = training.train(config, split, evaluate_every=0, verbose=0)
    model = result.model
    items = split.data.items
    embeddings = training.embed(model.candidate_tower, training.corpus_arrays(split, model.candidate_tower.encoder.specs))
    features = feature_arrays(split.test, split.data, model.query_tower.encoder.specs)
    tensors = {k: tf.constant(v) for k, v in features.items()}
    rows = [("offline protocol (exact, all training items excluded)", result.metrics["HR@50"])]
    tmp = Path(tempfile.mkdtemp())
    try:
        for name, index in (("brute_force", BruteForce(max_k=50)),
                            ("ivf", IVF(max_k=50, num_lists=80, num_probes=8)),
                            ("scann", ScaNN(ScaNNConfig().tree(num_leaves=40, num_leaves_to_search=4).reorder(100),
                                            max_k=50))):
            path = export_retrieval_model(model, (items, embeddings), index=index, export_dir_base=tmp / name, k=50)
            out = tf.saved_model.load(str(path)).signatures["serving_default"](**tensors)["item_ids"].numpy()
            truth = split.test["item_id"].to_numpy()
            hr = float(np.mean([t.encode() in set(row) for t, row in zip(truth, out)]))
            rows.append((f"export, {name} (serving: excludes the 50-item history)", hr))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--grpc-seconds", type=float, default=30.0)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quality-epochs", type=int, default=10)
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--out", default=str(HERE / "results" / "serving"))
    args = parser.parse_args(argv)
    rows, grpc_rows = [], []
    work = Path(tempfile.mkdtemp())
    try:
        for n in args.sizes:
            ids, x, queries = clustered(n)
            exact = BruteForce(max_k=10).index(ids, x)
            exact_ids = exact(queries, k=10)[1].numpy()
            for name, index in make_indexes(n).items():
                start = time.perf_counter()
                index.index(ids, x)
                build = time.perf_counter() - start
                fn = tf.function(lambda q, index=index: index(q, k=10))
                got = fn(queries)[1].numpy()
                recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, got)]))
                p50, p99 = latency(fn, queries)
                qps = throughput(fn, queries)
                base = work / f"{name}-{n}"
                size = save(index, x.shape[1], base / "1")
                row = dict(index=name, candidates=n, build_s=build, savedmodel_mb=size / 1e6, p50_ms=p50,
                           p99_ms=p99, batch256_qps=qps, recall_at_10=recall)
                print(row, flush=True)
                rows.append(row)
                if n == max(args.sizes) and name != "brute_force_fp16":
                    process, port = start_server(base)
                    try:
                        for clients in (1, 8, 32):
                            g50, g99, gqps = grpc_load(port, queries, clients, args.grpc_seconds)
                            grow = dict(index=name, candidates=n, clients=clients, p50_ms=g50, p99_ms=g99, qps=gqps)
                            print(grow, flush=True)
                            grpc_rows.append(grow)
                    finally:
                        process.terminate()
                        process.wait(timeout=60)
                shutil.rmtree(base, ignore_errors=True)
                del index
    finally:
        shutil.rmtree(work, ignore_errors=True)
    quality = [] if args.skip_quality or not (Path(args.data_dir) / "u.data").is_file() else \
        quality_cost(args.data_dir, args.quality_epochs)
    write(args, rows, grpc_rows, quality)


def write(args, rows, grpc_rows, quality):
    lines = ["# Index and serving benchmark", "",
             "Clustered, L2-normalised candidates (2000 Gaussian clusters, d=64); 1000 queries near candidates; "
             "k=10. One run on this 2-core CPU machine (server and load generator share the 2 cores).", "",
             "Command: `.venv/bin/python benchmarks/serving.py`", "",
             "## In process", "",
             "| index | candidates | build s | SavedModel MB | single-query p50 ms | p99 ms | batch-256 queries/s | recall@10 vs exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['candidates']:,} | {r['build_s']:.1f} | {r['savedmodel_mb']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['batch256_qps']:.0f} | {r['recall_at_10']:.3f} |")
    if grpc_rows:
        lines += ["", f"## End to end over gRPC (`tfrec-recall serve`, loopback, {args.grpc_seconds:g} s per row, "
                  "one query per request)", "",
                  "| index | candidates | concurrent clients | p50 ms | p99 ms | QPS |", "|---|---|---|---|---|---|"]
        for r in grpc_rows:
            lines.append(f"| {r['index']} | {r['candidates']:,} | {r['clients']} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['qps']:.0f} |")
    if quality:
        lines += ["", f"## Quality cost of the index on ML-100K (youtube_dnn_mixed, {args.quality_epochs} epochs)", "",
                  "| path | HR@50 |", "|---|---|"]
        lines += [f"| {name} | {hr:.3f} |" for name, hr in quality]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"in_process": rows, "grpc": grpc_rows,
                                                    "quality": quality}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
