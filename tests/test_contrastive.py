"""The self-supervised contrastive loss of the item tower (Yao et al. 2021, "Self-supervised Learning for
Large-scale Item Recommendations"): its contrastive loss L_self against a NumPy reference, correlated / random
feature masking (CFM / RFM), uniform auxiliary batches, and training."""
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.features import IdFeature, MultiCategoricalFeature, NumericFeature
from tfrec_recall.layers import MLPTower
from tfrec_recall.models import TwoTower
from tfrec_recall.tasks.contrastive import ContrastiveLoss, correlated_mask_sets, mutual_information
from tfrec_recall.tasks.retrieval import RetrievalTask
from tests.test_serialization import assert_keras_round_trips

ITEMS = tuple(f"i{i}" for i in range(12))
CORPUS = {"item_id": np.array(ITEMS, dtype=object),
          "genres": np.array([[("a", "b", "c")[i % 3], ("x", "")[i % 2]] for i in range(12)], dtype=object),
          "price": np.arange(12, dtype=np.float32)}
SPECS = [IdFeature("item_id", 4, vocabulary=ITEMS), MultiCategoricalFeature("genres", 4, vocabulary=("a", "b", "c", "x"),
                                                                           max_len=2), NumericFeature("price", mean=5.5, variance=12.0)]


def model_with(loss, seed=0):
    tf.keras.utils.set_random_seed(seed)
    query = MLPTower([IdFeature("user_id", 4, vocabulary=("u1", "u2"))], hidden_units=(6,), output_dim=4)
    candidate = MLPTower(SPECS, hidden_units=(6,), output_dim=4, name="candidate")
    return TwoTower(query, candidate, RetrievalTask(), auxiliary_losses=[loss])


def ref_ssl_loss(first, second, tau, ids):
    """Yao et al. 2021, the SSL loss L_self: -1/N sum_i log(exp(s(z_i, z'_i)/tau) / sum_j exp(s(z_i, z'_j)/tau)), s the cosine;
    j runs over the other items, so another copy of item i (a repeat of the uniform draw) is left out."""
    z = np.asarray(first, np.float64)
    w = np.asarray(second, np.float64)
    z, w = z / np.linalg.norm(z, axis=1, keepdims=True), w / np.linalg.norm(w, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(z)):
        logits = [z[i] @ w[j] / tau for j in range(len(w)) if j == i or ids[j] != ids[i]]
        own = z[i] @ w[i] / tau
        total += -(own - np.log(np.sum(np.exp(logits))))
    return total / len(z)


def test_loss_is_l_self_over_the_two_views_with_the_masks_and_draws_it_made():
    loss = ContrastiveLoss(CORPUS, temperature=0.5, batch_size=5, dropout=0.0, mask_sets=None, seed=4)
    model = model_with(loss)
    tower = model.candidate_tower
    state = loss._generator.state.numpy(), loss.sampler._generator.state.numpy()
    got = float(loss({}, tf.zeros((1, 4)), tf.zeros((1, 4)), training=False))
    # Replay the same draws: the sampler's items, then the masks (dropout 0 draws nothing).
    loss._generator.state.assign(state[0])
    loss.sampler._generator.state.assign(state[1])
    items, ids, _ = loss.sampler.sample()
    assert len(set(ids.numpy())) == 4, "this seed's draw repeats one item: the repeat is not a negative"
    in_set = loss._masks(5, 3)
    np.testing.assert_array_equal(tf.reduce_sum(in_set, axis=1).numpy(), [1, 1, 1, 1, 1])  # half of 3 fields
    first = tower(items, field_mask=1.0 - in_set).numpy()
    second = tower(items, field_mask=in_set).numpy()
    assert got == pytest.approx(ref_ssl_loss(first, second, 0.5, ids.numpy()), rel=1e-5)


