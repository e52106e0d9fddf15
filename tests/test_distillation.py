"""Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", sec. 2):
DistillationLoss against a NumPy reference of ``tau^2 * mean_i KL(softmax(t_i / tau) || softmax(s_i / tau))``,
its argument checks and round trips; the CrossFeatureRanker teacher (a DCN, Wang et al. 2021): pair scores,
round trips, training above chance; and a two-tower student trained with the loss, its teacher frozen."""
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrec_recall.data import leave_last_out, make_synthetic
from tfrec_recall.data.tfdata import make_dataset, to_tensors
from tfrec_recall.features import (IdFeature, MultiCategoricalFeature, NumericFeature, SequenceFeature,
                                   feature_arrays, specs_from_split)
from tfrec_recall.layers import MLPTower
from tfrec_recall.models import TwoTower
from tfrec_recall.models.teacher import CrossFeatureRanker, train_teacher
from tfrec_recall.tasks.distillation import DistillationLoss
from tfrec_recall.tasks.retrieval import RetrievalTask
from tests.test_serialization import assert_config_complete, assert_keras_round_trips, constructor_config

RNG = np.random.default_rng(7)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall_tests")
class MatrixTeacher(tf.keras.layers.Layer):
    """A fake teacher with fixed scores: ``score_pairs(q, c)[i, j] = matrix[q["row"][i], c["row"][j]]``."""

    def __init__(self, matrix, **kwargs):
        super().__init__(**kwargs)
        self.matrix = np.asarray(matrix, np.float32).tolist()

    def score_pairs(self, query_features, candidate_features, training=False):
        rows = tf.gather(tf.constant(self.matrix), query_features["row"])
        return tf.gather(rows, candidate_features["row"], axis=1)

    def get_config(self):
        return {**super().get_config(), "matrix": self.matrix}


def ref_distillation(q, c, teacher, tau, n=None):
    """Hinton et al. 2015, sec. 2: tau^2 * mean_i KL(softmax(t_i / tau) || softmax(s_i / tau)), s = q c[:n]^T,
    t = teacher[:, :n] (candidates: the first n rows of the batch)."""
    n = len(q) if n is None else min(n, len(q))
    s = np.asarray(q, np.float64) @ np.asarray(c, np.float64)[:n].T / tau
    t = np.asarray(teacher, np.float64)[:, :n] / tau

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p = np.exp(log_softmax(t))
    return float(tau ** 2 * np.mean(np.sum(p * (log_softmax(t) - log_softmax(s)), axis=1)))


def rows(b):
    return {"row": tf.range(b)}


@pytest.mark.parametrize("tau,n", [(1.0, None), (2.0, None), (1.0, 3), (2.0, 3), (0.5, 9)])
def test_distillation_loss_matches_numpy(tau, n):
    q, c = RNG.normal(size=(5, 3)).astype(np.float32), RNG.normal(size=(5, 3)).astype(np.float32)
    t = RNG.normal(size=(5, 5)).astype(np.float32) * 2
    loss = DistillationLoss(MatrixTeacher(t), temperature=tau, num_candidates=n)
    expected = ref_distillation(q, c, t, tau, n)
    assert float(loss(rows(5), tf.constant(q), tf.constant(c))) == pytest.approx(expected, rel=1e-5)
    # The same in a graph with an unknown batch size (as under fit).
    traced = tf.function(lambda f, a, b: loss(f, a, b), input_signature=[
        {"row": tf.TensorSpec([None], tf.int32)}, tf.TensorSpec([None, 3]), tf.TensorSpec([None, 3])])
    assert float(traced(rows(5), tf.constant(q), tf.constant(c))) == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_zero_when_teacher_equals_student_and_golden_value():
    q, c = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(4, 3)).astype(np.float32)
    for tau in (1.0, 3.0):
        same = DistillationLoss(MatrixTeacher(q @ c.T), temperature=tau)
        assert float(same(rows(4), tf.constant(q), tf.constant(c))) == pytest.approx(0.0, abs=1e-6)
    # q = c = I (2x2): s = [[1, 0], [0, 1]]; a uniform teacher t = 0: p = [1/2, 1/2] on each row.
    # tau = 1: KL = sum_j p_j (log p_j - log softmax(s)_j) = log(1/2) + log(1 + e) - 1/2 = log((1 + e) / 2) - 1/2
    #          = 0.6201145 - 0.5 = 0.1201145 on each row, the mean 0.1201145.
    # tau = 2: s / 2 = [1/2, 0]: KL = log((1 + e^0.5) / 2) - 1/4 = 0.2809298 - 0.25 = 0.0309298; * tau^2 = 0.1237192.
    eye = tf.eye(2)
    assert float(DistillationLoss(MatrixTeacher(np.zeros((2, 2))))(rows(2), eye, eye)) == pytest.approx(
        0.1201145, rel=1e-5)
    assert float(DistillationLoss(MatrixTeacher(np.zeros((2, 2))), temperature=2.0)(rows(2), eye, eye)) == (
        pytest.approx(0.1237192, rel=1e-5))


