"""MultiQueryRetriever: K query vectors per user searched in one index and merged (max score per item,
duplicates removed) or aggregated greedily for diversity as in ComiRec, checked against NumPy references."""
import numpy as np
import pytest

import tfrec_recall  # noqa: F401  (selects tf-keras)
import tensorflow as tf

from tfrec_recall.retrievers import BruteForce, IVF
from tfrec_recall.retrievers.multi_query import MultiQueryRetriever

NUM_ITEMS, DIM, NUM_QUERIES, BATCH = 60, 8, 3, 5


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    ids = np.array([f"i{j}" for j in range(NUM_ITEMS)])
    items = rng.normal(size=(NUM_ITEMS, DIM)).astype(np.float32)
    queries = rng.normal(size=(BATCH, NUM_QUERIES, DIM)).astype(np.float32)
    categories = np.array([f"c{j % 4}" for j in range(NUM_ITEMS)])
    return ids, items, queries, categories


def _reference_candidates(ids, items, user_queries, per_query_k, exclude=()):
    """f(u, i) = max over interests of e_i . v_u^(k), over the union of each interest's exact top
    ``per_query_k`` (excluded items removed)."""
    best = {}
    allowed = np.array([i not in set(exclude) for i in ids])
    for query in user_queries:
        scores = np.where(allowed, items @ query, -np.inf)
        for row in np.argsort(-scores)[:per_query_k]:
            if np.isfinite(scores[row]):
                best[ids[row]] = max(best.get(ids[row], -np.inf), float(scores[row]))
    return best


def _reference_greedy(best, categories_of, k, lam):
    """Cen et al. 2020 (ComiRec), Algorithm 1: k times pick argmax_i f(u, i) + lambda * sum_{s in S} g(i, s),
    g(i, s) = [category(i) != category(s)]."""
    picked = []
    remaining = dict(best)
    for _ in range(min(k, len(remaining))):
        gains = {i: f + lam * sum(categories_of[i] != categories_of[s] for s in picked) for i, f in remaining.items()}
        choice = max(gains, key=gains.get)
        picked.append(choice)
        del remaining[choice]
    return picked


@pytest.mark.parametrize("max_k, k", [(10, 10), (40, 3)])
def test_max_merge_equals_the_reference(corpus, max_k, k):
    """f(u, i) = max over the interests of e_i . v_u^(k) (Cen et al. 2020, Sec. 3.4), top k of the union of each
    interest's exact top per_query_k (= max_k). With k < per_query_k each interest is searched only to depth k;
    the merged top k must still equal the reference over the full depth."""
    ids, items, queries, _ = corpus
    retriever = MultiQueryRetriever(BruteForce(max_k=max_k).index(ids, items))
    scores, got = retriever(queries, k=k)
    for user in range(BATCH):
        best = _reference_candidates(ids, items, queries[user], per_query_k=max_k)
        expected = sorted(best, key=best.get, reverse=True)[:k]
        assert [i.decode() for i in got.numpy()[user]] == expected
        np.testing.assert_allclose(scores.numpy()[user], [best[i] for i in expected], rtol=1e-5)
        assert len(set(expected)) == k  # no duplicates


def test_duplicates_keep_their_best_score():
    ids = np.array(["a", "b", "c"])
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]], np.float32)
    # Interest 1 scores a 2, c 1.2, b 0; interest 2 scores b 3, c 1.8, a 0: merged a 2, b 3, c 1.8.
    queries = np.array([[[2.0, 0.0], [0.0, 3.0]]], np.float32)
    scores, got = MultiQueryRetriever(BruteForce(max_k=3).index(ids, items), per_query_k=2)(queries, k=3)
    assert [i.decode() for i in got.numpy()[0]] == ["b", "a", "c"]
    np.testing.assert_allclose(scores.numpy()[0], [3.0, 2.0, 1.8], rtol=1e-6)


