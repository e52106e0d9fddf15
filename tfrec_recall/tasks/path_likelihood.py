"""Deep Retrieval's structure objective, the loss of its E-step (Gao et al. 2020, "Learning a Retrievable
Structure for Large-Scale Recommendations", sec. 3): with the item-to-path assignment pi fixed, the structure
model's parameters maximise

    Q_str = sum_i log sum_{j=1..J} p(pi_j(y_i) | x_i),

the log-probability that user x_i reaches one of the J paths of the item y_i it interacted with.
:class:`PathLikelihoodTask` returns the negative mean over the batch (a loss to minimise); paths whose mask is
False (an item with fewer than J paths) do not count; every row needs at least one path.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfrec_recall.layers.structure import PathStructure


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
