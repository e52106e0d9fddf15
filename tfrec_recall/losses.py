"""The retrieval task: in-batch (and mixed) sampled softmax as a TFRS task layer.

:class:`RetrievalTask` extends ``tfrs.tasks.Retrieval`` with what production retrieval needs:

* logQ correction: logits s(x, y) - log Q(y) for every candidate column, where Q(y) is the expected number of
  copies of y among the step's candidates (the model computes it: B * q(y) from a
  :class:`~tfrec_recall.layers.frequency.StreamingFrequencyEstimator` plus M * u(y) from a corpus sampler);
  in-batch and sampled columns are corrected together or not at all;
* extra negatives (global uniform / popularity-damped samples) appended after the in-batch candidates: mixed
  negative sampling;
* removal of accidental hits (a candidate with the positive's id that is not the positive's own column);
* ``in_batch_negatives=False``: only the extra (global) negatives are negatives;
* hard negatives: only the ``num_hard_negatives`` highest-scoring negatives kept;
* per-example reward weights r_i multiplying each example's cross-entropy;
* under a ``tf.distribute`` strategy with several replicas, in-batch candidates (with their ids and log q) are
  gathered from all replicas, so each query sees the global batch's candidates as one device would; each
  replica's loss is the sum over its own queries, so the sum over replicas equals the single-device loss.

The loss is sum_i r_i * CE_i (TFRS's default SUM reduction).
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec_recall._validation import is_int

LARGE_NEGATIVE = -1e9


def _fingerprint(ids):
    if ids is None:
        return None
    ids = tf.reshape(ids, [-1])
    return tf.strings.to_hash_bucket_fast(ids, 1 << 62) if ids.dtype == tf.string else tf.cast(ids, tf.int64)


def _gather(ctx, value):
    return None if value is None else ctx.all_gather(value, axis=0)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class RetrievalTask(tfrs.tasks.Retrieval):
    def __init__(self, temperature: float = 1.0, remove_accidental_hits: bool = True,
                 num_hard_negatives: Optional[int] = None, gather_across_replicas: bool = True,
                 in_batch_negatives: bool = True, **kwargs):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if num_hard_negatives is not None and (not is_int(num_hard_negatives) or num_hard_negatives < 1):
            raise ValueError(f"num_hard_negatives must be None or a positive integer, got {num_hard_negatives!r}")
        name = kwargs.pop("name", None)
        super().__init__(temperature=None, remove_accidental_hits=False, num_hard_negatives=None, name=name)
        self.temperature = float(temperature)
        self.remove_hits = bool(remove_accidental_hits)
        self.num_hard = num_hard_negatives
        self.gather_across_replicas = bool(gather_across_replicas)
        self.in_batch_negatives = bool(in_batch_negatives)

    def logits_and_labels(self, query_embeddings, candidate_embeddings, candidate_ids=None, candidate_log_q=None,
                          negative_embeddings=None, negative_ids=None, negative_log_q=None):
        """Corrected logits ``[num_queries, num_candidates]`` and one-hot labels (positives on the diagonal of
        this replica's block)."""
        num_queries = tf.shape(query_embeddings)[0]
        offset = tf.constant(0, tf.int32)
        # Ids are compared as 62-bit fingerprints: ~10x faster than string equality, and collectives cannot
        # gather strings.
        candidate_ids = _fingerprint(candidate_ids)
        negative_ids = _fingerprint(negative_ids)
        ctx = tf.distribute.get_replica_context()
        if self.gather_across_replicas and ctx is not None and ctx.num_replicas_in_sync > 1:
            sizes = ctx.all_gather(tf.reshape(tf.shape(candidate_embeddings)[0], [1]), axis=0)
            offset = tf.reduce_sum(sizes[:ctx.replica_id_in_sync_group])
            candidate_embeddings = _gather(ctx, candidate_embeddings)
            candidate_ids = _gather(ctx, candidate_ids)
            candidate_log_q = _gather(ctx, candidate_log_q)
        num_in_batch = tf.shape(candidate_embeddings)[0]
        if negative_embeddings is not None:
            if (candidate_log_q is None) != (negative_log_q is None):
                raise ValueError("candidate_log_q and negative_log_q must be given together: in-batch and sampled "
                                 "candidates form one candidate set, corrected in the same units (log of the "
                                 "expected count among the step's candidates)")
            candidate_embeddings = tf.concat([candidate_embeddings, negative_embeddings], axis=0)
            if candidate_ids is not None:
                if negative_ids is None:
                    raise ValueError("negative_ids are needed with candidate_ids when negatives are given")
                candidate_ids = tf.concat([candidate_ids, negative_ids], axis=0)
            if candidate_log_q is not None:
                candidate_log_q = tf.concat([candidate_log_q, negative_log_q], axis=0)
        scores = tf.linalg.matmul(query_embeddings, candidate_embeddings, transpose_b=True) / self.temperature
        if candidate_log_q is not None:
            scores = scores - tf.cast(candidate_log_q, scores.dtype)[None, :]
        positive_column = offset + tf.range(num_queries)
        labels = tf.one_hot(positive_column, tf.shape(scores)[1], dtype=scores.dtype)
        if not self.in_batch_negatives:
            # Global negatives only: other queries' positives are not used as negatives.
            in_batch = tf.sequence_mask(tf.fill([num_queries], num_in_batch), tf.shape(scores)[1])
            scores = scores + tf.cast(in_batch & tf.equal(labels, 0.0), scores.dtype) * LARGE_NEGATIVE
        if self.remove_hits:
            if candidate_ids is None:
                raise ValueError("remove_accidental_hits=True needs candidate_ids")
            ids = tf.reshape(candidate_ids, [-1])
            positive_ids = tf.gather(ids, positive_column)
            duplicate = tf.equal(positive_ids[:, None], ids[None, :]) & tf.equal(labels, 0.0)
            scores = scores + tf.cast(duplicate, scores.dtype) * LARGE_NEGATIVE
        if self.num_hard is not None:
            scores, labels = tfrs.layers.loss.HardNegativeMining(self.num_hard)(scores, labels)
        return scores, labels

    def call(self, query_embeddings, candidate_embeddings, sample_weight=None, candidate_ids=None,
             candidate_log_q=None, negative_embeddings=None, negative_ids=None, negative_log_q=None,
             compute_metrics: bool = False, compute_batch_metrics: bool = False):
        scores, labels = self.logits_and_labels(query_embeddings, candidate_embeddings, candidate_ids,
                                                candidate_log_q, negative_embeddings, negative_ids, negative_log_q)
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=scores)
        if sample_weight is not None:
            per_example = per_example * tf.reshape(tf.cast(sample_weight, per_example.dtype), [-1])
        loss = tf.reduce_sum(per_example)
        update_ops = [m.update_state(loss) for m in self._loss_metrics]
        if compute_batch_metrics:
            update_ops += [m.update_state(labels, scores) for m in self._batch_metrics]
        if compute_metrics:
            update_ops += [m.update_state(query_embeddings, candidate_embeddings[:tf.shape(query_embeddings)[0]],
                                          true_candidate_ids=candidate_ids) for m in self._factorized_metrics]
        with tf.control_dependencies(update_ops):
            return tf.identity(loss)

    def get_config(self):
        return {"name": self.name, "temperature": self.temperature, "remove_accidental_hits": self.remove_hits,
                "num_hard_negatives": self.num_hard, "gather_across_replicas": self.gather_across_replicas,
                "in_batch_negatives": self.in_batch_negatives}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
