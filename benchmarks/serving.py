"""Index and serving benchmark.

    .venv/bin/python benchmarks/serving.py [--sizes 100000 1000000] [--grpc-seconds 30] [--skip-quality]
    .venv/bin/python benchmarks/serving.py --multi-query-only

For brute force, IVF and ScaNN over clustered, L2-normalised candidates (d=64) at each size: build seconds,
SavedModel size, in-process single-query p50/p99, batch-256 throughput, recall@10 against exact search; at the
largest size, end-to-end gRPC p50/p99 and QPS through `tfrec-recall serve` on loopback under 1, 8 and 32
concurrent clients; at the largest size, single-query vs multi-query (K = 4 query vectors per user, merged by
MultiQueryRetriever) p50/p99, interleaved; and the quality cost of each index on ML-100K (HR@50 through the
exported model). Writes benchmarks/results/serving.md and .json. ``--multi-query-only`` builds only the IVF index
at the largest size and replaces only the multi-query section of serving.md (and the "multi_query" key of
serving.json), keeping the rest.
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

from tfrec_recall.retrievers import IVF, BruteForce, MultiQueryRetriever, ScaNN, ScaNNConfig  # noqa: E402

INTERESTS = 4  # K: query vectors per user in the multi-query benchmark
MULTI_QUERY_HEADING = f"## Multi-query search (K = {INTERESTS} interests per user)"
MULTI_QUERY_INDEXES = ("brute_force", "ivf", "scann")  # measured at the largest size in the full run


def clustered(n, d=64, clusters=2000, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.integers(0, n, 1000)] + 0.1 * rng.normal(size=(1000, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.array([f"c{i}" for i in range(n)]), x, queries.astype(np.float32)


def make_ivf(n):
    lists = int(round(np.sqrt(n) * 2))  # 632 at 100K, 2000 at 1M
    return IVF(max_k=100, num_lists=lists, num_probes=max(12, lists // 100), kmeans_iterations=10,
               kmeans_sample_size=100_000)


def make_indexes(n):
    return {
        "brute_force": BruteForce(max_k=100),
        "brute_force_fp16": BruteForce(max_k=100, storage_dtype="float16"),
        "ivf": make_ivf(n),
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


def user_queries(queries, interests=INTERESTS):
    """[len(queries) // interests, interests, d]: user i's interests are rows i, i + u, i + 2u, ... (u users), so
    each user's queries lie near different (random) candidates, mostly in different clusters."""
    users = len(queries) // interests
    return np.stack([queries[j * users:(j + 1) * users] for j in range(interests)], axis=1)


def timed_ms(fn, x):
    start = time.perf_counter()
    fn(x)
    return (time.perf_counter() - start) * 1000


def multi_query_latency(name, index, queries, k=10, repeats=300):
    """Single-query ([1, d]) vs multi-query ([1, K, d] through MultiQueryRetriever) latency of one built index,
    interleaved in one loop (which goes first alternates) so machine noise hits both alike."""
    single = tf.function(lambda q: index(q, k=k))
    retriever = MultiQueryRetriever(index)
    multi = tf.function(lambda q: retriever(q, k=k))
    users = user_queries(queries)
    for i in range(5):  # warm-up (tracing, first-touch of the index)
        single(queries[i][None, :])
        multi(users[i][None])
    times = {"single": [], "multi": []}
    for i in range(repeats):
        calls = [("single", single, queries[i % len(queries)][None, :]), ("multi", multi, users[i % len(users)][None])]
        for key, fn, x in calls if i % 2 == 0 else calls[::-1]:
            times[key].append(timed_ms(fn, x))
    row = dict(index=name, candidates=index.num_candidates, users=len(users), interests=users.shape[1], k=k,
               per_query_k=retriever.per_query_k, depth=min(k, retriever.per_query_k), repeats=repeats)
    for key, values in times.items():
        row[f"{key}_p50_ms"], row[f"{key}_p99_ms"] = (float(np.percentile(values, q)) for q in (50, 99))
    row["p50_ratio"] = row["multi_p50_ms"] / row["single_p50_ms"]
    row["within_2x"] = bool(row["p50_ratio"] <= 2.0)
    print(row, flush=True)
    return row


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
    parser.add_argument("--multi-query-only", action="store_true",
                        help="only the IVF multi-query latency at the largest size; updates only its section")
    args = parser.parse_args(argv)
    if args.multi_query_only:
        return multi_query_only(args)
    rows, grpc_rows, multi_rows = [], [], []
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
                if n == max(args.sizes) and name in MULTI_QUERY_INDEXES:
                    multi_rows.append(multi_query_latency(name, index, queries))
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
    write(args, rows, grpc_rows, quality, multi_rows)


def multi_query_only(args):
    """Builds the IVF index at the largest size, measures single vs multi-query latency and updates only the
    multi-query section of serving.md and the "multi_query" key of serving.json."""
    n = max(args.sizes)
    ids, x, queries = clustered(n)
    index = make_ivf(n)
    start = time.perf_counter()
    index.index(ids, x)
    print(f"ivf over {n:,} candidates built in {time.perf_counter() - start:.1f} s "
          f"(num_probes {index.num_probes}, capacity {index.capacity})", flush=True)
    rows = [multi_query_latency("ivf", index, queries)]
    update_multi_query(Path(args.out), rows, command(args))


def command(args):
    sizes = "" if args.sizes == [100_000, 1_000_000] else " --sizes " + " ".join(map(str, args.sizes))
    return ".venv/bin/python benchmarks/serving.py" + sizes + (" --multi-query-only" if args.multi_query_only else "")


def multi_query_lines(rows, command):
    r = rows[0]
    lines = [MULTI_QUERY_HEADING, "",
             f"Command: `{command}`. One run on this 2-core CPU machine, the cores shared with other jobs.", "",
             f"{r['users']} users with K = {r['interests']} query vectors each (user i's are benchmark queries i, "
             f"i + {r['users']}, ..., i + {(r['interests'] - 1) * r['users']}), k = {r['k']}. Single query: one "
             f"[1, d] query through `tf.function(lambda q: index(q, k={r['k']}))`. Multi-query: one user's "
             f"[1, {r['interests']}, d] queries through `tf.function(lambda q: MultiQueryRetriever(index)(q, "
             f"k={r['k']}))`: each interest is searched to depth min(k, per_query_k) = {r['depth']} (exact for the "
             f"max merge), the {r['interests'] * r['depth']} results are merged by max score per item (duplicates "
             f"dropped) and the top {r['k']} kept. Both warmed up, then {r['repeats']} calls each, interleaved in "
             "one loop (alternating which goes first).", "",
             "| index | candidates | single p50 ms | single p99 ms | multi p50 ms | multi p99 ms | "
             "p50 multi / single | within 2x |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['candidates']:,} | {r['single_p50_ms']:.2f} | {r['single_p99_ms']:.2f} | "
                     f"{r['multi_p50_ms']:.2f} | {r['multi_p99_ms']:.2f} | {r['p50_ratio']:.2f} | "
                     f"{'yes' if r['within_2x'] else 'no'} |")
    return lines


def update_multi_query(out, rows, command):
    """Replaces (or appends) only the multi-query section of out.md and the "multi_query" key of out.json."""
    md, js = out.with_suffix(".md"), out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = md.read_text() if md.is_file() else "# Index and serving benchmark\n"
    section = "\n".join(multi_query_lines(rows, command)) + "\n"
    pattern = re.compile(rf"^{re.escape(MULTI_QUERY_HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda m: section + ("\n" if m.end() < len(text) else ""), text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)
    data = json.loads(js.read_text()) if js.is_file() else {}
    data["multi_query"] = rows
    js.write_text(json.dumps(data, indent=2))
    print(section)


def write(args, rows, grpc_rows, quality, multi_rows=()):
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
    if multi_rows:
        lines += ["", *multi_query_lines(multi_rows, command(args))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"in_process": rows, "grpc": grpc_rows, "quality": quality,
                                                    "multi_query": list(multi_rows)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
