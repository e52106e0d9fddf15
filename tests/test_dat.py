"""DAT (Yu et al. 2021, "A Dual Augmented Two-tower Model for Online Large-scale Recommendation"): the towers'
augmented vectors, the adaptive-mimic losses loss_u / loss_v and the category alignment loss loss_CA (after Deep
CORAL), each against a NumPy reference written from the paper's formula."""
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.features import IdFeature, MultiCategoricalFeature
from tfrec_recall.layers import MLPTower, SENetTower
from tfrec_recall.models import TwoTower
from tfrec_recall.tasks.dat import AdaptiveMimicLoss, CategoryAlignmentLoss
from tfrec_recall.tasks.retrieval import RetrievalTask
from tests.test_serialization import assert_keras_round_trips

USERS, ITEMS, GENRES = ("u1", "u2", "u3"), ("i1", "i2", "i3", "i4", "i5", "i6"), ("a", "b", "c")
GENRE = MultiCategoricalFeature("genres", 4, vocabulary=GENRES, max_len=2)
BATCH = {"user_id": tf.constant(["u1", "u2", "u3", "u1", "u2", "u3"]),
         "item_id": tf.constant(["i1", "i2", "i3", "i4", "i5", "i6"]),
         "genres": tf.constant([["a", "b"], ["a", ""], ["b", "a"], ["a", "c"], ["c", ""], ["b", ""]])}


def dat_model(seed=0, losses=None, dim=4):
    tf.keras.utils.set_random_seed(seed)
    query = MLPTower([IdFeature("user_id", 3, vocabulary=USERS)], hidden_units=(5,), output_dim=dim,
                     augment=IdFeature("user_id", dim, vocabulary=USERS), name="query")
    candidate = SENetTower([IdFeature("item_id", 3, vocabulary=ITEMS), GENRE], hidden_units=(5,), output_dim=dim,
                           augment=IdFeature("item_id", dim, vocabulary=ITEMS), name="candidate")
    if losses is None:
        losses = [AdaptiveMimicLoss("query", weight=0.5, name="mimic_query"),
                  AdaptiveMimicLoss("candidate", weight=2.0, name="mimic_candidate")]
    return TwoTower(query, candidate, RetrievalTask(temperature=0.5), auxiliary_losses=losses)


def ref_mimic(augmented, other, labels):
    """DAT's loss_u: 1/T sum_(u,v,y) [y a_u + (1 - y) p_v - p_v]^2 (squared L2), i.e. the mean over the
    T pairs of y ||a_u - p_v||^2; every in-batch-softmax pair is a positive (y = 1)."""
    a, p, y = np.asarray(augmented, np.float64), np.asarray(other, np.float64), np.asarray(labels, np.float64)
    return float(np.mean([np.sum((yi * ai + (1 - yi) * pi - pi) ** 2) for ai, pi, yi in zip(a, p, y)]))


def test_augmented_vector_is_a_tower_field_and_the_mimic_losses_match_the_paper():
    model = dat_model()
    q, c = model.embed_pair(BATCH)
    a_u = model.query_tower.augmented_vector(BATCH).numpy()
    a_v = model.candidate_tower.augmented_vector(BATCH).numpy()
    assert a_u.shape == (6, 4) and model.query_tower.num_fields == 2 and model.candidate_tower.num_fields == 3
    labels = np.ones(6)
    losses = model.compute_losses(BATCH)
    assert float(losses["mimic_query"]) == pytest.approx(ref_mimic(a_u, c.numpy(), labels), rel=1e-5)
    assert float(losses["mimic_candidate"]) == pytest.approx(ref_mimic(a_v, q.numpy(), labels), rel=1e-5)
    total = float(losses["retrieval_loss"]) + 0.5 * float(losses["mimic_query"]) + 2.0 * float(losses["mimic_candidate"])
    assert float(losses["loss"]) == pytest.approx(total, rel=1e-5)
    # The augmented vector feeds the tower: changing a_u's table changes p_u.
    table = model.query_tower.augment_encoder._embeddings["user_id"]
    table.embeddings.assign(table.embeddings + 1.0)
    assert not np.allclose(model.query_tower(BATCH).numpy(), q.numpy())


