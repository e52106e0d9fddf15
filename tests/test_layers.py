"""Feature encoder, towers, streaming frequency estimator, negative sampler: NumPy references, validation
errors, serialisation and save/load round trips."""
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.features import (FeatureEncoder, IdFeature, MultiCategoricalFeature, NumericFeature,
                                   SequenceFeature, as_spec)
from tfrec_recall.layers import (CorpusNegativeSampler, MLPTower, ResidualTower, SENetTower,
                                 StreamingFrequencyEstimator, YouTubeDNNTower)
from tests import references

SPECS = [IdFeature("user_id", 4, vocabulary=("u1", "u2")),
         SequenceFeature("history", 4, vocabulary=("a", "b", "c"), max_len=3, pooling="recency", decay=0.5),
         MultiCategoricalFeature("tags", 3, hash_buckets=10, max_len=2),
         NumericFeature("age", mean=30.0, variance=100.0, embedding_dim=2)]
INPUTS = {"user_id": tf.constant(["u1", "zzz"]),
          "history": tf.constant([["c", "a", ""], ["", "", ""]]),
          "tags": tf.constant([["t1", ""], ["t2", "t3"]]),
          "age": tf.constant([40.0, float("nan")])}


def test_encoder_lookup_oov_and_pooling_match_numpy():
    enc = FeatureEncoder(SPECS)
    user, history, tags, age = [f.numpy() for f in enc(INPUTS)]
    table = enc._embeddings["user_id"].embeddings.numpy()
    np.testing.assert_allclose(user[0], table[1])  # vocabulary index 0 is OOV: u1 -> 1
    np.testing.assert_allclose(user[1], table[0])  # unknown -> OOV bucket 0
    h = enc._embeddings["history"].embeddings.numpy()  # 0 mask, 1 OOV, a=2, b=3, c=4
    expected = (1.0 * h[4] + 0.5 * h[2]) / 1.5  # recency weights 0.5**position over the non-padding items
    np.testing.assert_allclose(history[0], expected, rtol=1e-6)
    np.testing.assert_allclose(history[1], np.zeros(4), atol=1e-7)  # empty history -> zeros
    dense = enc._projections["age"]
    w, b = dense.kernel.numpy(), dense.bias.numpy()
    np.testing.assert_allclose(age[0], 1.0 * w[0] + b, rtol=1e-6)  # (40 - 30) / sqrt(100) = 1
    np.testing.assert_allclose(age[1], b, rtol=1e-6)  # NaN -> the mean -> 0
    assert tags.shape == (2, 3)


def test_spec_validation_errors():
    with pytest.raises(ValueError, match=r"user_id: give exactly one of vocabulary or hash_buckets"):
        IdFeature("user_id")
    with pytest.raises(ValueError, match=r"history.pooling must be one of \('mean', 'recency'\), got 'max'"):
        SequenceFeature("history", vocabulary=("a",), pooling="max")
    with pytest.raises(ValueError, match=r"age: mean must be finite and variance positive.*variance=0.0"):
        NumericFeature("age", variance=0.0)
    with pytest.raises(ValueError, match=r"feature spec kind must be one of .* got 'image'"):
        as_spec({"kind": "image", "name": "x"})
    with pytest.raises(ValueError, match=r"feature names must be unique"):
        FeatureEncoder([SPECS[0], SPECS[0]])
    assert as_spec(SPECS[1].to_dict()) == SPECS[1]


TOWER_CASES = [
    (MLPTower, dict(hidden_units=(32,))),
    (SENetTower, dict(hidden_units=(32,), reduction_ratio=2.0)),
    (ResidualTower, dict(width=16, num_blocks=2)),
    (YouTubeDNNTower, dict(hidden_units=(32, 16))),
]


@pytest.mark.parametrize("cls,kwargs", TOWER_CASES, ids=[c.__name__ for c, _ in TOWER_CASES])
def test_towers_round_trip_config_and_savedmodel(tmp_path, cls, kwargs):
    tf.keras.utils.set_random_seed(0)
    tower = cls(SPECS, output_dim=5, **kwargs, name="tower")
    out = tower(INPUTS).numpy()
    assert out.shape == (2, 5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)  # L2-normalised
    clone = cls.from_config(tower.get_config())
    clone(INPUTS)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(INPUTS).numpy(), out, rtol=1e-6)
    again = tf.keras.utils.deserialize_keras_object(tf.keras.utils.serialize_keras_object(tower))
    assert type(again) is cls and again.get_config() == tower.get_config()
    tower.save(str(tmp_path / "tower"), save_format="tf")
    loaded = tf.keras.models.load_model(str(tmp_path / "tower"))
    assert type(loaded) is cls
    np.testing.assert_allclose(loaded(INPUTS).numpy(), out, rtol=1e-6)


