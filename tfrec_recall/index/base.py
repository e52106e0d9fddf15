"""Top-k index layers: build with ``index(ids, embeddings)`` (returns self), query with ``call``.

``call(queries, k=None, exclude=None)`` returns ``(scores [batch, k] float32, ids [batch, k] string)``; ``k``
is chosen per call up to the ``max_k`` given at construction; ``exclude`` is a ``[batch, E]`` string tensor of
ids to leave out (e.g. items the user has seen; pad with ``""``). Exclusion searches ``k + E`` candidates and
drops the excluded ones, so every returned id is valid. When fewer than ``k`` candidates remain, scores are
``-inf`` and ids ``""`` in the tail.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_positive_int


class TopKIndex(tf.keras.Model):
    def __init__(self, max_k: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.max_k = require_positive_int("max_k", max_k)
        self.ids: Optional[tf.Variable] = None
        self.num_candidates = 0
        self.dimension = 0

    # -- building ------------------------------------------------------------------------------------------
    def index(self, ids, embeddings) -> "TopKIndex":
        ids = np.asarray(ids).astype(str)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D [num_candidates, dim], got shape {embeddings.shape}")
        if ids.shape != (embeddings.shape[0],):
            raise ValueError(f"ids must be 1-D with one id per embedding row ({embeddings.shape[0]}), "
                             f"got shape {ids.shape}")
        if embeddings.shape[0] == 0:
            raise ValueError("cannot index an empty candidate set")
        if not np.all(np.isfinite(embeddings)):
            row = int(np.flatnonzero(~np.all(np.isfinite(embeddings), axis=1))[0])
            raise ValueError(f"embeddings row {row} (id {ids[row]!r}) is not finite")
        if (ids == "").any():
            raise ValueError("candidate ids must be non-empty strings ('' pads exclusions)")
        self.num_candidates, self.dimension = int(embeddings.shape[0]), int(embeddings.shape[1])
        self.ids = tf.Variable(ids.astype(object), trainable=False, dtype=tf.string, name="candidate_ids")
        self._build_index(embeddings)
        return self

    def index_from_dataset(self, dataset: tf.data.Dataset) -> "TopKIndex":
        """Indexes a dataset of ``(ids, embeddings)`` batches."""
        ids, vectors = [], []
        for batch_ids, batch_vectors in dataset:
            ids.append(np.asarray(batch_ids.numpy()).astype(str))
            vectors.append(np.asarray(batch_vectors.numpy(), dtype=np.float32))
        if not ids:
            raise ValueError("the dataset yielded no (ids, embeddings) batches")
        return self.index(np.concatenate(ids), np.concatenate(vectors))

    def _build_index(self, embeddings: np.ndarray) -> None:
        raise NotImplementedError

    # -- querying ------------------------------------------------------------------------------------------
    def _search(self, queries: tf.Tensor, k: int) -> Tuple[tf.Tensor, tf.Tensor]:
        """(scores [B, k] float32, candidate row indices [B, k] int32), best first."""
        raise NotImplementedError

    def call(self, queries, k: Optional[int] = None, exclude: Optional[tf.Tensor] = None):
        if self.ids is None:
            raise ValueError(f"{type(self).__name__}: call index(ids, embeddings) before querying")
        k = self.max_k if k is None else require_positive_int("k", k)
        if k > self.max_k:
            raise ValueError(f"k must be <= max_k ({self.max_k}), got {k}")
        queries = tf.convert_to_tensor(queries, tf.float32)
        extra = 0 if exclude is None else int(exclude.shape[-1] if exclude.shape[-1] is not None else 0)
        depth = min(k + extra, self.num_candidates)
        scores, rows = self._search(queries, depth)
        valid = rows >= 0
        ids = tf.where(valid, tf.gather(self.ids, tf.maximum(rows, 0)), "")
        scores = tf.where(valid, scores, -np.inf)
        if exclude is not None:
            exclude = tf.convert_to_tensor(exclude, tf.string)
            hit = tf.reduce_any(tf.equal(ids[:, :, None], exclude[:, None, :]) & (exclude[:, None, :] != ""),
                                axis=-1)
            scores = tf.where(hit, tf.cast(-np.inf, scores.dtype), scores)
            ids = tf.where(hit, "", ids)
        if depth < k:
            pad = k - depth
            scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
            ids = tf.pad(ids, [[0, 0], [0, pad]], constant_values="")
        top_scores, order = tf.math.top_k(scores, k=k)
        return top_scores, tf.gather(ids, order, batch_dims=1)

    def get_config(self):
        # An index is rebuilt with index(...), not from a config; the config describes it (Keras asks for one).
        return self.parameters()

    def parameters(self) -> dict:
        """Index type and parameters, for export manifests."""
        return {"type": type(self).__name__, "max_k": self.max_k, "num_candidates": self.num_candidates,
                "dimension": self.dimension}
