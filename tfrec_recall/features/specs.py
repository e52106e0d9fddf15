"""Declarative feature specs, and the one registry of feature kinds.

A spec says what a raw input is and how to embed it; :class:`~tfrec_recall.features.encoder.FeatureEncoder`
builds the lookup / hashing / normalisation and embedding layers from the specs, inside the model, so an
exported tower takes raw features (strings and floats). Each kind is a spec class registered once with
:func:`register_feature_kind`; what differs between kinds (dtype, width, the data-table kind it reads) is an
attribute of the class, so the serving signature, the tf.Example parse spec, dummy inputs and raw arrays are
derived without a switch over kinds. Inputs are dense:

* ``IdFeature`` (a categorical value, e.g. ``user_id``): ``[batch]`` string.
* ``MultiCategoricalFeature`` (e.g. genres): ``[batch, max_len]`` string, padded with ``""``; mean-pooled.
* ``NumericFeature``: ``[batch]`` float32, standardised with the training mean and variance (NaN -> mean).
* ``SequenceFeature`` (the item history): ``[batch, max_len]`` string, most recent first, padded with ``""``;
  pooled by ``mean`` or ``recency`` (weights ``decay ** position``).
* ``SequenceTimesFeature`` (``history_times``): ``[batch, max_len]`` int64, the timestamp of each history
  behaviour, aligned with the history (padding 0); never embedded: session-based towers (SDM) read it raw.

``specs_from_split`` (:mod:`tfrec_recall.features.vocabularies`) derives the specs from a split's *training*
data: vocabularies, normalisation statistics and padded widths; values outside the vocabulary map to OOV buckets.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple, TypeVar, Union

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall._validation import require_int

HISTORY = "history"
HISTORY_TIMES = "history_times"
EXAMPLE_AGE = "example_age"
POOLINGS = ("mean", "recency")
MULTI_CATEGORICAL_MAX_LEN = 16  # the widest padded side-feature list a spec takes from the data
_FEATURE_KINDS: Dict[str, type] = {}  # written only by register_feature_kind
S = TypeVar("S", bound=type)


def register_feature_kind(cls: S) -> S:
    """Class decorator: registers a spec class under its ``kind`` (the ``"kind"`` key of a spec's dict form).

    Raises ``ValueError`` when the kind is already taken."""
    if cls.kind in _FEATURE_KINDS:
        raise ValueError(f"feature kind {cls.kind!r} is already registered (by {_FEATURE_KINDS[cls.kind].__name__})")
    _FEATURE_KINDS[cls.kind] = cls
    return cls


def feature_kinds() -> Tuple[str, ...]:
    """The registered spec kinds, sorted."""
    return tuple(sorted(_FEATURE_KINDS))


def feature_kind(kind: str) -> type:
    """The spec class registered under ``kind``; ``ValueError`` naming the choices otherwise."""
    if kind not in _FEATURE_KINDS:
        raise ValueError(f"feature spec kind must be one of {list(feature_kinds())}, got {kind!r}")
    return _FEATURE_KINDS[kind]


def spec_for_table_kind(table_kind: str) -> type:
    """The spec class that embeds a side-feature column of ``table_kind`` (``InteractionData.feature_kinds``)."""
    matches = [cls for cls in _FEATURE_KINDS.values() if cls.table_kind == table_kind]
    if len(matches) != 1:
        raise ValueError(f"no single feature kind reads side-feature columns of kind {table_kind!r} "
                         f"(found {[c.__name__ for c in matches]})")
    return matches[0]


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    name: str
    embedding_dim: int = 32

    kind = "base"
    dtype = tf.string  # of the raw input
    table_kind = None  # the InteractionData.feature_kinds value this kind embeds, if any
    serving_default = None  # a value the model fills in when the input is absent (then not a serving input)

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
        cls = feature_kind(config.pop("kind", None))
        if config.get("vocabulary") is not None:
            config["vocabulary"] = tuple(config["vocabulary"])
        return cls(**config)

    @property
    def width(self) -> Optional[int]:
        """Values per example: ``None`` for a scalar input, ``max_len`` for a padded list."""
        return None

    @property
    def shape(self) -> list:
        return [None] if self.width is None else [None, self.width]

    @property
    def missing(self):
        """The raw value standing for "absent": ``""`` for strings, NaN (the training mean) for numbers."""
        return "" if self.dtype == tf.string else float("nan")

    def tensor_spec(self) -> tf.TensorSpec:
        """The serving signature's input for this feature."""
        return tf.TensorSpec(self.shape, self.dtype, name=self.name)

    def parse_spec(self) -> tf.io.FixedLenFeature:
        """How a tf.Example carries this feature (absent -> the missing value)."""
        shape = [] if self.width is None else [self.width]
        default = self.missing if self.width is None else [self.missing] * self.width
        return tf.io.FixedLenFeature(shape, self.dtype, default_value=default)

    def dummy_input(self) -> tf.Tensor:
        """One example of an empty raw input."""
        shape = [1] if self.width is None else [1, self.width]
        return tf.fill(shape, tf.constant(self.missing, self.dtype))

    def raw_array(self, column: pd.Series) -> np.ndarray:
        """The raw input array for a column of values (missing -> the missing value)."""
        return column.fillna("").astype(str).to_numpy(dtype=object)

    def training_array(self, rows: pd.DataFrame) -> Optional[np.ndarray]:
        """The raw input of training ``rows`` when it is derived from them rather than read from a column
        (``None``: read as at serving time)."""
        return None

    @classmethod
    def from_column(cls, name: str, values: pd.Series, embedding_dim: int) -> "FeatureSpec":
        """The spec of a side-feature column, with vocabulary / statistics from its training ``values``."""
        raise NotImplementedError(f"{cls.__name__} is not read from side-feature tables")


@dataclasses.dataclass(frozen=True)
class _Categorical(FeatureSpec):
    vocabulary: Optional[tuple] = None
    hash_buckets: Optional[int] = None
    num_oov: int = 1
    vocabulary_file: Optional[str] = None  # one token per line (e.g. a Beam job's ``<feature>.vocab``)

    def __post_init__(self):
        super().__post_init__()
        given = [self.vocabulary is not None, self.vocabulary_file is not None, self.hash_buckets is not None]
        if sum(given) != 1:
            raise ValueError(f"{self.name}: give exactly one of vocabulary, vocabulary_file or hash_buckets "
                             f"(got vocabulary={'set' if self.vocabulary is not None else None}, "
                             f"vocabulary_file={self.vocabulary_file!r}, hash_buckets={self.hash_buckets!r})")
        if self.vocabulary_file is not None and (not isinstance(self.vocabulary_file, str)
                                                 or not self.vocabulary_file):
            raise ValueError(f"{self.name}.vocabulary_file must be a non-empty path, got {self.vocabulary_file!r}")
        if self.hash_buckets is not None:
            require_int(f"{self.name}.hash_buckets", self.hash_buckets, 1)
        if self.vocabulary is not None:
            object.__setattr__(self, "vocabulary", tuple(str(v) for v in self.vocabulary))
            if len(self.vocabulary) == 0 or "" in self.vocabulary:
                raise ValueError(f"{self.name}.vocabulary must be non-empty and must not contain ''")
        require_int(f"{self.name}.num_oov", self.num_oov, 1)

    @property
    def has_vocabulary(self) -> bool:
        """Whether ids are looked up in a vocabulary (in memory or a file) rather than hashed."""
        return self.vocabulary is not None or self.vocabulary_file is not None

    def lookup_vocabulary(self):
        """What ``StringLookup(vocabulary=...)`` takes: the token list, or the vocabulary file's path (read by
        the lookup table itself, and an asset of an exported SavedModel)."""
        return self.vocabulary_file if self.vocabulary_file is not None else list(self.vocabulary)

    def vocabulary_tokens(self) -> tuple:
        """The vocabulary's tokens, read from the file when the spec names one (in memory: O(vocabulary))."""
        if self.vocabulary_file is None:
            return self.vocabulary
        from tfrec_recall import storage
        return tuple(line for line in storage.read_text(self.vocabulary_file).split("\n") if line)


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class IdFeature(_Categorical):
    kind = "id"
    table_kind = "categorical"

    @classmethod
    def from_column(cls, name, values, embedding_dim):
        return cls(name, embedding_dim, vocabulary=vocabulary_of(values.dropna().astype(str)))


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class MultiCategoricalFeature(_Categorical):
    max_len: int = 8
    kind = "multi_categorical"
    table_kind = "multi_categorical"

    def __post_init__(self):
        super().__post_init__()
        require_int(f"{self.name}.max_len", self.max_len, 1)

    @property
    def width(self) -> Optional[int]:
        return self.max_len

    @classmethod
    def from_column(cls, name, values, embedding_dim, max_width: int = MULTI_CATEGORICAL_MAX_LEN):
        lists = values.dropna()
        return cls(name, embedding_dim, vocabulary=vocabulary_of([x for t in lists for x in t]),
                   max_len=padded_width(max([len(t) for t in lists] + [0]), max_width))

    def raw_array(self, column: pd.Series) -> np.ndarray:
        out = np.full((len(column), self.max_len), "", dtype=object)
        for row, values in enumerate(column.to_numpy()):
            if isinstance(values, (tuple, list, np.ndarray)):
                values = [str(v) for v in values][:self.max_len]
                out[row, :len(values)] = values
        return out


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class SequenceFeature(MultiCategoricalFeature):
    max_len: int = 50
    pooling: str = "mean"
    decay: float = 0.9
    kind = "sequence"
    table_kind = None  # built from the interaction log (the history), not read from a side table

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.name}.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"{self.name}.decay must be in (0, 1], got {self.decay!r}")


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class SequenceTimesFeature(FeatureSpec):
    """The timestamps of the history's behaviours (module docstring), in the data's time unit (seconds for
    MovieLens); a tower that reads it keeps it out of its :class:`FeatureEncoder`."""
    max_len: int = 50
    embedding_dim: int = 1  # not embedded
    kind = "sequence_times"
    dtype = tf.int64
    table_kind = None  # built from the interaction log beside the history, not read from a side table

    def __post_init__(self):
        super().__post_init__()
        require_int(f"{self.name}.max_len", self.max_len, 1)

    @property
    def width(self) -> Optional[int]:
        return self.max_len

    @property
    def missing(self):
        return 0

    def raw_array(self, column: pd.Series) -> np.ndarray:
        out = np.zeros((len(column), self.max_len), dtype=np.int64)
        for row, values in enumerate(column.to_numpy()):
            if isinstance(values, (tuple, list, np.ndarray)) and len(values):
                times = np.asarray(values, dtype=np.float64)[:self.max_len]
                if not np.isfinite(times).all():
                    raise ValueError(f"{self.name}: row {row} has non-finite timestamps {list(values)[:5]}")
                out[row, :len(times)] = np.round(times).astype(np.int64)
        return out


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class NumericFeature(FeatureSpec):
    mean: float = 0.0
    variance: float = 1.0
    embedding_dim: int = 8
    kind = "numeric"
    dtype = tf.float32
    table_kind = "numeric"

    def __post_init__(self):
        super().__post_init__()
        if not np.isfinite(self.mean) or not (self.variance > 0 and np.isfinite(self.variance)):
            raise ValueError(f"{self.name}: mean must be finite and variance positive, got mean={self.mean!r}, "
                             f"variance={self.variance!r}")

    def raw_array(self, column: pd.Series) -> np.ndarray:
        return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float32)

    @classmethod
    def from_column(cls, name, values, embedding_dim=None):
        """Standardised with the training mean and variance; the embedding width stays the numeric default."""
        v = values.to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        return cls.from_moments(name, len(v), float(v.mean()) if len(v) else 0.0, float(v.var()) if len(v) else 0.0)

    @classmethod
    def from_moments(cls, name: str, count: int, mean: float, variance: float) -> "NumericFeature":
        """The spec of ``count`` finite training values of that mean and (population) variance: no value gives
        mean 0, and a variance at rounding level (a constant column: at most ``1e-12 * max(1, mean ** 2)``)
        gives variance 1, so standardising never divides by (almost) zero."""
        if not count:
            return cls(name, mean=0.0, variance=1.0)
        constant = variance <= 1e-12 * max(1.0, mean * mean)
        return cls(name, mean=float(mean), variance=1.0 if constant else float(variance))


