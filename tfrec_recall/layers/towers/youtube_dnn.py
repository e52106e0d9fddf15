"""The YouTubeDNN user tower (Covington et al. 2016): a pooled watch history plus user features -> ReLU MLP."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from tfrec_recall.features import SequenceFeature, SpecLike
from tfrec_recall.layers.towers.base import register_tower
from tfrec_recall.layers.towers.mlp import MLPTower

@register_tower("youtube_dnn")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class YouTubeDNNTower(MLPTower):
    """The YouTubeDNN user tower: pooled watch history (a ``SequenceFeature``) plus user features -> ReLU MLP."""

    query_only = True

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (256, 128),
                 activation: str = "relu", output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0,
                 **kwargs):
        super().__init__(features, hidden_units=hidden_units, activation=activation, output_dim=output_dim,
                         l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if not any(isinstance(s, SequenceFeature) for s in self.encoder.specs):
            raise ValueError("YouTubeDNNTower needs a SequenceFeature (the watch history) among its features, got "
                             f"{[f'{s.name}:{s.kind}' for s in self.encoder.specs]}")