def test_mimic_gradient_stops_at_the_other_towers_output():
    """stop_gradient(p_v): loss_u moves a_u (and the query tower), never the candidate tower."""
    model = dat_model(losses=[AdaptiveMimicLoss("query", name="mimic_query")])
    loss = model.auxiliary_losses[0]
    with tf.GradientTape() as tape:
        q, c = model.embed_pair(BATCH)
        value = loss(BATCH, q, c)
    candidate_vars = model.candidate_tower.trainable_variables
    grads = tape.gradient(value, candidate_vars + [model.query_tower.augment_encoder.trainable_variables[0]])
    assert all(g is None for g in grads[:-1])
    assert grads[-1] is not None and float(tf.norm(tf.convert_to_tensor(grads[-1]))) > 0


def test_mimic_needs_an_augmented_tower_and_augment_must_fit():
    query = MLPTower([IdFeature("user_id", 3, vocabulary=USERS)], hidden_units=(5,), output_dim=4)
    candidate = MLPTower([IdFeature("item_id", 3, vocabulary=ITEMS)], hidden_units=(5,), output_dim=4)
    with pytest.raises(ValueError, match=r"AdaptiveMimicLoss\(side='query'\) needs the query tower to have an "
                                         r"augmented vector"):
        TwoTower(query, candidate, auxiliary_losses=[AdaptiveMimicLoss("query")])
    with pytest.raises(ValueError, match=r"augment 'user_id': its embedding_dim must equal the tower's output_dim "
                                         r"\(4\).*got 3"):
        MLPTower([IdFeature("item_id", 3, vocabulary=ITEMS)], output_dim=4, augment=IdFeature("user_id", 3,
                                                                                                vocabulary=USERS))
    with pytest.raises(ValueError, match=r"augment must be a scalar categorical feature spec \(an id\), got "
                                         r"'genres' of kind 'multi_categorical'"):
        MLPTower([IdFeature("item_id", 3, vocabulary=ITEMS)], output_dim=4, augment=GENRE)
    with pytest.raises(ValueError, match=r"side must be one of \('query', 'candidate'\), got 'user'"):
        AdaptiveMimicLoss("user")


def test_augmented_towers_and_dat_losses_round_trip(tmp_path):
    kind = IdFeature("kind", 2, vocabulary=("k1", "k2"))  # read by the loss only, not by the towers
    model = dat_model(losses=[AdaptiveMimicLoss("candidate", weight=0.3, name="m"),
                              CategoryAlignmentLoss(kind, weight=2.0, name="cal")])
    for layer in [model.query_tower, model.candidate_tower] + model.auxiliary_losses:
        assert_keras_round_trips(layer)
    expected = model.candidate_tower(BATCH).numpy()
    model.candidate_tower.save(str(tmp_path / "tower"), save_format="tf")
    loaded = tf.keras.models.load_model(str(tmp_path / "tower"))
    np.testing.assert_allclose(loaded(BATCH).numpy(), expected, rtol=1e-6)
    clone = TwoTower.from_config(model.get_config())
    assert [type(x).__name__ for x in clone.auxiliary_losses] == ["AdaptiveMimicLoss", "CategoryAlignmentLoss"]
    names = [s.name for s in clone.training_feature_specs()]
    assert names == ["user_id", "item_id", "genres", "kind"]  # the towers' inputs, then the losses' own
    losses = clone.compute_losses({**BATCH, "kind": tf.constant(["k1", "k2", "k1", "k2", "k1", "k1"])})
    assert set(losses) == {"retrieval_loss", "m", "cal", "loss"} and all(np.isfinite(float(v)) for v in losses.values())


