"""Cross-replica negatives: GRADIENTS of the retrieval loss under a MirroredStrategy (two logical CPUs) equal the
single-device gradients on the same global batch.

The loss is the in-batch sampled softmax of Yi et al. 2019 ("Sampling-Bias-Corrected Neural Modeling for Large
Corpus Item Recommendations", eq. 3), with the corrected logit of eq. 4

    s^c(x_i, y_j) = s(x_i, y_j) / T - log p_j,

summed over the queries i of the batch (TFRS's SUM reduction):  L = sum_i r_i * CE_i with
CE_i = -log softmax_j(s^c(x_i, y_j))[i]. On one device every query sees the B candidates of the global batch.
Under a strategy with R replicas, :class:`~tfrec_recall.tasks.retrieval.RetrievalTask` all-gathers the in-batch
candidates (embeddings, ids, log p), so replica r's loss L_r is the sum over ITS queries with softmax over ALL
B candidates, and sum_r L_r = L. For the gradients, all_gather's gradient all-reduces the upstream gradient
across replicas and slices out this replica's rows, so replica r's ``tape.gradient(L_r, w)`` holds dL_r/dw
through its queries plus d(sum_r' L_r')/dw through its own candidates; the all-reduced SUM over replicas is
then dL/dw. Without the gather (TFRS's default behaviour, ``gather_across_replicas=False``) each replica's
softmax sees only its B / R candidates: a different loss with different gradients, which is checked too so the
equality has power.
"""
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.tasks.retrieval import RetrievalTask

GLOBAL_BATCH = 8
FEATURES = 5
DIM = 4
NUM_NEGATIVES = 5

RNG = np.random.default_rng(2024)
X_QUERY = RNG.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32)
X_CANDIDATE = RNG.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32)
# Replica 0 gets rows 0-3, replica 1 rows 4-7. "a" occurs in both halves (an accidental hit ACROSS replicas,
# which a replica only sees after the gather), "b" twice inside replica 0's half.
IDS = np.array(["a", "b", "c", "b", "d", "a", "e", "f"])
LOG_Q = np.log(RNG.uniform(0.05, 0.9, size=GLOBAL_BATCH)).astype(np.float32)  # plain per-candidate log p(y)
WEIGHTS = RNG.uniform(0.5, 2.0, size=GLOBAL_BATCH).astype(np.float32)
# Extra (global) negatives, the same tensors on both sides: "e" and "c" collide with in-batch positives.
X_NEGATIVE = RNG.normal(size=(NUM_NEGATIVES, FEATURES)).astype(np.float32)
NEG_IDS = np.array(["e", "g", "c", "h", "i"])
NEG_LOG_Q = np.log(RNG.uniform(0.5, 3.0, size=NUM_NEGATIVES)).astype(np.float32)

CASES = {
    # In-batch softmax with accidental-hit removal (the "a" hit spans the two replicas).
    "in_batch_hits": dict(task=dict(temperature=1.0, remove_accidental_hits=True)),
    # + plain per-candidate log-q corrections s(x, y) / T - log p(y), reward weights and a temperature.
    "in_batch_logq_weights": dict(task=dict(temperature=0.5, remove_accidental_hits=True), log_q=True,
                                  weights=True),
    # Mixed negative sampling (Yang et al. 2020): in-batch candidates plus the same extra negatives.
    "mixed_negatives": dict(task=dict(temperature=1.0, remove_accidental_hits=True), negatives=True),
    "mixed_negatives_logq": dict(task=dict(temperature=0.7, remove_accidental_hits=True), negatives=True,
                                 log_q=True, weights=True),
    # Hard-negative mining over the gathered candidates.
    "hard_negatives": dict(task=dict(temperature=1.0, remove_accidental_hits=True, num_hard_negatives=3),
                           log_q=True),
}


def _towers(seed):
    """Small deterministic query / candidate towers (Dense-tanh-Dense)."""
    def tower(offset, name):
        init = lambda k: tf.keras.initializers.GlorotUniform(seed=seed + offset + k)  # noqa: E731
        model = tf.keras.Sequential([tf.keras.layers.Dense(6, activation="tanh", kernel_initializer=init(0),
                                                           bias_initializer="glorot_uniform"),
                                     tf.keras.layers.Dense(DIM, kernel_initializer=init(1))], name=name)
        model.build((None, FEATURES))
        return model
    return tower(0, "query"), tower(10, "candidate")


def _task_inputs(case, ids, log_q, weights):
    kwargs = dict(candidate_ids=ids)
    if case.get("log_q"):
        kwargs["candidate_log_q"] = log_q
    if case.get("weights"):
        kwargs["sample_weight"] = weights
    return kwargs


