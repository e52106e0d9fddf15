"""Deep Retrieval's structure objective, the loss of its E-step (Gao et al. 2020, "Learning a Retrievable
Structure for Large-Scale Recommendations", sec. 3): with the item-to-path assignment pi fixed, the structure
model's parameters maximise

    Q_str = sum_i log sum_{j=1..J} p(pi_j(y_i) | x_i),

the log-probability that user x_i reaches one of the J paths of the item y_i it interacted with.
:class:`PathLikelihoodTask` returns the negative mean over the batch (a loss to minimise); paths whose mask is
False (an item with fewer than J paths) do not count; every row needs at least one path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.schema import ITEM_ID
from tfrec_recall.layers.structure import PathStructure, code_paths, path_codes
from tfrec_recall.tasks.auxiliary import AuxiliaryLoss, first_of


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class PathLikelihoodTask(tf.keras.layers.Layer):
    """``call(user_embeddings [B, dim], item_paths [B, J, D], path_mask [B, J] or None)`` -> the scalar
    ``-mean_i log sum_j p(path_ij | x_i)`` under ``structure``."""

    def __init__(self, structure: PathStructure, **kwargs):
        super().__init__(**kwargs)
        if isinstance(structure, dict):
            structure = tf.keras.layers.deserialize(structure)
        if not isinstance(structure, PathStructure):
            raise ValueError(f"structure must be a PathStructure, got {type(structure).__name__}")
        self.structure = structure

    def call(self, user_embeddings, item_paths, path_mask: Optional[tf.Tensor] = None):
        log_probs = self.structure(user_embeddings, item_paths)  # [B, J]
        if path_mask is not None:
            log_probs = tf.where(tf.cast(path_mask, tf.bool), log_probs, -np.inf)
        return -tf.reduce_mean(tf.reduce_logsumexp(log_probs, axis=-1))

    def get_config(self) -> dict:
        return {**super().get_config(), "structure": tf.keras.layers.serialize(self.structure)}


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class PathStructureLoss(AuxiliaryLoss):
    """Deep Retrieval's E-step loss as an auxiliary loss of a two-tower model: the structure model reads the
    query tower's user vector, and the model's own retrieval task is the jointly trained softmax reranker
    (Gao et al. 2020, sec. 3.4). The loss holds the item-to-path assignment: ``items`` (the corpus ids), each
    with up to ``num_paths`` (J) paths, random at first (seeded by ``seed``), replaced by the M-step through
    :meth:`assign`. Its value is :class:`PathLikelihoodTask`'s over the batch rows whose item has a path
    (an id outside ``items`` has none and does not count)."""

    def __init__(self, structure: PathStructure, items: Sequence[str], num_paths: int = 3,
                 item_feature: str = ITEM_ID, seed: int = 0, weight: float = 1.0, **kwargs):
        super().__init__(weight=weight, **kwargs)
        self.likelihood = PathLikelihoodTask(structure, name="likelihood")
        self.structure = self.likelihood.structure
        if isinstance(items, (str, bytes)) or len(items) == 0:
            raise ValueError(f"items must be a non-empty list of item ids, got {items!r:.80}")
        self.items = [str(i) for i in items]
        if len(set(self.items)) != len(self.items):
            raise ValueError("items must not repeat an id")
        self.num_paths = require_positive_int("num_paths", num_paths)
        check_num_paths(self.num_paths, self.structure)
        self.item_feature, self.seed = str(item_feature), int(seed)
        self._lookup = tf.keras.layers.StringLookup(vocabulary=self.items, num_oov_indices=1, name="item_rows")
        codes = random_paths(len(self.items), self.num_paths, self.structure.num_paths, self.seed)
        paths, mask = self._table(codes)
        self.item_paths = tf.Variable(paths, trainable=False, name="item_paths")
        self.path_mask = tf.Variable(mask, trainable=False, name="path_mask")

    def _table(self, codes: np.ndarray):
        """[V + 1, J, D] int32 paths and [V + 1, J] mask of [V, J] path codes (-1: none); row 0 for unknown ids."""
        codes = np.asarray(codes, np.int64)
        if codes.shape != (len(self.items), self.num_paths):
            raise ValueError(f"path codes must have shape [{len(self.items)} items, J={self.num_paths}], got "
                             f"{list(codes.shape)}")
        if codes.max(initial=-1) >= self.structure.num_paths or codes.min(initial=0) < -1:
            raise ValueError(f"path codes must be in [0, K^D = {self.structure.num_paths}) or -1, got range "
                             f"[{codes.min()}, {codes.max()}]")
        s = self.structure
        paths = code_paths(np.maximum(codes, 0), s.num_codes, s.num_layers).astype(np.int32)
        pad = np.zeros((1, self.num_paths, s.num_layers), np.int32)
        return np.concatenate([pad, paths]), np.concatenate([np.zeros((1, self.num_paths), bool), codes >= 0])

    def assign(self, codes) -> None:
        """Replaces the assignment with ``codes`` [V, J] (path codes in the order of ``items``; -1: no path)."""
        paths, mask = self._table(codes)
        self.item_paths.assign(paths)
        self.path_mask.assign(mask)

    def path_codes(self) -> np.ndarray:
        """The current assignment, [V, J] path codes in the order of ``items`` (-1: no path)."""
        codes = path_codes(self.item_paths.numpy()[1:], self.structure.num_codes)
        return np.where(self.path_mask.numpy()[1:], codes, -1)

    def paths_of(self, ids) -> np.ndarray:
        """[n, J, D] paths of ``ids`` (any order); -1 for an unused slot, an unknown id or an item without paths."""
        row_of = {item: r for r, item in enumerate(self.items)}
        ids = np.asarray(ids).astype(str)
        codes = np.full((len(ids), self.num_paths), -1, np.int64)
        known = np.array([i in row_of for i in ids], bool)
        codes[known] = self.path_codes()[[row_of[i] for i in ids[known]]]
        s = self.structure
        return np.where(codes[..., None] >= 0, code_paths(np.maximum(codes, 0), s.num_codes, s.num_layers), -1)

    def item_rows(self, ids) -> tf.Tensor:
        """0-based rows of ``ids`` in ``items`` (-1 for an unknown id)."""
        return tf.cast(self._lookup(first_of(tf.convert_to_tensor(ids))), tf.int64) - 1

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        rows = self.item_rows(features[self.item_feature]) + 1
        mask = tf.gather(self.path_mask, rows)
        known = tf.reduce_any(mask, axis=-1)
        rows, mask = tf.boolean_mask(rows, known), tf.boolean_mask(mask, known)
        user = tf.boolean_mask(query_embeddings, known)
        loss = self.likelihood(user, tf.gather(self.item_paths, rows), mask)
        return tf.where(tf.reduce_any(known), loss, tf.zeros_like(loss))

    def get_config(self) -> dict:
        return {**super().get_config(), "structure": tf.keras.layers.serialize(self.structure),
                "items": list(self.items), "num_paths": self.num_paths, "item_feature": self.item_feature,
                "seed": self.seed}


def check_num_paths(num_paths: int, structure: PathStructure) -> None:
    """J paths per item must be distinct paths of the structure: J <= K^D."""
    if num_paths > structure.num_paths:
        raise ValueError(f"num_paths J ({num_paths}) must be <= K^D = {structure.num_codes}^{structure.num_layers}"
                         f" = {structure.num_paths}, the number of paths")


def random_paths(num_items: int, num_paths: int, total_paths: int, seed: int) -> np.ndarray:
    """The paper's random initial assignment: J distinct uniform path codes per item, [num_items, J]."""
    rng = np.random.default_rng(seed)
    if total_paths <= 4 * num_paths:
        return np.stack([rng.choice(total_paths, num_paths, replace=False) for _ in range(num_items)])
    codes = rng.integers(0, total_paths, size=(num_items, num_paths))
    for row in codes:  # redraw an item's paths when two coincide (rare when K^D >> J)
        while len(np.unique(row)) < num_paths:
            row[:] = rng.integers(0, total_paths, size=num_paths)
    return codes
