"""FeatureEncoder: the Keras layer that turns raw features (strings and floats) into one embedding per field."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall.features.specs import FeatureSpec, SequenceFeature, SpecLike, as_spec


def _is_numeric(spec: FeatureSpec) -> bool:
    return spec.dtype != tf.string


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class FeatureEncoder(tf.keras.layers.Layer):
    """Raw features -> one embedding per field (a list of ``[batch, embedding_dim_i]`` tensors).

    Numeric inputs are standardised and projected; categorical ones looked up (vocabulary or hashing) and
    embedded; list inputs (``width`` set) are mean-pooled over their non-empty slots, or recency-weighted
    for a ``SequenceFeature`` with ``pooling="recency"``. :meth:`sequence` gives a list feature unpooled."""

    def __init__(self, features: Sequence[SpecLike], **kwargs):
        super().__init__(**kwargs)
        self.specs: List[FeatureSpec] = [as_spec(s) for s in features]
        if not self.specs:
            raise ValueError("features must name at least one feature spec, got an empty list")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        self._lookups, self._embeddings, self._projections = {}, {}, {}
        for spec in self.specs:
            self._make_layers(spec)

    def _make_layers(self, spec: FeatureSpec) -> None:
        key = spec.name
        if _is_numeric(spec):
            self._projections[key] = tf.keras.layers.Dense(spec.embedding_dim, name=f"{key}_projection")
            return
        padded = spec.width is not None  # index 0 is the padding slot of list inputs
        if spec.has_vocabulary:
            self._lookups[key] = tf.keras.layers.StringLookup(
                vocabulary=spec.lookup_vocabulary(), num_oov_indices=spec.num_oov,
                mask_token="" if padded else None, name=f"{key}_lookup")
            size = self._lookups[key].vocabulary_size()  # tokens + OOV buckets (+ the padding slot)
        else:
            self._lookups[key] = tf.keras.layers.Hashing(spec.hash_buckets, name=f"{key}_hashing")
            size = spec.hash_buckets + int(padded)
        self._embeddings[key] = tf.keras.layers.Embedding(size, spec.embedding_dim, name=f"{key}_embedding")

    @property
    def feature_names(self) -> List[str]:
        return [s.name for s in self.specs]

    @property
    def output_dims(self) -> List[int]:
        return [s.embedding_dim for s in self.specs]

    def dummy_inputs(self) -> Dict[str, tf.Tensor]:
        """One example of empty / zero raw inputs with the right dtypes and widths."""
        return {spec.name: spec.dummy_input() for spec in self.specs}

    def _indices(self, spec, values):
        if spec.has_vocabulary or spec.width is None:
            return self._lookups[spec.name](values)
        # Hashed list input: shift by one so index 0 stays the padding slot.
        return tf.where(tf.equal(values, ""), tf.zeros_like(values, tf.int64), self._lookups[spec.name](values) + 1)

    def _input(self, inputs: Mapping[str, tf.Tensor], spec: FeatureSpec) -> tf.Tensor:
        if spec.name in inputs:
            return tf.convert_to_tensor(inputs[spec.name])
        present = [s.name for s in self.specs if s.name in inputs]
        if spec.serving_default is None or not present:
            raise KeyError(f"input feature {spec.name!r} is missing; got {sorted(inputs)}")
        # An input the model fills in at serving time (e.g. the example age, 0): one value per example.
        batch = tf.shape(tf.convert_to_tensor(inputs[present[0]]))[0]
        return tf.fill([batch], tf.constant(spec.serving_default, spec.dtype))

    def sequence(self, inputs: Mapping[str, tf.Tensor], name: str):
        """The unpooled embeddings of list feature ``name``: ``([batch, max_len, d], mask [batch, max_len])``,
        the mask true on non-empty slots (the order of the raw input, most recent first for a history)."""
        spec = next((s for s in self.specs if s.name == name), None)
        if spec is None or spec.width is None:
            raise ValueError(f"sequence: {name!r} is not a list feature of this encoder "
                             f"(list features: {[s.name for s in self.specs if s.width is not None]})")
        value = tf.reshape(self._input(inputs, spec), [-1, spec.width])
        return self._embeddings[name](self._indices(spec, value)), tf.not_equal(value, "")

    def _encode(self, spec: FeatureSpec, value: tf.Tensor) -> tf.Tensor:
        if _is_numeric(spec):
            x = (tf.reshape(tf.cast(value, tf.float32), [-1, 1]) - spec.mean) / float(np.sqrt(spec.variance))
            return self._projections[spec.name](tf.where(tf.math.is_nan(x), tf.zeros_like(x), x))
        if spec.width is None:
            return self._embeddings[spec.name](self._indices(spec, tf.reshape(value, [-1])))
        value = tf.reshape(value, [-1, spec.width])
        vectors = self._embeddings[spec.name](self._indices(spec, value))  # [B, L, d]
        weights = tf.cast(tf.not_equal(value, ""), tf.float32)
        if isinstance(spec, SequenceFeature) and spec.pooling == "recency":
            weights *= tf.pow(spec.decay, tf.range(spec.width, dtype=tf.float32))[None, :]
        total = tf.reduce_sum(weights, axis=1, keepdims=True)
        return tf.reduce_sum(vectors * weights[..., None], axis=1) / tf.maximum(total, 1e-9)

    def call(self, inputs: Mapping[str, tf.Tensor]) -> List[tf.Tensor]:
        return [self._encode(spec, self._input(inputs, spec)) for spec in self.specs]

    def get_config(self):
        config = super().get_config()
        config["features"] = [s.to_dict() for s in self.specs]
        return config