@register_feature_kind
@dataclasses.dataclass(frozen=True)
class ExampleAgeFeature(NumericFeature):
    """The age of a training example (Covington et al. 2016, "Deep Neural Networks for YouTube
    Recommendations", sec. 3.3 "Example Age"): ``(reference_time - timestamp) / time_unit``, clipped at 0, where
    ``reference_time`` is the latest timestamp of the training data. A query-side feature: training rows carry
    their age, and at serving time it is 0 (``serving_default``): the model fills it in, so it is not a serving
    input, and evaluation queries are asked "now" as served ones are. ``mean`` / ``variance`` standardise the
    ages of the training rows."""
    reference_time: float = 0.0
    time_unit: float = 86400.0
    kind = "example_age"
    table_kind = None  # derived from the interaction timestamps, not read from a side table
    serving_default = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not np.isfinite(self.reference_time):
            raise ValueError(f"{self.name}.reference_time must be finite, got {self.reference_time!r}")
        if not (np.isfinite(self.time_unit) and self.time_unit > 0):
            raise ValueError(f"{self.name}.time_unit must be a finite number > 0, got {self.time_unit!r}")

    @property
    def missing(self):
        """An absent age is "now" (0), in parsed tf.Examples too, not the training mean."""
        return self.serving_default

    def ages(self, timestamps) -> np.ndarray:
        age = (self.reference_time - np.asarray(timestamps, dtype=np.float64)) / self.time_unit
        return np.maximum(age, 0.0).astype(np.float32)

    def training_array(self, rows: pd.DataFrame) -> np.ndarray:
        from tfrec_recall.data.schema import TIMESTAMP
        if TIMESTAMP not in rows.columns:
            raise KeyError(f"{self.name}: the training rows have no {TIMESTAMP!r} column ({list(rows.columns)})")
        return self.ages(rows[TIMESTAMP].to_numpy())

    @classmethod
    def from_timestamps(cls, name: str, timestamps, time_unit: float = 86400.0) -> "ExampleAgeFeature":
        """The spec whose reference time is the latest of the training ``timestamps``; ``ValueError`` when
        they are all equal (no time to measure ages by)."""
        t = np.asarray(timestamps, dtype=np.float64)
        if len(t) == 0 or not np.isfinite(t).all() or t.min() == t.max():
            raise ValueError(f"{name} (example age) needs varying, finite training timestamps; got "
                             f"{len(np.unique(t))} distinct value(s) over {len(t)} rows")
        ages = (t.max() - t) / time_unit
        return cls(name, mean=float(ages.mean()), variance=float(max(ages.var(), 1e-12)),
                   reference_time=float(t.max()), time_unit=float(time_unit))


def padded_width(longest: int, max_width: int = MULTI_CATEGORICAL_MAX_LEN) -> int:
    """The padded width of a list feature whose longest training list has ``longest`` values: at least 1,
    at most ``max_width``."""
    return min(max(int(longest), 1), max_width)


def vocabulary_of(values) -> tuple:
    """The sorted distinct non-empty string values."""
    counts = pd.Series(list(values), dtype=object).value_counts(sort=False)
    return tuple(sorted(str(v) for v in counts.index if str(v) != ""))


SpecLike = Union[FeatureSpec, Mapping]


def as_spec(spec: SpecLike) -> FeatureSpec:
    if isinstance(spec, FeatureSpec):
        return spec
    if isinstance(spec, Mapping):
        return FeatureSpec.from_dict(spec)
    raise TypeError(f"a feature spec must be a FeatureSpec or a dict, got {type(spec).__name__}")