def test_exclusion_mask_and_padding(corpus):
    ids, items, queries, _ = corpus
    retriever = MultiQueryRetriever(BruteForce(max_k=20).index(ids, items), per_query_k=4)
    exclude = np.array([["i1", "i2", ""]] * BATCH)
    mask = np.array([[True, False, False]] * BATCH)
    scores, got = retriever(queries, k=20, exclude=exclude, query_mask=mask)
    for user in range(BATCH):
        best = _reference_candidates(ids, items, queries[user][:1], per_query_k=4, exclude=("i1", "i2"))
        expected = sorted(best, key=best.get, reverse=True)
        # One interest of 4 items: 4 real results, then 16 padding entries.
        assert [i.decode() for i in got.numpy()[user][:4]] == expected
        assert list(got.numpy()[user][4:]) == [b""] * 16 and np.all(np.isneginf(scores.numpy()[user][4:]))


@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_greedy_diversity_equals_comirec_algorithm_1(corpus, lam):
    ids, items, queries, categories = corpus
    retriever = MultiQueryRetriever(BruteForce(max_k=12).index(ids, items), diversity=lam)
    retriever.set_categories(ids, categories)
    scores, got = retriever(queries, k=12)
    categories_of = dict(zip(ids, categories))
    for user in range(BATCH):
        best = _reference_candidates(ids, items, queries[user], per_query_k=12)
        expected = _reference_greedy(best, categories_of, 12, lam)
        assert [i.decode() for i in got.numpy()[user]] == expected
        np.testing.assert_allclose(scores.numpy()[user], [best[i] for i in expected], rtol=1e-5)
    if lam == 5.0:  # a large lambda forces round robin over the 4 categories: 3 of each in the top 12
        picked = [categories_of[i.decode()] for i in got.numpy()[0]]
        assert sorted(picked.count(c) for c in set(categories)) == [3, 3, 3, 3]


def test_any_index_and_config_round_trip(corpus):
    ids, items, queries, categories = corpus
    ivf = IVF(max_k=10, num_lists=4, num_probes=4).index(ids, items)  # every list probed: exact
    exact = MultiQueryRetriever(BruteForce(max_k=10).index(ids, items))(queries, k=10)
    approximate = MultiQueryRetriever(ivf)(queries, k=10)
    np.testing.assert_array_equal(approximate[1].numpy(), exact[1].numpy())
    retriever = MultiQueryRetriever(BruteForce(max_k=10), per_query_k=5, diversity=0.5)
    config = retriever.get_config()
    clone = MultiQueryRetriever.from_config(config)
    assert clone.get_config() == config and clone.per_query_k == 5 and clone.diversity == 0.5


def test_saved_model_round_trip(corpus, tmp_path):
    ids, items, queries, categories = corpus
    retriever = MultiQueryRetriever(BruteForce(max_k=10).index(ids, items), diversity=0.3)
    retriever.set_categories(ids, categories)
    module = tf.Module()
    module.retriever = retriever
    module.serve = tf.function(lambda q: retriever(q, k=10),
                               input_signature=[tf.TensorSpec([None, NUM_QUERIES, DIM], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "m"))
    before = retriever(queries, k=10)
    loaded = tf.saved_model.load(str(tmp_path / "m"))  # kept referenced: its variables live with it
    after = loaded.serve(tf.constant(queries))
    np.testing.assert_array_equal(after[1].numpy(), before[1].numpy())
    np.testing.assert_allclose(after[0].numpy(), before[0].numpy(), rtol=1e-6)


def test_bad_arguments_are_named(corpus):
    ids, items, queries, categories = corpus
    index = BruteForce(max_k=10).index(ids, items)
    with pytest.raises(ValueError, match="diversity must be a finite number >= 0, got -1"):
        MultiQueryRetriever(index, diversity=-1)
    with pytest.raises(ValueError, match=r"per_query_k must be <= the index's max_k \(10\), got 11"):
        MultiQueryRetriever(index, per_query_k=11)
    with pytest.raises(ValueError, match="index must be a TopKIndex"):
        MultiQueryRetriever(object())
    with pytest.raises(ValueError, match="diversity > 0 needs the items' categories"):
        MultiQueryRetriever(index, diversity=0.5)(queries, k=5)
    with pytest.raises(ValueError, match=r"queries must be \[batch, num_queries, dim\]"):
        MultiQueryRetriever(index)(queries[:, 0], k=5)
    retriever = MultiQueryRetriever(index).set_categories(ids, categories)
    with pytest.raises(ValueError, match="set_categories was already called"):
        retriever.set_categories(ids, categories)
    with pytest.raises(ValueError, match=r"k must be <= max_k \(10\), got 11"):
        retriever(queries, k=11)
