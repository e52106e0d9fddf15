"""The DSSM tower: concatenated field embeddings -> MLP."""
from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from tfrec_recall.features import SpecLike
from tfrec_recall.layers.towers.base import ACTIVATIONS, Tower, check_units, register_tower

def _mlp(units: Sequence[int], activation: str, prefix: str) -> List[tf.keras.layers.Layer]:
    return [tf.keras.layers.Dense(u, activation=activation, name=f"{prefix}_{i}") for i, u in enumerate(units)]


@register_tower("mlp")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class MLPTower(Tower):
    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (128,), activation: str = "relu",
                 output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(features, output_dim=output_dim, l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.hidden_units = check_units("hidden_units", hidden_units)
        self.activation = activation
        self.hidden = _mlp(self.hidden_units, activation, "hidden")

    def run_mlp(self, x, training=None):
        for layer in self.hidden:
            x = self._dropout(layer(x), training=training)
        return x

    def combine(self, fields, training=None):
        return self.run_mlp(tf.concat(fields, axis=-1), training=training)

    def get_config(self):
        return {**super().get_config(), "hidden_units": list(self.hidden_units), "activation": self.activation}
