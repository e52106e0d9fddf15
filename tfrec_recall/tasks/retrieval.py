"""The retrieval task: in-batch (and mixed) sampled softmax as a TFRS task layer.

:class:`RetrievalTask` extends ``tfrs.tasks.Retrieval`` with what production retrieval needs:

* logQ correction: logits s(x, y) - log Q(y) for every candidate column, where Q(y) is the expected number of
  copies of y among the step's candidates (the model computes it: B * q(y) from a
  :class:`~tfrec_recall.layers.sampling.frequency.StreamingFrequencyEstimator` plus M * u(y) from a corpus sampler);
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

from typing import Callable, Optional, Sequence

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec_recall._validation import is_int
from tfrec_recall.layers.interest.scorers import DotScorer, Scorer

LARGE_NEGATIVE = -1e9
LAYER_KWARGS = ("trainable", "dtype")  # Keras layer arguments accepted besides TFRS's


def _fingerprint(ids):
    if ids is None:
        return None
    ids = tf.reshape(ids, [-1])
    return tf.strings.to_hash_bucket_fast(ids, 1 << 62) if ids.dtype == tf.string else tf.cast(ids, tf.int64)


def _gather(ctx, value):
    return None if value is None else ctx.all_gather(value, axis=0)


def _metric_list(argument: str, value, kind: type) -> list:
    """``value`` (None, one metric or a sequence of metrics, as TFRS takes them) as a list of ``kind``."""
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for metric in values:
        if not isinstance(metric, kind):
            raise TypeError(f"{argument} must hold {kind.__module__}.{kind.__qualname__} objects, got {metric!r}")
    return values


def _serialize_metric(argument: str, metric) -> dict:
    """The Keras serialisation of ``metric``; a metric without a config (e.g. ``FactorizedTopK``, whose
    candidate index is state, not configuration) raises ``NotImplementedError`` naming the argument."""
    try:
        return tf.keras.utils.serialize_keras_object(metric)
    except NotImplementedError as error:
        raise NotImplementedError(
            f"RetrievalTask cannot serialise {argument} entry {type(metric).__name__} {metric.name!r}: it has no "
            "config (a FactorizedTopK's candidates are an index, not configuration); build the task without it "
            "for saving and set task.factorized_metrics after loading") from error


def _apply_layer_kwargs(layer: tf.keras.layers.Layer, trainable: bool = True, dtype=None) -> None:
    """Applies the Keras layer arguments that ``tfrs.tasks.Retrieval.__init__`` does not forward."""
    layer.trainable = trainable
    if dtype is not None:
        layer._set_dtype_policy(dtype)  # what Layer.__init__ does with its own dtype argument


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class RetrievalTask(tfrs.tasks.Retrieval):
    """``tfrs.tasks.Retrieval`` with logQ correction, extra negatives, reward weights and cross-replica
    candidates (see the module docstring).

    Takes TFRS's arguments with TFRS's meaning: ``loss`` (a Keras loss of ``(labels, logits, sample_weight)``
    replacing the default ``CategoricalCrossentropy(from_logits=True, reduction=SUM)``), ``metrics`` (one or
    several ``tfrs.metrics.Factorized``, updated in :meth:`call` when ``compute_metrics``), ``batch_metrics``
    (Keras metrics updated with the batch's labels and logits when ``compute_batch_metrics``),
    ``loss_metrics`` (Keras metrics of the loss), ``temperature`` (``None`` means 1, as in TFRS: no scaling),
    ``num_hard_negatives``, ``remove_accidental_hits`` and ``name``; this package's defaults differ from TFRS's
    only in ``remove_accidental_hits=True``. ``scorer`` (a :class:`~tfrec_recall.layers.interest.Scorer`,
    default :class:`~tfrec_recall.layers.interest.DotScorer`) computes the query x candidate logits before the
    temperature, logQ correction and masking; it is given each query's positive candidate as ``targets``
    (MIND's label-aware attention reads them) and the ``interest_mask`` passed to :meth:`call`; with a
    multi-interest scorer the queries are ``[B, K, d]`` and factorized ``metrics`` (which score one vector per
    query) do not apply. Besides the Keras layer arguments ``trainable`` and ``dtype``, any other keyword
    argument is refused with a ``TypeError`` naming it.
    """

    def __init__(self, loss: Optional[Callable] = None, metrics=None,
                 batch_metrics: Optional[Sequence[tf.keras.metrics.Metric]] = None,
                 loss_metrics: Optional[Sequence[tf.keras.metrics.Metric]] = None,
                 temperature: Optional[float] = 1.0, num_hard_negatives: Optional[int] = None,
                 remove_accidental_hits: bool = True, name: Optional[str] = None,
                 gather_across_replicas: bool = True, in_batch_negatives: bool = True,
                 scorer: Optional[Scorer] = None, **kwargs):
        unknown = sorted(set(kwargs) - set(LAYER_KWARGS))
        if unknown:
            raise TypeError(f"RetrievalTask got unexpected keyword argument(s) {unknown}; it accepts TFRS's "
                            "Retrieval arguments, gather_across_replicas, in_batch_negatives, scorer and "
                            f"{LAYER_KWARGS}")
        temperature = 1.0 if temperature is None else temperature
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if num_hard_negatives is not None and (not is_int(num_hard_negatives) or num_hard_negatives < 1):
            raise ValueError(f"num_hard_negatives must be None or a positive integer, got {num_hard_negatives!r}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be None or a Keras loss (a callable), got {loss!r}")
        if scorer is not None and not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be None or a tfrec_recall.layers.interest.Scorer, got {scorer!r}")
        metrics = _metric_list("metrics", metrics, tfrs.metrics.Factorized)
        super().__init__(loss=loss, metrics=metrics,
                         batch_metrics=_metric_list("batch_metrics", batch_metrics, tf.keras.metrics.Metric),
                         loss_metrics=_metric_list("loss_metrics", loss_metrics, tf.keras.metrics.Metric),
                         temperature=None, remove_accidental_hits=False, num_hard_negatives=None, name=name)
        _apply_layer_kwargs(self, **kwargs)
        self._given_loss = loss
        self.temperature = float(temperature)
        self.remove_hits = bool(remove_accidental_hits)
        self.num_hard = num_hard_negatives
        self.gather_across_replicas = bool(gather_across_replicas)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.scorer = scorer if scorer is not None else DotScorer(name="dot_scorer")

    def logits_and_labels(self, query_embeddings, candidate_embeddings, candidate_ids=None, candidate_log_q=None,
                          negative_embeddings=None, negative_ids=None, negative_log_q=None, interest_mask=None):
        """Corrected logits ``[num_queries, num_candidates]`` and one-hot labels (positives on the diagonal of
        this replica's block); the raw logits come from the scorer."""
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
        targets = candidate_embeddings[offset:offset + num_queries]  # each query's positive
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
        scores = self.scorer(query_embeddings, candidate_embeddings, targets=targets,
                             interest_mask=interest_mask) / self.temperature
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
             compute_metrics: bool = True, compute_batch_metrics: bool = True, interest_mask=None):
        """The loss sum_i r_i * CE_i (or the given ``loss`` of the labels, logits and ``sample_weight``).

        As in TFRS: the loss metrics are always updated (with the weighted loss), the factorized ``metrics``
        when ``compute_metrics`` (with the query embeddings and this replica's positive candidates, by
        ``candidate_ids`` when given), the ``batch_metrics`` with the labels and logits (after logQ
        correction, masking and hard-negative mining) when ``compute_batch_metrics``. ``interest_mask``
        ([B, K], for multi-interest queries) goes to the scorer."""
        scores, labels = self.logits_and_labels(query_embeddings, candidate_embeddings, candidate_ids,
                                                candidate_log_q, negative_embeddings, negative_ids, negative_log_q,
                                                interest_mask)
        if sample_weight is not None:
            sample_weight = tf.reshape(tf.cast(sample_weight, scores.dtype), [-1])
        loss = self._loss(y_true=labels, y_pred=scores, sample_weight=sample_weight)
        # The loss already carries the weights: TFRS 0.7.3 also passes the [batch] sample_weight with the scalar
        # loss, which Keras metrics refuse (InvalidArgumentError), so only the loss goes to the loss metrics.
        update_ops = [m.update_state(loss) for m in self._loss_metrics]
        if compute_metrics:
            positives = candidate_embeddings[:tf.shape(query_embeddings)[0]]  # without extra negatives
            update_ops += [m.update_state(query_embeddings, positives, true_candidate_ids=candidate_ids)
                           for m in self._factorized_metrics]
        if compute_batch_metrics:
            update_ops += [m.update_state(labels, scores) for m in self._batch_metrics]
        with tf.control_dependencies(update_ops):
            return tf.identity(loss)

    def get_config(self):
        config = super().get_config()
        config.update({
            "loss": None if self._given_loss is None else tf.keras.losses.serialize(self._given_loss),
            "metrics": [_serialize_metric("metrics", m) for m in self._factorized_metrics],
            "batch_metrics": [_serialize_metric("batch_metrics", m) for m in self._batch_metrics],
            "loss_metrics": [_serialize_metric("loss_metrics", m) for m in self._loss_metrics],
            "temperature": self.temperature, "num_hard_negatives": self.num_hard,
            "remove_accidental_hits": self.remove_hits, "gather_across_replicas": self.gather_across_replicas,
            "in_batch_negatives": self.in_batch_negatives,
            "scorer": tf.keras.utils.serialize_keras_object(self.scorer)})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("loss") is not None:
            config["loss"] = tf.keras.losses.deserialize(config["loss"])
        if config.get("scorer") is not None:
            config["scorer"] = tf.keras.utils.deserialize_keras_object(config["scorer"])
        # Keras metrics through tf.keras.metrics.deserialize: it knows the built-in ones also where Keras's
        # legacy deserialisation runs (loading a SavedModel), which the generic function does not.
        config["metrics"] = [tf.keras.utils.deserialize_keras_object(m) for m in config.get("metrics") or []]
        for key in ("batch_metrics", "loss_metrics"):
            config[key] = [tf.keras.metrics.deserialize(m) for m in config.get(key) or []]
        return cls(**config)