def _loss(task, case, query_tower, candidate_tower, xq, xc, ids, log_q, weights):
    kwargs = _task_inputs(case, ids, log_q, weights)
    if case.get("negatives"):
        kwargs.update(negative_embeddings=candidate_tower(tf.constant(X_NEGATIVE)), negative_ids=tf.constant(NEG_IDS))
        if case.get("log_q"):
            kwargs["negative_log_q"] = tf.constant(NEG_LOG_Q)
    return task(query_tower(xq), candidate_tower(xc), **kwargs)


def _single_device(case, towers):
    """Loss and gradients on one device, the full global batch of 8."""
    query_tower, candidate_tower = towers
    task = RetrievalTask(**case["task"])
    variables = query_tower.trainable_variables + candidate_tower.trainable_variables
    with tf.GradientTape() as tape:
        loss = _loss(task, case, query_tower, candidate_tower, tf.constant(X_QUERY), tf.constant(X_CANDIDATE),
                     tf.constant(IDS), tf.constant(LOG_Q), tf.constant(WEIGHTS))
    return float(loss), [g.numpy() for g in tape.gradient(loss, variables)]


def _halves(strategy):
    """Per-replica values: replica r gets rows [4r, 4r + 4) of the global batch."""
    half = GLOBAL_BATCH // 2

    def value_fn(ctx):
        rows = slice(ctx.replica_id_in_sync_group * half, (ctx.replica_id_in_sync_group + 1) * half)
        return tuple(tf.constant(a[rows]) for a in (X_QUERY, X_CANDIDATE, IDS, LOG_Q, WEIGHTS))

    return strategy.experimental_distribute_values_from_function(value_fn)


