"""Deep Retrieval at 1M items: recall, items scored per query and single-query p50 latency for a range of beam
widths, beside BruteForce and IVF, on a synthetic clustered corpus.

    .venv/bin/python benchmarks/deep_retrieval_scale.py [--items 1000000] [--rounds 5] [--beams 5,10,...,800]

The corpus: ``--items`` unit vectors (d = DIM) around CLUSTERS random centroids. The training interactions: users who
each click CLICKS items of one cluster (every item clicked ``--clicks-per-item`` times), each user's query drawn
around a random item of that cluster (its vector plus noise, renormalised), as users who click items near them
would be; the structure model (D = 2 layers of K = 100 codes, J = 1 path per item) is trained on them by the
paper's EM with the library's own pieces: E-step epochs of ``PathLikelihoodTask`` (Adam), then the M-step
(beam search per interaction, ``ScoreAccumulator``, ``assign_paths`` with the path-size penalty). The user
encoder is the identity here (queries and items share the space), so the benchmark measures the structure and
the retrieval, not a tower.

Evaluation: two disjoint sets of HELDOUT_USERS held-out users (validation and test), drawn exactly as the
training users are (:func:`interactions`) but with their own rng, and never trained on. Two measures, on each set:
recall@k against the exact top k (the share of brute force's top k over all items that an index returns), and
the paper's measure, ground-truth recall@100: the share of a held-out user's clicked items that are in the
index's top 100, averaged over users, with its ratio to brute force over the same vectors (and a 95 % paired
bootstrap interval over users). The operating point of each measure is chosen on validation (the smallest beam
meeting the goal: recall within TOLERANCE of brute force with at most 1/BUDGET of its items scored) and reported
once on test. Beams are tried in ``--beams`` order up to the first whose validation queries score more than
1/BUDGET of the items. Latency: one query per call through a traced function, p50 over QUERIES test queries after
a warm-up, all indexes in this process (a shared, noisy 2-core machine: the ratios matter, not the
milliseconds). Writes benchmarks/results/deep_retrieval_scale.md / .json.
"""
from __future__ import annotations

import argparse
import json
import shlex
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
BEAMS = (5, 10, 20, 40, 100, 200, 400, 600, 800)  # <= K^D; with D = 2 and B >= K the beam is exact: the B best paths
KS = (10, 100)  # recall@k against the exact top k
GT_K = 100  # ground-truth recall@GT_K of the held-out users' clicks
QUERIES = 300  # single-query latency samples
CLICKS = 5  # items each synthetic user clicks
HELDOUT_USERS, HELDOUT_SEED = 2000, 1  # per held-out set (validation, test); their rng, not the training one
BUDGET, TOLERANCE = 10, 0.05  # the goal: recall within 5 % of brute force with >= 10x fewer items scored
EVAL_BATCH = 32  # queries per call: bounds a wide beam's [batch, candidates, dim] rerank gather


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
    tf.keras.utils.set_random_seed(0)  # the structure's initial weights (EM is then repeatable)
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


def held_out_sets(items: np.ndarray, cluster: np.ndarray, size: int, seed: int) -> dict:
    """Two disjoint sets of ``size`` held-out users, {"validation": ..., "test": ...}, drawn as :func:`interactions`
    draws the training users but with their own rng (never trained on); each holds the users' "queries"
    [size, DIM] and "clicks" (the rows of each user's clicked items)."""
    rng = np.random.default_rng(seed)
    anchors, users, clicked = interactions(cluster, rng)
    groups = np.split(clicked, np.flatnonzero(np.diff(users)) + 1)  # users are numbered in order
    chosen = rng.choice(len(anchors), 2 * size, replace=False)
    queries = queries_near(items, anchors[chosen], rng)
    parts = {"validation": slice(0, size), "test": slice(size, 2 * size)}
    return {name: {"queries": queries[s], "clicks": [groups[u] for u in chosen[s]]} for name, s in parts.items()}


def traced_search(index, k: int):
    """``index(q, k=k)`` through a traced function (the graph an export serves), any batch size."""
    return tf.function(lambda q: index(q, k=k), input_signature=[tf.TensorSpec([None, DIM], tf.float32)])


