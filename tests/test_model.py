"""The retrieval task against a NumPy reference, TwoTower training / serialisation / checkpoints,
MirroredStrategy cross-replica negatives, and the full-corpus metrics against hand-computed values."""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.config import ConfigError, load_config
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.tasks.retrieval import RetrievalTask
from tfrec_recall.evaluation.metrics import full_corpus_metrics
from tfrec_recall.training.callbacks import RetrievalEvaluation
from tfrec_recall.models import TwoTower
from tests import references
from tests.conftest import chance_hit_rate

RNG = np.random.default_rng(7)
Q = RNG.normal(size=(6, 4)).astype(np.float32)
C = RNG.normal(size=(6, 4)).astype(np.float32)
IDS = np.array(["a", "b", "a", "c", "d", "b"])
LOG_Q = np.log(RNG.uniform(0.05, 0.9, size=6)).astype(np.float32)
W = RNG.uniform(0.5, 2.0, size=6).astype(np.float32)
NEG = RNG.normal(size=(5, 4)).astype(np.float32)
NEG_IDS = np.array(["a", "e", "f", "g", "c"])
NEG_LOG_Q = np.log(RNG.uniform(0.5, 3.0, size=5)).astype(np.float32)


def test_golden_two_by_two_loss():
    # q = [[1,0],[0,1]], c = [[1,0],[0,1]], temperature 0.5 -> logits [[2,0],[0,2]];
    # CE per row = log(e^2 + e^0) - 2 = log(1 + e^-2) = 0.126928; sum of two rows = 0.253856.
    task = RetrievalTask(temperature=0.5, remove_accidental_hits=False)
    eye = tf.eye(2)
    assert float(task(eye, eye)) == pytest.approx(2 * math.log(1 + math.exp(-2)), rel=1e-6)


@pytest.mark.parametrize("options", [
    dict(),
    dict(temperature=0.3),
    dict(log_q=True),
    dict(remove_hits=True),
    dict(weights=True, log_q=True, remove_hits=True, temperature=0.5),
    dict(num_hard=2, remove_hits=True),
    dict(neg=True, remove_hits=True, log_q=True),  # mixed negatives
    dict(neg=True, remove_hits=True),
    dict(neg=True, in_batch=False, log_q=True),  # global negatives only
])
def test_task_matches_numpy_reference(options):
    temperature = options.get("temperature", 1.0)
    task = RetrievalTask(temperature=temperature, remove_accidental_hits=options.get("remove_hits", False),
                         num_hard_negatives=options.get("num_hard"),
                         in_batch_negatives=options.get("in_batch", True))
    kwargs = dict(candidate_ids=tf.constant(IDS))
    ref = dict(ids=list(IDS), temperature=temperature, remove_hits=options.get("remove_hits", False),
               num_hard=options.get("num_hard"), in_batch=options.get("in_batch", True))
    if options.get("log_q"):
        kwargs["candidate_log_q"] = tf.constant(LOG_Q)
        ref["log_q"] = LOG_Q
    if options.get("weights"):
        kwargs["sample_weight"] = tf.constant(W)
        ref["weights"] = W
    if options.get("neg"):
        kwargs.update(negative_embeddings=tf.constant(NEG), negative_ids=tf.constant(NEG_IDS))
        ref.update(neg=NEG, neg_ids=list(NEG_IDS))
        if options.get("log_q"):
            kwargs["negative_log_q"] = tf.constant(NEG_LOG_Q)
            ref["neg_log_q"] = NEG_LOG_Q
    got = float(task(tf.constant(Q), tf.constant(C), **kwargs))
    assert got == pytest.approx(references.retrieval_loss(Q, C, **ref), rel=1e-5)


