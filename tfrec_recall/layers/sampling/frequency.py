"""Streaming frequency estimation for the logQ correction (Yi et al., RecSys 2019, "Sampling-Bias-Corrected
Neural Modeling for Large Corpus Item Recommendations", Algorithms 2 and 3), counting every occurrence.

The quantity estimated is the item's EXPECTED NUMBER OF OCCURRENCES PER STEP among the step's (global) batch
of candidates, B * q(y) for a batch of B rows drawn from q. That is what the in-batch softmax must subtract
(log of the expected count of candidate y among the step's candidates), and it exceeds 1 for items seen
several times per batch, which a per-step "was it seen" probability cannot express.

For each of ``num_hashes`` hash functions h_j with ``num_buckets`` buckets there are three arrays: A_j holds the
global step at which a bucket was last seen, B_j the moving average of the number of steps between two
occurrences, W_j the weight mass of that average. At global step t, a bucket b hit c >= 1 times by the batch
has seen c occurrences since step A_j[b]; each is credited an equal share g = (t - A_j[b]) / c of that gap, and
the paper's update B <- (1 - alpha) * B + alpha * g is applied once per occurrence, i.e. with k = (1 - alpha)^c

    B_j[b] <- k * B_j[b] + (1 - k) * g,      W_j[b] <- k * W_j[b] + (1 - k),      A_j[b] <- t

The period estimate is B_j[b] / W_j[b]: with W starting at 0 this is the bias-corrected moving average (as in
Adam), so a bucket seen n times is the weighted mean of its n gaps instead of being pulled towards an arbitrary
initial value (the paper leaves B's initial value open; ``initial_steps`` > 0 starts every bucket at that
period with full weight instead). With c = 1 and W = 1 this is the paper's update exactly; sharing the gap
equally keeps the estimate of frequent items unbiased (the paper's per-sample loop credits the whole gap to
the first copy and 0 to the others, which, applied in order, over-estimates an item seen 50 times per step by
about 30 % at alpha = 0.01). The expected count is 1 / max_j (B_j / W_j)[h_j(y)]: collisions make a bucket
look more frequent (smaller period), so the largest period is the least collided estimate; a bucket never
seen gives count 0.

The global step and A are int64 (a float32 step stops counting at 2^24). State lives in non-trainable
variables, saved with checkpoints and SavedModels; only the buckets of the step's ids are written (sparse
``scatter_update``), also under a ``tf.distribute`` strategy, where every replica applies the same gathered
global batch and the first replica's write is kept.
"""
from __future__ import annotations

import tensorflow as tf

from tfrec_recall._validation import is_int, require_positive_int


class NonTrainableLayer(tf.keras.layers.Layer):
    """A layer without trainable state: ``trainable`` is always False. A ``trainable`` argument is ignored (as
    configs of earlier versions may hold one); Keras's cascade of a parent model's ``trainable = True`` (which
    loading a SavedModel runs) writes the flag underneath and is not seen; setting True on the layer itself
    is refused."""

    def __init__(self, **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(trainable=False, **kwargs)

    @property
    def trainable(self) -> bool:
        return False

    @trainable.setter
    def trainable(self, value) -> None:
        if value:
            raise ValueError(f"{type(self).__name__} has no trainable state: trainable must be False, got {value!r}")
        self._trainable = False


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class StreamingFrequencyEstimator(NonTrainableLayer):
    def __init__(self, num_buckets: int = 1 << 20, num_hashes: int = 2, alpha: float = 0.01,
                 initial_steps: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        require_positive_int("num_buckets", num_buckets)
        if not is_int(num_hashes) or not 1 <= num_hashes <= 16:
            raise ValueError(f"num_hashes must be an integer in [1, 16], got {num_hashes!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not (isinstance(initial_steps, (int, float)) and 0.0 <= initial_steps < float("inf")):
            raise ValueError(f"initial_steps must be a finite number >= 0, got {initial_steps!r}")
        self.num_buckets, self.num_hashes = num_buckets, num_hashes
        self.alpha, self.initial_steps = float(alpha), float(initial_steps)
        sync = dict(synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, trainable=False)
        size = num_hashes * num_buckets  # flat [hash, bucket] arrays: sparse updates work on mirrored variables
        self.last_step = self.add_weight(name="A", shape=(size,), dtype=tf.int64, initializer="zeros", **sync)
        self.period = self.add_weight(name="B", shape=(size,), dtype=tf.float32,
                                      initializer=tf.keras.initializers.Constant(self.initial_steps), **sync)
        self.mass = self.add_weight(name="W", shape=(size,), dtype=tf.float32,
                                    initializer=tf.keras.initializers.Constant(float(self.initial_steps > 0)),
                                    **sync)
        self.step = self.add_weight(name="global_step", shape=(), dtype=tf.int64, initializer="zeros", **sync)
        self.built = True  # all state is made here; Keras saves an unbuilt layer only partially

    def hash(self, ids: tf.Tensor) -> tf.Tensor:
        """Flat state indices ``[num_hashes, n]`` of string (or integer) ids: ``j * num_buckets + h_j(id)``,
        where h_j is keyed SipHash with key j."""
        ids = tf.reshape(ids, [-1])
        if ids.dtype != tf.string:
            ids = tf.strings.as_string(ids)
        return tf.stack([tf.strings.to_hash_bucket_strong(ids, self.num_buckets, key=[j + 1, 7919 * (j + 1)])
                         + j * self.num_buckets for j in range(self.num_hashes)], axis=0)

    def update(self, ids: tf.Tensor) -> tf.Tensor:
        """Advances the global step by one and records every occurrence of every id in ``ids``."""
        return self.update_buckets(self.hash(ids))

    def update_buckets(self, buckets: tf.Tensor) -> tf.Tensor:
        """:meth:`update` on precomputed indices ``[num_hashes, n]`` (e.g. gathered from all replicas)."""
        new_step = self.step.assign_add(tf.constant(1, tf.int64))
        index, counts = tf.unique_with_counts(tf.reshape(tf.cast(buckets, tf.int64), [-1]))[0::2]
        last = tf.gather(self.last_step, index)
        gap = tf.cast(new_step - last, tf.float32) / tf.cast(counts, tf.float32)
        keep = tf.pow(1.0 - self.alpha, tf.cast(counts, tf.float32))
        period = keep * tf.gather(self.period, index) + (1.0 - keep) * gap
        mass = keep * tf.gather(self.mass, index) + (1.0 - keep)
        ops = [self.period.scatter_update(tf.IndexedSlices(period, index)),
               self.mass.scatter_update(tf.IndexedSlices(mass, index)),
               self.last_step.scatter_update(tf.IndexedSlices(tf.fill(tf.shape(index), new_step), index))]
        with tf.control_dependencies(ops):
            return tf.identity(new_step)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        """Estimated expected count per step, B * q(y), of each id: shape ``[n]``."""
        return self.count_from_buckets(self.hash(ids))

    def count_from_buckets(self, buckets: tf.Tensor) -> tf.Tensor:
        """:meth:`call` on precomputed indices ``[num_hashes, n]`` (training hashes each batch once)."""
        buckets = tf.cast(buckets, tf.int64)
        mass = tf.gather(self.mass, buckets)
        period = tf.gather(self.period, buckets) / tf.maximum(mass, 1e-30)
        count = tf.where(mass > 0, 1.0 / tf.maximum(period, 1e-9), 0.0)
        return tf.reduce_min(count, axis=0)  # = 1 / max_j period_j over the hashes (0 when a bucket is unseen)

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets, "num_hashes": self.num_hashes,
                "alpha": self.alpha, "initial_steps": self.initial_steps}
