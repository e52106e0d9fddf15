"""RetrievalModel: the auxiliary-loss hook (AlignmentLoss against NumPy, total = main + sum w_i aux_i, each
logged under its name), checkpoints unchanged by it, towers' unpooled sequences, and index_candidates /
recommend (also on the model ``training.train`` returns)."""
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.features import IdFeature, SequenceFeature
from tfrec_recall.layers import MLPTower, YouTubeDNNTower
from tfrec_recall.layers.interest import DotScorer
from tfrec_recall.models import AlignmentLoss, AuxiliaryLoss, RetrievalModel, TwoTower
from tfrec_recall.retrievers import BruteForce
from tfrec_recall.tasks.retrieval import RetrievalTask
from tests.test_serialization import assert_config_complete, assert_keras_round_trips, constructor_config

ITEMS = ("i1", "i2", "i3", "i4", "i5")
USERS = ("u1", "u2", "u3")
HISTORY = SequenceFeature("history", 4, vocabulary=ITEMS, max_len=3)
BATCH = {"user_id": tf.constant(["u1", "u2", "u3", "u1"]), "item_id": tf.constant(["i1", "i2", "i3", "i4"]),
         "history": tf.constant([["i3", "i1", ""], ["", "", ""], ["i2", "i9", "i5"], ["i5", "", ""]])}
RNG = np.random.default_rng(3)


def two_tower(auxiliary_losses=(), seed=1):
    tf.keras.utils.set_random_seed(seed)
    query = YouTubeDNNTower([IdFeature("user_id", 4, vocabulary=USERS), HISTORY], hidden_units=(8,),
                            output_dim=4, name="query")
    candidate = MLPTower([IdFeature("item_id", 4, vocabulary=ITEMS)], hidden_units=(8,), output_dim=4,
                         name="candidate")
    return TwoTower(query, candidate, RetrievalTask(temperature=0.5, scorer=DotScorer(name="dot")),
                    auxiliary_losses=auxiliary_losses, name="two_tower")


# ----------------------------------------------------------------------------------------------------------
# AlignmentLoss and the hook

