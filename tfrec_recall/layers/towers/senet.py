"""SENetTower: squeeze-excitation field reweighting (Hu et al. 2018; FiBiNET, the SENet two-tower) before the MLP."""
from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from tfrec_recall.features import SpecLike
from tfrec_recall.layers.towers.base import register_tower
from tfrec_recall.layers.towers.mlp import MLPTower

@register_tower("senet")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class SENetTower(MLPTower):
    """MLP tower whose field embeddings are first reweighted by a squeeze-excitation block: squeeze each field
    to its mean, excite with Dense(F / reduction_ratio, ReLU) -> Dense(F, sigmoid), scale each field."""

    def __init__(self, features: Sequence[SpecLike], reduction_ratio: float = 2.0, hidden_units: Sequence[int] = (128,),
                 activation: str = "relu", output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0,
                 **kwargs):
        super().__init__(features, hidden_units=hidden_units, activation=activation, output_dim=output_dim,
                         l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if not reduction_ratio >= 1.0:
            raise ValueError(f"reduction_ratio must be >= 1, got {reduction_ratio!r}")
        self.reduction_ratio = float(reduction_ratio)
        num_fields = self.num_fields
        self.squeeze_units = max(1, int(round(num_fields / self.reduction_ratio)))
        self.excite_1 = tf.keras.layers.Dense(self.squeeze_units, activation="relu", name="excite_1")
        self.excite_2 = tf.keras.layers.Dense(num_fields, activation="sigmoid", name="excite_2")

    def field_weights(self, fields: List[tf.Tensor]) -> tf.Tensor:
        squeezed = tf.stack([tf.reduce_mean(f, axis=-1) for f in fields], axis=-1)  # [B, F]
        return self.excite_2(self.excite_1(squeezed))

    def combine(self, fields, training=None):
        weights = self.field_weights(fields)
        scaled = [f * weights[:, i:i + 1] for i, f in enumerate(fields)]
        return self.run_mlp(tf.concat(scaled, axis=-1), training=training)

    def get_config(self):
        return {**super().get_config(), "reduction_ratio": self.reduction_ratio}
