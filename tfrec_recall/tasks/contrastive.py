"""Self-supervised contrastive auxiliary loss for the item tower (Yao et al. 2021, "Self-supervised Learning for
Large-scale Item Recommendations", CIKM; SSL).

Each step draws an auxiliary batch of items uniformly from the corpus (a distribution other than the
popularity-skewed training batch's, so that tail items get as many views as head ones), makes two views of every
item and trains the candidate tower to tell each item's second view from the other items' (the paper's
contrastive SSL loss L_self):

    L_self = -1/N sum_i log( exp(s(z_i, z'_i) / tau) / sum_j exp(s(z_i, z'_j) / tau) ),

s the cosine similarity of the two views' embeddings, tau its own temperature. Views (the paper's augmentations):

* feature masking: the features are split into a set A and its complement; view 1 sees the complement, view 2
  sees A (a masked feature's field embedding is zeroed). Correlated Feature Masking (CFM) picks a seed feature
  uniformly and fills A with the features of highest mutual information with it, up to half of them
  (``mask_sets``, from :func:`correlated_mask_sets`); without ``mask_sets``, Random Feature Masking (RFM) picks
  half of the features at random per item;
* feature dropout: each value of a multi-valued feature (e.g. an item's genres) is dropped with probability
  ``dropout`` in each view.

A masked tower call leaves out DAT's augmented vector (an item-unique embedding would make the task trivial).

The same item drawn twice in the auxiliary batch is not its own negative (its other copies' logits are masked).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall._validation import require_finite_nonnegative, require_positive_int
from tfrec_recall.layers.sampling import CorpusNegativeSampler
from tfrec_recall.tasks.auxiliary import AuxiliaryLoss

MASKINGS = ("correlated", "random")
SEED_OFFSET = 7919  # added to ``seed`` for the loss's random streams


def _discrete(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Integer codes of a raw feature column: strings (a list feature's row joined) or numbers in quantile bins."""
    if values.ndim == 2:
        values = np.array(["|".join(map(str, row)) for row in values], dtype=object)
    if values.dtype.kind == "f":
        finite = np.isfinite(values).any()
        edges = np.unique(np.nanquantile(values, np.linspace(0, 1, bins + 1)[1:-1])) if finite else []
        return np.where(np.isnan(values), -1, np.searchsorted(edges, np.nan_to_num(values)))
    return pd.factorize(pd.Series(values.astype(str)))[0]


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(A; B) in nats of two integer-coded columns, from their joint counts."""
    joint = pd.crosstab(a, b).to_numpy(dtype=np.float64)
    p = joint / joint.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / outer[nonzero])))


def correlated_mask_sets(arrays: Mapping[str, np.ndarray], feature_names: Sequence[str]) -> list:
    """CFM's masked sets: row f is the 0/1 membership of the set A chosen when feature f is the seed: f plus
    the ``max(1, F // 2) - 1`` other features of highest mutual information with f over the corpus ``arrays``
    (one row per item)."""
    codes = [_discrete(np.asarray(arrays[name])) for name in feature_names]
    count = len(codes)
    size = max(1, count // 2)
    out = []
    for seed in range(count):
        scores = [(-mutual_information(codes[seed], codes[j]), j) for j in range(count) if j != seed]
        chosen = [seed] + [j for _, j in sorted(scores)[:size - 1]]
        out.append([int(j in chosen) for j in range(count)])
    return out


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ContrastiveLoss(AuxiliaryLoss):
    """The SSL loss of the model's candidate tower (module docstring). ``corpus_features``: raw candidate
    features of every corpus item (the auxiliary batch is drawn from them, uniformly, ``batch_size`` items per
    step); ``mask_sets``: CFM sets (``None``: random masking); ``dropout``: the multi-valued features' value
    dropout rate; ``temperature``: tau of L_self."""

    reads_query_embeddings = False  # the candidate tower's alone: fits a multi-interest model too

    def __init__(self, corpus_features: Mapping[str, Sequence], weight: float = 1.0, temperature: float = 0.1,
                 batch_size: int = 256, dropout: float = 0.1, mask_sets: Optional[Sequence[Sequence[int]]] = None,
                 id_feature: str = "item_id", seed: int = 0, **kwargs):
        super().__init__(weight=weight, **kwargs)
        if require_finite_nonnegative("temperature", temperature) == 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.temperature, self.dropout, self.seed = float(temperature), float(dropout), int(seed)
        self.batch_size = require_positive_int("batch_size", batch_size)
        # Its own random streams: a negative sampler seeded with the same seed would draw the same items.
        self.sampler = CorpusNegativeSampler(corpus_features, id_feature=id_feature, num_negatives=batch_size,
                                             seed=seed + SEED_OFFSET, name="corpus_sampler")
        # A tuple: Keras would wrap a list attribute in a tracked ListWrapper.
        self.mask_sets = None if mask_sets is None else tuple(map(tuple, np.asarray(mask_sets, np.int64).tolist()))
        self._generator = tf.random.Generator.from_seed(seed + SEED_OFFSET + 1)

    def check_model(self, model) -> None:
        tower = model.candidate_tower
        names = tower.encoder.feature_names
        if len(names) < 2:
            raise ValueError(f"ContrastiveLoss masks candidate features to make two views; the candidate tower has "
                             f"{len(names)} feature(s) {names}: add item side features (use_side_features)")
        missing = sorted(set(s.name for s in tower.input_specs) - set(self.sampler._arrays))
        if missing:
            raise ValueError(f"corpus_features lacks the candidate tower's features {missing}")
        if self.mask_sets is not None and np.shape(self.mask_sets) != (len(names), len(names)):
            raise ValueError(f"mask_sets must be a {len(names)} x {len(names)} 0/1 matrix (one row per candidate "
                             f"feature {names}), got shape {np.shape(self.mask_sets)}")

    def _masks(self, batch: int, fields: int) -> tf.Tensor:
        """``[batch, fields]`` 0/1 membership of each item's set A."""
        if self.mask_sets is not None:
            seeds = self._generator.uniform([batch], 0, fields, dtype=tf.int64)
            return tf.gather(tf.constant(self.mask_sets, tf.float32), seeds)
        noise = self._generator.uniform([batch, fields])
        kth = tf.math.top_k(noise, k=max(1, fields // 2)).values[:, -1:]
        return tf.cast(noise >= kth, tf.float32)

    def _drop_values(self, features):
        out = {}
        for spec in self.model.candidate_tower.input_specs:
            value = features[spec.name]
            if spec.dtype == tf.string and spec.width is not None and self.dropout > 0:
                drop = self._generator.uniform(tf.shape(value)) < self.dropout
                value = tf.where(drop, tf.zeros_like(value), value)
            out[spec.name] = value
        return out

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        tower = self.model.candidate_tower
        items, ids, _ = self.sampler.sample()
        in_set = self._masks(self.batch_size, len(tower.encoder.specs))
        first = tower(self._drop_values(items), training=training, field_mask=1.0 - in_set)
        second = tower(self._drop_values(items), training=training, field_mask=in_set)
        first, second = tf.math.l2_normalize(first, axis=-1), tf.math.l2_normalize(second, axis=-1)
        logits = tf.matmul(first, second, transpose_b=True) / self.temperature
        duplicate = tf.logical_and(tf.equal(ids[:, None], ids[None, :]), tf.logical_not(tf.eye(self.batch_size,
                                                                                               dtype=tf.bool)))
        logits = tf.where(duplicate, tf.cast(-1e9, logits.dtype), logits)
        labels = tf.range(self.batch_size)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    def get_config(self):
        sampler = self.sampler.get_config()
        return {**super().get_config(), "corpus_features": sampler["candidate_features"],
                "temperature": self.temperature, "batch_size": self.batch_size, "dropout": self.dropout,
                "mask_sets": None if self.mask_sets is None else [list(row) for row in self.mask_sets],
                "id_feature": sampler["id_feature"], "seed": self.seed}