def test_distillation_loss_errors():
    teacher = MatrixTeacher(np.zeros((2, 2)))
    for bad, shown in ((0, "0"), (float("inf"), "inf"), (-1.0, "-1.0")):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {shown}"):
            DistillationLoss(teacher, temperature=bad)
    with pytest.raises(ValueError, match=r"num_candidates must be a positive integer, got 0"):
        DistillationLoss(teacher, num_candidates=0)
    with pytest.raises(ValueError, match=r"teacher must be a Keras layer or model with a score_pairs\(.*got <"):
        DistillationLoss(tf.keras.layers.Dense(1))
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got -1"):
        DistillationLoss(teacher, weight=-1)


# ----------------------------------------------------------------------------------------------------------
# The CrossFeatureRanker teacher

ITEMS = ("i1", "i2", "i3", "i4", "i5")
QUERY_SPECS = [IdFeature("user_id", 4, vocabulary=("u1", "u2", "u3")),
               SequenceFeature("history", 4, vocabulary=ITEMS, max_len=3),
               NumericFeature("age", mean=30.0, variance=100.0, embedding_dim=2)]
ITEM_SPECS = [IdFeature("item_id", 4, vocabulary=ITEMS), MultiCategoricalFeature("tags", 3, hash_buckets=10, max_len=2)]
QUERIES = {"user_id": np.array(["u1", "u2", "zz"], object),
           "history": np.array([["i3", "i1", ""], ["", "", ""], ["i2", "i9", "i5"]], object),
           "age": np.array([40.0, np.nan, 21.0], np.float32)}
CANDIDATES = {"item_id": np.array(["i1", "i4", "i2", "i9"], object),
              "tags": np.array([["t1", ""], ["t2", "t3"], ["", ""], ["t1", "t4"]], object)}


def ranker(**kwargs):
    tf.keras.utils.set_random_seed(5)
    model = CrossFeatureRanker(QUERY_SPECS, [s.to_dict() for s in ITEM_SPECS], hidden_units=(8,), name="teacher",
                               **kwargs)
    model.build(None)
    return model


def pair_scores(model, queries, candidates):
    """call() on each explicit (query i, candidate j) pair, one pair at a time."""
    out = np.zeros((len(queries["user_id"]), len(candidates["item_id"])), np.float32)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            pair = {**{k: v[i:i + 1] for k, v in queries.items()}, **{k: v[j:j + 1] for k, v in candidates.items()}}
            out[i, j] = model(to_tensors(pair)).numpy()[0]
    return out


@pytest.mark.parametrize("cross_layers", [2, 0])
def test_score_pairs_equals_call_on_each_pair(cross_layers):
    model = ranker(cross_layers=cross_layers)
    scores = model.score_pairs(to_tensors(QUERIES), to_tensors(CANDIDATES)).numpy()
    assert scores.shape == (3, 4)
    np.testing.assert_allclose(scores, pair_scores(model, QUERIES, CANDIDATES), rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 0  # not a constant: the pairs differ


def test_ranker_errors():
    with pytest.raises(ValueError, match=r"disjoint names, both have \['item_id'\]"):
        CrossFeatureRanker(QUERY_SPECS + ITEM_SPECS[:1], ITEM_SPECS)
    with pytest.raises(ValueError, match=r"candidate_features must name at least one feature spec, got \[\]"):
        CrossFeatureRanker(QUERY_SPECS, [])
    with pytest.raises(ValueError, match=r"cross_layers must be an integer >= 0, got -1"):
        CrossFeatureRanker(QUERY_SPECS, ITEM_SPECS, cross_layers=-1)
    with pytest.raises(ValueError, match=r"hidden_units must be a sequence of positive integers, got \[0\]"):
        CrossFeatureRanker(QUERY_SPECS, ITEM_SPECS, hidden_units=(0,))


def test_ranker_and_loss_round_trip_config_savedmodel_and_keras_file(tmp_path):
    model = ranker()
    queries, candidates = to_tensors(QUERIES), to_tensors(CANDIDATES)
    scores = model.score_pairs(queries, candidates).numpy()
    clone = assert_keras_round_trips(model)
    clone.build(None)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone.score_pairs(queries, candidates).numpy(), scores, rtol=1e-6)
    model.save(str(tmp_path / "teacher"), save_format="tf", include_optimizer=False)
    model.save(str(tmp_path / "teacher.keras"))
    for path in ("teacher", "teacher.keras"):
        loaded = tf.keras.models.load_model(str(tmp_path / path), compile=False)
        assert type(loaded) is CrossFeatureRanker
        assert constructor_config(loaded.get_config()) == constructor_config(model.get_config())
        np.testing.assert_allclose(loaded.score_pairs(queries, candidates).numpy(), scores, rtol=1e-6)
    loss = DistillationLoss(model, weight=0.5, temperature=2.0, num_candidates=3, name="distillation")
    assert not model.trainable and loss.feature_specs() == QUERY_SPECS + ITEM_SPECS
    assert_config_complete(loss)
    again = assert_keras_round_trips(loss)
    assert (type(again.teacher), again.teacher.trainable, again.temperature, again.num_candidates) == (
        CrossFeatureRanker, False, 2.0, 3)
    assert assert_keras_round_trips(DistillationLoss(MatrixTeacher(np.eye(2)))).feature_specs() == []


