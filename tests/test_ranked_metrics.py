"""Metrics from ranked id lists (evaluation/ranked.py, evaluation/retrieval.py) and evaluate() through
retrievers. References are written here from the metric definitions (PROTOCOL.md), independently of the code
under test; full_corpus_metrics is the independent full-score-matrix reference."""
import math

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrec_recall.evaluation import evaluate, evaluate_retriever, full_corpus_metrics, ranked_list_metrics
from tfrec_recall.features import feature_arrays
from tfrec_recall.retrievers import IVF, BruteForce, MultiQueryRetriever

NINF = -np.inf


def test_golden_ranked_lists():
    # D = max(ks) = 3. User 0: c has 2 higher -> rank 3. User 1: d has 1 higher, tied with b and c (the list goes
    # on to a lower score, so the block is complete) -> rank 2, 3 or 4 with probability 1/3 each.
    scores = [[5, 4, 3, 2, NINF], [3, 2, 2, 2, 1]]
    ids = [["a", "b", "c", "d", ""], ["a", "b", "c", "d", "e"]]
    m = ranked_list_metrics(scores, ids, [["c"], ["d"]], ks=(1, 3), num_candidates=5)
    assert m["HR@1"] == 0.0
    assert m["HR@3"] == pytest.approx((1 + 2 / 3) / 2)  # 5/6
    # NDCG@3: user 0 1/log2(4) = 0.5; user 1 (1/log2(3) + 1/log2(4) + 0) / 3
    assert m["NDCG@3"] == pytest.approx((0.5 + (1 / math.log2(3) + 0.5) / 3) / 2)
    # MRR within the top 3: user 0 1/3; user 1 (1/2 + 1/3 + 0) / 3 = 5/18 -> (1/3 + 5/18) / 2 = 11/36
    assert m["MRR"] == pytest.approx(11 / 36)
    assert (m["Coverage@1"], m["Coverage@3"]) == pytest.approx((1 / 5, 3 / 5))  # {a}, {a, b, c} of 5
    assert m["users"] == 2


def test_open_tie_block_and_non_finite_scores_are_refused():
    # The block of score 2 reaches the end of a full list: more items may score 2 beyond it.
    with pytest.raises(ValueError, match=r"1 of 1 users have a tie block at rank 2"):
        ranked_list_metrics([[3, 2, 2]], [["a", "b", "c"]], [["z"]], ks=(2,), num_candidates=10)
    with pytest.raises(ValueError, match=r"1 of 2 users have NaN or infinite scores"):
        ranked_list_metrics([[3, 2, 1], [np.nan, 1, 0]], [["a", "b", "c"]] * 2, [["a"], ["a"]], ks=(2,),
                            num_candidates=3)


def _id(rows):
    return [[f"i{r}" for r in row] for row in rows]


def test_constant_model_scores_chance_through_any_retriever():
    # 500 candidates, user u has 5 + u excluded items and positive u: chance HR@10 = 10 / (500 - 5 - u), and a
    # retriever returning only 11 ids cannot see the tie block's size: BruteForce counts it exactly.
    n, users = 500, 4
    ids = np.array([f"i{i}" for i in range(n)])
    exclude = _id([range(100, 105 + u) for u in range(users)])
    chance = np.mean([10 / (n - 5 - u) for u in range(users)])
    brute = BruteForce(max_k=11).index(ids, np.ones((n, 4)))
    m = evaluate_retriever(brute, np.zeros((users, 4)), _id([[u] for u in range(users)]), exclude, ks=(10,))
    assert m["HR@10"] == pytest.approx(chance) and m["HR@10"] not in (0.0, 1.0)
    # MRR@10 of a uniform rank over T items: H_10 / T (H_10 = 2.928968)
    harmonic = sum(1 / r for r in range(1, 11))
    assert m["MRR"] == pytest.approx(np.mean([harmonic / (n - 5 - u) for u in range(users)]))
    # An approximate index asks for longer lists until they end (padding), or refuses at its max_k.
    small = np.array([f"i{i}" for i in range(40)])
    ivf = IVF(max_k=64, num_lists=2, num_probes=2, seed=0).index(small, np.ones((40, 4)))
    m = evaluate_retriever(ivf, np.zeros((2, 4)), [["i0"], ["i1"]], [["i5"], []], ks=(10,))
    assert m["HR@10"] == pytest.approx((10 / 39 + 10 / 40) / 2)
    ivf = IVF(max_k=20, num_lists=2, num_probes=2, seed=0).index(small, np.ones((40, 4)))
    with pytest.raises(ValueError, match=r"2 of 2 users' lists end inside the tie block .* max_k=20"):
        evaluate_retriever(ivf, np.zeros((2, 4)), [["i0"], ["i1"]], ks=(10,))
    with pytest.raises(ValueError, match=r"1 of 2 users have NaN or infinite scores"):
        evaluate_retriever(brute, np.array([[0.0] * 4, [np.nan] * 4]), [["i0"], ["i1"]], ks=(10,))