def test_task_validation_and_config():
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got 0"):
        RetrievalTask(temperature=0)
    with pytest.raises(ValueError, match=r"num_hard_negatives must be None or a positive integer, got -3"):
        RetrievalTask(num_hard_negatives=-3)
    with pytest.raises(ValueError, match=r"remove_accidental_hits=True needs candidate_ids"):
        RetrievalTask()(tf.constant(Q), tf.constant(C))
    # Half-corrected candidate sets are refused: both column groups are corrected in the same units or neither.
    with pytest.raises(ValueError, match=r"candidate_log_q and negative_log_q must be given together"):
        RetrievalTask(remove_accidental_hits=False)(tf.constant(Q), tf.constant(C), negative_embeddings=tf.constant(NEG),
                                                    negative_log_q=tf.constant(NEG_LOG_Q))
    task = RetrievalTask(temperature=0.2, num_hard_negatives=3, in_batch_negatives=False, name="t")
    assert RetrievalTask.from_config(task.get_config()).get_config() == task.get_config()


def test_mirrored_strategy_gathers_negatives_across_replicas(mirrored_strategy):
    strategy = mirrored_strategy
    task = RetrievalTask(temperature=0.7, remove_accidental_hits=True)
    single = float(task(tf.constant(Q), tf.constant(C), candidate_ids=tf.constant(IDS),
                        candidate_log_q=tf.constant(LOG_Q), sample_weight=tf.constant(W)))
    per_replica = TwoSlices(strategy)

    @tf.function
    def replica_loss(q, c, ids, log_q, w):
        return task(q, c, candidate_ids=ids, candidate_log_q=log_q, sample_weight=w)

    values = strategy.run(replica_loss, args=per_replica(Q, C, IDS, LOG_Q, W))
    total = float(strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))
    assert total == pytest.approx(single, rel=1e-5)
    # TFRS's own behaviour (per-replica negatives only) gives a different, smaller loss: the test can fail.
    local = RetrievalTask(temperature=0.7, remove_accidental_hits=True, gather_across_replicas=False)
    local_values = strategy.run(tf.function(lambda q, c, ids, log_q, w: local(
        q, c, candidate_ids=ids, candidate_log_q=log_q, sample_weight=w)), args=per_replica(Q, C, IDS, LOG_Q, W))
    assert float(strategy.reduce(tf.distribute.ReduceOp.SUM, local_values, axis=None)) < single - 1e-3