def ref_alignment(q, c, alpha):
    """Wang & Isola 2020, eq. 4: mean_i ||q_i - c_i||_2 ** alpha."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    return float(np.mean([np.linalg.norm(qi - ci) ** alpha for qi, ci in zip(q, c)]))


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.5])
def test_alignment_loss_matches_numpy(alpha):
    q, c = RNG.normal(size=(5, 3)).astype(np.float32), RNG.normal(size=(5, 3)).astype(np.float32)
    got = float(AlignmentLoss(alpha=alpha)({}, tf.constant(q), tf.constant(c)))
    assert got == pytest.approx(ref_alignment(q, c, alpha), rel=1e-5)


def test_alignment_loss_golden_value_and_errors():
    # q = [[3, 4], [0, 0]], c = [[0, 0], [1, 0]]: distances 5 and 1; alpha 2: (25 + 1) / 2 = 13; alpha 1: 3.
    q, c = tf.constant([[3.0, 4.0], [0.0, 0.0]]), tf.constant([[0.0, 0.0], [1.0, 0.0]])
    assert float(AlignmentLoss()({}, q, c)) == pytest.approx(13.0)
    assert float(AlignmentLoss(alpha=1.0)({}, q, c)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got -1"):
        AlignmentLoss(weight=-1)
    with pytest.raises(ValueError, match=r"alpha must be > 0, got 0"):
        AlignmentLoss(alpha=0)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got inf"):
        AlignmentLoss(alpha=float("inf"))


def test_total_loss_is_main_plus_weighted_auxiliary_losses():
    model = two_tower([AlignmentLoss(weight=0.3, name="align"), AlignmentLoss(weight=2.0, alpha=1.0, name="a1")])
    losses = model.compute_losses(BATCH)
    q, c = model.query_tower(BATCH).numpy(), model.candidate_tower(BATCH).numpy()
    assert float(losses["align"]) == pytest.approx(ref_alignment(q, c, 2.0), rel=1e-5)
    assert float(losses["a1"]) == pytest.approx(ref_alignment(q, c, 1.0), rel=1e-5)
    main = float(model.task(tf.constant(q), tf.constant(c), candidate_ids=BATCH["item_id"]))
    assert float(losses["retrieval_loss"]) == pytest.approx(main, rel=1e-5)
    expected = main + 0.3 * ref_alignment(q, c, 2.0) + 2.0 * ref_alignment(q, c, 1.0)
    assert float(losses["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(model.compute_loss(BATCH)) == pytest.approx(expected, rel=1e-5)


def test_fit_logs_each_loss_separately_as_epoch_means():
    model = two_tower()
    model.add_auxiliary_loss(AlignmentLoss(weight=0.5, name="align"))
    # Frozen weights: every batch's losses are reproducible; eager: no tracing, a fast test.
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0), run_eagerly=True)
    batches = [{k: v[:2] for k, v in BATCH.items()}, {k: v[2:] for k, v in BATCH.items()}]
    per_batch = [model.compute_losses(b) for b in batches]
    history = model.fit(tf.data.Dataset.from_tensor_slices(BATCH).batch(2), epochs=1, verbose=0).history
    assert set(history) == {"loss", "retrieval_loss", "align", "regularization_loss"}
    for name in ("loss", "retrieval_loss", "align"):
        assert history[name][0] == pytest.approx(np.mean([float(b[name]) for b in per_batch]), rel=1e-5)
    assert history["loss"][0] == pytest.approx(history["retrieval_loss"][0] + 0.5 * history["align"][0], rel=1e-5)


class VectorLoss(AuxiliaryLoss):
    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        return tf.reduce_sum(query_embeddings, axis=-1)


def test_auxiliary_loss_errors():
    model = two_tower([AlignmentLoss(name="align")])
    for name in ("loss", "retrieval_loss", "regularization_loss", "align"):
        with pytest.raises(ValueError, match=rf"auxiliary loss name '{name}' is already used by a logged value"):
            model.add_auxiliary_loss(AlignmentLoss(name=name))
    with pytest.raises(TypeError, match=r"an auxiliary loss must be a tfrec_recall AuxiliaryLoss layer, got"):
        model.add_auxiliary_loss(lambda *args: 0.0)
    with pytest.raises(TypeError, match=r"auxiliary_losses must be a sequence of AuxiliaryLoss layers, got one"):
        two_tower(AlignmentLoss(name="align"))
    model.add_auxiliary_loss(VectorLoss(name="vector"))
    with pytest.raises(ValueError, match=r"auxiliary loss 'vector' must return a scalar, got shape \(4,\)"):
        model.compute_losses(BATCH)
    with pytest.raises(NotImplementedError, match=r"AuxiliaryLoss must implement call"):
        AuxiliaryLoss()({}, tf.zeros([2, 2]), tf.zeros([2, 2]))
    with pytest.raises(NotImplementedError, match=r"RetrievalModel must implement embed_pair"):
        RetrievalModel().compute_loss(BATCH)


def test_auxiliary_losses_round_trip_config_savedmodel_and_old_checkpoints(tmp_path):
    loss = AlignmentLoss(weight=0.25, alpha=1.5, name="align")
    assert_config_complete(loss)
    assert assert_keras_round_trips(loss).get_config() == loss.get_config()
    model = two_tower([loss])
    assert_config_complete(model)
    expected, query = float(model.compute_loss(BATCH)), model(BATCH).numpy()
    clone = assert_keras_round_trips(model)
    assert [(a.name, a.weight, a.alpha) for a in clone.auxiliary_losses] == [("align", 0.25, 1.5)]
    model.save(str(tmp_path / "model"), save_format="tf", include_optimizer=False)
    loaded = tf.keras.models.load_model(str(tmp_path / "model"), compile=False)
    assert type(loaded) is TwoTower and constructor_config(loaded.get_config()) == constructor_config(
        model.get_config())
    np.testing.assert_allclose(loaded(BATCH).numpy(), query, rtol=1e-6)
    assert [(a.name, a.weight, a.alpha) for a in loaded.auxiliary_losses] == [("align", 0.25, 1.5)]
    assert float(loaded.compute_loss(BATCH)) == pytest.approx(expected, rel=1e-6)
    # A checkpoint of a model without auxiliary losses (what older runs wrote) restores one with them, every
    # object matched: the hook adds no checkpointed variable (its trackers are not tracked).
    old = two_tower(seed=2)
    old.compute_loss(BATCH)
    path = tf.train.Checkpoint(model=old).write(str(tmp_path / "old" / "ckpt"))
    assert not [n for n, _ in tf.train.list_variables(path) if "retrieval_loss" in n or "align" in n]
    fresh = two_tower([AlignmentLoss(name="align")])
    fresh.compute_loss(BATCH)
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    np.testing.assert_allclose(fresh(BATCH).numpy(), old(BATCH).numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Towers: the unpooled sequence

def test_tower_returns_the_unpooled_sequence_with_its_mask():
    tower = two_tower().query_tower
    pooled, sequence, mask = tower.call_with_sequence(BATCH)
    assert sequence.shape == (4, 3, 4) and mask.shape == (4, 3)
    np.testing.assert_array_equal(mask.numpy(), BATCH["history"].numpy() != b"")
    np.testing.assert_allclose(pooled.numpy(), tower(BATCH).numpy(), rtol=1e-6)
    # Row 0's slots are the embeddings of i3 and i1 (looked up as the encoder does):
    encoder = tower.encoder
    rows = encoder._embeddings["history"](encoder._lookups["history"](tf.constant(["i3", "i1"]))).numpy()
    np.testing.assert_allclose(sequence.numpy()[0, :2], rows, rtol=1e-6)
    # The pooled history field is the masked mean of the sequence (the encoder's mean pooling).
    seq, m = tower.encode_sequence(BATCH, "history")
    weights = m.numpy().astype(np.float64)
    mean = (seq.numpy() * weights[..., None]).sum(1) / np.maximum(weights.sum(1, keepdims=True), 1e-9)
    np.testing.assert_allclose(tower.encoder(BATCH)[1].numpy(), mean, rtol=1e-5, atol=1e-6)


def test_tower_sequence_errors_name_the_features():
    candidate = two_tower().candidate_tower
    with pytest.raises(ValueError, match=r"candidate: name the sequence feature to encode, the tower has 0"):
        candidate.encode_sequence(BATCH)
    with pytest.raises(ValueError, match=r"query: 'user_id' is not a list feature of this tower \(list features: "
                                         r"\['history'\]\)"):
        two_tower().query_tower.encode_sequence(BATCH, "user_id")


# ----------------------------------------------------------------------------------------------------------
# index_candidates / recommend

def numpy_top_k(queries, embeddings, ids, k, exclude=None):
    scores = np.asarray(queries, np.float64) @ np.asarray(embeddings, np.float64).T
    for row, items in enumerate(exclude or []):
        scores[row, [list(ids).index(i) for i in items]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.asarray(ids)[order]


def test_recommend_answers_in_one_call_after_indexing():
    model = two_tower()
    with pytest.raises(ValueError, match=r"TwoTower.recommend needs an index of the candidates: call "
                                         r"model.index_candidates\(ids, candidate_features_or_embeddings\) first"):
        model.recommend(BATCH, k=2)
    index = model.index_candidates(list(ITEMS), {"item_id": np.array(ITEMS)})
    assert isinstance(index, BruteForce) and model.retriever is index and index.max_k == 100
    embeddings = model.candidate_tower({"item_id": tf.constant(ITEMS)}).numpy()
    queries = model(BATCH).numpy()
    scores, ids = model.recommend(BATCH, k=3, exclude=[["i1", "i2"], [], ["i5"], ["i1", "i2", "i3", "i4"]])
    exclude = [["i1", "i2"], [], ["i5"], ["i1", "i2", "i3", "i4"]]
    ref_scores, ref_ids = numpy_top_k(queries, embeddings, ITEMS, 3, exclude)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5)
    got_ids = ids.numpy().astype(str)
    assert (got_ids[np.isfinite(ref_scores)] == ref_ids[np.isfinite(ref_scores)]).all()
    assert list(got_ids[3]) == ["i5", "", ""]  # four of five excluded: the tail is empty
    # Indexing embeddings (here into a given index) gives the same answers.
    model.index_candidates(list(ITEMS), embeddings, index=BruteForce(max_k=4))
    np.testing.assert_allclose(model.recommend(BATCH, k=4)[0].numpy(), numpy_top_k(queries, embeddings, ITEMS, 4)[0],
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"k must be <= max_k \(4\), got 5"):
        model.recommend(BATCH, k=5)
    with pytest.raises(ValueError, match=r"exclude must hold one list of item ids per user \(4 users\)"):
        model.recommend(BATCH, k=2, exclude=[["i1"]])
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 0"):
        model.recommend(BATCH, k=0)
    with pytest.raises(TypeError, match=r"index must be an index name or a TopKIndex, got 3"):
        model.index_candidates(list(ITEMS), embeddings, index=3)
    with pytest.raises(ValueError, match=r"index must be one of \["):
        model.index_candidates(list(ITEMS), embeddings, index="exact")


def test_trained_model_recommends(tiny_model, small_split):
    from tfrec_recall import training
    model, items, embeddings = tiny_model  # built by training.train
    assert model.retriever is not None and model.retriever.num_candidates == len(items)
    users = small_split.valid.head(3)
    features = training.feature_arrays(users, small_split.data, model.query_tower.encoder.specs)
    scores, ids = model.recommend(features, k=10)
    assert scores.shape == (3, 10) and ids.shape == (3, 10)
    ref_scores, ref_ids = numpy_top_k(model(features).numpy(), embeddings, np.asarray(items).astype(str), 10)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-4, atol=1e-5)
