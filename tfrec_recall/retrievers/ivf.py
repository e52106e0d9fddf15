"""IVF: an inverted-file index in stock TensorFlow ops only, so it serves from stock ``tensorflow_model_server``
on CPU and GPU hosts.

Building: k-means (Lloyd's, on a sample) gives ``num_lists`` centroids; every candidate goes to its nearest
centroid, except that a list holds at most ``capacity_factor`` times the mean list size: a candidate beyond
that moves to its next-nearest list with room (balanced lists keep the padding small). Lists are stored as
fixed-shape padded tensors: row indices ``[num_lists, capacity]`` (-1 pads) and vectors
``[num_lists, capacity, dim]``.

Querying: score the centroids by inner product, probe the ``num_probes`` best lists, re-score their candidates
exactly, return the top k. Like any IVF over inner products, it suits L2-normalised (cosine) embeddings best.

Tuning (``target_recall``, default 0.95; ``None`` turns it off): after building, ``num_probes`` is raised until
recall@max_k against exact search, measured on ``tuning_queries`` queries near the corpus, reaches the target
(or every list is probed); see :mod:`tfrec_recall.retrievers.tuning`. The tuned ``num_probes`` is the index's
``num_probes`` from then on (in ``get_config``, ``parameters`` and any SavedModel traced after building).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfrec_recall._validation import require_int, require_positive_int
from tfrec_recall.retrievers.base import TopKIndex
from tfrec_recall.retrievers.registry import register_index
from tfrec_recall.retrievers.tuning import DEFAULT_TARGET_RECALL, TuningResult, check_tuning_arguments, tune_search


def _nearest(x: tf.Tensor, centroids: tf.Tensor, top: int = 1, chunk: int = 65536):
    """Indices of the ``top`` nearest centroids (L2) for each row of x, computed in chunks."""
    c_norm = tf.reduce_sum(centroids * centroids, axis=1)
    out = []
    for start in range(0, int(x.shape[0]), chunk):
        block = x[start:start + chunk]
        score = 2.0 * tf.linalg.matmul(block, centroids, transpose_b=True) - c_norm[None, :]
        out.append(tf.math.top_k(score, k=top).indices.numpy())
    return np.concatenate(out)


def kmeans(x: np.ndarray, num_clusters: int, iterations: int = 15, sample_size: int = 200_000, seed: int = 0,
           progress: bool = False) -> np.ndarray:
    """Lloyd's k-means on a sample of x; empty clusters are re-seeded from random sample points."""
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), size=min(len(x), sample_size), replace=False)]
    centroids = sample[rng.choice(len(sample), size=num_clusters, replace=False)].copy()
    sample_t = tf.constant(sample)
    for _ in tqdm(range(iterations), desc="k-means", disable=not progress, leave=False):
        assign = _nearest(sample_t, tf.constant(centroids))[:, 0]
        sums = tf.math.unsorted_segment_sum(sample_t, assign, num_clusters).numpy()
        counts = np.bincount(assign, minlength=num_clusters)
        empty = counts == 0
        centroids = np.where(empty[:, None], centroids, sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if empty.any():
            centroids[empty] = sample[rng.choice(len(sample), size=int(empty.sum()), replace=False)]
    return centroids


def balanced_assignment(x: np.ndarray, centroids: np.ndarray, capacity: int, choices: int = 8) -> np.ndarray:
    """List of each row: the nearest centroid with room; rows closer to a centroid win its places."""
    n, num_lists = len(x), len(centroids)
    if capacity * num_lists < n:
        raise ValueError(f"capacity {capacity} x {num_lists} lists cannot hold {n} candidates")
    choices = min(choices, num_lists)
    ranked = _nearest(tf.constant(x), tf.constant(centroids), top=choices)  # [n, choices]
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(num_lists, dtype=np.int64)
    for c in range(choices):
        todo = np.flatnonzero(assign < 0)
        if len(todo) == 0:
            break
        target = ranked[todo, c]
        dist = np.sum((x[todo] - centroids[target]) ** 2, axis=1)
        order = np.lexsort((dist, target))  # by list, then closest first
        todo, target = todo[order], target[order]
        first = np.r_[0, np.flatnonzero(np.diff(target)) + 1]
        rank_in_list = np.arange(len(todo)) - np.repeat(first, np.diff(np.r_[first, len(todo)]))
        take = rank_in_list < (capacity - load[target])
        assign[todo[take]] = target[take]
        np.add.at(load, target[take], 1)
    left = np.flatnonzero(assign < 0)
    for row in left:  # rare: every preferred list is full; take the emptiest list
        target = int(np.argmin(load))
        assign[row] = target
        load[target] += 1
    return assign


@register_index("ivf")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class IVF(TopKIndex):
    """Inverted-file index: ``num_lists`` k-means lists (``kmeans_iterations`` Lloyd iterations on a
    ``kmeans_sample_size`` sample, seeded by ``seed``), each holding at most ``capacity_factor`` times the mean
    list size; a query probes its ``num_probes`` best lists, raised after building until the measured recall@max_k
    reaches ``target_recall`` (``tuning_queries`` queries with ``tuning_noise``, seeded by ``seed``)."""

    def __init__(self, max_k: int = 100, num_lists: int = 1024, num_probes: int = 32, kmeans_iterations: int = 15,
                 kmeans_sample_size: int = 200_000, capacity_factor: float = 1.5, seed: int = 0,
                 progress: bool = False, target_recall: Optional[float] = DEFAULT_TARGET_RECALL,
                 tuning_queries: int = 1000, tuning_noise: float = 0.5, **kwargs):
        super().__init__(max_k=max_k, **kwargs)
        self.num_lists = require_positive_int("num_lists", num_lists)
        self.num_probes = require_positive_int("num_probes", num_probes)
        if num_probes > num_lists:
            raise ValueError(f"num_probes must be <= num_lists ({num_lists}), got {num_probes}")
        self.kmeans_iterations = require_positive_int("kmeans_iterations", kmeans_iterations)
        self.kmeans_sample_size = require_positive_int("kmeans_sample_size", kmeans_sample_size)
        if not (isinstance(capacity_factor, numbers.Real) and not isinstance(capacity_factor, bool)
                and 1.0 <= capacity_factor < math.inf):
            raise ValueError(f"capacity_factor must be a finite number >= 1, got {capacity_factor!r}")
        self.capacity_factor = float(capacity_factor)
        self.seed = require_int("seed", seed, minimum=0)
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be a bool, got {progress!r}")
        self.progress = progress
        self.target_recall, self.tuning_queries, self.tuning_noise = check_tuning_arguments(
            target_recall, tuning_queries, tuning_noise)
        self.capacity = 0
        self.tuning: Optional[TuningResult] = None

    def _build_index(self, embeddings: np.ndarray) -> None:
        n, d = embeddings.shape
        if self.num_lists > n:
            raise ValueError(f"num_lists ({self.num_lists}) must be <= the number of candidates ({n})")
        centroids = kmeans(embeddings, self.num_lists, self.kmeans_iterations, self.kmeans_sample_size,
                           self.seed, self.progress)
        self.capacity = max(1, math.ceil(self.capacity_factor * n / self.num_lists))
        assign = balanced_assignment(embeddings, centroids, self.capacity)
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=self.num_lists)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        slot = np.arange(n) - np.repeat(starts, counts)
        rows = np.full((self.num_lists, self.capacity), -1, dtype=np.int32)
        rows[assign[order], slot] = order
        vectors = np.zeros((self.num_lists, self.capacity, d), dtype=np.float32)
        vectors[assign[order], slot] = embeddings[order]
        # Recompute centroids as the means of the final (balanced) lists.
        sums = np.zeros((self.num_lists, d), dtype=np.float64)
        np.add.at(sums, assign, embeddings)
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        self.centroids = tf.Variable(centroids.astype(np.float32), trainable=False, name="centroids")
        self.list_rows = tf.Variable(rows, trainable=False, name="list_rows")
        self.list_vectors = tf.Variable(vectors, trainable=False, name="list_vectors")
        self.fill_ratio = float(n / (self.num_lists * self.capacity))
        if self.target_recall is not None:
            self._tune(embeddings)

    def _tune(self, embeddings: np.ndarray) -> None:
        """Raises ``num_probes`` until the measured recall@max_k reaches ``target_recall``."""
        def search(queries, setting, k):
            self.num_probes = setting["num_probes"]
            return tf.function(lambda q: self._search(q, k))(tf.constant(queries))[1].numpy()

        requested = self.num_probes
        try:
            self.tuning = tune_search(search, embeddings, min(self.max_k, len(embeddings)),
                                      {"num_probes": requested}, {"num_probes": self.num_lists},
                                      self.target_recall, self.tuning_queries, self.tuning_noise, self.seed)
        finally:
            self.num_probes = requested  # the tuned value only once tuning has finished
        self.num_probes = self.tuning.setting["num_probes"]

    def _search(self, queries, k):
        probes = min(self.num_probes, self.num_lists)
        depth = min(k, probes * self.capacity)
        _, probe = tf.math.top_k(tf.linalg.matmul(queries, self.centroids, transpose_b=True), k=probes)

        def one(args):
            query, lists = args
            vectors = tf.reshape(tf.gather(self.list_vectors, lists), [-1, self.list_vectors.shape[-1]])
            rows = tf.reshape(tf.gather(self.list_rows, lists), [-1])
            scores = tf.linalg.matvec(vectors, query)
            scores = tf.where(rows >= 0, scores, -np.inf)
            top, where = tf.math.top_k(scores, k=depth)
            return top, tf.gather(rows, where)

        scores, rows = tf.map_fn(one, (queries, probe), fn_output_signature=(tf.float32, tf.int32))
        if depth < k:
            scores = tf.pad(scores, [[0, 0], [0, k - depth]], constant_values=-np.inf)
            rows = tf.pad(rows, [[0, 0], [0, k - depth]], constant_values=-1)
        return scores, rows

    def get_config(self) -> dict:
        return {**super().get_config(), "num_lists": self.num_lists, "num_probes": self.num_probes,
                "kmeans_iterations": self.kmeans_iterations, "kmeans_sample_size": self.kmeans_sample_size,
                "capacity_factor": self.capacity_factor, "seed": self.seed, "progress": self.progress,
                "target_recall": self.target_recall, "tuning_queries": self.tuning_queries,
                "tuning_noise": self.tuning_noise}

    def parameters(self) -> dict:
        return {**super().parameters(), "num_lists": self.num_lists, "num_probes": self.num_probes,
                "capacity": self.capacity, "capacity_factor": self.capacity_factor,
                "kmeans_iterations": self.kmeans_iterations, "fill_ratio": getattr(self, "fill_ratio", None),
                "target_recall": self.target_recall, "tuning_queries": self.tuning_queries,
                "tuning_noise": self.tuning_noise}