def _truncated_mrr(scores, positives, exclude, depth):
    """NumPy reference: E[1/rank * 1{rank <= depth}] of the best positive, rank uniform over its tie block."""
    total = 0.0
    for s, pos, ex in zip(scores, positives, exclude):
        s = s.astype(np.float64).copy()
        s[[e for e in ex if e not in pos]] = -np.inf
        best = 0.0
        for p in pos:
            h, t = np.sum(s > s[p]), np.sum(s == s[p])
            best = max(best, sum(1 / r for r in range(h + 1, h + t + 1) if r <= depth) / t)
        total += best
    return total / len(scores)


@pytest.fixture(scope="module")
def tied_problem():
    rng = np.random.default_rng(11)  # small integer embeddings: many ties
    candidates = rng.integers(-2, 3, size=(80, 4)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)
    positives = [list(rng.choice(80, size=rng.integers(1, 3), replace=False)) for _ in range(30)]
    exclude = [list(rng.choice(80, size=rng.integers(0, 12), replace=False)) for _ in range(30)]
    return candidates, queries, positives, exclude


def _same(got, ref, skip=("MRR",)):
    for key, value in ref.items():
        if key not in skip:
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_brute_force_and_ivf_lists_match_the_full_corpus_reference(tied_problem):
    candidates, queries, positives, exclude = tied_problem
    ids = np.array([f"i{i}" for i in range(80)])
    ref = full_corpus_metrics(queries, candidates, positives, exclude, ks=(5, 10))
    mrr = _truncated_mrr(queries @ candidates.T, positives, exclude, 10)
    brute = BruteForce(max_k=11).index(ids, candidates)
    # An IVF probing every list is exact: its lists (lengthened while tie blocks stay open) give the same numbers.
    ivf = IVF(max_k=80, num_lists=4, num_probes=4, seed=0).index(ids, candidates)
    for retriever in (brute, ivf):
        got = evaluate_retriever(retriever, queries, _id(positives), _id(exclude), ks=(5, 10), batch_size=7)
        # Which tied items fill a top-K list is the retriever's own choice: coverage is compared for BruteForce.
        _same(got, ref, skip=("MRR",) if retriever is brute else ("MRR", "Coverage@5", "Coverage@10"))
        assert got["MRR"] == pytest.approx(mrr, abs=1e-6)
    # Probing 1 of 4 lists returns fewer items (padded lists): measured by the same code, every user counted.
    partial = IVF(max_k=80, num_lists=4, num_probes=1, seed=0).index(ids, candidates)
    got = evaluate_retriever(partial, queries, _id(positives), _id(exclude), ks=(5, 10))
    assert got["users"] == 30 and 0.0 <= got["HR@10"] <= 1.0


def test_multi_query_retriever_matches_the_max_over_interests_reference():
    rng = np.random.default_rng(2)  # continuous scores: no ties
    candidates = rng.normal(size=(60, 4)).astype(np.float32)
    queries = rng.normal(size=(20, 2, 4)).astype(np.float32)
    positives = [[int(p)] for p in rng.integers(0, 60, size=20)]
    exclude = [list(rng.choice(60, size=5, replace=False)) for _ in range(20)]
    ids = np.array([f"i{i}" for i in range(60)])
    retriever = MultiQueryRetriever(BruteForce(max_k=11).index(ids, candidates))
    got = evaluate_retriever(retriever, queries, _id(positives), _id(exclude), ks=(5, 10))
    best = np.max(queries @ candidates.T, axis=1)  # f(u, i) = max_k q_k . c_i, as a score matrix
    _same(got, full_corpus_metrics(best, np.eye(60), positives, exclude, ks=(5, 10)))
    assert got["MRR"] == pytest.approx(_truncated_mrr(best, positives, exclude, 10), abs=1e-6)
    # A batch of 8 users with K = 2 searches 16 queries at once: batch_size counts queries, the answers are the
    # same for any batch size (one user per batch, and batches that split the users unevenly).
    for batch_size in (1, 8, 13):
        again = evaluate_retriever(retriever, queries, _id(positives), _id(exclude), ks=(5, 10),
                                   batch_size=batch_size)
        _same(again, got, skip=())
    # Interest masks: a user's masked interests do not search (the reference drops them from the max).
    mask = np.ones((20, 2), bool)
    mask[::2, 1] = False
    masked = evaluate_retriever(retriever, queries, _id(positives), _id(exclude), ks=(5, 10), query_mask=mask)
    best = np.where(mask[:, :, None], queries @ candidates.T, -np.inf).max(axis=1)
    _same(masked, full_corpus_metrics(best, np.eye(60), positives, exclude, ks=(5, 10)))