def test_senet_weights_gate_fields():
    tower = SENetTower(SPECS, hidden_units=(8,), output_dim=4)
    weights = tower.field_weights(tower.encoder(INPUTS)).numpy()
    assert weights.shape == (2, len(SPECS)) and np.all((weights > 0) & (weights < 1))


def test_tower_validation_errors():
    with pytest.raises(ValueError, match=r"output_dim must be a positive integer, got 0"):
        MLPTower(SPECS, output_dim=0)
    with pytest.raises(ValueError, match=r"hidden_units must be a sequence of positive integers, got \[8, -1\]"):
        MLPTower(SPECS, hidden_units=(8, -1))
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'sigmoid'"):
        MLPTower(SPECS, activation="sigmoid")
    with pytest.raises(ValueError, match=r"reduction_ratio must be >= 1, got 0.5"):
        SENetTower(SPECS, reduction_ratio=0.5)
    with pytest.raises(ValueError, match=r"YouTubeDNNTower needs a SequenceFeature"):
        YouTubeDNNTower([SPECS[0]])
    with pytest.raises(KeyError, match=r"input feature 'age' is missing"):
        MLPTower(SPECS)({k: v for k, v in INPUTS.items() if k != "age"})


# --- streaming frequency estimator ----------------------------------------------------------------------------

def test_estimator_matches_numpy_reference():
    rng = np.random.default_rng(0)
    est = StreamingFrequencyEstimator(num_buckets=13, num_hashes=3, alpha=0.1)
    ids_stream = [tf.constant([f"i{x}" for x in rng.integers(0, 30, size=8)]) for _ in range(40)]
    buckets = [est.hash(ids).numpy() for ids in ids_stream]
    for ids in ids_stream:
        est.update(ids)
    a, b, t = references.frequency_estimate(buckets, 13, 0.1)
    np.testing.assert_allclose(est.last_step.numpy(), a)
    np.testing.assert_allclose(est.period.numpy(), b, rtol=1e-5)
    assert float(est.step.numpy()) == t == 40
    probe = tf.constant([f"i{x}" for x in range(30)])
    np.testing.assert_allclose(est(probe).numpy(), references.probability_from_state(b, est.hash(probe).numpy()),
                               rtol=1e-5)


def test_estimator_golden_values():
    # One bucket (every id collides), alpha 0.5, batches x | x,x | y | x; each step touches the bucket once:
    # step 1: B = 0.5*0     + 0.5*(1-0) = 0.5
    # step 2: B = 0.5*0.5   + 0.5*(2-1) = 0.75   (the duplicate x counts once)
    # step 3: B = 0.5*0.75  + 0.5*(3-2) = 0.875  (y hits the same bucket)
    # step 4: B = 0.5*0.875 + 0.5*(4-3) = 0.9375
    est = StreamingFrequencyEstimator(num_buckets=1, num_hashes=1, alpha=0.5)
    for batch in (["x"], ["x", "x"], ["y"], ["x"]):
        est.update(tf.constant(batch))
    assert est.period.numpy()[0, 0] == pytest.approx(0.9375)
    assert est(tf.constant(["x"])).numpy()[0] == pytest.approx(1.0)  # 1/max(0.9375, 1) clipped to 1


def test_estimator_periodic_stream_within_ten_percent():
    # Item k appears every period[k] steps (known frequency 1/period). Several hash arrays with few buckets
    # cause collisions; the max over arrays recovers the uncollided estimate.
    periods = np.array([2, 3, 5, 7, 11, 13, 20, 40, 60, 90])
    est = StreamingFrequencyEstimator(num_buckets=16, num_hashes=4, alpha=0.05)
    steps = 3000
    seen = np.zeros(len(periods), dtype=int)
    for t in range(1, steps + 1):
        present = [k for k, p in enumerate(periods) if t % p == 0]
        seen[present] += 1
        est.update(tf.constant([f"item{k}" for k in present] or ["filler"]))
    estimate = est(tf.constant([f"item{k}" for k in range(len(periods))])).numpy()
    mask = seen >= 50
    assert mask.sum() >= 8
    relative_error = np.abs(estimate[mask] - 1.0 / periods[mask]) * periods[mask]
    assert relative_error.max() < 0.10, relative_error


