"""Streaming frequency estimation for the logQ correction (Yi et al., RecSys 2019, "Sampling-Bias-Corrected
Neural Modeling for Large Corpus Item Recommendations", Algorithms 2 and 3).

For each of ``num_hashes`` hash functions h_j with ``num_buckets`` buckets there are two arrays: A_j holds the
global step at which a bucket was last seen, B_j the estimated number of steps between two sightings. At global
step t, for each distinct bucket b hit by the batch:

    B_j[b] <- (1 - alpha) * B_j[b] + alpha * (t - A_j[b])
    A_j[b] <- t

The estimated per-step sampling probability of item y is p(y) = 1 / max_j B_j[h_j(y)]: hash collisions make a
bucket look more frequent (smaller B), so the largest B over the arrays is the least collided estimate.
Updates are batched: one step per batch, each distinct bucket updated once per step (duplicates in a batch count
as one sighting). p is clipped to [1 / max_b, 1]. State lives in non-trainable variables, saved with
checkpoints and SavedModels.
"""
from __future__ import annotations

import tensorflow as tf

from tfrec_recall._validation import is_int, require_positive_int


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class StreamingFrequencyEstimator(tf.keras.layers.Layer):
    def __init__(self, num_buckets: int = 1 << 20, num_hashes: int = 2, alpha: float = 0.01,
                 initial_steps: float = 0.0, **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(trainable=False, **kwargs)
        require_positive_int("num_buckets", num_buckets)
        if not is_int(num_hashes) or not 1 <= num_hashes <= 16:
            raise ValueError(f"num_hashes must be an integer in [1, 16], got {num_hashes!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not initial_steps >= 0.0:
            raise ValueError(f"initial_steps must be >= 0, got {initial_steps!r}")
        self.num_buckets, self.num_hashes = num_buckets, num_hashes
        self.alpha, self.initial_steps = float(alpha), float(initial_steps)
        sync = dict(synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, trainable=False)
        self.last_step = self.add_weight(name="A", shape=(num_hashes, num_buckets), dtype=tf.float32,
                                         initializer="zeros", **sync)
        self.period = self.add_weight(name="B", shape=(num_hashes, num_buckets), dtype=tf.float32,
                                      initializer=tf.keras.initializers.Constant(self.initial_steps), **sync)
        self.step = self.add_weight(name="global_step", shape=(), dtype=tf.float32, initializer="zeros", **sync)

    def hash(self, ids: tf.Tensor) -> tf.Tensor:
        """Bucket indices ``[num_hashes, n]`` of string (or integer) ids; hash j is keyed SipHash with key j."""
        ids = tf.reshape(ids, [-1])
        if ids.dtype != tf.string:
            ids = tf.strings.as_string(ids)
        return tf.stack([tf.strings.to_hash_bucket_strong(ids, self.num_buckets, key=[j + 1, 7919 * (j + 1)])
                         for j in range(self.num_hashes)], axis=0)

    def update(self, ids: tf.Tensor) -> tf.Tensor:
        """Advances the global step by one and records one sighting of every distinct id in ``ids``."""
        return self.update_buckets(self.hash(ids))

    def update_buckets(self, buckets: tf.Tensor) -> tf.Tensor:
        """:meth:`update` on precomputed buckets ``[num_hashes, n]`` (e.g. gathered from all replicas)."""
        new_step = self.step.assign_add(1.0)
        buckets = tf.cast(buckets, tf.int64)
        updates_a, updates_b = [], []
        for j in range(self.num_hashes):
            unique, _ = tf.unique(buckets[j])
            index = tf.stack([tf.fill(tf.shape(unique), tf.cast(j, tf.int64)), unique], axis=1)
            last = tf.gather_nd(self.last_step, index)
            period = tf.gather_nd(self.period, index)
            updates_b.append((index, (1.0 - self.alpha) * period + self.alpha * (new_step - last)))
            updates_a.append((index, tf.fill(tf.shape(unique), new_step)))
        with tf.control_dependencies([u for _, u in updates_b]):
            if tf.distribute.has_strategy():
                # Distributed variables have no scatter update in replica context: assign whole arrays
                # (every replica computes the same values from the same gathered buckets).
                index_b = tf.concat([i for i, _ in updates_b], axis=0)
                ops = [self.period.assign(tf.tensor_scatter_nd_update(
                           self.period, index_b, tf.concat([u for _, u in updates_b], axis=0))),
                       self.last_step.assign(tf.tensor_scatter_nd_update(
                           self.last_step, index_b, tf.concat([u for _, u in updates_a], axis=0)))]
            else:
                ops = [self.period.scatter_nd_update(i, u) for i, u in updates_b]
                ops += [self.last_step.scatter_nd_update(i, u) for i, u in updates_a]
        with tf.control_dependencies(ops):
            return tf.identity(new_step)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        """Estimated per-step probability p(y) of each id, shape ``[n]``."""
        return self.probability_from_buckets(self.hash(ids))

    def probability_from_buckets(self, buckets: tf.Tensor) -> tf.Tensor:
        """:meth:`call` on precomputed buckets ``[num_hashes, n]`` (training hashes each batch once)."""
        buckets = tf.cast(buckets, tf.int64)
        index = tf.stack([tf.repeat(tf.range(self.num_hashes, dtype=tf.int64)[:, None], tf.shape(buckets)[1],
                                    axis=1), buckets], axis=-1)
        period = tf.reduce_max(tf.gather_nd(self.period, index), axis=0)
        return 1.0 / tf.maximum(period, 1.0)

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets, "num_hashes": self.num_hashes,
                "alpha": self.alpha, "initial_steps": self.initial_steps}