def test_masked_fields_do_not_reach_the_tower_and_dropout_empties_list_values():
    loss = ContrastiveLoss(CORPUS, batch_size=4, dropout=0.5, seed=1)
    model = model_with(loss)
    tower = model.candidate_tower
    items = {k: tf.constant(v[:4]) for k, v in CORPUS.items()}
    changed = dict(items, genres=tf.constant([["c", "c"]] * 4))
    keep_id_price = tf.constant([[1.0, 0.0, 1.0]] * 4)
    np.testing.assert_allclose(tower(items, field_mask=keep_id_price).numpy(),
                               tower(changed, field_mask=keep_id_price).numpy(), rtol=1e-6)
    dropped = loss._drop_values({k: tf.constant(np.repeat(v[:1], 400, axis=0)) for k, v in CORPUS.items()})
    rate = float(tf.reduce_mean(tf.cast(tf.equal(dropped["genres"][:, 1], ""), tf.float32)))
    assert 0.4 < rate < 0.6, f"value dropout 0.5 emptied {rate:.2f} of the slots"
    np.testing.assert_array_equal(dropped["item_id"].numpy().astype(str), np.repeat(CORPUS["item_id"][:1], 400))


def test_mutual_information_and_correlated_masks():
    # Two identical fair coins share ln 2 nats; independent columns share none.
    a = np.array([0, 1] * 50)
    assert mutual_information(a, a) == pytest.approx(np.log(2), rel=1e-9)
    assert mutual_information(a, np.repeat([0, 1], 50)) == pytest.approx(0.0, abs=1e-12)
    # Four features: b copies a, c and d are independent of both; half of 4 = 2 per set.
    rng = np.random.default_rng(0)
    cols = {"a": rng.integers(0, 5, 400).astype(str), "c": rng.integers(0, 5, 400).astype(str),
            "d": rng.random(400).astype(np.float32)}
    cols["b"] = np.array(["v" + s for s in cols["a"]], dtype=object)
    sets = correlated_mask_sets(cols, ["a", "b", "c", "d"])
    assert sets[0] == [1, 1, 0, 0] and sets[1] == [1, 1, 0, 0]
    assert all(sum(row) == 2 and row[i] == 1 for i, row in enumerate(sets))


def test_random_masking_and_uniform_auxiliary_batches():
    loss = ContrastiveLoss(CORPUS, batch_size=6, seed=2)
    model_with(loss)
    masks = loss._masks(1000, 4).numpy()
    assert set(masks.sum(axis=1)) == {2.0}
    np.testing.assert_allclose(masks.mean(axis=0), 0.5, atol=0.06)
    # The auxiliary batch is drawn uniformly from the corpus (not by popularity): 12 items, ~1/12 each.
    draws = np.concatenate([loss.sampler.sample()[1].numpy() for _ in range(400)])
    shares = np.unique(draws, return_counts=True)[1] / len(draws)
    assert len(shares) == 12 and np.all(np.abs(shares - 1 / 12) < 0.03)


def test_configuration_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0"):
        ContrastiveLoss(CORPUS, temperature=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        ContrastiveLoss(CORPUS, dropout=1.0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        ContrastiveLoss(CORPUS, batch_size=0)
    tf.keras.utils.set_random_seed(0)
    query = MLPTower([IdFeature("user_id", 4, vocabulary=("u1",))], output_dim=4)
    ids_only = MLPTower([SPECS[0]], output_dim=4)
    with pytest.raises(ValueError, match=r"the candidate tower has 1 feature\(s\) \['item_id'\]: add item side "
                                         r"features"):
        TwoTower(query, ids_only, auxiliary_losses=[ContrastiveLoss(CORPUS)])
    with pytest.raises(ValueError, match=r"mask_sets must be a 3 x 3 0/1 matrix"):
        model_with(ContrastiveLoss(CORPUS, mask_sets=[[1, 0], [0, 1]]))


def test_round_trip_and_training_lowers_the_contrastive_loss():
    loss = ContrastiveLoss(CORPUS, weight=1.0, batch_size=8, mask_sets=correlated_mask_sets(CORPUS, list(CORPUS)),
                           name="ssl")
    model = model_with(loss)
    assert_keras_round_trips(loss)
    batch = {"user_id": np.array(["u1", "u2"] * 6, dtype=object), **CORPUS}
    data = tf.data.Dataset.from_tensor_slices(batch).repeat(30).batch(12)
    model.compile(tf.keras.optimizers.Adam(0.03))
    history = model.fit(data, epochs=8, verbose=0).history
    # Chance for 8 views: log 8 = 2.08; learning to match each view lowers it.
    assert np.all(np.isfinite(history["ssl"])) and history["ssl"][-1] < history["ssl"][0]
    assert history["ssl"][-1] < np.log(8) - 0.3, f"log 8 = {np.log(8):.2f} is chance; got {history['ssl'][-1]:.2f}"
