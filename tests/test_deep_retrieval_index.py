"""DeepRetrievalIndex (Gao et al. 2020, section 3.3 "retrieval": beam search over the structure, the union of the
items on the B paths, then ranking): checked against NumPy references over the same structure: exhaustive
enumeration of the K^D paths (the paper's p(c|x), eq. 1) and a brute-force dot-product ranking of the union."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

from tests.test_path_structure import DIM, _reference_layer, _reference_log_prob
from tfrec_recall.layers.structure import PathStructure
from tfrec_recall.retrievers import DeepRetrievalIndex
from tfrec_recall.retrievers.deep_retrieval import items_scored, path_codes

N, J, K, D = 60, 2, 4, 2


def _world(seed=0):
    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    structure = PathStructure(num_layers=D, num_codes=K, code_dim=3, hidden_units=[5])
    queries = rng.normal(size=(5, DIM)).astype(np.float32)
    structure(queries, np.zeros((5, 1, D), np.int32))
    items = np.array([f"i{n}" for n in range(N)])
    embeddings = rng.normal(size=(N, DIM)).astype(np.float32)
    paths = rng.integers(0, K, size=(N, J, D)).astype(np.int32)
    return structure, queries, items, embeddings, paths


def _index(world, beam_width, rerank=True, max_k=10):
    structure, _, items, embeddings, paths = world
    return DeepRetrievalIndex(structure, beam_width=beam_width, rerank=rerank, max_k=max_k).index(items, embeddings,
                                                                                                   paths)


def _reference_beam(structure, query, beam_width):
    """The paths a beam of ``beam_width`` keeps (the paper's beam search, Algorithm 1), in NumPy: after each
    layer, the ``beam_width`` most probable prefixes."""
    beams = [()]
    for d in range(D):
        extended = [b + (c,) for b in beams for c in range(K)]
        score = [sum(_reference_log_prob_prefix(structure, query, p)) for p in extended]
        order = np.argsort(-np.array(score), kind="stable")[:beam_width]
        beams = [extended[i] for i in order]
    return beams


def _reference_log_prob_prefix(structure, query, prefix):
    return [_reference_layer(structure, query, list(prefix[:d]), d)[prefix[d]] for d in range(len(prefix))]


def _union(paths, beams):
    on = {tuple(p) for p in beams}
    return [n for n in range(N) if any(tuple(p) in on for p in paths[n])]


def test_every_beam_gives_exact_top_k_over_the_corpus():
    """B = K^D: every path is on the beam, so the reranked result is brute-force top-k of the dot product."""
    world = _world()
    _, queries, items, embeddings, paths = world
    scores, ids = _index(world, beam_width=K ** D)(queries, k=10)
    for b in range(5):  # every item has paths, so every item is reachable
        dots = embeddings @ queries[b]
        best = np.argsort(-dots, kind="stable")[:10]
        assert ids.numpy()[b].astype(str).tolist() == items[best].tolist()
        np.testing.assert_allclose(scores.numpy()[b], dots[best], rtol=1e-5)


def test_a_narrow_beam_ranks_the_union_of_its_paths_items():
    world = _world(seed=1)
    structure, queries, items, embeddings, paths = world
    index = _index(world, beam_width=3)
    scores, ids = index(queries, k=10)
    for b in range(5):
        union = _union(paths, _reference_beam(structure, queries[b], 3))
        dots = embeddings[union] @ queries[b]
        best = np.array(union)[np.argsort(-dots, kind="stable")[:10]]
        got = ids.numpy()[b].astype(str)
        assert got[: len(best)].tolist() == items[best].tolist()
        assert (got[len(best):] == "").all() and np.isneginf(scores.numpy()[b, len(best):]).all()
        assert items_scored(index, queries[b:b + 1])[0] == len(union)


def test_without_the_reranker_items_rank_by_their_best_beam_path():
    world = _world(seed=2)
    structure, queries, items, _, paths = world
    scores, ids = _index(world, beam_width=5, rerank=False)(queries, k=10)
    for b in range(5):
        beams = _reference_beam(structure, queries[b], 5)
        log_p = {p: _reference_log_prob(structure, queries[b], list(p)) for p in beams}
        best = {n: max(log_p[tuple(p)] for p in paths[n] if tuple(p) in log_p) for n in _union(paths, beams)}
        expected = sorted(best.values(), reverse=True)[:10]
        got = [i for i in ids.numpy()[b].astype(str) if i]
        np.testing.assert_allclose(scores.numpy()[b, : len(got)], expected[: len(got)], rtol=1e-5, atol=1e-6)
        assert len(got) == min(10, len(best)) and len(set(got)) == len(got)  # each item once
        for item, score in zip(got, scores.numpy()[b]):
            np.testing.assert_allclose(score, best[int(item[1:])], rtol=1e-5, atol=1e-6)


def test_exclusion_and_an_item_on_several_beam_paths():
    world = _world(seed=3)
    structure, queries, items, embeddings, paths = world
    paths = paths.copy()
    paths[7] = [[0, 0], [0, 1]]  # item 7 on two paths that a full beam holds
    full = DeepRetrievalIndex(structure, beam_width=K ** D, max_k=N).index(items, embeddings, paths)
    _, ids = full(queries, k=N)
    assert all(sorted(row.astype(str).tolist()) == sorted(items.tolist()) for row in ids.numpy())  # once each
    top = ids.numpy()[:, :3]
    _, excluded = full(queries, k=10, exclude=tf.constant(top))
    assert all(not set(row) & set(seen) for row, seen in zip(excluded.numpy(), top))  # each query's own exclusions
    np.testing.assert_array_equal(excluded.numpy(), ids.numpy()[:, 3:13])  # the next 10 of the full ranking


def test_path_codes_are_lexicographic_ranks():
    everything = np.array(list(itertools.product(range(K), repeat=3)))
    np.testing.assert_array_equal(path_codes(everything, K), np.arange(K ** 3))


@pytest.mark.parametrize("paths, message", [
    (np.zeros((N, 4, D), np.int32), r"J \(4 paths per item\) must be <= beam_width \(3\)"),
    (np.zeros((N, 1, D + 1), np.int32), r"paths must have shape \[num_candidates=60, J, D=2\], got \[60, 1, 3\]"),
    (np.full((N, 1, D), K, np.int32), r"paths must hold integer codes in \[0, 4\)"),
    (np.zeros((N, 1, D), np.float32), r"paths must hold integer codes"),
    (None, r"needs paths"),
])
def test_bad_paths_are_refused(paths, message):
    structure, _, items, embeddings, _ = _world()
    with pytest.raises(ValueError, match=message):
        DeepRetrievalIndex(structure, beam_width=3).index(items, embeddings, paths)


def test_bad_arguments_are_named():
    structure = _world()[0]
    with pytest.raises(ValueError, match=r"beam_width \(17\) must be <= K\^D = 4\^2 = 16"):
        DeepRetrievalIndex(structure, beam_width=17)
    with pytest.raises(ValueError, match=r"rerank must be a bool, got 'yes'"):
        DeepRetrievalIndex(structure, rerank="yes", beam_width=4)
    with pytest.raises(ValueError, match=r"structure must be a PathStructure, got str"):
        DeepRetrievalIndex("tree")


def test_config_round_trip_and_saved_model(tmp_path):
    world = _world(seed=4)
    index = _index(world, beam_width=6)
    clone = DeepRetrievalIndex.from_config(index.get_config())
    assert not clone.is_built and clone.get_config() == index.get_config()
    queries = world[1]
    module = tf.Module()
    module.index = index
    module.search = tf.function(lambda q: index(q, k=5), input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    expected_scores, expected_ids = index(queries, k=5)
    got_scores, got_ids = loaded.search(tf.constant(queries))
    np.testing.assert_array_equal(got_ids.numpy(), expected_ids.numpy())
    np.testing.assert_allclose(got_scores.numpy(), expected_scores.numpy(), rtol=1e-6)