class TwoSlices:
    """Splits arrays by rows into per-replica values: replica 0 gets the first half."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, *arrays):
        half = len(arrays[0]) // 2

        def value_fn(ctx):
            index = ctx.replica_id_in_sync_group
            return tuple(tf.constant(a[index * half:(index + 1) * half]) for a in arrays)

        return self.strategy.experimental_distribute_values_from_function(value_fn)


def test_two_tower_trains_round_trips_and_checkpoints(tmp_path, small_split):
    from tfrec_recall import training
    config = load_config("youtube_dnn", overrides={"epochs": 3, "batch_size": 128, "hidden_units": [32],
                                                   "embedding_dim": 16, "output_dim": 16,
                                                   "logq_correction": True, "negatives": "mixed",
                                                   "num_negatives": 64, "learning_rate": 0.01})
    result = training.train(config, small_split, evaluate_every=1, verbose=0)
    history = result.history
    assert history["loss"][-1] < history["loss"][0]
    assert "val_HR@10" in history and len(history["val_HR@10"]) == 3
    chance = chance_hit_rate(small_split, 50)  # 50 / (200 items - ~12 training items) = 0.27
    assert result.metrics["HR@50"] > 1.5 * chance, (result.metrics, chance)
    model = result.model
    assert float(model.frequency_estimator.step.numpy()) > 0
    # Serialise / deserialise the whole model, copy weights, same query embeddings.
    batch = next(iter(make_dataset(training.training_arrays(model, small_split), 32)))
    clone = tf.keras.utils.deserialize_keras_object(tf.keras.utils.serialize_keras_object(model))
    assert isinstance(clone, TwoTower) and clone.negative_sampler.num_negatives == 64
    clone.compute_loss(batch)
    # Checkpoint round trip: estimator state and tower weights come back.
    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=clone).read(str(tmp_path / "ckpt")).expect_partial()
    np.testing.assert_allclose(clone.query_tower(batch).numpy(), model.query_tower(batch).numpy(), rtol=1e-5)
    np.testing.assert_allclose(clone.frequency_estimator.period.numpy(), model.frequency_estimator.period.numpy())


def test_training_is_deterministic(small_split):
    from tfrec_recall import training
    config = load_config("two_tower", overrides={"epochs": 1, "batch_size": 256, "embedding_dim": 8,
                                                 "output_dim": 8})
    first = training.train(config, small_split, evaluate_every=0, verbose=0)
    second = training.train(config, small_split, evaluate_every=0, verbose=0)
    assert first.history["loss"] == second.history["loss"]
    assert first.metrics == second.metrics


def test_two_tower_validation(small_split):
    from tfrec_recall.layers import MLPTower
    from tfrec_recall.features import IdFeature
    tower = MLPTower([IdFeature("user_id", 4, vocabulary=("a",))])
    with pytest.raises(ValueError, match=r"item_id_feature 'item_id' is not a feature of the candidate tower"):
        TwoTower(tower, tower)
    with pytest.raises(TypeError, match=r"query_tower must be a Keras layer or model, got str"):
        TwoTower("tower", tower)


def test_config_errors_name_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'temperature': must be > 0, got 0.0"):
        load_config(overrides={"temperature": 0})
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'"):
        load_config(overrides={"epoch": 3})
    with pytest.raises(ConfigError, match=r"config key 'negatives': must be one of .* got 'hard'"):
        load_config(overrides={"negatives": "hard"})
    with pytest.raises(ConfigError, match=r"--model must be one of .* got 'bert4rec'"):
        load_config("bert4rec")
    path = tmp_path / "c.yaml"
    path.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(path=str(path))


# --- metrics ---------------------------------------------------------------------------------------------------

def test_metrics_hand_computed():
    # 1-d embeddings: the query is [1], candidate scores are their values.
    candidates = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])
    queries = np.ones((3, 1))
    positives = [[2], [0, 4], [3]]
    exclude = [[0], [], [0, 1, 2, 3]]  # user 3's own positive 3 is never excluded
    m = full_corpus_metrics(queries, candidates, positives, exclude, ks=(1, 2))
    # user 1: candidate 0 excluded -> ranking 1,2,3,... -> positive 2 at rank 2
    # user 2: positives 0 (rank 1) and 4 (rank 5)
    # user 3: 0,1,2 excluded -> positive 3 at rank 1
    assert m["HR@1"] == pytest.approx((0 + 1 + 1) / 3)
    assert m["HR@2"] == pytest.approx((1 + 1 + 1) / 3)
    assert m["Recall@2"] == pytest.approx((1 + 0.5 + 1) / 3)
    # NDCG@2: user1 1/log2(3) / 1; user2 1 / (1 + 1/log2(3)); user3 1
    ndcg = (1 / math.log2(3) + 1 / (1 + 1 / math.log2(3)) + 1) / 3
    assert m["NDCG@2"] == pytest.approx(ndcg)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # top-1 lists: user1 -> 1, user2 -> 0, user3 -> 3 ... (3 distinct of 5)
    assert m["Coverage@1"] == pytest.approx(3 / 5)
    assert m["users"] == 3
    with pytest.raises(ValueError, match=r"positives has 2 rows but there are 3 queries"):
        full_corpus_metrics(queries, candidates, positives[:2])


def test_evaluation_callback_adds_validation_metrics():
    callback = RetrievalEvaluation(lambda: {"HR@10": 0.5, "users": 3}, every=2)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs == {}
    callback.on_epoch_end(1, logs)
    assert logs == {"val_HR@10": 0.5}
    with pytest.raises(ValueError, match=r"every must be a positive integer, got 0"):
        RetrievalEvaluation(lambda: {}, every=0)


def test_fit_under_mirrored_strategy_with_estimator_and_mixed_negatives(small_split, mirrored_strategy):
    from tfrec_recall import training
    strategy = mirrored_strategy
    config = load_config("youtube_dnn", overrides={"embedding_dim": 8, "output_dim": 8, "hidden_units": [8],
                                                   "logq_correction": True, "negatives": "mixed",
                                                   "num_negatives": 16, "estimator_buckets": 4096})
    with strategy.scope():
        model = training.build_model(config, small_split)
        model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    arrays = training.training_arrays(model, small_split)
    dataset = make_dataset(arrays, 64, drop_remainder=True)
    steps = len(small_split.train) // 64
    history = model.fit(dataset, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # One estimator step per global batch, not per replica.
    assert float(model.frequency_estimator.step.numpy()) == steps


def test_random_split_evaluation_groups_positives_per_user(small_data):
    from tfrec_recall import training
    from tfrec_recall.data import random_split
    split = random_split(small_data, valid_fraction=0.1, test_fraction=0.2, history_length=5, seed=0)
    assert split.test.user_id.duplicated().any()  # some users hold out several items
    config = load_config("two_tower", overrides={"epochs": 1, "embedding_dim": 8, "output_dim": 8})
    model = training.build_model(config, split)
    metrics = training.evaluate(model, split, "test", ks=(10,))
    assert metrics["users"] == split.test.user_id.nunique()
    assert metrics["Recall@10"] <= metrics["HR@10"]


# --- logQ in expected-count units (issue 9) -------------------------------------------------------------------

ITEMS = [f"i{k}" for k in range(6)]
ITEM_COUNTS = np.array([50.0, 20.0, 10.0, 5.0, 1.0, 0.0])


def _tiny_model(in_batch: bool, logq: bool = True, estimator: bool = True, num_negatives: int = 32):
    from tfrec_recall.features import IdFeature
    from tfrec_recall.layers import CorpusNegativeSampler, MLPTower, StreamingFrequencyEstimator
    query = MLPTower([IdFeature("user_id", 4, vocabulary=("u1", "u2"))], output_dim=4)
    candidate = MLPTower([IdFeature("item_id", 4, vocabulary=tuple(ITEMS))], output_dim=4)
    sampler = CorpusNegativeSampler({"item_id": ITEMS}, counts=ITEM_COUNTS, beta=0.5, num_negatives=num_negatives,
                                    seed=3)
    est = StreamingFrequencyEstimator(num_buckets=1 << 10, num_hashes=2, alpha=0.1) if estimator else None
    return TwoTower(query, candidate, RetrievalTask(in_batch_negatives=in_batch), frequency_estimator=est,
                    negative_sampler=sampler, logq_correction=logq)


def test_mixed_negatives_correction_matches_formula_and_monte_carlo():
    model = _tiny_model(in_batch=True)
    rng = np.random.default_rng(2)
    for _ in range(50):  # a stream of batches of 8 positives with repeats
        model.frequency_estimator.update(tf.constant(rng.choice(ITEMS, size=8, p=[.4, .2, .2, .1, .05, .05])))
    ids = tf.constant(["i0", "i0", "i1", "i3", "i5"])
    negative_ids = tf.constant(["i2", "i0", "i4"])
    got = model.log_q(ids, negative_ids)
    rows = lambda t: [ITEMS.index(x.decode()) for x in t.numpy()]  # noqa: E731
    weights = ITEM_COUNTS ** 0.5
    for key, x in (("candidate_log_q", ids), ("negative_log_q", negative_ids)):
        batch_counts = model.frequency_estimator(x).numpy()  # B q(y), checked against its own reference above
        expected = references.mixed_log_q(batch_counts, weights, 32, rows(x))
        np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-5)
    # Monte Carlo: the M u(y) part equals the sampler's actual mean number of copies of y per draw.
    draws = np.stack([model.negative_sampler.sample()[1].numpy() for _ in range(2000)])
    monte_carlo = np.array([np.mean(np.sum(draws == item.encode(), axis=1)) for item in ITEMS[:5]])
    sampled_part = np.exp(model.log_q(tf.constant(ITEMS[:5]))["candidate_log_q"].numpy()) \
        - model.frequency_estimator(tf.constant(ITEMS[:5])).numpy()
    np.testing.assert_allclose(sampled_part, monte_carlo, rtol=0.06)  # >= 5 sd of the 2000-draw mean


def test_global_negatives_correct_the_positive_by_the_sampler():
    model = _tiny_model(in_batch=False, estimator=False)
    ids = tf.constant(["i0", "i3"])
    got = model.log_q(ids, tf.constant(["i1"]))
    weights = ITEM_COUNTS ** 0.5
    np.testing.assert_allclose(got["candidate_log_q"].numpy(), references.mixed_log_q([0, 0], weights, 32, [0, 3]),
                               rtol=1e-5)
    np.testing.assert_allclose(got["negative_log_q"].numpy(), references.mixed_log_q([0], weights, 32, [1]),
                               rtol=1e-5)


def test_two_tower_refuses_inconsistent_correction():
    with pytest.raises(ValueError, match=r"logq_correction=True with in-batch negatives needs a frequency_estimator"):
        _tiny_model(in_batch=True, estimator=False)
    with pytest.raises(ValueError, match=r"frequency_estimator is used only with logq_correction=True"):
        _tiny_model(in_batch=True, logq=False)
    with pytest.raises(ValueError, match=r"frequency_estimator is used only .* in_batch_negatives=False"):
        _tiny_model(in_batch=False)


# --- metrics that cannot be fooled ------------------------------------------------------------------------------

def test_metrics_ties_take_the_expected_value():
    # Scores 3, 2, 2, 2, 1 and the positive is candidate 2: one higher, tied with two others, so its rank is
    # 2, 3 or 4 with probability 1/3 each (expected rank 1 + 1 + 2/2 = 3):
    # HR@1 = 0, HR@2 = 1/3, HR@3 = 2/3; MRR = (1/2 + 1/3 + 1/4) / 3 = 0.36111;
    # NDCG@3 = (1/log2(3) + 1/log2(4) + 0) / 3 = 0.37698.
    candidates = np.array([[3.0], [2.0], [2.0], [2.0], [1.0]])
    m = full_corpus_metrics(np.ones((1, 1)), candidates, [[2]], ks=(1, 2, 3))
    assert (m["HR@1"], m["HR@2"], m["HR@3"]) == pytest.approx((0.0, 1 / 3, 2 / 3))
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_constant_model_scores_chance_and_nan_is_refused():
    # 50 candidates, user u has 5 + u excluded training items: chance HR@10 = 10 / (50 - 5 - u).
    n_users = 4
    exclude = [list(range(10, 15 + u)) for u in range(n_users)]
    m = full_corpus_metrics(np.zeros((n_users, 8)), np.ones((50, 8)), [[u] for u in range(n_users)], exclude,
                            ks=(10,))
    chance = np.mean([10 / (50 - 5 - u) for u in range(n_users)])
    assert m["HR@10"] == pytest.approx(chance)
    queries = np.ones((n_users, 8))
    queries[[1, 3], 2] = np.nan
    with pytest.raises(ValueError, match=r"2 of 4 users have NaN or infinite scores"):
        full_corpus_metrics(queries, np.ones((50, 8)), [[u] for u in range(n_users)], ks=(10,))


def test_candidate_embeddings_are_checked_unless_the_retriever_is_already_built():
    from tfrec_recall.evaluation.evaluate import indexed_retriever
    from tfrec_recall.retrievers import BruteForce
    ids = np.array(["a", "b", "c"])
    embeddings = np.eye(3, dtype=np.float32)
    broken = embeddings.copy()
    broken[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"1 of 3 candidate embeddings are NaN or infinite"):
        indexed_retriever(None, ids, broken, depth=2)
    with pytest.raises(ValueError, match=r"embeddings are needed unless retriever is an index already built"):
        indexed_retriever(BruteForce(max_k=2), ids, None, depth=2)
    built = BruteForce(max_k=2).index(ids, embeddings)
    assert indexed_retriever(built, ids, None, depth=2) is built  # used as is: nothing re-embedded
    _, found = indexed_retriever(built, ids, None, depth=2, multi_query=True)(embeddings[None, 2:], k=1)
    assert found.numpy().tolist() == [[b"c"]]


def test_tie_aware_metrics_match_monte_carlo_tie_breaking():
    """Independent reference: break ties at random (a jitter smaller than any score gap), rank strictly, average
    over 3000 draws; the expected metrics must agree within sampling error (PROTOCOL.md's expected rank)."""
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(6, 30)).astype(np.float64)  # 4 distinct values: large tie blocks
    positives = [[int(p)] for p in rng.integers(0, 30, size=6)]
    m = full_corpus_metrics(scores, np.eye(30), positives, ks=(5, 10))
    draws = {"HR@5": [], "NDCG@10": [], "MRR": []}
    for _ in range(3000):
        jittered = scores + rng.random(scores.shape) * 1e-3
        ranks = np.array([1 + np.sum(row > row[p[0]]) for row, p in zip(jittered, positives)])
        draws["HR@5"].append(np.mean(ranks <= 5))
        draws["NDCG@10"].append(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0)))
        draws["MRR"].append(np.mean(1.0 / ranks))
    for name, values in draws.items():
        assert m[name] == pytest.approx(np.mean(values), abs=4 * np.std(values) / np.sqrt(len(values)) + 1e-9), name


