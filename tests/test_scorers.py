"""The pluggable scorers (tfrec_recall.layers.interest) against NumPy references written from their formulas,
their configuration and save / load round trips, and RetrievalTask's ``scorer`` argument (the default gives
the task's previous logits exactly)."""
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.layers.interest import DotScorer, LabelAwareAttentionScorer, MaxInterestScorer, Scorer
from tfrec_recall.tasks.retrieval import RetrievalTask
from tests import references
from tests.test_serialization import assert_config_complete, assert_keras_round_trips

RNG = np.random.default_rng(5)
B, K, N, D = 3, 4, 5, 3
INTERESTS = RNG.normal(size=(B, K, D)).astype(np.float32)
CANDIDATES = RNG.normal(size=(N, D)).astype(np.float32)
TARGETS = RNG.normal(size=(B, D)).astype(np.float32)
MASK = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool)


# ----------------------------------------------------------------------------------------------------------
# NumPy references, written from the formulas (plain loops, float64)

def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_max_interest(interests, candidates, mask=None):
    """s(u_b, y_n) = max over valid k of <u_bk, y_n>."""
    out = np.zeros((len(interests), len(candidates)))
    for b, user in enumerate(interests):
        valid = [k for k in range(len(user)) if mask is None or mask[b, k]]
        for n, y in enumerate(candidates):
            out[b, n] = max(float(np.dot(user[k], y)) for k in valid)
    return out


def ref_label_aware(interests, candidates, p, targets=None, mask=None):
    """MIND (Li et al. 2019, Sec. 3.5): v_u = V_u softmax(pow(V_u^T e, p)) with e the label: the target of
    user b when given, else candidate n itself; s = <v_u, y_n>."""
    out = np.zeros((len(interests), len(candidates)))
    for b, user in enumerate(interests):
        valid = [k for k in range(len(user)) if mask is None or mask[b, k]]
        for n, y in enumerate(candidates):
            label = y if targets is None else targets[b]
            w = softmax([np.power(float(np.dot(user[k], label)), p) for k in valid])
            v = sum(w_k * user[k].astype(np.float64) for w_k, k in zip(w, valid))
            out[b, n] = float(np.dot(v, y))
    return out


# ----------------------------------------------------------------------------------------------------------
# The scorers

def test_dot_scorer_matches_numpy_and_golden_value():
    got = DotScorer()(tf.constant(INTERESTS[:, 0]), tf.constant(CANDIDATES)).numpy()
    np.testing.assert_allclose(got, INTERESTS[:, 0].astype(np.float64) @ CANDIDATES.T, rtol=1e-5, atol=1e-6)
    # [[1, 2]] . [[3, 4], [-1, 0]]^T = [[1*3 + 2*4, 1*(-1) + 2*0]] = [[11, -1]]
    np.testing.assert_allclose(DotScorer()(tf.constant([[1.0, 2.0]]), tf.constant([[3.0, 4.0], [-1.0, 0.0]])),
                               [[11.0, -1.0]])