# ----------------------------------------------------------------------------------------------------------
# Training the teacher, and distilling it into a two-tower student

@pytest.fixture(scope="module")
def split():
    return leave_last_out(make_synthetic(num_users=300, num_items=200, seed=0), history_length=10)


@pytest.fixture(scope="module")
def specs(split):
    return specs_from_split(split, embedding_dim=16, side_embedding_dim=8)


@pytest.fixture(scope="module")
def teacher(split, specs):
    # The learning rate above the 1e-3 default: 3 epochs of this small split then leave the teacher well
    # above chance (with 1e-3, AUC ~0.65).
    return train_teacher(split, specs["query"], specs["candidate"], epochs=3, learning_rate=1e-2, seed=0)


def auc(positive, negative):
    """P(score of a positive > score of a negative), ties counting one half."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(np.mean(p > n) + 0.5 * np.mean(p == n))


def test_trained_teacher_ranks_held_out_positives_above_uniform_negatives(split, teacher):
    specs = teacher.query_feature_specs() + teacher.candidate_feature_specs()
    items, rng = np.asarray(split.data.items), np.random.default_rng(0)
    negatives = pd.concat([split.test.assign(item_id=items[rng.integers(0, len(items), len(split.test))])
                           for _ in range(5)], ignore_index=True)
    scores = [teacher(to_tensors(feature_arrays(r, split.data, specs))).numpy() for r in (split.test, negatives)]
    value = auc(*scores)  # ~0.73 here
    assert value > 0.65, f"teacher AUC {value:.3f} of test positives vs uniform negatives: chance is 0.5"


def test_train_teacher_errors(split, specs):
    for kwargs, message in (({"epochs": 0}, r"epochs must be a positive integer, got 0"),
                            ({"num_negatives": 0}, r"num_negatives must be a positive integer, got 0"),
                            ({"learning_rate": 0.0}, r"learning_rate must be a finite number > 0, got 0.0"),
                            ({"seed": -1}, r"seed must be an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            train_teacher(split, specs["query"], specs["candidate"], **kwargs)
    with pytest.raises(TypeError, match=r"split must be a tfrec_recall Split, got dict"):
        train_teacher({}, specs["query"], specs["candidate"])


def test_student_trains_with_distillation_and_teacher_stays_frozen(split, specs, teacher):
    tf.keras.utils.set_random_seed(3)
    towers = [MLPTower(specs[side], hidden_units=(16,), output_dim=8, name=side) for side in ("query", "candidate")]
    model = TwoTower(*towers, RetrievalTask(temperature=0.2), auxiliary_losses=[
        DistillationLoss(teacher, weight=1.0, temperature=2.0, name="distillation")])
    arrays = feature_arrays(split.train, split.data, model.training_feature_specs())
    dataset = make_dataset(arrays, 256, shuffle=True, seed=0, drop_remainder=True)  # one trace of the step
    model.trainable = True  # sets every sublayer's flag, the teacher's too (as loading a SavedModel does)
    assert len(model.trainable_variables) == len(towers[0].trainable_variables + towers[1].trainable_variables)
    before = [w.copy() for w in teacher.get_weights()]
    batch = next(iter(dataset))
    with tf.GradientTape() as tape:
        value = model.compute_losses(batch, training=True)["distillation"]
    gradients = tape.gradient(value, model.trainable_variables + teacher.variables)
    student_gradients = gradients[:len(model.trainable_variables)]
    assert any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in student_gradients)
    assert all(g is None for g in gradients[len(model.trainable_variables):])  # no gradient into the teacher
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    history = model.fit(dataset, epochs=2, verbose=0).history
    assert "distillation" in history and np.all(np.isfinite(history["distillation"]))
    assert history["distillation"][-1] < history["distillation"][0]
    for got, want in zip(teacher.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_attached_loss_distils_the_students_softmax_logits():
    """Hinton et al. 2015, sec. 2: the student's logits are those of its own softmax, the dot products divided
    by the retrieval task's temperature (0.5 here)."""
    tf.keras.utils.set_random_seed(0)
    query = MLPTower([IdFeature("row_id", 3, vocabulary=("a", "b"))], output_dim=3)
    candidate = MLPTower([IdFeature("item_id", 3, vocabulary=("x", "y"))], output_dim=3)
    t = RNG.normal(size=(5, 5)).astype(np.float32)
    loss = DistillationLoss(MatrixTeacher(t), temperature=2.0)
    TwoTower(query, candidate, RetrievalTask(temperature=0.5), auxiliary_losses=[loss])
    q, c = RNG.normal(size=(5, 3)).astype(np.float32), RNG.normal(size=(5, 3)).astype(np.float32)
    got = float(loss(rows(5), tf.constant(q), tf.constant(c)))
    assert got == pytest.approx(ref_distillation(q / 0.5, c, t, 2.0), rel=1e-5)
    assert got != pytest.approx(ref_distillation(q, c, t, 2.0), rel=1e-3)
