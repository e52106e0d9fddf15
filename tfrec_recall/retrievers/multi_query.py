"""Multi-query retrieval: K query vectors per user (multi-interest models: MIND, ComiRec, SDM) searched in any
:class:`~tfrec_recall.retrievers.base.TopKIndex` and merged into one ranked list, in stock TensorFlow ops.

Merging (Cen et al., "Controllable Multi-Interest Framework for Recommendation", KDD 2020, Sec. 3.4):

* ``diversity=0`` (the default): every interest retrieves min(``per_query_k``, ``k``) items; an item's score is
  its best score over the interests, f(u, i) = max_k e_i . v_u^(k) (duplicates removed), and the top ``k`` are
  kept. Searching deeper than ``k`` would change nothing: an item outside the top k of the interest that gives
  its best score has k distinct items above it under f, so it cannot be in the merged top k.
* ``diversity=lambda > 0``: ComiRec's controllable aggregation. The merged candidates M (the union above) are
  picked greedily, k times: j = argmax over i in M \\ S of f(u, i) + lambda * sum over s in S of g(i, s), with
  g(i, s) = 1 when the categories of i and s differ (the paper's Algorithm 1, which maximises
  Q(u, S) = sum_i f(u, i) + lambda * sum_{i, j in S} g(i, j) greedily). Items are returned in the order picked,
  each with its score f(u, i). Categories come from :meth:`set_categories`; items without one share one
  "unknown" category.

``call(queries [B, K, d], k=None, exclude=None, query_mask=None)`` returns ``(scores [B, k], ids [B, k])`` like
a single index; ``query_mask`` [B, K] (bool) marks the interests a user really has (MIND's dynamic K_u); when
fewer than ``k`` items remain, the tail holds score ``-inf`` and id ``""``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_finite_nonnegative, require_positive_int
from tfrec_recall.retrievers.base import TopKIndex
from tfrec_recall.retrievers.protocol import Retriever


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class MultiQueryRetriever(Retriever):
    def __init__(self, index: TopKIndex, per_query_k: Optional[int] = None, diversity: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(index, TopKIndex):
            raise ValueError(f"index must be a TopKIndex (BruteForce, IVF, ScaNN), got {type(index).__name__}")
        self.index = index
        self.max_k = index.max_k
        self.per_query_k = self.max_k if per_query_k is None else require_positive_int("per_query_k", per_query_k)
        if self.per_query_k > self.max_k:
            raise ValueError(f"per_query_k must be <= the index's max_k ({self.max_k}), got {self.per_query_k}")
        self.diversity = require_finite_nonnegative("diversity", diversity)
        self.categories: Optional[tf.lookup.StaticHashTable] = None
        self.num_categories = 0

    # -- building ------------------------------------------------------------------------------------------
    def set_categories(self, ids, categories) -> "MultiQueryRetriever":
        """The category of every candidate id (any hashable labels), for the diversity-controlled merge."""
        if self.categories is not None:
            raise ValueError("set_categories was already called; build a new MultiQueryRetriever instead")
        ids = np.asarray(ids).astype(str)
        labels = np.asarray(categories)
        if ids.ndim != 1 or labels.shape != ids.shape:
            raise ValueError(f"ids and categories must be 1-D of the same length, got shapes {ids.shape} and "
                             f"{labels.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique: each candidate has one category")
        _, codes = np.unique(labels.astype(str), return_inverse=True)
        self.num_categories = int(codes.max()) + 1 if len(codes) else 0
        self.categories = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.constant(codes.astype(np.int64))),
            default_value=tf.constant(self.num_categories, tf.int64))  # the shared "unknown" category
        return self

    # -- querying ------------------------------------------------------------------------------------------
    @property
    def is_built(self) -> bool:
        return self.index.is_built

    @property
    def corpus_size(self) -> int:
        return self.index.corpus_size

    def call(self, queries, k: Optional[int] = None, exclude=None, query_mask=None):
        k = self.max_k if k is None else require_positive_int("k", k)
        if k > self.max_k:
            raise ValueError(f"k must be <= max_k ({self.max_k}), got {k}")
        if self.diversity > 0 and self.categories is None:
            raise ValueError("diversity > 0 needs the items' categories: call set_categories(ids, categories)")
        depth = self.per_query_k if self.diversity > 0 else min(self.per_query_k, k)
        scores, ids = self._search_each(tf.convert_to_tensor(queries, tf.float32), depth, exclude, query_mask)
        scores = _drop_duplicates(scores, ids)
        if self.diversity == 0:
            top, order = tf.math.top_k(scores, k=min(k, scores.shape[-1]))
            found = tf.where(tf.math.is_finite(top), tf.gather(ids, order, batch_dims=1), "")
            return _pad(top, found, k)
        return _pad(*self._greedy(scores, ids, min(k, scores.shape[-1])), k)

    def _search_each(self, queries, depth: int, exclude, query_mask):
        """Top ``depth`` of every interest: (scores, ids) [B, K * depth]; masked interests -inf."""
        if queries.shape.rank != 3 or queries.shape[1] is None:
            raise ValueError(f"queries must be [batch, num_queries, dim] with a fixed num_queries, got shape "
                             f"{queries.shape}")
        num_queries = int(queries.shape[1])
        flat = tf.reshape(queries, [-1, queries.shape[-1]])
        if exclude is not None:
            exclude = tf.repeat(tf.convert_to_tensor(exclude, tf.string), num_queries, axis=0)
        scores, ids = self.index(flat, k=depth, exclude=exclude)
        if query_mask is not None:
            keep = tf.reshape(tf.cast(query_mask, tf.bool), [-1, 1])
            scores = tf.where(keep, scores, -np.inf)
        batch = tf.shape(queries)[0]
        width = num_queries * depth
        return tf.reshape(scores, [batch, width]), tf.reshape(ids, [batch, width])

    def _greedy(self, scores, ids, k: int):
        """ComiRec's Algorithm 1 over the merged candidates: k picks of f + lambda * #picked of another
        category."""
        codes = self.categories.lookup(ids)
        depth = self.num_categories + 1
        batch = tf.shape(scores)[0]

        def step(i, picked_counts, available, out_scores, out_ids):
            same = tf.gather(picked_counts, codes, batch_dims=1)  # [B, M]: picked items of i's category
            gain = scores + self.diversity * (tf.cast(i, tf.float32) - same)
            gain = tf.where(available, gain, -np.inf)
            choice = tf.argmax(gain, axis=1, output_type=tf.int32)
            chosen = tf.gather(scores, choice, batch_dims=1)
            valid = tf.math.is_finite(tf.gather(gain, choice, batch_dims=1))
            out_scores = out_scores.write(i, tf.where(valid, chosen, -np.inf))
            out_ids = out_ids.write(i, tf.where(valid, tf.gather(ids, choice, batch_dims=1), ""))
            hit = tf.one_hot(tf.gather(codes, choice, batch_dims=1), depth) * tf.cast(valid, tf.float32)[:, None]
            available = available & ~tf.cast(tf.one_hot(choice, tf.shape(scores)[1]), tf.bool)
            return i + 1, picked_counts + hit, available, out_scores, out_ids

        state = (tf.constant(0), tf.zeros([batch, depth]), tf.math.is_finite(scores),
                 tf.TensorArray(tf.float32, size=k), tf.TensorArray(tf.string, size=k))
        _, _, _, out_scores, out_ids = tf.while_loop(lambda i, *_: i < k, step, state)
        return tf.transpose(out_scores.stack()), tf.transpose(out_ids.stack())

    def get_config(self):
        return {**super().get_config(), "index": tf.keras.utils.serialize_keras_object(self.index),
                "per_query_k": self.per_query_k, "diversity": self.diversity}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["index"] = tf.keras.utils.deserialize_keras_object(config["index"])
        return cls(**config)

    def parameters(self) -> dict:
        """What an export manifest records about the merge."""
        return {"type": type(self).__name__, "per_query_k": self.per_query_k, "diversity": self.diversity,
                "num_categories": self.num_categories, "index": self.index.parameters()}


def _drop_duplicates(scores, ids):
    """-inf for every occurrence of an id but its best-scoring one (the first of equal best ones), and for empty
    ids (padding). Linear in B * W (hash-based unique, segment max and min), where comparing every pair of the W
    merged ids as strings ([B, W, W] for W = K * per_query_k) would dominate multi-query latency."""
    flat_ids, flat_scores = tf.reshape(ids, [-1]), tf.reshape(scores, [-1])
    items, item = tf.unique(flat_ids, out_idx=tf.int64)
    position = tf.range(tf.size(flat_ids, out_type=tf.int64))
    row = position // tf.maximum(tf.shape(ids, out_type=tf.int64)[1], 1)
    pairs, group = tf.unique(row * tf.size(items, out_type=tf.int64) + item, out_idx=tf.int64)  # (row, id) pairs
    groups = tf.size(pairs, out_type=tf.int64)
    best = tf.gather(tf.math.unsorted_segment_max(flat_scores, group, groups), group)
    candidate = tf.where(tf.equal(flat_scores, best), position, tf.size(position, out_type=tf.int64))
    first = tf.gather(tf.math.unsorted_segment_min(candidate, group, groups), group)
    keep = tf.equal(first, position) & tf.not_equal(flat_ids, "")
    return tf.where(tf.reshape(keep, tf.shape(ids)), scores, tf.cast(-np.inf, scores.dtype))


def _pad(scores, ids, k: int):
    missing = k - scores.shape[-1]
    if missing <= 0:
        return scores, ids
    return (tf.pad(scores, [[0, 0], [0, missing]], constant_values=-np.inf),
            tf.pad(ids, [[0, 0], [0, missing]], constant_values=""))
