"""Deep Retrieval's retrieval step (Gao et al. 2020): beam search over the learned path structure, the union of
the items on the B paths found, then top-k, all in stock TensorFlow ops.

Each item sits on J paths (``index(ids, embeddings, paths)``, paths [n, J, D] from the structure's training). A
query's candidates are the items of its beam's paths (an inverted index from path code to items, searched with
``tf.searchsorted``); they are ranked by the reranker, the dot product of the query with the item embeddings (a
two-tower scorer over the retrieved items only), or, with ``rerank=False``, by the log-probability of the best
beam path they sit on. An item on several beam paths counts once. Exclusion and padding are the base class's.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfrec_recall.layers.structure import PathStructure, check_beam_width, path_codes, place_values
from tfrec_recall.retrievers.base import TopKIndex


def _first_of_each_item(rows: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """``scores`` with every repeat of an item in its row set to -inf, keeping the item's best score."""
    by_score = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
    rows, scores = tf.gather(rows, by_score, batch_dims=1), tf.gather(scores, by_score, batch_dims=1)
    by_row = tf.argsort(rows, axis=1, stable=True)  # repeats adjacent, the best first
    rows, scores = tf.gather(rows, by_row, batch_dims=1), tf.gather(scores, by_row, batch_dims=1)
    repeat = tf.concat([tf.zeros_like(rows[:, :1], tf.bool), rows[:, 1:] == rows[:, :-1]], axis=1)
    return rows, tf.where(repeat, tf.cast(-np.inf, scores.dtype), scores)


