"""TwoTower (DSSM): a query tower and a candidate tower joined by a dot product, trained with a RetrievalTask.

Variants are made by what is plugged in, not by flags:

* ids only / side features: the towers' feature specs;
* DSSM MLP, SENet, residual or YouTubeDNN user tower: the tower classes;
* sampling-bias correction: a ``StreamingFrequencyEstimator`` (logQ of in-batch candidates);
* global / popularity-damped / mixed negatives: a ``CorpusNegativeSampler``;
* hard negatives, temperature, accidental-hit removal: the task.
"""
from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec_recall.data.schema import ITEM_ID, WEIGHT
from tfrec_recall.layers.frequency import StreamingFrequencyEstimator
from tfrec_recall.layers.sampling import CorpusNegativeSampler
from tfrec_recall.layers.towers import Tower
from tfrec_recall.losses import RetrievalTask

_serialize = tf.keras.utils.serialize_keras_object
_deserialize = tf.keras.utils.deserialize_keras_object


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class TwoTower(tfrs.Model):
    def __init__(self, query_tower: Tower, candidate_tower: Tower, task: Optional[RetrievalTask] = None,
                 frequency_estimator: Optional[StreamingFrequencyEstimator] = None,
                 negative_sampler: Optional[CorpusNegativeSampler] = None, item_id_feature: str = ITEM_ID,
                 weight_feature: Optional[str] = WEIGHT, **kwargs):
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
        self.weight_feature = weight_feature

    def call(self, features, training=False):
        """Query embeddings of ``features`` (the retrieval model's serving path)."""
        return self.query_tower(features, training=training)

    def _candidate_log_q(self, ids, training):
        if self.frequency_estimator is None:
            return None
        estimator = self.frequency_estimator
        buckets = estimator.hash(ids)  # hashed once per step, for both the update and the lookup
        if not training:
            return tf.math.log(estimator.probability_from_buckets(buckets))
        seen = buckets
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            seen = ctx.all_gather(buckets, axis=1)  # every replica records the same global batch
        with tf.control_dependencies([estimator.update_buckets(seen)]):
            return tf.math.log(estimator.probability_from_buckets(buckets))

    def compute_loss(self, features, training=False):
        query = self.query_tower(features, training=training)
        candidate = self.candidate_tower(features, training=training)
        ids = features[self.item_id_feature]
        weight = features.get(self.weight_feature) if self.weight_feature else None
        negatives = {}
        if self.negative_sampler is not None:
            neg_features, neg_ids, neg_log_q = self.negative_sampler.sample()
            negatives = dict(negative_embeddings=self.candidate_tower(neg_features, training=training),
                             negative_ids=neg_ids, negative_log_q=neg_log_q)
        return self.task(query, candidate, sample_weight=weight, candidate_ids=ids,
                         candidate_log_q=self._candidate_log_q(ids, training), **negatives)

    def get_config(self):
        return {"name": self.name, "query_tower": _serialize(self.query_tower),
                "candidate_tower": _serialize(self.candidate_tower), "task": _serialize(self.task),
                "frequency_estimator": (None if self.frequency_estimator is None
                                        else _serialize(self.frequency_estimator)),
                "negative_sampler": None if self.negative_sampler is None else _serialize(self.negative_sampler),
                "item_id_feature": self.item_id_feature, "weight_feature": self.weight_feature}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("query_tower", "candidate_tower", "task", "frequency_estimator", "negative_sampler"):
            if config.get(key) is not None:
                config[key] = _deserialize(config[key])
        return cls(**config)
