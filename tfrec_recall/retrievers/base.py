"""Top-k index layers: build once with ``index(ids, embeddings)`` (returns self), query with ``call``.

``call(queries, k=None, exclude=None)`` returns ``(scores [batch, k] float32, ids [batch, k] string)``; ``k``
is chosen per call up to the ``max_k`` given at construction; ``exclude`` is a ``[batch, E]`` string tensor of
ids to leave out (e.g. items the user has seen; pad with ``""``; ids that are not candidates are ignored).
Exclusion searches at least ``k + E`` candidates and drops the excluded ones, so the excluded ids can never
crowd the top k: every returned id is valid, and an exact index returns the best ``k`` non-excluded candidates.
``E`` may be unknown when traced (a ``[batch, None]`` signature input): the search depth is then picked at run
time among static depths ``k, 2k, 4k, ...`` (capped at the corpus size), the smallest that holds ``k + E``.
When fewer than ``k`` candidates remain, scores are ``-inf`` and ids ``""`` in the tail.

Every index is a registered Keras object (``package="tfrec_recall"``) whose ``get_config`` / ``from_config``
round trip gives an unbuilt index with the same parameters, and is registered by its public name in
:mod:`tfrec_recall.retrievers.registry`. A built index records :data:`INDEX_FORMAT_VERSION` (in its config and in an
``index_format_version`` variable saved with it); a config or saved index of another version is refused.
"""
from __future__ import annotations

import abc
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_positive_int
from tfrec_recall.retrievers.protocol import Retriever

# The layout of a built index's state (variables and config). A saved index or config written with another
# version is refused (check_format_version) instead of being misread; bump it when that layout changes.
INDEX_FORMAT_VERSION = 1


def check_format_version(found, source: str = "the index") -> None:
    """Raises ``ValueError`` naming both versions unless ``found`` is :data:`INDEX_FORMAT_VERSION`."""
    if found != INDEX_FORMAT_VERSION:
        raise ValueError(f"{source} has index format version {found!r}, but this tfrec_recall reads index format "
                         f"version {INDEX_FORMAT_VERSION}: rebuild it with this version")


def check_saved_format_version(restored) -> None:
    """Checks the ``index_format_version`` variable of an index restored from a SavedModel or checkpoint (e.g.
    ``tf.saved_model.load(export_dir).retrieval_index``); ``ValueError`` naming both versions on a mismatch."""
    variable = getattr(restored, "index_format_version", None)
    if variable is None:
        raise ValueError(f"the saved index records no index format version, but this tfrec_recall reads index "
                         f"format version {INDEX_FORMAT_VERSION}: rebuild it with this version")
    check_format_version(int(tf.convert_to_tensor(variable).numpy()), "the saved index")


