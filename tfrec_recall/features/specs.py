"""Declarative feature specs and the Keras layer that turns raw features into field embeddings.

A spec says what a raw input is and how to embed it; :class:`FeatureEncoder` builds the lookup / hashing /
normalisation and embedding layers from the specs, inside the model, so an exported tower takes raw features
(strings and floats). Inputs are dense:

* ``IdFeature`` (a categorical value, e.g. ``user_id``): ``[batch]`` string.
* ``MultiCategoricalFeature`` (e.g. genres): ``[batch, max_len]`` string, padded with ``""``; mean-pooled.
* ``NumericFeature``: ``[batch]`` float32, standardised with the training mean and variance (NaN -> mean).
* ``SequenceFeature`` (the item history): ``[batch, max_len]`` string, most recent first, padded with ``""``;
  pooled by ``mean`` or ``recency`` (weights ``decay ** position``).

``specs_from_split`` derives the specs from a split's *training* data: vocabularies, normalisation statistics
and padded widths; values outside the vocabulary map to OOV buckets.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall.data.schema import ITEM_ID, USER_ID, WEIGHT, InteractionData
from tfrec_recall._validation import require_int

HISTORY = "history"
POOLINGS = ("mean", "recency")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    name: str
    embedding_dim: int = 32

    kind = "base"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"feature name must be a non-empty string, got {self.name!r}")
        require_int(f"{self.name}.embedding_dim", self.embedding_dim, 1)

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def from_dict(config: Mapping) -> "FeatureSpec":
        config = dict(config)
        kind = config.pop("kind", None)
        if kind not in SPEC_KINDS:
            raise ValueError(f"feature spec kind must be one of {sorted(SPEC_KINDS)}, got {kind!r}")
        if config.get("vocabulary") is not None:
            config["vocabulary"] = tuple(config["vocabulary"])
        return SPEC_KINDS[kind](**config)


@dataclasses.dataclass(frozen=True)
class _Categorical(FeatureSpec):
    vocabulary: Optional[tuple] = None
    hash_buckets: Optional[int] = None
    num_oov: int = 1

    def __post_init__(self):
        super().__post_init__()
        if (self.vocabulary is None) == (self.hash_buckets is None):
            raise ValueError(f"{self.name}: give exactly one of vocabulary or hash_buckets "
                             f"(got vocabulary={'set' if self.vocabulary is not None else None}, "
                             f"hash_buckets={self.hash_buckets!r})")
        if self.hash_buckets is not None:
            require_int(f"{self.name}.hash_buckets", self.hash_buckets, 1)
        if self.vocabulary is not None:
            object.__setattr__(self, "vocabulary", tuple(str(v) for v in self.vocabulary))
            if len(self.vocabulary) == 0 or "" in self.vocabulary:
                raise ValueError(f"{self.name}.vocabulary must be non-empty and must not contain ''")
        require_int(f"{self.name}.num_oov", self.num_oov, 1)


@dataclasses.dataclass(frozen=True)
class IdFeature(_Categorical):
    kind = "id"


@dataclasses.dataclass(frozen=True)
class MultiCategoricalFeature(_Categorical):
    max_len: int = 8
    kind = "multi_categorical"

    def __post_init__(self):
        super().__post_init__()
        require_int(f"{self.name}.max_len", self.max_len, 1)


@dataclasses.dataclass(frozen=True)
class SequenceFeature(MultiCategoricalFeature):
    max_len: int = 50
    pooling: str = "mean"
    decay: float = 0.9
    kind = "sequence"

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.name}.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"{self.name}.decay must be in (0, 1], got {self.decay!r}")


@dataclasses.dataclass(frozen=True)
class NumericFeature(FeatureSpec):
    mean: float = 0.0
    variance: float = 1.0
    embedding_dim: int = 8
    kind = "numeric"

    def __post_init__(self):
        super().__post_init__()
        if not np.isfinite(self.mean) or not (self.variance > 0 and np.isfinite(self.variance)):
            raise ValueError(f"{self.name}: mean must be finite and variance positive, got mean={self.mean!r}, "
                             f"variance={self.variance!r}")


SPEC_KINDS = {cls.kind: cls for cls in (IdFeature, MultiCategoricalFeature, SequenceFeature, NumericFeature)}
SpecLike = Union[FeatureSpec, Mapping]


def as_spec(spec: SpecLike) -> FeatureSpec:
    if isinstance(spec, FeatureSpec):
        return spec
    if isinstance(spec, Mapping):
        return FeatureSpec.from_dict(spec)
    raise TypeError(f"a feature spec must be a FeatureSpec or a dict, got {type(spec).__name__}")


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class FeatureEncoder(tf.keras.layers.Layer):
    """Raw features -> one embedding per field (a list of ``[batch, embedding_dim_i]`` tensors)."""

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
            key = spec.name
            if isinstance(spec, NumericFeature):
                self._projections[key] = tf.keras.layers.Dense(spec.embedding_dim, name=f"{key}_projection")
                continue
            multi = isinstance(spec, MultiCategoricalFeature)
            if spec.vocabulary is not None:
                self._lookups[key] = tf.keras.layers.StringLookup(
                    vocabulary=list(spec.vocabulary), num_oov_indices=spec.num_oov,
                    mask_token="" if multi else None, name=f"{key}_lookup")
                size = len(spec.vocabulary) + spec.num_oov + (1 if multi else 0)
            else:
                self._lookups[key] = tf.keras.layers.Hashing(spec.hash_buckets, name=f"{key}_hashing")
                size = spec.hash_buckets + (1 if multi else 0)
            self._embeddings[key] = tf.keras.layers.Embedding(size, spec.embedding_dim, name=f"{key}_embedding")

    @property
    def feature_names(self) -> List[str]:
        return [s.name for s in self.specs]

    @property
    def output_dims(self) -> List[int]:
        return [s.embedding_dim for s in self.specs]

    def dummy_inputs(self) -> Dict[str, tf.Tensor]:
        """One example of empty / zero raw inputs with the right dtypes and widths."""
        out = {}
        for spec in self.specs:
            if isinstance(spec, NumericFeature):
                out[spec.name] = tf.zeros([1], tf.float32)
            elif isinstance(spec, MultiCategoricalFeature):
                out[spec.name] = tf.fill([1, spec.max_len], "")
            else:
                out[spec.name] = tf.constant([""])
        return out

    def _indices(self, spec, values):
        if spec.vocabulary is not None or not isinstance(spec, MultiCategoricalFeature):
            return self._lookups[spec.name](values)
        # Hashed multi-valued: shift by one so index 0 stays the padding slot.
        return tf.where(tf.equal(values, ""), tf.zeros_like(values, tf.int64), self._lookups[spec.name](values) + 1)

    def call(self, inputs: Mapping[str, tf.Tensor]) -> List[tf.Tensor]:
        fields = []
        for spec in self.specs:
            if spec.name not in inputs:
                raise KeyError(f"input feature {spec.name!r} is missing; got {sorted(inputs)}")
            value = inputs[spec.name]
            if isinstance(spec, NumericFeature):
                x = tf.reshape(tf.cast(value, tf.float32), [-1, 1])
                x = (x - spec.mean) / float(np.sqrt(spec.variance))
                x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
                fields.append(self._projections[spec.name](x))
                continue
            value = tf.convert_to_tensor(value)
            if not isinstance(spec, MultiCategoricalFeature):
                fields.append(self._embeddings[spec.name](self._indices(spec, tf.reshape(value, [-1]))))
                continue
            value = tf.reshape(value, [-1, spec.max_len])
            vectors = self._embeddings[spec.name](self._indices(spec, value))  # [B, L, d]
            weights = tf.cast(tf.not_equal(value, ""), tf.float32)
            if isinstance(spec, SequenceFeature) and spec.pooling == "recency":
                weights *= tf.pow(spec.decay, tf.range(spec.max_len, dtype=tf.float32))[None, :]
            total = tf.reduce_sum(weights, axis=1, keepdims=True)
            pooled = tf.reduce_sum(vectors * weights[..., None], axis=1) / tf.maximum(total, 1e-9)
            fields.append(pooled)
        return fields

    def get_config(self):
        config = super().get_config()
        config["features"] = [s.to_dict() for s in self.specs]
        return config


# ----------------------------------------------------------------------------------------------------------
# Specs from training data, and raw feature arrays for rows of a split.

def _vocabulary(values) -> tuple:
    counts = pd.Series(list(values), dtype=object).value_counts(sort=False)
    return tuple(sorted(str(v) for v in counts.index if str(v) != ""))


def specs_from_split(split, *, embedding_dim: int = 32, side_embedding_dim: int = 16,
                     history_length: Optional[int] = None, pooling: str = "mean",
                     use_side_features: bool = True, use_user_id: bool = True,
                     use_history: bool = True) -> Dict[str, List[FeatureSpec]]:
    """Feature specs for the query and candidate sides, with vocabularies and statistics from training rows."""
    data: InteractionData = split.data
    train = split.train
    query: List[FeatureSpec] = []
    candidate: List[FeatureSpec] = []
    item_vocab = _vocabulary(train[ITEM_ID])
    if use_user_id:
        query.append(IdFeature(USER_ID, embedding_dim, vocabulary=_vocabulary(train[USER_ID])))
    if use_history:
        query.append(SequenceFeature(HISTORY, embedding_dim, vocabulary=item_vocab,
                                     max_len=history_length or split.history_length, pooling=pooling))
    candidate.append(IdFeature(ITEM_ID, embedding_dim, vocabulary=item_vocab))
    if use_side_features:
        for table, key, side in ((data.user_features, USER_ID, query), (data.item_features, ITEM_ID, candidate)):
            if table is None:
                continue
            rows = table.reindex(pd.Index(train[key].unique()))
            for column in table.columns:
                kind = data.feature_kinds[column]
                values = rows[column]
                if kind == "numeric":
                    v = values.to_numpy(dtype=np.float64)
                    v = v[np.isfinite(v)]
                    side.append(NumericFeature(column, mean=float(v.mean()) if len(v) else 0.0,
                                               variance=float(v.var()) if len(v) and v.var() > 0 else 1.0))
                elif kind == "categorical":
                    side.append(IdFeature(column, side_embedding_dim,
                                          vocabulary=_vocabulary(values.dropna().astype(str))))
                else:
                    flat = [x for tup in values.dropna() for x in tup]
                    width = int(max([len(t) for t in values.dropna()] + [1]))
                    side.append(MultiCategoricalFeature(column, side_embedding_dim, vocabulary=_vocabulary(flat),
                                                        max_len=min(width, 16)))
    return {"query": query, "candidate": candidate}


def _pad(sequences, width: int) -> np.ndarray:
    out = np.full((len(sequences), width), "", dtype=object)
    for row, seq in enumerate(sequences):
        if isinstance(seq, (tuple, list, np.ndarray)):
            seq = [str(s) for s in seq][:width]
            out[row, :len(seq)] = seq
    return out


def feature_arrays(rows: pd.DataFrame, data: InteractionData, specs: Sequence[FeatureSpec],
                   with_weight: bool = False) -> Dict[str, np.ndarray]:
    """Raw input arrays for ``specs`` over ``rows`` (which hold ``user_id`` and/or ``item_id``, and ``history``).

    Side features are joined from the data's user / item tables; unknown entities get ``""`` (OOV) or NaN
    (the training mean)."""
    out: Dict[str, np.ndarray] = {}
    for spec in specs:
        name = spec.name
        if name in rows.columns:
            column = rows[name]
        elif data.user_features is not None and name in data.user_features.columns and USER_ID in rows.columns:
            column = data.user_features[name].reindex(rows[USER_ID].to_numpy())
        elif data.item_features is not None and name in data.item_features.columns and ITEM_ID in rows.columns:
            column = data.item_features[name].reindex(rows[ITEM_ID].to_numpy())
        else:
            raise KeyError(f"feature {name!r} is neither a column of the rows ({list(rows.columns)}) nor a user or "
                           f"item feature of {data.name!r}")
        if isinstance(spec, NumericFeature):
            out[name] = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float32)
        elif isinstance(spec, MultiCategoricalFeature):
            out[name] = _pad(column.to_numpy(), spec.max_len)
        else:
            out[name] = column.fillna("").astype(str).to_numpy(dtype=object)
    if with_weight:
        out[WEIGHT] = (rows[WEIGHT].to_numpy(dtype=np.float32) if WEIGHT in rows.columns
                       else np.ones(len(rows), dtype=np.float32))
    return out