def test_estimator_random_stream_and_checkpoint(tmp_path):
    # Items present in each step with known probabilities. The EMA starts from B = 0, which weighs
    # (1 - alpha) ** n after n sightings, so every item here is seen many times 1 / alpha (>= 300 sightings).
    rng = np.random.default_rng(1)
    probs = np.array([0.5, 0.3, 0.2, 0.1, 0.05])
    est = StreamingFrequencyEstimator(num_buckets=1 << 12, num_hashes=2, alpha=0.02)
    update = tf.function(est.update)
    for _ in range(6000):
        present = np.flatnonzero(rng.random(len(probs)) < probs)
        update(tf.constant([f"j{k}" for k in present] or ["none"]))
    estimate = est(tf.constant([f"j{k}" for k in range(len(probs))])).numpy()
    relative_error = np.abs(estimate - probs) / probs
    assert relative_error.max() < 0.25 and relative_error.mean() < 0.10, relative_error
    tf.train.Checkpoint(estimator=est).write(str(tmp_path / "ckpt"))
    fresh = StreamingFrequencyEstimator(num_buckets=1 << 12, num_hashes=2, alpha=0.01)
    tf.train.Checkpoint(estimator=fresh).read(str(tmp_path / "ckpt")).assert_consumed()
    np.testing.assert_allclose(fresh(tf.constant(["j0", "j3"])).numpy(), estimate[[0, 3]])
    assert StreamingFrequencyEstimator.from_config(est.get_config()).get_config() == est.get_config()


def test_estimator_validation():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 0.0"):
        StreamingFrequencyEstimator(alpha=0.0)
    with pytest.raises(ValueError, match=r"num_hashes must be an integer in \[1, 16\], got 0"):
        StreamingFrequencyEstimator(num_hashes=0)


# --- negative sampler ------------------------------------------------------------------------------------------

def test_sampler_distributions_and_log_expected_counts():
    ids = [f"i{k}" for k in range(5)]
    counts = [1000.0, 100.0, 10.0, 1.0, 0.0]
    features = {"item_id": ids, "price": [1.0, 2.0, 3.0, 4.0, 5.0]}
    uniform = CorpusNegativeSampler(features, counts=counts, beta=0.0, num_negatives=20000, seed=1)
    damped = CorpusNegativeSampler(features, counts=counts, beta=0.5, num_negatives=20000, seed=1)
    q = np.array(counts) ** 0.5 / np.sum(np.array(counts) ** 0.5)
    np.testing.assert_allclose(damped.probabilities, q)
    for sampler, expected in ((uniform, np.full(5, 0.2)), (damped, q)):
        feats, sampled, log_count = sampler.sample()
        freq = np.array([np.mean(sampled.numpy() == i.encode()) for i in ids])
        np.testing.assert_allclose(freq, expected, atol=0.015)
        lookup = dict(zip(ids, np.log(expected * 20000 + 1e-300)))
        np.testing.assert_allclose(log_count.numpy(), [lookup[s.decode()] for s in sampled.numpy()], rtol=1e-5)
        prices = dict(zip(ids, features["price"]))
        np.testing.assert_allclose(feats["price"].numpy(), [prices[s.decode()] for s in sampled.numpy()])
    again = CorpusNegativeSampler.from_config(damped.get_config())
    np.testing.assert_array_equal(again.sample()[1].numpy(),
                                  CorpusNegativeSampler(features, counts=counts, beta=0.5, num_negatives=20000,
                                                        seed=1).sample()[1].numpy())
    with pytest.raises(ValueError, match=r"beta=0.75 needs counts"):
        CorpusNegativeSampler(features, beta=0.75)
    with pytest.raises(ValueError, match=r"num_negatives must be a positive integer, got 0"):
        CorpusNegativeSampler(features, num_negatives=0)