class TopKIndex(Retriever):
    """Base of the top-k indexes: subclasses implement ``_build_index`` and ``_search``. Built once, by
    :meth:`index`; the config (``get_config`` / ``from_config``) rebuilds an unbuilt index with the same
    parameters."""

    def __init__(self, max_k: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.max_k = require_positive_int("max_k", max_k)
        self.ids: Optional[tf.Variable] = None
        self.index_format_version: Optional[tf.Variable] = None
        self.num_candidates = 0
        self.dimension = 0

    @property
    def is_built(self) -> bool:
        return self.ids is not None

    @property
    def corpus_size(self) -> int:
        return self.num_candidates

    # -- building ------------------------------------------------------------------------------------------
    def index(self, ids, embeddings) -> "TopKIndex":
        """Builds the index over ``ids`` [n] and ``embeddings`` [n, dim], once; returns self."""
        if self.ids is not None:
            raise ValueError(f"{type(self).__name__} {self.name!r} is already built over {self.num_candidates} "
                             "candidates; an index is built once: make a new one (e.g. "
                             "type(index).from_config(index.get_config())) to index other candidates")
        ids, embeddings = _checked_candidates(ids, embeddings)
        self._build_index(embeddings)
        self.num_candidates, self.dimension = int(embeddings.shape[0]), int(embeddings.shape[1])
        self.index_format_version = tf.Variable(INDEX_FORMAT_VERSION, trainable=False, dtype=tf.int32,
                                                name="index_format_version")
        self.ids = tf.Variable(ids.astype(object), trainable=False, dtype=tf.string, name="candidate_ids")
        return self

    @abc.abstractmethod
    def _build_index(self, embeddings: np.ndarray) -> None:
        """Builds the search structures over validated float32 ``embeddings`` [n, dim]."""

    # -- querying ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _search(self, queries: tf.Tensor, k: int) -> Tuple[tf.Tensor, tf.Tensor]:
        """(scores [B, k] float32, candidate row indices [B, k] int32, -1 for none), best first."""

    def call(self, queries, k: Optional[int] = None, exclude: Optional[tf.Tensor] = None):
        """(scores [B, k] float32, ids [B, k] string) of the best ``k`` candidates not in ``exclude``."""
        if self.ids is None:
            raise ValueError(f"{type(self).__name__}: call index(ids, embeddings) before querying")
        k = self.max_k if k is None else require_positive_int("k", k)
        if k > self.max_k:
            raise ValueError(f"k must be <= max_k ({self.max_k}), got {k}")
        queries = tf.convert_to_tensor(queries, tf.float32)
        if exclude is None:
            return self._top_k_excluding(queries, k, None, min(k, self.num_candidates))
        exclude = _checked_exclude(exclude, queries)
        width = exclude.shape[-1]
        if width is not None:  # known when traced: one static search depth
            return self._top_k_excluding(queries, k, exclude, min(k + int(width), self.num_candidates))
        depths = self.search_depths(k)
        needed = tf.minimum(k + tf.shape(exclude)[-1], self.num_candidates)
        branch = tf.reduce_sum(tf.cast(tf.constant(depths, tf.int32) < needed, tf.int32))
        return tf.switch_case(branch, [lambda d=d: self._top_k_excluding(queries, k, exclude, d) for d in depths])

    def search_depths(self, k: int) -> Tuple[int, ...]:
        """The static search depths a variable-width exclusion chooses from: ``k, 2k, 4k, ...`` capped at the
        corpus size (whose depth is the last)."""
        depths, depth = [], min(require_positive_int("k", k), self.num_candidates)
        while depth < self.num_candidates:
            depths.append(depth)
            depth = min(2 * depth, self.num_candidates)
        return tuple(depths + [self.num_candidates])

    def _top_k_excluding(self, queries, k: int, exclude: Optional[tf.Tensor], depth: int):
        """Searches ``depth`` (>= k + exclusion width, or the whole corpus) candidates, drops the excluded ids and
        keeps the best ``k``."""
        scores, rows = self._search(queries, depth)
        valid = rows >= 0
        ids = tf.where(valid, tf.gather(self.ids, tf.maximum(rows, 0)), "")
        scores = tf.where(valid, scores, -np.inf)
        if exclude is not None:
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

    # -- configuration -------------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """Every constructor argument (with Keras' ``name`` and ``trainable``), plus the index format version;
        the built state is not part of it."""
        return {**super().get_config(), "name": self.name, "trainable": self.trainable, "max_k": self.max_k,
                "format_version": INDEX_FORMAT_VERSION}

    @classmethod
    def from_config(cls, config: dict) -> "TopKIndex":
        """An unbuilt index with the parameters of ``config``; refuses another index format version."""
        config = dict(config)
        check_format_version(config.pop("format_version", None), f"the {cls.__name__} config")
        return cls(**config)

    def parameters(self) -> dict:
        """Index type and parameters, for export manifests; ``recall`` is :meth:`recall_report`."""
        return {"type": type(self).__name__, "max_k": self.max_k, "num_candidates": self.num_candidates,
                "dimension": self.dimension, "format_version": INDEX_FORMAT_VERSION, "recall": self.recall_report()}

    def recall_report(self) -> Optional[dict]:
        """Recall@k of this index against exact search, as measured when it was built (``k``,
        ``target_recall``, ``measured_recall``, ``met_target``, the tuned ``setting``, ``num_queries``, the
        settings ``tried``), or ``None`` when not measured (unbuilt, or built with ``target_recall=None``).
        Approximate indexes with recall tuning keep their :class:`~tfrec_recall.retrievers.tuning.TuningResult` in
        ``self.tuning``."""
        tuning = getattr(self, "tuning", None)
        return None if tuning is None else tuning.as_dict()


def _checked_candidates(ids, embeddings) -> Tuple[np.ndarray, np.ndarray]:
    """``ids`` as a str array and ``embeddings`` as float32 [n, dim], or ``ValueError`` saying what is wrong."""
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
    return ids, embeddings


def _checked_exclude(exclude, queries: tf.Tensor) -> tf.Tensor:
    """``exclude`` as a ``[batch, E]`` string tensor with the queries' batch size, or ``ValueError`` naming its
    dtype or shape (a batch size known only at run time is asserted in the graph)."""
    if not isinstance(exclude, (tf.Tensor, tf.Variable)):
        array = np.asarray(exclude)
        if array.dtype.kind not in "USO":
            raise ValueError(f"exclude must hold string ids, got dtype {array.dtype} (shape {list(array.shape)})")
        exclude = tf.constant(array.astype(object) if array.dtype.kind == "U" else array, tf.string)
    if exclude.dtype != tf.string:
        raise ValueError(f"exclude must be a string tensor of item ids, got dtype {exclude.dtype.name}")
    if exclude.shape.rank != 2:
        raise ValueError(f"exclude must be [batch, num_excluded] (rank 2), got shape {exclude.shape}")
    rows, batch = exclude.shape[0], queries.shape[0]
    if rows is not None and batch is not None:
        if rows != batch:
            raise ValueError(f"exclude has {rows} rows but there are {batch} queries")
        return exclude
    check = tf.debugging.assert_equal(tf.shape(exclude)[0], tf.shape(queries)[0],
                                      message="exclude must have one row per query")
    with tf.control_dependencies([check]):
        return tf.identity(exclude)