# --- training: epoch-mean loss, non-finite losses, early stopping -------------------------------------------------

def test_history_loss_is_the_epoch_mean(small_split):
    from tfrec_recall import training
    config = load_config("two_tower", overrides={"embedding_dim": 8, "output_dim": 8, "batch_size": 256})
    model = training.build_model(config, small_split)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0))  # frozen weights: every batch's loss is reproducible
    dataset = make_dataset(training.training_arrays(model, small_split), 256)
    batch_losses = [float(model.compute_loss(batch)) for batch in dataset]
    history = model.fit(dataset, epochs=1, verbose=0).history
    assert len(batch_losses) >= 3 and batch_losses[-1] != pytest.approx(np.mean(batch_losses), rel=0.01)
    assert history["loss"][0] == pytest.approx(np.mean(batch_losses), rel=1e-5)


def test_non_finite_loss_stops_training_naming_epoch_and_causes(small_split):
    from tfrec_recall import training
    from tfrec_recall.training.callbacks import NonFiniteLossError
    config = load_config("two_tower", overrides={"embedding_dim": 8, "output_dim": 8, "epochs": 2,
                                                 "learning_rate": 1e30, "optimizer": "adagrad"})
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at epoch 1, batch \d+: .*learning "
                                                 r"rate.*\(learning_rate=1e\+30, temperature=0.05\)"):
        training.train(config, small_split, verbose=0)
    with pytest.raises(ConfigError, match=r"config key 'learning_rate': must be a finite number, got inf"):
        load_config(overrides={"learning_rate": float("inf")})