def test_max_interest_scorer_matches_numpy_with_and_without_mask():
    scorer = MaxInterestScorer()
    np.testing.assert_allclose(scorer(INTERESTS, CANDIDATES).numpy(), ref_max_interest(INTERESTS, CANDIDATES),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer(INTERESTS, CANDIDATES, interest_mask=MASK).numpy(),
                               ref_max_interest(INTERESTS, CANDIDATES, MASK), rtol=1e-5, atol=1e-6)
    # interests [[1, 0], [0, 2]], candidate [3, 1]: dots 3 and 2 -> max 3; with the first masked -> 2.
    two = tf.constant([[[1.0, 0.0], [0.0, 2.0]]])
    assert float(scorer(two, tf.constant([[3.0, 1.0]]))[0, 0]) == pytest.approx(3.0)
    assert float(scorer(two, tf.constant([[3.0, 1.0]]), interest_mask=[[False, True]])[0, 0]) == pytest.approx(2.0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_label_aware_attention_matches_numpy_every_candidate_its_own_label(p):
    got = LabelAwareAttentionScorer(power=p)(INTERESTS, CANDIDATES, interest_mask=MASK).numpy()
    np.testing.assert_allclose(got, ref_label_aware(INTERESTS, CANDIDATES, p, mask=MASK), rtol=1e-4, atol=1e-5)


def test_label_aware_attention_with_targets_and_non_integer_power():
    got = LabelAwareAttentionScorer(power=2.0)(INTERESTS, CANDIDATES, targets=TARGETS).numpy()
    np.testing.assert_allclose(got, ref_label_aware(INTERESTS, CANDIDATES, 2.0, targets=TARGETS), rtol=1e-4,
                               atol=1e-5)
    # A non-integer power needs non-negative scores (the real power): non-negative embeddings.
    positive, items, labels = np.abs(INTERESTS), np.abs(CANDIDATES), np.abs(TARGETS)
    got = LabelAwareAttentionScorer(power=1.5)(positive, items, targets=labels, interest_mask=MASK).numpy()
    np.testing.assert_allclose(got, ref_label_aware(positive, items, 1.5, targets=labels, mask=MASK),
                               rtol=1e-4, atol=1e-5)


def test_label_aware_attention_golden_value_and_limits():
    # Interests u1 = [1, 0], u2 = [0, 2]; label = candidate y = [2, 1.5]: scores <u1, y> = 2, <u2, y> = 3.
    # p = 1: w = softmax([2, 3]) = [0.268941, 0.731059];
    # v = [0.268941, 1.462117]; s = 2 * 0.268941 + 1.5 * 1.462117 = 0.537883 + 2.193176 = 2.731059.
    interests, y = tf.constant([[[1.0, 0.0], [0.0, 2.0]]]), tf.constant([[2.0, 1.5]])
    assert float(LabelAwareAttentionScorer(power=1.0)(interests, y)[0, 0]) == pytest.approx(2.731059, rel=1e-5)
    # p = 0: equal weights, s = (2 + 3) / 2 = 2.5; large p: the hard max, s -> max(2, 3) = 3.
    assert float(LabelAwareAttentionScorer(power=0.0)(interests, y)[0, 0]) == pytest.approx(2.5, rel=1e-6)
    assert float(LabelAwareAttentionScorer(power=30.0)(interests, y)[0, 0]) == pytest.approx(3.0, rel=1e-5)
    # p = inf: exactly the hard max, 3 (ComiRec's argmax readout).
    assert float(LabelAwareAttentionScorer(power=float("inf"))(interests, y)[0, 0]) == 3.0


def test_label_aware_attention_hard_max_with_targets_and_mask():
    """ComiRec (Cen et al. 2020, Sec. 3.3): v_u = V_u[:, argmax_k <u_k, e_label>] over the valid interests,
    scored against every candidate; the gradient reaches only the chosen interest."""
    interests = tf.Variable(INTERESTS)
    with tf.GradientTape() as tape:
        got = LabelAwareAttentionScorer(power=float("inf"))(interests, CANDIDATES, targets=TARGETS,
                                                            interest_mask=MASK)
        total = tf.reduce_sum(got)
    gradient = tape.gradient(total, interests).numpy()
    for b in range(B):
        valid = [k for k in range(K) if MASK[b, k]]
        best = max(valid, key=lambda k: float(INTERESTS[b, k] @ TARGETS[b]))
        np.testing.assert_allclose(got.numpy()[b], CANDIDATES @ INTERESTS[b, best], rtol=1e-5, atol=1e-6)
        assert [k for k in range(K) if np.any(gradient[b, k] != 0)] == [best]


def test_scorer_errors_name_argument_and_value():
    for bad in (-1.0, float("nan"), True, "2"):
        with pytest.raises(ValueError, match=r"power must be a number >= 0 or inf, got"):
            LabelAwareAttentionScorer(power=bad)
    with pytest.raises(ValueError, match=r"MaxInterestScorer needs queries of shape \[batch, num_interests, dim\]"):
        MaxInterestScorer()(INTERESTS[:, 0], CANDIDATES)
    with pytest.raises(ValueError, match=r"DotScorer scores one query vector per user and takes no interest_mask"):
        DotScorer()(INTERESTS[:, 0], CANDIDATES, interest_mask=MASK)
    with pytest.raises(NotImplementedError, match=r"Scorer must implement call"):
        Scorer()(INTERESTS[:, 0], CANDIDATES)
    with pytest.raises(TypeError, match=r"scorer must be None or a tfrec_recall.layers.interest.Scorer"):
        RetrievalTask(scorer="dot")


@tf.keras.utils.register_keras_serializable(package="tfrec_recall_tests")
class ScoringModel(tf.keras.Model):
    """Test harness: a Keras model around one scorer, to save and load it."""

    def __init__(self, scorer, **kwargs):
        super().__init__(**kwargs)
        self.scorer = scorer

    def call(self, inputs):
        return self.scorer(inputs["queries"], inputs["candidates"][0])

    def get_config(self):
        return {"scorer": tf.keras.utils.serialize_keras_object(self.scorer), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(tf.keras.utils.deserialize_keras_object(config["scorer"]), name=config["name"])


@pytest.mark.parametrize("scorer, queries", [(DotScorer(name="dot"), INTERESTS[:, 0]),
                                             (MaxInterestScorer(name="max"), INTERESTS),
                                             (LabelAwareAttentionScorer(power=3.0, name="mind"), INTERESTS)])
def test_scorers_round_trip_config_and_save_load(tmp_path, scorer, queries):
    assert_config_complete(scorer)
    clone = assert_keras_round_trips(scorer)
    assert clone.name == scorer.name and getattr(clone, "power", None) == getattr(scorer, "power", None)
    inputs = {"queries": tf.constant(queries), "candidates": tf.constant(CANDIDATES[None])}
    model = ScoringModel(scorer)
    expected = model(inputs).numpy()
    model.save(str(tmp_path / "scorer.keras"))
    loaded = tf.keras.models.load_model(str(tmp_path / "scorer.keras"), compile=False)
    assert type(loaded.scorer) is type(scorer) and loaded.scorer.get_config() == scorer.get_config()
    np.testing.assert_allclose(loaded(inputs).numpy(), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# RetrievalTask's scorer

Q = RNG.normal(size=(6, 4)).astype(np.float32)
C = RNG.normal(size=(6, 4)).astype(np.float32)
IDS = np.array(["a", "b", "a", "c", "d", "b"])
LOG_Q = np.log(RNG.uniform(0.05, 0.9, size=6)).astype(np.float32)


def cross_entropy_sum(logits):
    """sum_i -log softmax(logits_i)[i] (positives on the diagonal)."""
    return float(sum(-np.log(softmax(row)[i]) for i, row in enumerate(np.asarray(logits, np.float64))))


def test_default_scorer_is_dot_and_gives_the_previous_loss():
    task = RetrievalTask(temperature=0.5, remove_accidental_hits=True)
    assert isinstance(task.scorer, DotScorer)
    kwargs = dict(candidate_ids=tf.constant(IDS), candidate_log_q=tf.constant(LOG_Q))
    got = float(task(tf.constant(Q), tf.constant(C), **kwargs))
    explicit = RetrievalTask(temperature=0.5, remove_accidental_hits=True, scorer=DotScorer())
    assert float(explicit(tf.constant(Q), tf.constant(C), **kwargs)) == got
    assert got == pytest.approx(references.retrieval_loss(Q, C, ids=list(IDS), log_q=LOG_Q, temperature=0.5,
                                                          remove_hits=True), rel=1e-5)
    # The logits are exactly the previous matmul / temperature - log q.
    logits, _ = task.logits_and_labels(tf.constant(Q), tf.constant(C), candidate_log_q=tf.constant(LOG_Q),
                                       candidate_ids=tf.constant(IDS))
    previous = tf.linalg.matmul(tf.constant(Q), tf.constant(C), transpose_b=True) / 0.5 - LOG_Q[None, :]
    duplicate = (IDS[:, None] == IDS[None, :]) & ~np.eye(6, dtype=bool)
    np.testing.assert_array_equal(logits.numpy()[~duplicate], previous.numpy()[~duplicate])


def test_task_with_multi_interest_scorers_matches_numpy():
    interests = RNG.normal(size=(3, 2, 4)).astype(np.float32)
    items = C[:3]
    mask = np.array([[True, False], [True, True], [True, True]])
    task = RetrievalTask(remove_accidental_hits=False, scorer=MaxInterestScorer())
    got = float(task(tf.constant(interests), tf.constant(items), interest_mask=tf.constant(mask)))
    assert got == pytest.approx(cross_entropy_sum(ref_max_interest(interests, items, mask)), rel=1e-5)
    # Label-aware attention in training: each user's vector is built from its own positive (the target).
    task = RetrievalTask(remove_accidental_hits=False, scorer=LabelAwareAttentionScorer(power=2.0))
    got = float(task(tf.constant(interests), tf.constant(items)))
    assert got == pytest.approx(cross_entropy_sum(ref_label_aware(interests, items, 2.0, targets=items)),
                                rel=1e-5)


def test_task_config_round_trips_with_scorer():
    task = RetrievalTask(temperature=0.2, scorer=LabelAwareAttentionScorer(power=4.0, name="mind"), name="task")
    clone = assert_keras_round_trips(task)
    assert isinstance(clone.scorer, LabelAwareAttentionScorer) and clone.scorer.power == 4.0
    assert clone.scorer.name == "mind"
    assert isinstance(RetrievalTask.from_config(RetrievalTask().get_config()).scorer, DotScorer)
