"""Deep Retrieval's E-step loss (Gao et al. 2020, sec. 3, the structure objective
Q_str = sum_i log sum_j p(pi_j(y_i) | x_i)): checked against a NumPy reference of that sum over the paper's
p(c | x) (eq. 1), and trained on users whose item paths follow their cluster."""
import numpy as np
import pytest
import tensorflow as tf

from tests.test_path_structure import DIM, _reference_log_prob, _structure
from tfrec_recall.layers.structure import PathStructure
from tfrec_recall.tasks.path_likelihood import PathLikelihoodTask


def test_loss_is_the_negative_mean_structure_objective():
    structure, x = _structure(layers=2, codes=5)
    paths = np.random.default_rng(3).integers(0, 5, size=(4, 3, 2)).astype(np.int32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0]], bool)
    got = PathLikelihoodTask(structure)(x, paths, mask).numpy()
    per_user = [np.log(sum(np.exp(_reference_log_prob(structure, x[b], paths[b, j])) for j in range(3) if mask[b, j]))
                for b in range(4)]
    np.testing.assert_allclose(got, -np.mean(per_user), rtol=1e-5)
    unmasked = [np.log(sum(np.exp(_reference_log_prob(structure, x[b], paths[b, j])) for j in range(3)))
                for b in range(4)]
    np.testing.assert_allclose(PathLikelihoodTask(structure)(x, paths).numpy(), -np.mean(unmasked), rtol=1e-5)


def test_training_the_structure_moves_each_cluster_onto_its_path():
    """4 user clusters; cluster k's items sit on path (k, k) (D = 2, K = 4). After training on the E-step loss a
    beam of width 1 finds a user's path for nearly every user; chance is 1 / K^D = 1/16."""
    tf.keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    clusters = rng.integers(0, 4, size=512)
    x = (np.eye(DIM)[clusters] + 0.3 * rng.normal(size=(512, DIM))).astype(np.float32)
    paths = np.stack([clusters, clusters], axis=1)[:, None, :].astype(np.int32)  # [512, J = 1, D = 2]
    structure = PathStructure(num_layers=2, num_codes=4, code_dim=4, hidden_units=[16])
    task, optimizer = PathLikelihoodTask(structure), tf.keras.optimizers.Adam(0.05)
    losses = []
    for step in range(150):
        batch = rng.choice(512, size=64, replace=False)
        with tf.GradientTape() as tape:
            loss = task(x[batch], paths[batch])
        grads = tape.gradient(loss, structure.trainable_variables)
        optimizer.apply_gradients(zip(grads, structure.trainable_variables))
        losses.append(float(loss))
    found, _ = structure.beam_search(tf.constant(x), beam_width=1)
    accuracy = np.mean((found.numpy()[:, 0] == paths[:, 0]).all(axis=1))
    assert losses[0] > np.log(16) - 0.5 and np.mean(losses[-10:]) < 0.3  # from about log 16 to near 0
    assert accuracy > 0.9  # chance 1/16


def test_bad_structure_and_config_round_trip():
    with pytest.raises(ValueError, match=r"structure must be a PathStructure, got list"):
        PathLikelihoodTask([1, 2])
    structure, x = _structure(layers=2, codes=4)
    task = PathLikelihoodTask(structure)
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(task))
    assert clone.get_config() == task.get_config()
    paths = np.zeros((4, 2, 2), np.int32)
    clone(x, paths)
    clone.set_weights(task.get_weights())
    np.testing.assert_allclose(clone(x, paths).numpy(), task(x, paths).numpy(), rtol=1e-6)
