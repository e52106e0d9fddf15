"""ResidualTower: a projection to ``width`` then residual blocks (Dense-ReLU-Dense, skip, layer norm)."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from tfrec_recall.features import SpecLike
from tfrec_recall.layers.towers.base import ACTIVATIONS, Tower, check_units, register_tower
from tfrec_recall._validation import require_int

@register_tower("residual")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ResidualTower(Tower):
    def __init__(self, features: Sequence[SpecLike], width: int = 128, num_blocks: int = 2, activation: str = "relu",
                 output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(features, output_dim=output_dim, l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_units("width", [width])
        require_int("num_blocks", num_blocks, minimum=0)
        self.width, self.num_blocks, self.activation = width, num_blocks, activation
        self.input_projection = tf.keras.layers.Dense(width, name="input_projection")
        self.blocks = [(tf.keras.layers.Dense(width, activation=activation, name=f"block_{i}_a"),
                        tf.keras.layers.Dense(width, name=f"block_{i}_b"),
                        tf.keras.layers.LayerNormalization(name=f"block_{i}_norm")) for i in range(num_blocks)]

    def combine(self, fields, training=None):
        x = self.input_projection(tf.concat(fields, axis=-1))
        for dense_a, dense_b, norm in self.blocks:
            x = norm(x + self._dropout(dense_b(dense_a(x)), training=training))
        return x

    @classmethod
    def from_hidden_units(cls, features, hidden_units, **kwargs):
        """``hidden_units`` [w, ...]: width w (128 when empty) and one residual block per entry (at least one)."""
        return cls(features, width=hidden_units[0] if hidden_units else 128,
                   num_blocks=max(1, len(hidden_units)), **kwargs)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_blocks": self.num_blocks,
                "activation": self.activation}
