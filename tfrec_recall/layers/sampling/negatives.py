"""Negative samplers over the item corpus.

:class:`CorpusNegativeSampler` draws ``num_negatives`` items per training step (shared by the whole batch),
with replacement, from u(y) proportional to ``count(y) ** beta``: ``beta = 0`` is global uniform, ``0 < beta < 1``
popularity-damped (word2vec's 0.75), ``beta = 1`` the unigram distribution. It returns the items' raw features
(the candidate tower embeds them), their ids (for accidental-hit removal) and their expected count in the
draw, M * u(y) with M = ``num_negatives``; :meth:`expected_counts` gives M * u(y) for any ids (0 outside the
corpus), which the logQ correction of mixed negatives needs for the in-batch candidates too (Yang et al.
2020: one candidate set, each candidate corrected by log(B * q(y) + M * u(y))).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall.data.tfdata import to_tensors
from tfrec_recall.layers.sampling.frequency import NonTrainableLayer
from tfrec_recall._validation import require_positive_int


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class CorpusNegativeSampler(NonTrainableLayer):
    def __init__(self, candidate_features: Mapping[str, Sequence], id_feature: str = "item_id",
                 counts: Optional[Sequence[float]] = None, beta: float = 0.0, num_negatives: int = 256,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if id_feature not in candidate_features:
            raise ValueError(f"candidate_features must contain the id feature {id_feature!r}, got "
                             f"{sorted(candidate_features)}")
        arrays = {k: np.asarray(v) for k, v in candidate_features.items()}
        n = len(arrays[id_feature])
        if n == 0:
            raise ValueError("candidate_features is empty: the corpus needs at least one item")
        for name, a in arrays.items():
            if len(a) != n:
                raise ValueError(f"candidate_features[{name!r}] has {len(a)} rows, expected {n}")
        require_positive_int("num_negatives", num_negatives)
        if not beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if counts is None:
            if beta != 0.0:
                raise ValueError(f"beta={beta!r} needs counts (item frequencies); pass counts or use beta=0")
            weights = np.ones(n)
        else:
            counts = np.asarray(counts, dtype=np.float64)
            if counts.shape != (n,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
                raise ValueError(f"counts must be {n} finite non-negative numbers, got shape {counts.shape}")
            weights = counts ** beta if beta > 0 else np.ones(n)
            if weights.sum() <= 0:
                raise ValueError("counts ** beta sums to zero: no item can be sampled")
        self.probabilities = weights / weights.sum()
        self.id_feature, self.beta, self.num_negatives, self.seed = id_feature, float(beta), num_negatives, seed
        self._arrays = arrays
        self._counts = None if counts is None else counts
        self._features = to_tensors(arrays)
        self._logits = tf.constant(np.log(np.maximum(self.probabilities, 1e-30)), dtype=tf.float32)
        self._expected = tf.constant(self.probabilities * num_negatives, dtype=tf.float32)
        ids = self._features[id_feature]
        self._row_of = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(ids, tf.range(n, dtype=tf.int64)), default_value=-1)
        self._generator = tf.random.Generator.from_seed(seed)
        self.built = True  # all state is made here; Keras saves an unbuilt layer only partially

    def call(self, inputs=None):
        return self.sample()

    def sample(self):
        """Returns (features, ids, expected counts M * u(y)) of one draw of ``num_negatives`` items."""
        seed = self._generator.make_seeds(1)[:, 0]
        index = tf.random.stateless_categorical(self._logits[None, :], self.num_negatives, seed=seed)[0]
        features: Dict[str, tf.Tensor] = {k: tf.gather(v, index) for k, v in self._features.items()}
        return features, features[self.id_feature], tf.gather(self._expected, index)

    def expected_counts(self, ids: tf.Tensor) -> tf.Tensor:
        """M * u(y) of each id in ``ids`` (the expected number of copies in one draw); 0 for ids outside the
        corpus."""
        rows = self._row_of.lookup(tf.cast(tf.reshape(ids, [-1]), self._row_of.key_dtype))
        return tf.where(rows >= 0, tf.gather(self._expected, tf.maximum(rows, 0)), 0.0)

    def get_config(self):
        return {**super().get_config(),
                "candidate_features": {k: v.tolist() for k, v in self._arrays.items()},
                "id_feature": self.id_feature, "beta": self.beta, "num_negatives": self.num_negatives,
                "seed": self.seed, "counts": None if self._counts is None else self._counts.tolist()}