def test_early_stopping_restores_the_best_validation_epoch(small_split, monkeypatch):
    from tfrec_recall import training
    script = iter([0.10, 0.30, 0.20, 0.15, 0.40, 0.50])  # validation HR@50 per epoch: best is epoch 2
    weights = []

    class Record(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights.append([w.copy() for w in self.model.query_tower.get_weights()])

    def scripted(model, split, which="test", ks=(10, 50, 100), progress=False):
        value = next(script, 0.0)
        return {"HR@10": value / 2, "HR@50": value, "HR@100": value, "NDCG@10": value / 4, "users": 1}

    monkeypatch.setattr(training.fit, "evaluate", scripted)  # what train() calls
    config = load_config("two_tower", overrides={"embedding_dim": 8, "output_dim": 8, "epochs": 6, "patience": 2,
                                                 "learning_rate": 0.05})
    result = training.train(config, small_split, verbose=0, callbacks=[Record()])
    # Epochs 3 and 4 do not improve on 0.30: with patience 2 training stops after epoch 4 and keeps epoch 2.
    assert len(result.history["loss"]) == 4 and result.best_epoch == 2
    for kept, epoch2, epoch4 in zip(result.model.query_tower.get_weights(), weights[1], weights[3]):
        np.testing.assert_array_equal(kept, epoch2)
    assert not all(np.array_equal(a, b) for a, b in zip(weights[1], weights[3]))
    with pytest.raises(ConfigError, match=r"config key 'selection_metric': must be one of .* got 'HR@20'"):
        load_config(overrides={"selection_metric": "HR@20"})