def top_rows(search, queries: np.ndarray) -> np.ndarray:
    """The item rows [n, k] (-1 for none) each query's ``search`` returns, EVAL_BATCH queries per call."""
    out = []
    for start in range(0, len(queries), EVAL_BATCH):
        ids = search(tf.constant(queries[start:start + EVAL_BATCH]))[1].numpy()
        out.append(np.array([[int(i) if i else -1 for i in row] for row in ids]))
    return np.concatenate(out)


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the exact top k in the top k of ``ids``."""
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, truth)]))


def ground_truth_recall(ids: np.ndarray, clicks: list) -> np.ndarray:
    """Per held-out user, the share of their clicked items in the top GT_K of ``ids``."""
    return np.array([np.isin(c, row[:GT_K]).mean() for row, c in zip(ids, clicks)])


def ratio_interval(ours: np.ndarray, reference: np.ndarray, draws: int = 2000) -> list:
    """95 % paired bootstrap interval, over users, of mean(ours) / mean(reference)."""
    picks = np.random.default_rng(2).integers(0, len(ours), (draws, len(ours)))
    return np.percentile(ours[picks].mean(axis=1) / reference[picks].mean(axis=1), [2.5, 97.5]).tolist()


def p50_latency(search, queries: np.ndarray) -> float:
    """p50 ms of one query per call of the traced ``search``, after a warm-up."""
    for q in queries[:10]:
        search(tf.constant(q[None]))
    times = []
    for q in queries:
        start = time.perf_counter()
        search(tf.constant(q[None]))[1].numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def evaluate_index(name, index, sets: dict, scored, reference=None):
    """(row, per-user ground-truth recall per set) of one index. The row holds p50 ms (test queries) and, per
    set, the mean items scored (``scored(queries)``), recall@k against the exact top k and ground-truth recall@GT_K
    with its ratio to ``reference`` (brute force's per-user values; the index itself when None)."""
    search = traced_search(index, max(KS))
    row, per_user = {"index": name, "p50_ms": p50_latency(search, sets["test"]["queries"][:QUERIES])}, {}
    for part, data in sets.items():
        ids = top_rows(search, data["queries"])
        gt = per_user[part] = ground_truth_recall(ids, data["clicks"])
        ref = gt if reference is None else reference[part]
        row[part] = {"items_scored": float(scored(data["queries"])), f"gt_recall@{GT_K}": float(gt.mean()),
                     "gt_ratio": float(gt.mean() / ref.mean()), "gt_ratio_95": ratio_interval(gt, ref),
                     **{f"recall@{k}": recall(ids, data["truth"], k) for k in KS}}
    print(row, flush=True)
    return row, per_user


def mean_items_scored(index, queries: np.ndarray) -> float:
    """Mean of :func:`items_scored` over ``queries``, EVAL_BATCH per call."""
    from tfrec_recall.retrievers.deep_retrieval import items_scored
    return float(np.mean(np.concatenate([items_scored(index, queries[s:s + EVAL_BATCH])
                                         for s in range(0, len(queries), EVAL_BATCH)])))


def evaluate_beams(structure, paths, ids, items, beams, sets, reference, budget: float) -> list:
    """Rows of DeepRetrievalIndex for each beam width in order, up to and including the first whose validation
    queries score more than ``budget`` items (the widths after it are not tried)."""
    from tfrec_recall.retrievers.deep_retrieval import DeepRetrievalIndex
    rows = []
    for beam in beams:
        index = DeepRetrievalIndex(structure, beam_width=beam, max_k=max(KS)).index(ids, items, paths)
        row, _ = evaluate_index(f"DeepRetrieval B = {beam}", index, sets,
                                lambda q, index=index: mean_items_scored(index, q), reference)
        rows.append({**row, "beam": beam})
        if row["validation"]["items_scored"] > budget:
            print(f"B = {beam} scores more than {budget:,.0f} items per query: wider beams not tried", flush=True)
            break
    return rows


def baseline_rows(ids, items, sets: dict):
    """Rows of BruteForce and IVF, and brute force's per-user ground-truth recall (the reference)."""
    from tfrec_recall.export import make_index
    from tfrec_recall.retrievers import BruteForce
    n = len(items)
    brute, reference = evaluate_index("BruteForce", BruteForce(max_k=max(KS)).index(ids, items), sets, lambda q: n)
    ivf = make_index("ivf", max(KS), n, target_recall=None, exact_search_below=0)
    ivf.index(ids, items)
    scored = round(n * ivf.num_probes / ivf.num_lists)
    row, _ = evaluate_index(f"IVF ({ivf.num_lists} lists, {ivf.num_probes} probed)", ivf, sets, lambda q: scored,
                            reference)
    return [brute, row], reference


def exact_top(items_tf, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows [n, k] of the exact top k over all items, EVAL_BATCH queries at a time."""
    return np.concatenate([tf.math.top_k(tf.matmul(tf.constant(queries[s:s + EVAL_BATCH]), items_tf,
                                                   transpose_b=True), k=k)[1].numpy()
                           for s in range(0, len(queries), EVAL_BATCH)])


def operating_points(rows: list, budget: float) -> dict:
    """Per measure, the smallest beam meeting the goal on validation (at most ``budget`` items scored and recall
    >= 1 - TOLERANCE of brute force's: exact recall@100, brute force being 1, or the ground-truth ratio), or
    None."""
    measures = {"exact": "recall@100", "ground truth": "gt_ratio"}
    meets = lambda v, key: v["items_scored"] <= budget and v[key] >= 1 - TOLERANCE  # noqa: E731
    return {m: next((r for r in rows if "beam" in r and meets(r["validation"], key)), None)
            for m, key in measures.items()}


def parse_beams(text: str) -> tuple:
    """``"5,10,20"`` -> (5, 10, 20)."""
    try:
        beams = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beams must be comma-separated integers, got {text!r}") from None
    if not beams or min(beams) < 1 or list(beams) != sorted(beams):
        raise argparse.ArgumentTypeError(f"--beams must be increasing positive integers, got {text!r}")
    return beams


def parse_args(argv):
    """The command line's arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--e-steps", type=int, default=1000, help="Adam steps (of 4096) per E-step, about")
    parser.add_argument("--clicks-per-item", type=int, default=4, help="users who click each item")
    parser.add_argument("--hidden", type=int, default=32, help="the structure MLPs' hidden units")
    parser.add_argument("--beams", type=parse_beams, default=BEAMS, help="beam widths, increasing, comma-separated; "
                        "tried up to the first that scores more than 1/BUDGET of the items (each must be <= K^D)")
    parser.add_argument("--out", default=str(HERE / "results" / "deep_retrieval_scale"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = ".venv/bin/python benchmarks/deep_retrieval_scale.py " + shlex.join(argv)
    rng = np.random.default_rng(0)
    items, cluster = corpus(args.items, rng)
    ids = np.arange(args.items).astype(str)
    log: list = []
    start = time.perf_counter()
    structure, paths = train_structure(items, cluster, args.rounds, rng, log, args.e_steps,
                                       args.clicks_per_item, args.hidden)
    train_seconds = time.perf_counter() - start
    sets = held_out_sets(items, cluster, HELDOUT_USERS, HELDOUT_SEED)
    for data in sets.values():
        data["truth"] = exact_top(tf.constant(items), data["queries"], max(KS))
    rows, reference = baseline_rows(ids, items, sets)
    budget = args.items / BUDGET
    rows += evaluate_beams(structure, paths, ids, items, args.beams, sets, reference, budget)
    args.wall_seconds = time.perf_counter() - start
    write_report(rows, log, args, train_seconds, operating_points(rows, budget), Path(args.out))
    return 0


def fmt_ratio(v: dict) -> str:
    """Ground-truth ratio to brute force with its 95 % interval."""
    low, high = v["gt_ratio_95"]
    return f"{v['gt_ratio']:.3f} ({low:.3f}-{high:.3f})"


def results_tables(rows: list, n: int) -> str:
    """The test table (every measure) and the validation table (the selection measures)."""
    base = rows[0]["p50_ms"]
    test = [f"| index | recall@10 | recall@100 | GT recall@{GT_K} | GT DR / brute force (95 %) | items scored "
            "per query | fewer than brute force | p50 ms | p50 / brute force |", "|---" * 9 + "|"]
    valid = [f"| index | recall@100 | GT recall@{GT_K} | GT DR / brute force (95 %) | items scored per query | "
             "fewer than brute force |", "|---" * 6 + "|"]
    for r in rows:
        t, v = r["test"], r["validation"]
        test.append(f"| {r['index']} | {t['recall@10']:.3f} | {t['recall@100']:.3f} | {t[f'gt_recall@{GT_K}']:.3f} | "
                    f"{fmt_ratio(t)} | {t['items_scored']:,.0f} | {n / t['items_scored']:.0f}x | "
                    f"{r['p50_ms']:.2f} | {r['p50_ms'] / base:.2f} |")
        valid.append(f"| {r['index']} | {v['recall@100']:.3f} | {v[f'gt_recall@{GT_K}']:.3f} | {fmt_ratio(v)} | "
                     f"{v['items_scored']:,.0f} | {n / v['items_scored']:.0f}x |")
    return ("## Test users\n\n" + "\n".join(test) + "\n\n## Validation users\n\n" + "\n".join(valid))


def rounds_table(log: list) -> str:
    """The EM rounds table."""
    lines = ["| round | structure loss | paths used | max items on a path | median | E-step s | M-step s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['structure_loss']:.3f} | {r['paths_used']:,} | {r['max_path_size']} | "
              f"{r['median_path_size']:.0f} | {r['e_step_seconds']:.0f} | {r['m_step_seconds']:.0f} |" for r in log]
    return "## EM rounds\n\n" + "\n".join(lines)


def verdict(points: dict, rows: list, n: int) -> str:
    """One sentence per measure: the beam chosen on validation and its test numbers, or that none met the goal."""
    names = {"exact": "recall@100 against the exact top 100", "ground truth": f"ground-truth recall@{GT_K}"}
    key = {"exact": "recall@100", "ground truth": "gt_ratio"}
    within = [r for r in rows if "beam" in r and r["validation"]["items_scored"] <= n / BUDGET]
    out = []
    for measure, row in points.items():
        if row is None:
            best = max(within, key=lambda r: r["validation"][key[measure]], default=None)
            out.append(f"- {names[measure]}: **not met** by any beam tried within the budget on validation" + (
                "" if best is None else f" (best {best['validation'][key[measure]]:.3f} of brute force at B = "
                f"{best['beam']}, {best['validation']['items_scored']:,.0f} items scored)") + ".")
            continue
        t = row["test"]
        out.append(f"- {names[measure]}: **met** on validation first at B = {row['beam']}; on test at that B: "
                   f"{t[key[measure]]:.3f} of brute force (GT ratio {fmt_ratio(t)}, exact recall@100 "
                   f"{t['recall@100']:.3f}), {t['items_scored']:,.0f} items scored ({n / t['items_scored']:.0f}x "
                   f"fewer), p50 {row['p50_ms']:.2f} ms vs {rows[0]['p50_ms']:.2f} ms brute force.")
    return "\n".join(out)


def header(args, train_seconds: float) -> str:
    """The setup paragraph and the definitions of the two measures."""
    return (f"# Deep Retrieval at {args.items:,} items\n\n"
            f"Synthetic corpus: {args.items:,} unit vectors (d = {DIM}) around {CLUSTERS} centroids; the structure "
            f"(D = {LAYERS}, K = {CODES}, J = {PATHS}, K^D = {CODES ** LAYERS:,} paths) trained by EM on users who "
            f"each click {CLICKS} items of one cluster, every item clicked {args.clicks_per_item} times, their query "
            f"near a random item of the cluster; structure MLPs of {args.hidden} hidden units ({args.rounds} rounds "
            f"of about {args.e_steps} E-step Adam steps of 4096 and an M-step, alpha = {ALPHA}; {train_seconds:.0f} s "
            f"of training, {args.wall_seconds:.0f} s in all). The reranker is the exact dot product over the "
            f"retrieved items. p50 of one query per call through a traced function (as an export runs it), "
            f"{QUERIES} test queries, same process, shared 2-core machine.\n\n"
            f"Two disjoint sets of {HELDOUT_USERS:,} held-out users (validation, test), drawn as the training users "
            "are but with their own rng and never trained on; there is no other test set in this synthetic "
            "benchmark. Two measures:\n\n"
            "- **recall@k (exact)**: the share of brute force's exact top k (over all items, same vectors) that "
            "the index returns; brute force is 1 by definition.\n"
            f"- **GT recall@{GT_K} (ground truth, the paper's measure)**: the share of each held-out user's "
            f"{CLICKS} clicked items that are in the index's top {GT_K}, averaged over users; **GT DR / brute "
            "force** is its ratio to brute force's over the same vectors, with a 95 % paired bootstrap interval "
            "over users.\n\n"
            f"Goal (issue 13): recall within {TOLERANCE * 100:.0f} % of brute force with >= {BUDGET}x fewer items "
            f"scored (<= {args.items / BUDGET:,.0f} per query). Beams requested: {', '.join(map(str, args.beams))}; "
            f"tried in order up to the first that scores more than {args.items / BUDGET:,.0f} items on "
            "validation.\n\n")


def write_report(rows, log, args, train_seconds, points: dict, out: Path) -> None:
    """Writes the .md (tables, operating points, command) and the .json."""
    text = (header(args, train_seconds) + results_tables(rows, args.items)
            + "\n\n## Operating points (smallest B meeting the goal on validation, reported on test)\n\n"
            + verdict(points, rows, args.items) + "\n\n" + rounds_table(log)
            + f"\n\nCommand: `{args.command}`\n")
    out.with_suffix(".md").write_text(text)
    chosen = {m: (None if r is None else r["beam"]) for m, r in points.items()}
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "rounds": log, "items": args.items,
                                                    "operating_points": chosen, "command": args.command,
                                                    "train_seconds": train_seconds,
                                                    "wall_seconds": args.wall_seconds}, indent=2))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