# Not in the index registry yet: --index choices build an index from embeddings alone, and this one needs the
# structure and the item paths that Deep Retrieval's EM training produces.
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class DeepRetrievalIndex(TopKIndex):
    """Retrieval by beam search (width ``beam_width``) over a trained :class:`PathStructure` whose input is the
    query vector; built once with ``index(ids, embeddings, paths)``."""

    def __init__(self, structure: PathStructure, beam_width: int = 20, rerank: bool = True, max_k: int = 100,
                 **kwargs):
        super().__init__(max_k=max_k, **kwargs)
        if isinstance(structure, dict):
            structure = tf.keras.layers.deserialize(structure)
        if not isinstance(structure, PathStructure):
            raise ValueError(f"structure must be a PathStructure, got {type(structure).__name__}")
        self.structure = structure
        self.beam_width = check_beam_width(beam_width, structure.num_codes, structure.num_layers)
        if not isinstance(rerank, bool):
            raise ValueError(f"rerank must be a bool, got {rerank!r}")
        self.rerank = rerank
        self._paths: Optional[np.ndarray] = None

    def index(self, ids, embeddings, paths=None) -> "DeepRetrievalIndex":
        """Builds over ``ids`` [n], ``embeddings`` [n, dim] (the reranker's item vectors) and ``paths``
        [n, J, D] (each item's J paths; a path of -1s is an unused slot); J must be <= beam_width. An item
        with no path is never retrieved: their number is ``unreachable`` (and in :meth:`parameters`)."""
        if paths is None:
            raise ValueError("DeepRetrievalIndex.index needs paths: [num_candidates, J, D] codes of each item")
        self._paths = self._checked_paths(paths, np.asarray(embeddings).shape[0])
        return super().index(ids, embeddings)

    def _checked_paths(self, paths, n: int) -> np.ndarray:
        paths = np.asarray(paths)
        s = self.structure
        if paths.ndim != 3 or paths.shape[0] != n or paths.shape[2] != s.num_layers:
            raise ValueError(f"paths must have shape [num_candidates={n}, J, D={s.num_layers}], got "
                             f"{list(paths.shape)}")
        none = (paths == -1).all(axis=-1)  # an unused slot (an item with fewer than J paths)
        if paths.dtype.kind not in "iu" or ((paths < 0) | (paths >= s.num_codes)).any(axis=-1)[~none].any():
            raise ValueError(f"paths must hold integer codes in [0, {s.num_codes}) (or -1 for a whole unused path),"
                             f" got dtype {paths.dtype}, range [{paths.min()}, {paths.max()}]")
        if paths.shape[1] > self.beam_width:
            raise ValueError(f"J ({paths.shape[1]} paths per item) must be <= beam_width ({self.beam_width})")
        return paths

    def _build_index(self, embeddings: np.ndarray) -> None:
        n, j, _ = self._paths.shape
        used = (self._paths >= 0).all(axis=-1).ravel()
        pairs = np.unique(np.stack([path_codes(self._paths, self.structure.num_codes).ravel()[used],
                                    np.repeat(np.arange(n), j)[used]], axis=1), axis=0)  # (code, row) by code
        self.unreachable = int(n - len(np.unique(pairs[:, 1])))  # items on no path: never retrieved
        self.sorted_codes = tf.Variable(pairs[:, 0], trainable=False, dtype=tf.int64, name="path_codes")
        self.sorted_rows = tf.Variable(pairs[:, 1].astype(np.int32), trainable=False, name="path_rows")
        self.item_embeddings = tf.Variable(embeddings, trainable=False, name="item_embeddings")
        self.place_values = tf.constant(place_values(self.structure.num_codes, self.structure.num_layers))
        self._paths = None

    def candidates(self, queries: tf.Tensor):
        """(rows [batch, C] int32, -1 padding; log p of the best beam path of each, [batch, C]): the items on
        each query's beam paths, with repeats (an item on several beam paths)."""
        paths, log_probs = self.structure.beam_search(queries, self.beam_width)
        codes = tf.reshape(tf.reduce_sum(tf.cast(paths, tf.int64) * self.place_values, axis=-1), [-1])
        starts = tf.searchsorted(self.sorted_codes, codes, side="left", out_type=tf.int64)
        ends = tf.searchsorted(self.sorted_codes, codes, side="right", out_type=tf.int64)
        positions = tf.ragged.range(starts, ends)  # [batch * B, items on that path]
        rows = tf.gather(self.sorted_rows, positions)
        path_scores = tf.ones_like(rows, tf.float32) * tf.reshape(log_probs, [-1, 1])
        regroup = lambda t: tf.RaggedTensor.from_uniform_row_length(t, self.beam_width).merge_dims(1, 2)  # noqa
        return (regroup(rows).to_tensor(default_value=-1),
                regroup(path_scores).to_tensor(default_value=-np.inf))

    def _search(self, queries, k):
        rows, scores = self.candidates(queries)
        if self.rerank:
            vectors = tf.gather(self.item_embeddings, tf.maximum(rows, 0))
            scores = tf.where(rows >= 0, tf.einsum("bd,bcd->bc", queries, vectors), -np.inf)
        rows, scores = _first_of_each_item(rows, scores)
        pad = tf.maximum(k - tf.shape(rows)[1], 0)
        rows = tf.pad(rows, [[0, 0], [0, pad]], constant_values=-1)
        scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
        top, order = tf.math.top_k(scores, k=k)
        rows = tf.gather(rows, order, batch_dims=1)
        return top, tf.where(tf.math.is_finite(top), rows, -1)

    def get_config(self) -> dict:
        return {**super().get_config(), "structure": tf.keras.layers.serialize(self.structure),
                "beam_width": self.beam_width, "rerank": self.rerank}

    def parameters(self) -> dict:
        s = self.structure
        return {**super().parameters(), "num_layers": s.num_layers, "num_codes": s.num_codes,
                "beam_width": self.beam_width, "rerank": self.rerank,
                "unreachable_items": getattr(self, "unreachable", None)}


def items_scored(index: DeepRetrievalIndex, queries) -> np.ndarray:
    """The number of distinct items each query's beam retrieves (what the reranker scores)."""
    rows, _ = index.candidates(tf.convert_to_tensor(queries, tf.float32))
    rows = rows.numpy()
    return np.array([len(set(r[r >= 0].tolist())) for r in rows])


__all__ = ["DeepRetrievalIndex", "path_codes", "items_scored"]
