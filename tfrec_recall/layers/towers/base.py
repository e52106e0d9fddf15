"""Towers: raw features -> one embedding per example.

Every tower encodes its features into field embeddings (:class:`~tfrec_recall.features.FeatureEncoder`),
combines them in a tower-specific body, projects to ``output_dim`` and optionally L2-normalises. Variants
differ only by the body:

* :class:`MLPTower`: concatenated fields -> ReLU MLP.
* :class:`SENetTower`: squeeze-excitation reweighting of the fields (Hu et al. 2018, as in FiBiNET / the
  SENet two-tower) before the MLP.
* :class:`ResidualTower`: a projection to ``width`` then ``num_blocks`` residual blocks (Dense-ReLU-Dense,
  skip connection, layer normalisation).
* :class:`YouTubeDNNTower`: the YouTubeDNN user tower (Covington et al. 2016): a pooled watch-history sequence
  plus user features into a ReLU MLP; it requires a ``SequenceFeature``.
"""
from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from tfrec_recall.features import FeatureEncoder, SequenceFeature, SpecLike
from tfrec_recall._validation import is_int, require_int, require_positive_int

ACTIVATIONS = ("relu", "gelu", "swish", "tanh")


def _check_units(name: str, units) -> tuple:
    units = tuple(units)
    if any(not is_int(u) or u < 1 for u in units):
        raise ValueError(f"{name} must be a sequence of positive integers, got {list(units)!r}")
    return units


def model_base_config(model: tf.keras.Model, config: dict) -> dict:
    """``config`` (a subclassed model's ``super().get_config()``, which Keras leaves empty when the subclass
    overrides ``get_config``) completed with the Keras arguments every model takes: name, trainable, dtype."""
    return {**config, "name": model.name, "trainable": model.trainable, "dtype": model.dtype_policy.name}


class Tower(tf.keras.Model):
    """Base tower; subclasses implement :meth:`combine`."""

    def __init__(self, features: Sequence[SpecLike], output_dim: int = 64, l2_normalize: bool = True,
                 dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        require_positive_int("output_dim", output_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.encoder = FeatureEncoder(features, name="features")
        self.output_dim = output_dim
        self.l2_normalize = bool(l2_normalize)
        self.dropout_rate = float(dropout)
        self._dropout = tf.keras.layers.Dropout(dropout)
        self.projection = tf.keras.layers.Dense(output_dim, name="projection")

    @property
    def feature_names(self) -> List[str]:
        return self.encoder.feature_names

    def combine(self, fields: List[tf.Tensor], training=None) -> tf.Tensor:
        raise NotImplementedError

    def build(self, input_shape=None):
        # Build from real raw inputs of the specs' dtypes: Keras's default build feeds float placeholders,
        # which string features cannot take (this is what reloading a SavedModel calls).
        if not self.built:
            self.call(self.encoder.dummy_inputs())
            self.built = True

    def call(self, inputs, training=None):
        x = self.combine(self.encoder(inputs), training=training)
        x = self.projection(self._dropout(x, training=training))
        if self.l2_normalize:
            x = tf.math.l2_normalize(x, axis=-1)
        return x

    def get_config(self):
        return {**model_base_config(self, super().get_config()),
                "features": [s.to_dict() for s in self.encoder.specs], "output_dim": self.output_dim,
                "l2_normalize": self.l2_normalize, "dropout": self.dropout_rate}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _mlp(units: Sequence[int], activation: str, prefix: str) -> List[tf.keras.layers.Layer]:
    return [tf.keras.layers.Dense(u, activation=activation, name=f"{prefix}_{i}") for i, u in enumerate(units)]


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class MLPTower(Tower):
    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (128,), activation: str = "relu",
                 output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(features, output_dim=output_dim, l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.hidden_units = _check_units("hidden_units", hidden_units)
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
        num_fields = len(self.encoder.specs)
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


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ResidualTower(Tower):
    def __init__(self, features: Sequence[SpecLike], width: int = 128, num_blocks: int = 2, activation: str = "relu",
                 output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(features, output_dim=output_dim, l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        _check_units("width", [width])
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

    def get_config(self):
        return {**super().get_config(), "width": self.width, "num_blocks": self.num_blocks,
                "activation": self.activation}


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class YouTubeDNNTower(MLPTower):
    """The YouTubeDNN user tower: pooled watch history (a ``SequenceFeature``) plus user features -> ReLU MLP."""

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (256, 128),
                 activation: str = "relu", output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0,
                 **kwargs):
        super().__init__(features, hidden_units=hidden_units, activation=activation, output_dim=output_dim,
                         l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        if not any(isinstance(s, SequenceFeature) for s in self.encoder.specs):
            raise ValueError("YouTubeDNNTower needs a SequenceFeature (the watch history) among its features, got "
                             f"{[f'{s.name}:{s.kind}' for s in self.encoder.specs]}")


TOWERS = {"mlp": MLPTower, "senet": SENetTower, "residual": ResidualTower, "youtube_dnn": YouTubeDNNTower}