def test_query_shapes_must_fit_the_retriever():
    ids = np.array([f"i{i}" for i in range(12)])
    brute = BruteForce(max_k=11).index(ids, np.eye(12, 4, dtype=np.float32))
    multi = MultiQueryRetriever(brute)
    positives = [["i0"], ["i1"]]
    with pytest.raises(ValueError, match=r"queries must be \[users, d\] for a single index \(wrap the index in a "
                                         r"MultiQueryRetriever for K queries per user\), got shape \(2, 3, 4\)"):
        evaluate_retriever(brute, np.zeros((2, 3, 4)), positives, ks=(5,))
    with pytest.raises(ValueError, match=r"queries must be \[users, K, d\] for a MultiQueryRetriever, got shape "
                                         r"\(2, 4\)"):
        evaluate_retriever(multi, np.zeros((2, 4)), positives, ks=(5,))
    with pytest.raises(ValueError, match=r"query_mask must be \[users, K\] = \[2, 3\], got shape \[2, 2\]"):
        evaluate_retriever(multi, np.zeros((2, 3, 4)), positives, ks=(5,), query_mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"query_mask marks the interests .* a single index \(BruteForce\) "
                                         r"takes none"):
        evaluate_retriever(brute, np.zeros((2, 4)), positives, ks=(5,), query_mask=np.ones((2, 4), bool))


def test_evaluate_on_split_dict_and_dataset_agree_with_the_reference(tiny_model, small_split):
    model, items, embeddings = tiny_model
    users = small_split.test.drop_duplicates("user_id").reset_index(drop=True)
    queries = model.query_tower(feature_arrays(users, small_split.data, model.query_tower.encoder.specs)).numpy()
    index = {item: i for i, item in enumerate(items)}
    positives = [[index[i]] for i in users["item_id"]]
    exclude = [[index[i] for i in small_split.train_items[u]] for u in users["user_id"]]
    ref = full_corpus_metrics(queries, embeddings, positives, exclude, ks=(10, 50))
    split_metrics = evaluate(model, small_split, "test", ks=(10, 50))
    _same(split_metrics, ref)
    ivf_metrics = evaluate(model, small_split, "test", ks=(10, 50), retriever=IVF(max_k=51, num_lists=4, num_probes=4))
    _same(ivf_metrics, ref)
    arrays = feature_arrays(users, small_split.data, model.query_tower.encoder.specs)
    width = max(len(v) for v in small_split.train_items.values())
    arrays["item_id"] = users["item_id"].to_numpy(dtype=object)
    arrays["seen"] = np.array([list(small_split.train_items[u]) + [""] * (width - len(small_split.train_items[u]))
                               for u in users["user_id"]], dtype=object)
    from_dict = evaluate(model, arrays, ks=(10, 50), exclude_column="seen", candidates=(items, embeddings))
    dataset = tf.data.Dataset.from_tensor_slices({k: v.astype(str) if v.dtype == object else v
                                                  for k, v in arrays.items()}).batch(37)
    from_dataset = evaluate(model, dataset, ks=(10, 50), exclude_column="seen", candidates=(items, embeddings))
    for got in (from_dict, from_dataset):
        assert got == pytest.approx(split_metrics, abs=1e-6)
    with pytest.raises(TypeError, match=r"data must be a Split, a tf.data.Dataset or a dict of arrays, got list"):
        evaluate(model, [1, 2], candidates=(items, embeddings))
    with pytest.raises(KeyError, match=r"label_column 'movie' is not a column of data"):
        evaluate(model, arrays, label_column="movie", candidates=(items, embeddings))
    with pytest.raises(ValueError, match=r"candidates is required when data is not a Split"):
        evaluate(model, arrays)
    with pytest.raises(TypeError, match=r"retriever must be a Retriever .* got str"):
        evaluate(model, small_split, retriever="ivf")


def test_metric_sums_over_chunks_equal_one_call():
    """Lists added in two chunks give the one-call metrics: means over all users (not a mean of chunk means:
    3 users then 1) and coverage over the union of the lists (golden: ids a, b, c, d in the top 2 -> 4 / 8)."""
    from tfrec_recall.evaluation.ranked import MetricSums
    scores = [[3.0, 2.0, 1.0]] * 4
    ids = [["a", "b", "c"], ["a", "b", "c"], ["b", "a", "c"], ["c", "d", "a"]]
    positives = [["a"], ["c"], ["x"], ["d"]]
    whole = ranked_list_metrics(scores, ids, positives, ks=(1, 2), num_candidates=8)
    sums = MetricSums((1, 2)).add(scores[:3], ids[:3], positives[:3]).add(scores[3:], ids[3:], positives[3:])
    assert sums.result(8) == whole
    # HR@2: users 1 (a at 1) and 4 (d at 2) hit -> 2 / 4; Coverage@2: {a, b, c, d} / 8
    assert whole["HR@2"] == 0.5 and whole["Coverage@2"] == 0.5 and whole["users"] == 4