def ref_category_alignment(vectors, categories):
    """DAT's loss_CA after Deep CORAL (Sun & Saenko 2016, eq. 1-3): C(S) = 1/(n-1) (X^T X - (1^T X)^T (1^T X) / n);
    loss = sum over categories S_i != S_major with n_i >= 2 of ||C(S_major) - C(S_i)||_F^2 / (4 d^2)."""
    x, cats = np.asarray(vectors, np.float64), np.asarray(categories)
    d = x.shape[1]
    labels, counts = np.unique(cats, return_counts=True)
    major = labels[np.argmax(counts)]

    def cov(rows):
        n = len(rows)
        ones = np.ones((1, n))
        return (rows.T @ rows - (ones @ rows).T @ (ones @ rows) / n) / (n - 1)

    big = cov(x[cats == major])
    return float(sum(np.sum((big - cov(x[cats == c])) ** 2) / (4 * d * d)
                     for c, n in zip(labels, counts) if c != major and n >= 2))


def test_category_alignment_matches_coral_and_skips_small_categories():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(9, 3)).astype(np.float32)
    first_genres = ["a", "a", "a", "a", "b", "b", "b", "c", "zz"]  # majority a; c alone and OOV zz alone: skipped
    genres = tf.constant([[g, "x"] for g in first_genres])  # the first listed value is the category
    loss = CategoryAlignmentLoss(GENRE)
    got = float(loss({"genres": genres}, tf.zeros((9, 3)), tf.constant(vectors)))
    assert got == pytest.approx(ref_category_alignment(vectors, first_genres), rel=1e-5)
    assert got > 0
    # Golden: a = rows [0, 0], [2, 2] (cov [[2, 2], [2, 2]]); b = [0, 0], [1, -1] (cov [[.5, -.5], [-.5, .5]]);
    # the difference [[1.5, 2.5], [2.5, 1.5]] has squared Frobenius norm 2 * 1.5^2 + 2 * 2.5^2 = 17;
    # / (4 * d^2 = 16) = 1.0625 (a and b tie for the majority; the distance is symmetric).
    x = tf.constant([[0.0, 0.0], [2.0, 2.0], [0.0, 0.0], [1.0, -1.0]])
    cats = {"genres": tf.constant([["a", ""], ["a", ""], ["b", ""], ["b", ""]])}
    assert float(loss(cats, x, x)) == pytest.approx(1.0625, rel=1e-6)
    # Every category with fewer than 2 items: nothing to align.
    single = {"genres": tf.constant([["a", ""], ["b", ""], ["c", ""]])}
    assert float(loss(single, tf.zeros((3, 2)), tf.constant(vectors[:3, :2]))) == 0.0


def test_category_alignment_needs_a_categorical_spec_and_the_batch_feature():
    from tfrec_recall.features import NumericFeature
    with pytest.raises(ValueError, match=r"category must be a categorical feature spec with a vocabulary, got "
                                         r"'price' of kind 'numeric'"):
        CategoryAlignmentLoss(NumericFeature("price"))
    with pytest.raises(KeyError, match=r"category feature 'genres' is not in the batch"):
        CategoryAlignmentLoss(GENRE)({"item_id": BATCH["item_id"]}, tf.zeros((6, 2)), tf.zeros((6, 2)))


def test_dat_model_trains_and_the_mimic_losses_fall():
    model = dat_model(losses=[AdaptiveMimicLoss("query", name="mimic_query"),
                              AdaptiveMimicLoss("candidate", name="mimic_candidate"),
                              CategoryAlignmentLoss(GENRE, weight=10.0, name="cal")])
    data = tf.data.Dataset.from_tensor_slices(BATCH).repeat(20).batch(6)
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(data, epochs=3, verbose=0).history
    for key in ("mimic_query", "mimic_candidate", "cal", "loss"):
        assert np.all(np.isfinite(history[key])), key
    assert history["mimic_query"][-1] < history["mimic_query"][0]
    assert history["mimic_candidate"][-1] < history["mimic_candidate"][0]
