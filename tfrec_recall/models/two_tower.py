"""TwoTower (DSSM): a query tower and a candidate tower joined by a dot product, trained with a RetrievalTask.

Variants are made by what is plugged in, not by flags:

* ids only / side features: the towers' feature specs;
* DSSM MLP, SENet, residual, YouTubeDNN or self-attentive (SASRec) user tower: the tower classes;
* multi-interest users (MIND, ComiRec): a multi-interest query tower (``[batch, K, d]`` and its
  ``interest_mask``) with a multi-interest scorer in the task (MIND's label-aware attention; its hard max for
  ComiRec); ``recommend`` and the export search each interest and merge;
* sampling-bias correction (``logq_correction=True``): every candidate column's logit is corrected by
  log Q(y), Q(y) = B * q(y) + M * u(y), the expected number of copies of y among the step's candidates:
  B * q(y) from a ``StreamingFrequencyEstimator`` over the step's positives (in-batch candidates) and
  M * u(y) from the ``CorpusNegativeSampler`` (sampled candidates); with global negatives only
  (the task's ``in_batch_negatives=False``) Q(y) = M * u(y), the positive included (Yi et al. 2019;
  Yang et al. 2020, mixed negative sampling);
* global / popularity-damped / mixed negatives: a ``CorpusNegativeSampler``;
* hard negatives, temperature, accidental-hit removal: the task;
* sample weights: only from the feature named by ``weight_feature`` (none by default), never implicitly.

Training steps, logging, auxiliary losses (``auxiliary_losses``) and ``index_candidates`` / ``recommend`` come
from :class:`~tfrec_recall.models.base.RetrievalModel`: ``fit`` logs ``loss`` as the mean over the epoch's
batches (of the global batch's summed loss), not the last batch's value, and ``retrieval_loss`` (the task's
loss alone) besides it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tfrec_recall.data.schema import ITEM_ID
from tfrec_recall.layers.sampling.frequency import StreamingFrequencyEstimator
from tfrec_recall.layers.sampling import CorpusNegativeSampler
from tfrec_recall.layers.towers import Tower
from tfrec_recall.models.base import AuxiliaryLoss, RetrievalModel
from tfrec_recall.layers.interest.scorers import DotScorer
from tfrec_recall.tasks.retrieval import RetrievalTask

MIN_EXPECTED_COUNT = 1e-6  # floor of Q(y) before the log: an item neither seen nor sampleable
_serialize = tf.keras.utils.serialize_keras_object
_deserialize = tf.keras.utils.deserialize_keras_object


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class TwoTower(RetrievalModel):
    def __init__(self, query_tower: Tower, candidate_tower: Tower, task: Optional[RetrievalTask] = None,
                 frequency_estimator: Optional[StreamingFrequencyEstimator] = None,
                 negative_sampler: Optional[CorpusNegativeSampler] = None, item_id_feature: str = ITEM_ID,
                 weight_feature: Optional[str] = None, logq_correction: bool = False,
                 auxiliary_losses: Sequence[AuxiliaryLoss] = (), **kwargs):
        super().__init__(**kwargs)
        for name, tower in (("query_tower", query_tower), ("candidate_tower", candidate_tower)):
            if not isinstance(tower, tf.keras.layers.Layer):
                raise TypeError(f"{name} must be a Keras layer or model, got {type(tower).__name__}")
        if item_id_feature not in getattr(candidate_tower, "feature_names", [item_id_feature]):
            raise ValueError(f"item_id_feature {item_id_feature!r} is not a feature of the candidate tower "
                             f"({candidate_tower.feature_names})")
        self.query_tower = query_tower
        self.candidate_tower = candidate_tower
        self.task = task if task is not None else RetrievalTask()
        self.frequency_estimator = frequency_estimator
        self.negative_sampler = negative_sampler
        self.item_id_feature = item_id_feature
        if weight_feature is not None and not (isinstance(weight_feature, str) and weight_feature):
            raise ValueError(f"weight_feature must be None or a feature name, got {weight_feature!r}")
        self.weight_feature = weight_feature
        self.logq_correction = bool(logq_correction)
        self._check_negatives()
        self._check_scorer()
        self.add_auxiliary_losses(auxiliary_losses)

    def _check_negatives(self):
        in_batch = self.task.in_batch_negatives
        if not in_batch and self.negative_sampler is None:
            raise ValueError("the task has in_batch_negatives=False (global negatives only) but no negative_sampler "
                             "is given: there would be no negatives")
        if self.frequency_estimator is not None and not (self.logq_correction and in_batch):
            raise ValueError("frequency_estimator is used only with logq_correction=True and in-batch negatives; "
                             f"got logq_correction={self.logq_correction}, in_batch_negatives={in_batch}")
        if self.logq_correction and in_batch and self.frequency_estimator is None:
            raise ValueError("logq_correction=True with in-batch negatives needs a frequency_estimator (the "
                             "expected count of each in-batch candidate)")

    @property
    def multi_interest(self) -> bool:
        """True when the query tower gives K interest vectors per user (``[batch, K, d]``)."""
        return bool(getattr(self.query_tower, "multi_interest", False))

    def _check_scorer(self):
        single = isinstance(self.task.scorer, DotScorer)
        if self.multi_interest and single:
            raise ValueError(f"the query tower {type(self.query_tower).__name__} gives K interests per user: the "
                             "task needs a multi-interest scorer (LabelAwareAttentionScorer, MaxInterestScorer), "
                             "got DotScorer")
        if not self.multi_interest and not single:
            raise ValueError(f"the task's scorer {type(self.task.scorer).__name__} scores K interests per user but "
                             f"the query tower {type(self.query_tower).__name__} gives one vector: use DotScorer")

    def query_interest_mask(self, features):
        """``[batch, K]`` valid interests of a multi-interest query tower (None for a single-vector one)."""
        return self.query_tower.interest_mask(features) if self.multi_interest else None

    def build_from_config(self, config):
        """Builds both towers from raw inputs of their specs' dtypes (what deserialising a model that was called
        runs): Keras's default builds the model from float placeholders, which string features cannot take.
        ``build`` itself is not overridden: Keras would then refuse ``fit`` before a first call."""
        self.query_tower.build(None)
        self.candidate_tower.build(None)
        self.built = True

    def call(self, features, training=False):
        """Query embeddings of ``features`` (the retrieval model's serving path)."""
        return self.query_tower(features, training=training)

    def _batch_counts(self, ids, training):
        """B * q(y) of the step's positives; in training the estimator first records the (global) batch."""
        estimator = self.frequency_estimator
        buckets = estimator.hash(ids)  # hashed once per step, for both the update and the lookup
        if not training:
            return estimator.count_from_buckets(buckets)
        seen = buckets
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            seen = ctx.all_gather(buckets, axis=1)  # every replica records the same global batch
        with tf.control_dependencies([estimator.update_buckets(seen)]):
            return estimator.count_from_buckets(buckets)

    def log_q(self, ids, negative_ids=None, training=False):
        """``candidate_log_q`` / ``negative_log_q`` for the task: log Q(y) = log(B * q(y) + M * u(y)) of each
        in-batch candidate (``ids``) and sampled one (``negative_ids``); in training the estimator first
        records the batch."""
        in_batch = self.task.in_batch_negatives

        def log_expected(x, batch_count):
            sampled = 0.0 if self.negative_sampler is None else self.negative_sampler.expected_counts(x)
            return tf.math.log(tf.maximum(batch_count + sampled, MIN_EXPECTED_COUNT))

        out = {"candidate_log_q": log_expected(ids, self._batch_counts(ids, training) if in_batch else 0.0)}
        if negative_ids is not None:
            out["negative_log_q"] = log_expected(negative_ids,
                                                 self.frequency_estimator(negative_ids) if in_batch else 0.0)
        return out

    def embed_pair(self, features, training=False):
        return self.query_tower(features, training=training), self.candidate_tower(features, training=training)

    def embed_candidates(self, features, training=False):
        return self.candidate_tower(features, training=training)

    def candidate_feature_specs(self) -> list:
        return list(self.candidate_tower.input_specs)

    def query_feature_specs(self) -> list:
        return list(self.query_tower.input_specs)

    def retrieval_loss(self, features, query_embeddings, candidate_embeddings, training=False):
        query, candidate = query_embeddings, candidate_embeddings
        ids = features[self.item_id_feature]
        weight = None
        if self.weight_feature is not None:
            if self.weight_feature not in features:
                raise KeyError(f"weight_feature {self.weight_feature!r} is not in the batch; got {sorted(features)}")
            weight = features[self.weight_feature]
        negatives, negative_ids = {}, None
        if self.negative_sampler is not None:
            neg_features, negative_ids, _ = self.negative_sampler.sample()
            negatives = dict(negative_embeddings=self.candidate_tower(neg_features, training=training),
                             negative_ids=negative_ids)
        log_q = self.log_q(ids, negative_ids, training) if self.logq_correction else {}
        # As in TFRS models: the (full-corpus, slow) factorized metrics only outside training.
        return self.task(query, candidate, sample_weight=weight, candidate_ids=ids, compute_metrics=not training,
                         interest_mask=self.query_interest_mask(features), **negatives, **log_q)

    def get_config(self):
        return {**super().get_config(), "query_tower": _serialize(self.query_tower),
                "candidate_tower": _serialize(self.candidate_tower), "task": _serialize(self.task),
                "frequency_estimator": (None if self.frequency_estimator is None
                                        else _serialize(self.frequency_estimator)),
                "negative_sampler": None if self.negative_sampler is None else _serialize(self.negative_sampler),
                "item_id_feature": self.item_id_feature, "weight_feature": self.weight_feature,
                "logq_correction": self.logq_correction}

    @classmethod
    def deserialize_config(cls, config):
        config = super().deserialize_config(config)
        for key in ("query_tower", "candidate_tower", "task", "frequency_estimator", "negative_sampler"):
            if config.get(key) is not None:
                config[key] = _deserialize(config[key])
        return config