def _distributed(strategy, case, towers, gather):
    """Summed (all-reduce SUM) per-replica losses and per-replica ``tape.gradient``s, towers mirrored."""
    with strategy.scope():
        query_tower, candidate_tower = _towers(seed=0)
        task = RetrievalTask(gather_across_replicas=gather, **case["task"])
    query_tower.set_weights(towers[0].get_weights())
    candidate_tower.set_weights(towers[1].get_weights())
    variables = query_tower.trainable_variables + candidate_tower.trainable_variables

    def replica_fn(xq, xc, ids, log_q, weights):
        with tf.GradientTape() as tape:
            loss = _loss(task, case, query_tower, candidate_tower, xq, xc, ids, log_q, weights)
        sizes = tf.shape(xq)[0]
        return loss, tape.gradient(loss, variables), sizes

    @tf.function
    def step(inputs):
        loss, grads, sizes = strategy.run(replica_fn, args=inputs)
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        return total, [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads], \
            strategy.experimental_local_results(sizes)

    total, grads, sizes = step(_halves(strategy))
    assert [int(s) for s in sizes] == [GLOBAL_BATCH // 2] * 2  # each replica really got half the batch
    return float(total), [g.numpy() for g in grads]


def _scale(grads):
    return max(float(np.max(np.abs(g))) for g in grads)


def _max_gap(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(CASES))
def test_cross_replica_gradients_equal_single_device(mirrored_strategy, name):
    """sum_r dL_r/dw under the 2-replica MirroredStrategy == dL/dw on one device (Yi et al. 2019 sampled
    softmax with corrected logits s(x, y) / T - log p(y), summed over queries); without the gather they
    differ."""
    case = CASES[name]
    towers = _towers(seed=0)
    single_loss, single_grads = _single_device(case, towers)
    loss, grads = _distributed(mirrored_strategy, case, towers, gather=True)
    scale = _scale(single_grads)
    assert scale > 1e-2  # non-trivial gradients
    assert loss == pytest.approx(single_loss, rel=1e-5)
    for got, want in zip(grads, single_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    # Power: per-replica candidates only (TFRS's behaviour) give a smaller loss and different gradients.
    local_loss, local_grads = _distributed(mirrored_strategy, case, towers, gather=False)
    assert local_loss < single_loss - 1e-3
    assert _max_gap(local_grads, single_grads) > 1e-2 * scale


def test_gradient_check_detects_a_missing_cross_replica_hit(mirrored_strategy):
    """Power of the accidental-hit part: without hit removal the "a" candidate of the other replica is a
    negative of query 0 and 5, so the gradients move; the distributed sum still matches its own single-device
    reference, and differs from the hit-removed one."""
    without = dict(task=dict(temperature=1.0, remove_accidental_hits=False))
    towers = _towers(seed=0)
    single_loss, single_grads = _single_device(without, towers)
    loss, grads = _distributed(mirrored_strategy, without, towers, gather=True)
    assert loss == pytest.approx(single_loss, rel=1e-5)
    scale = _scale(single_grads)
    for got, want in zip(grads, single_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    _, removed_grads = _single_device(CASES["in_batch_hits"], towers)
    assert _max_gap(removed_grads, single_grads) > 1e-3 * scale


def test_gradient_check_sees_a_gather_that_drops_cross_replica_gradients(mirrored_strategy, monkeypatch):
    """Power for the GRADIENT part: a gather whose backward pass keeps only the replica's own rows (the other
    replicas' candidates enter as constants) leaves the forward loss exactly equal but loses the terms
    d L_r' / d c_r for r' != r, so the summed gradients no longer match."""
    from tfrec_recall.tasks import retrieval as losses

    def gather_without_cross_gradients(ctx, value):
        if value is None or not value.dtype.is_floating:  # ids, log q of constants: as the library does
            return None if value is None else ctx.all_gather(value, axis=0)
        gathered = ctx.all_gather(tf.stop_gradient(value), axis=0)
        rows = tf.shape(value)[0]
        before = ctx.replica_id_in_sync_group * rows  # equal halves here
        after = tf.shape(gathered)[0] - before - rows
        own = value - tf.stop_gradient(value)  # zero forward, identity backward
        paddings = tf.concat([tf.stack([[before, after]]), tf.zeros([tf.rank(value) - 1, 2], tf.int32)], axis=0)
        return gathered + tf.pad(own, paddings)

    case = CASES["mixed_negatives_logq"]
    towers = _towers(seed=0)
    single_loss, single_grads = _single_device(case, towers)
    monkeypatch.setattr(losses, "_gather", gather_without_cross_gradients)
    loss, grads = _distributed(mirrored_strategy, case, towers, gather=True)
    assert loss == pytest.approx(single_loss, rel=1e-5)  # the forward pass cannot tell
    assert _max_gap(grads, single_grads) > 1e-2 * _scale(single_grads)


def test_two_tower_gradients_match_on_a_distributed_dataset(small_split, mirrored_strategy):
    """A small package TwoTower (YouTubeDNN query tower over the history, MLP candidate tower, in-batch
    negatives with accidental-hit removal): the all-reduced per-replica gradients of ``compute_loss`` over a
    distributed dataset (global batch 64, 32 rows per replica) equal the single-device gradients, embedding
    tables included (their IndexedSlices gradients densified)."""
    from tfrec_recall import training
    from tfrec_recall.config import load_config
    strategy = mirrored_strategy
    config = load_config("youtube_dnn", overrides={"embedding_dim": 8, "side_embedding_dim": 4, "output_dim": 8,
                                                   "hidden_units": [8], "temperature": 0.2})
    batch = 64

    def build():
        training.set_seed(5)
        model = training.build_model(config, small_split)
        model.query_tower.build()
        model.candidate_tower.build()
        return model

    single = build()
    with strategy.scope():
        mirrored = build()
    for tower in ("query_tower", "candidate_tower"):
        getattr(mirrored, tower).set_weights(getattr(single, tower).get_weights())
    assert [v.shape for v in single.trainable_variables] == [v.shape for v in mirrored.trainable_variables]

    arrays = training.training_arrays(single, small_split)
    dataset = make_dataset(arrays, batch, drop_remainder=True).take(1)
    features = next(iter(dataset))
    ids = features["item_id"].numpy()
    # The batch has a popular item in both halves: an accidental hit that crosses the replicas.
    assert set(ids[:batch // 2]) & set(ids[batch // 2:])

    dense = lambda grads: [tf.convert_to_tensor(g) for g in grads]  # noqa: E731
    with tf.GradientTape() as tape:
        single_loss = single.compute_loss(features, training=True)
    single_grads = [g.numpy() for g in dense(tape.gradient(single_loss, single.trainable_variables))]

    def replica_fn(inputs):
        with tf.GradientTape() as tape:
            loss = mirrored.compute_loss(inputs, training=True)
        return loss, dense(tape.gradient(loss, mirrored.trainable_variables)), tf.shape(inputs["item_id"])[0]

    @tf.function
    def step(inputs):
        loss, grads, rows = strategy.run(replica_fn, args=(inputs,))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads],
                strategy.experimental_local_results(rows))

    loss, grads, rows = step(next(iter(strategy.experimental_distribute_dataset(dataset))))
    assert [int(r) for r in rows] == [batch // 2] * 2
    assert float(loss) == pytest.approx(float(single_loss), rel=1e-5)
    scale = _scale(single_grads)
    assert scale > 1e-3
    for variable, got, want in zip(single.trainable_variables, grads, single_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5 * scale, err_msg=variable.name)
