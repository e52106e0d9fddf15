"""Deep Retrieval's structure model (Gao et al. 2020, "Learning a Retrievable Structure for Large-Scale
Recommendations"): p(c | x) = prod_d p(c_d | x, c_1..c_{d-1}) (the paper's eq. 1, each factor a softmax over
the K codes of layer d from an MLP over [x, embeddings of the earlier codes]), checked against a NumPy reference
written from that formula; beam search checked against exhaustive enumeration and a greedy reference."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.layers.structure import PathStructure

DIM = 6


def _structure(layers=2, codes=8, seed=0):
    tf.keras.utils.set_random_seed(seed)
    structure = PathStructure(num_layers=layers, num_codes=codes, code_dim=3, hidden_units=[5])
    x = np.random.default_rng(seed).normal(size=(4, DIM)).astype(np.float32)
    structure(x, np.zeros((4, 1, layers), np.int32))  # builds every layer's weights
    return structure, x


def _reference_layer(structure, x, prefix, d):
    """log p(c_d | x, prefix) over the K codes, in NumPy from the layer's weights (the paper's per-layer softmax
    over an MLP of [x, embeddings of the earlier codes])."""
    tables = [structure.code_embeddings[i].embeddings.numpy() for i in range(d)]
    h = np.concatenate([x] + [tables[i][prefix[i]] for i in range(d)])
    dense = structure.layer_mlps[d].layers
    for layer in dense[:-1]:
        h = np.maximum(h @ layer.kernel.numpy() + layer.bias.numpy(), 0.0)
    logits = h @ dense[-1].kernel.numpy() + dense[-1].bias.numpy()
    logits = logits - logits.max()
    return logits - np.log(np.exp(logits).sum())


def _reference_log_prob(structure, x, path):
    """log p(path | x) = sum over layers of log p(c_d | x, c_1..c_{d-1}) (the paper's eq. 1)."""
    return sum(_reference_layer(structure, x, path[:d], d)[path[d]] for d in range(structure.num_layers))


def _all_paths(structure):
    return np.array(list(itertools.product(range(structure.num_codes), repeat=structure.num_layers)), np.int32)


def test_log_prob_matches_the_papers_product_of_softmaxes():
    structure, x = _structure(layers=3, codes=5)
    paths = np.random.default_rng(1).integers(0, 5, size=(4, 7, 3)).astype(np.int32)
    got = structure(x, paths).numpy()
    expected = [[_reference_log_prob(structure, x[b], paths[b, j]) for j in range(7)] for b in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_probabilities_of_all_paths_sum_to_one():
    structure, x = _structure(layers=2, codes=8)
    paths = np.broadcast_to(_all_paths(structure), (4, 64, 2))
    np.testing.assert_allclose(np.exp(structure(x, paths).numpy()).sum(axis=1), np.ones(4), rtol=1e-5)


def test_beam_search_with_every_beam_is_exhaustive_enumeration():
    """B >= K^D (D = 2, K = 8): the beam holds all 64 paths, best first, with their exact log-probabilities."""
    structure, x = _structure(layers=2, codes=8)
    paths, scores = structure.beam_search(tf.constant(x), beam_width=64)
    everything = _all_paths(structure)
    exact = structure(x, np.broadcast_to(everything, (4, 64, 2))).numpy()
    for b in range(4):
        order = np.argsort(-exact[b], kind="stable")
        np.testing.assert_allclose(scores.numpy()[b], exact[b][order], rtol=1e-5, atol=1e-6)
        assert {tuple(p) for p in paths.numpy()[b]} == {tuple(p) for p in everything}
    np.testing.assert_allclose(structure(x, paths).numpy(), scores.numpy(), rtol=1e-5, atol=1e-6)


def test_narrow_beams_are_consistent_and_width_one_is_greedy():
    structure, x = _structure(layers=3, codes=6, seed=2)
    paths, scores = structure.beam_search(tf.constant(x), beam_width=5)
    assert paths.shape == (4, 5, 3) and np.all(np.diff(scores.numpy(), axis=1) <= 1e-6)  # best first
    np.testing.assert_allclose(structure(x, paths).numpy(), scores.numpy(), rtol=1e-5, atol=1e-5)
    greedy, _ = structure.beam_search(tf.constant(x), beam_width=1)
    for b in range(4):
        prefix = []
        for d in range(3):  # width 1: the most probable code of each layer given the codes chosen so far
            prefix.append(int(np.argmax(_reference_layer(structure, x[b], prefix, d))))
        assert greedy.numpy()[b, 0].tolist() == prefix


def test_a_beam_of_the_top_paths_finds_the_best_path_of_a_peaked_model():
    """A beam of width K finds the exact best path when each layer's choice does not depend on the prefix."""
    structure, x = _structure(layers=2, codes=8, seed=3)
    for table in structure.code_embeddings:
        table.embeddings.assign(tf.zeros_like(table.embeddings))  # later layers ignore the prefix
    paths, _ = structure.beam_search(tf.constant(x), beam_width=8)
    exact = structure(x, np.broadcast_to(_all_paths(structure), (4, 64, 2))).numpy()
    np.testing.assert_array_equal(paths.numpy()[:, 0], _all_paths(structure)[exact.argmax(axis=1)])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_codes": 1}, r"num_codes must be an integer >= 2, got 1"),
    ({"num_layers": 0}, r"num_layers must be a positive integer, got 0"),
    ({"code_dim": -2}, r"code_dim must be a positive integer, got -2"),
    ({"hidden_units": "64"}, r"hidden_units must be a list of positive integers, got '64'"),
    ({"hidden_units": [64, 0]}, r"hidden_units must be a positive integer, got 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PathStructure(**kwargs)


def test_beam_wider_than_the_number_of_paths_is_refused():
    structure, x = _structure(layers=2, codes=8)
    with pytest.raises(ValueError, match=r"beam_width \(65\) must be <= K\^D = 8\^2 = 64"):
        structure.beam_search(tf.constant(x), beam_width=65)
    with pytest.raises(ValueError, match=r"beam_width must be a positive integer, got 0"):
        structure.beam_search(tf.constant(x), beam_width=0)


def test_config_round_trip_and_saved_beam_search(tmp_path):
    structure, x = _structure(layers=2, codes=8)
    config = tf.keras.layers.serialize(structure)
    clone = tf.keras.layers.deserialize(config)
    assert clone.get_config() == structure.get_config()
    clone(x, np.zeros((4, 1, 2), np.int32))
    clone.set_weights(structure.get_weights())
    np.testing.assert_allclose(clone(x, np.zeros((4, 2, 2), np.int32)).numpy(),
                               structure(x, np.zeros((4, 2, 2), np.int32)).numpy(), rtol=1e-6)

    module = tf.Module()
    module.structure = structure
    module.search = tf.function(lambda q: structure.beam_search(q, beam_width=10),
                                input_signature=[tf.TensorSpec([None, DIM], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    expected_paths, expected_scores = structure.beam_search(tf.constant(x), beam_width=10)
    got_paths, got_scores = loaded.search(tf.constant(x))
    np.testing.assert_array_equal(got_paths.numpy(), expected_paths.numpy())
    np.testing.assert_allclose(got_scores.numpy(), expected_scores.numpy(), rtol=1e-6)
