"""Deep Retrieval at 1M items: recall against brute force, items scored per query, and single-query p50 latency
beside BruteForce and IVF, on a synthetic clustered corpus.

    .venv/bin/python benchmarks/deep_retrieval_scale.py [--items 1000000] [--rounds 3]

The corpus: ``--items`` unit vectors (d = DIM) around CLUSTERS random centroids. The training interactions: users who
each click CLICKS items of one cluster (every item clicked once), each user's query drawn around a random item
of that cluster (its vector plus noise, renormalised), as users who click items near them would be; the structure model (D = 2 layers of K = 100 codes, J = 1 path per item) is trained on them by the
paper's EM with the library's own pieces: E-step epochs of ``PathLikelihoodTask`` (Adam), then the M-step
(beam search per interaction, ``ScoreAccumulator``, ``assign_paths`` with the path-size penalty). The user
encoder is the identity here (queries and items share the space), so the benchmark measures the structure and
the retrieval, not a tower. Held-out queries are drawn the same way; recall@k is the share of the exact top k
(brute force over all items) that an index returns. Latency: one query per call, p50 over QUERIES calls after
a warm-up, all indexes in this process (a shared, noisy 2-core machine: the ratios matter, not the
milliseconds). Writes benchmarks/results/deep_retrieval_scale.md / .json.
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
import tensorflow as tf  # noqa: E402

DIM, CLUSTERS, NOISE = 32, 2000, 0.35
LAYERS, CODES, PATHS = 2, 100, 1
ALPHA = 1e-6  # penalty increment alpha * |c|^3: ~1 at 100 items on a path (the mean), ~8 at 200
BEAMS = (5, 10, 20, 40)
KS = (10, 100)
QUERIES = 300
CLICKS = 5  # items each synthetic user clicks


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def corpus(n: int, rng):
    """(item vectors [n, DIM], cluster of each item [n])."""
    centroids = unit(rng.normal(size=(CLUSTERS, DIM)))
    cluster = rng.integers(0, CLUSTERS, n)
    return unit(centroids[cluster] + NOISE * rng.normal(size=(n, DIM)) / np.sqrt(DIM)), cluster


def interactions(cluster: np.ndarray, rng, passes: int = 1):
    """Users who each click CLICKS items of one cluster, every item clicked ``passes`` times: in each pass each
    cluster's items are shuffled and cut into groups of CLICKS, one user per group, whose query lies near a
    random item of the cluster. Returns (the users' anchor items [U], the user of each click, the clicked
    item)."""
    anchors, users, clicked = [], [], []
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(CLUSTERS + 1))
    for c in [c for _ in range(passes) for c in range(CLUSTERS)]:
        members = rng.permutation(order[bounds[c]:bounds[c + 1]])
        for start in range(0, len(members), CLICKS):
            group = members[start:start + CLICKS]
            users.append(np.full(len(group), len(anchors)))
            anchors.append(members[rng.integers(len(members))])
            clicked.append(group)
    return np.array(anchors), np.concatenate(users), np.concatenate(clicked)


def queries_near(items: np.ndarray, rows: np.ndarray, rng) -> np.ndarray:
    return unit(items[rows] + NOISE * rng.normal(size=(len(rows), DIM)) / np.sqrt(DIM))


def training_step(task, optimizer):
    """One Adam step on the structure objective (traced once)."""
    @tf.function
    def step(xb, pb):
        with tf.GradientTape() as tape:
            loss = task(xb, pb)
        variables = task.structure.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss
    return step


def e_step(step, x: np.ndarray, paths: np.ndarray, seed: int, batch: int = 4096) -> float:
    """One epoch of ``step`` over the interactions, shuffled; returns the mean loss."""
    data = tf.data.Dataset.from_tensor_slices((x, paths)).shuffle(len(x), seed=seed).batch(batch)
    return float(np.mean([float(step(xb, pb)) for xb, pb in data]))


def m_step(structure, x: np.ndarray, clicked: np.ndarray, beam: int, num_items: int, batch: int = 8192):
    from tfrec_recall.layers.structure import code_paths, path_codes
    from tfrec_recall.training.path_assignment import ScoreAccumulator, assign_paths
    accumulator = ScoreAccumulator(num_items)
    search = tf.function(lambda q: structure.beam_search(q, beam))
    for start in range(0, len(x), batch):
        paths, log_p = search(tf.constant(x[start:start + batch]))
        accumulator.add(clicked[start:start + batch], path_codes(paths.numpy(), CODES), log_p.numpy())
    result = assign_paths(accumulator.result(max_candidates=beam), num_paths=PATHS, alpha=ALPHA, iterations=2)
    return code_paths(np.maximum(result.paths, 0), CODES, LAYERS).astype(np.int32), result


def train_structure(items: np.ndarray, cluster: np.ndarray, rounds: int, rng, log: list, e_steps: int = 1000,
                    passes: int = 1, hidden: int = 128):
    """EM on :func:`interactions` (users clicking CLICKS items near them). Returns the structure and the items'
    paths [n, J, D]."""
    from tfrec_recall.layers.structure import PathStructure, code_paths
    from tfrec_recall.tasks.path_likelihood import PathLikelihoodTask, random_paths
    n = len(items)
    structure = PathStructure(num_layers=LAYERS, num_codes=CODES, code_dim=16, hidden_units=(hidden,))
    task = PathLikelihoodTask(structure)
    step = training_step(task, tf.keras.optimizers.Adam(3e-3))
    anchors, users, clicked = interactions(cluster, rng, passes)
    x = queries_near(items, anchors, rng)[users]  # the user's query, for each of its clicks
    paths = code_paths(random_paths(n, PATHS, CODES ** LAYERS, seed=0), CODES, LAYERS).astype(np.int32)
    for r in range(rounds):
        start = time.perf_counter()
        epochs = max(1, int(np.ceil(e_steps * 4096 / len(x))))  # about e_steps Adam steps per E-step
        loss = [e_step(step, x, paths[clicked], seed=r * 10 + e) for e in range(epochs)][-1]
        e_seconds = time.perf_counter() - start
        paths, result = m_step(structure, x, clicked, beam=10, num_items=n)
        sizes = result.path_sizes
        log.append({"round": r + 1, "structure_loss": loss, "e_step_seconds": e_seconds,
                    "m_step_seconds": time.perf_counter() - start - e_seconds, "paths_used": int(len(sizes)),
                    "max_path_size": int(sizes.max()), "median_path_size": float(np.median(sizes))})
        print(f"round {r + 1}: {log[-1]}", flush=True)
    return structure, paths  # [n, J, D]


def exact_top(items_tf, queries: np.ndarray, k: int) -> np.ndarray:
    return tf.math.top_k(tf.matmul(tf.constant(queries), items_tf, transpose_b=True), k=k)[1].numpy()


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, truth)]))


def p50_latency(index, queries: np.ndarray, k: int) -> float:
    """p50 ms of one query per call through a traced function (the graph an export serves)."""
    search = tf.function(lambda q: index(q, k=k), input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    for q in queries[:10]:
        search(tf.constant(q[None]))
    times = []
    for q in queries:
        start = time.perf_counter()
        search(tf.constant(q[None]))[1].numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def evaluate_index(name, index, queries, truth, scored) -> dict:
    k = max(KS)
    rows = np.char.decode(index(tf.constant(queries), k=k)[1].numpy().astype(bytes), "utf-8")
    ids = np.array([[int(i) if i else -1 for i in row] for row in rows])
    out = {"index": name, "items_scored": scored, "p50_ms": p50_latency(index, queries, k)}
    out.update({f"recall@{kk}": recall(ids, truth, kk) for kk in KS})
    print(out, flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--e-steps", type=int, default=1000, help="Adam steps (of 4096) per E-step, about")
    parser.add_argument("--clicks-per-item", type=int, default=4, help="users who click each item")
    parser.add_argument("--hidden", type=int, default=32, help="the structure MLPs' hidden units")
    parser.add_argument("--out", default=str(HERE / "results" / "deep_retrieval_scale"))
    args = parser.parse_args(argv)
    from tfrec_recall.retrievers import BruteForce
    from tfrec_recall.export import make_index
    from tfrec_recall.retrievers.deep_retrieval import DeepRetrievalIndex, items_scored
    rng = np.random.default_rng(0)
    items, cluster = corpus(args.items, rng)
    ids = np.arange(args.items).astype(str)
    log: list = []
    start = time.perf_counter()
    structure, paths = train_structure(items, cluster, args.rounds, rng, log, args.e_steps,
                                       args.clicks_per_item, args.hidden)
    train_seconds = time.perf_counter() - start
    queries = queries_near(items, rng.integers(0, args.items, QUERIES), rng)
    truth = exact_top(tf.constant(items), queries, max(KS))
    rows = [evaluate_index("BruteForce", BruteForce(max_k=max(KS)).index(ids, items), queries, truth, args.items)]
    ivf = make_index("ivf", max(KS), args.items, target_recall=None, exact_search_below=0)
    ivf.index(ids, items)
    rows.append(evaluate_index(f"IVF ({ivf.num_lists} lists, {ivf.num_probes} probed)", ivf, queries, truth,
                               round(args.items * ivf.num_probes / ivf.num_lists)))
    for beam in BEAMS:
        index = DeepRetrievalIndex(structure, beam_width=beam, max_k=max(KS)).index(ids, items, paths)
        scored = float(items_scored(index, queries).mean())
        rows.append(evaluate_index(f"DeepRetrieval B = {beam}", index, queries, truth, scored))
    write_report(rows, log, args, train_seconds, Path(args.out))
    return 0


def write_report(rows, log, args, train_seconds, out: Path) -> None:
    base = rows[0]["p50_ms"]
    lines = ["| index | recall@10 | recall@100 | items scored per query | fewer than brute force | p50 ms | p50 / "
             "brute force |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['recall@10']:.3f} | {r['recall@100']:.3f} | {r['items_scored']:,.0f} | "
                     f"{args.items / r['items_scored']:.0f}x | {r['p50_ms']:.2f} | {r['p50_ms'] / base:.2f} |")
    rounds = ["| round | structure loss | paths used | max items on a path | median | E-step s | M-step s |",
              "|---|---|---|---|---|---|---|"]
    rounds += [f"| {r['round']} | {r['structure_loss']:.3f} | {r['paths_used']:,} | {r['max_path_size']} | "
               f"{r['median_path_size']:.0f} | {r['e_step_seconds']:.0f} | {r['m_step_seconds']:.0f} |" for r in log]
    text = (f"# Deep Retrieval at {args.items:,} items\n\n"
            f"Synthetic corpus: {args.items:,} unit vectors (d = {DIM}) around {CLUSTERS} centroids; the structure "
            f"(D = {LAYERS}, K = {CODES}, J = {PATHS}, K^D = {CODES ** LAYERS:,} paths) trained by EM on users who "
            f"each click {CLICKS} items of one cluster, every item clicked {args.clicks_per_item} times, their query near "
            f"a random item of the cluster; structure MLPs of {args.hidden} hidden units ({args.rounds} rounds of about {args.e_steps} E-step Adam steps of 4096 and an M-step, alpha = {ALPHA}; "
            f"{train_seconds:.0f} s). {QUERIES} held-out queries; recall@k against the exact top k; the reranker "
            "is the exact dot product over the retrieved items. p50 of one query per call through a traced function (as an export runs it), same process.\n\n"
            + "\n".join(lines) + "\n\n## EM rounds\n\n" + "\n".join(rounds)
            + f"\n\nCommand: `.venv/bin/python benchmarks/deep_retrieval_scale.py --items {args.items} "
            f"--rounds {args.rounds} --e-steps {args.e_steps} --clicks-per-item {args.clicks_per_item} "
            f"--hidden {args.hidden}`\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "rounds": log, "items": args.items}, indent=2))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
