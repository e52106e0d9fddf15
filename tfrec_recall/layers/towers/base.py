"""Towers: raw features -> one embedding per example; the registry of tower names.

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

from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import tensorflow as tf

from tfrec_recall.features import FeatureEncoder, FeatureSpec, SequenceFeature, SpecLike, as_spec
from tfrec_recall._validation import is_int, require_positive_int

_TOWER_TYPES: Dict[str, type] = {}  # written only by register_tower
T = TypeVar("T", bound=type)


def register_tower(name: str) -> Callable[[T], T]:
    """Class decorator: registers a tower class under the config name ``name`` (``query_tower`` /
    ``candidate_tower`` in a RunConfig). A class with ``query_only = True`` cannot be a candidate tower."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tower name must be a non-empty string, got {name!r}")

    def decorate(cls: T) -> T:
        if name in _TOWER_TYPES:
            raise ValueError(f"tower name {name!r} is already registered (by {_TOWER_TYPES[name].__qualname__})")
        _TOWER_TYPES[name] = cls
        return cls

    return decorate


def _load_builtin_towers() -> None:
    import tfrec_recall.layers.towers  # noqa: F401  (its modules register the built-in towers)


def tower_names(candidate: bool = False) -> Tuple[str, ...]:
    """The registered tower names, sorted; with ``candidate=True`` only those that can embed items."""
    _load_builtin_towers()
    return tuple(sorted(n for n, c in _TOWER_TYPES.items() if not (candidate and c.query_only)))


def tower_class(name: str) -> type:
    """The tower class registered under ``name``; ``ValueError`` naming the choices otherwise."""
    _load_builtin_towers()
    if name not in _TOWER_TYPES:
        raise ValueError(f"tower must be one of {list(tower_names())}, got {name!r}")
    return _TOWER_TYPES[name]


ACTIVATIONS = ("relu", "gelu", "swish", "tanh")


def check_units(name: str, units) -> tuple:
    units = tuple(units)
    if any(not is_int(u) or u < 1 for u in units):
        raise ValueError(f"{name} must be a sequence of positive integers, got {list(units)!r}")
    return units


def _augment_spec(augment: SpecLike, output_dim: int) -> FeatureSpec:
    spec = as_spec(augment)
    if spec.dtype != tf.string or spec.width is not None:
        raise ValueError(f"augment must be a scalar categorical feature spec (an id), got {spec.name!r} of kind "
                         f"{spec.kind!r}")
    if spec.embedding_dim != output_dim:
        raise ValueError(f"augment {spec.name!r}: its embedding_dim must equal the tower's output_dim "
                         f"({output_dim}), the augmented vector is compared with the other tower's output; got "
                         f"{spec.embedding_dim}")
    return spec


def model_base_config(model: tf.keras.Model, config: dict) -> dict:
    """``config`` (a subclassed model's ``super().get_config()``, which Keras leaves empty when the subclass
    overrides ``get_config``) completed with the Keras arguments every model takes: name, trainable, dtype."""
    return {**config, "name": model.name, "trainable": model.trainable, "dtype": model.dtype_policy.name}


class Tower(tf.keras.Model):
    """Base tower; subclasses implement :meth:`combine`."""

    query_only = False  # True: needs query-side inputs (e.g. a history), so it cannot embed items
    multi_interest = False  # True: call returns [batch, K, output_dim], with interest_mask(inputs) [batch, K]

    def __init__(self, features: Sequence[SpecLike], output_dim: int = 64, l2_normalize: bool = True,
                 dropout: float = 0.0, augment: Optional[SpecLike] = None, **kwargs):
        super().__init__(**kwargs)
        require_positive_int("output_dim", output_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.encoder = FeatureEncoder(features, name="features")
        self.augment_encoder = None if augment is None else FeatureEncoder([_augment_spec(augment, output_dim)],
                                                                           name="augment")
        self.output_dim = output_dim
        self.l2_normalize = bool(l2_normalize)
        self.dropout_rate = float(dropout)
        self._dropout = tf.keras.layers.Dropout(dropout)
        self.projection = tf.keras.layers.Dense(output_dim, name="projection")

    @property
    def feature_names(self) -> List[str]:
        """The raw inputs the tower reads (its features, then the augmented vector's id if not among them)."""
        return [s.name for s in self.input_specs]

    @property
    def input_specs(self) -> List[FeatureSpec]:
        """The specs of the raw inputs the tower reads, each input once (the serving signature's inputs)."""
        specs = list(self.encoder.specs)
        if self.augment_encoder is not None and self.augment_spec.name not in self.encoder.feature_names:
            specs.append(self.augment_spec)
        return specs

    @property
    def serving_specs(self) -> List[FeatureSpec]:
        """The inputs a server is sent: :attr:`input_specs` but those the model fills in (the example age)."""
        return [s for s in self.input_specs if s.serving_default is None]

    @property
    def augment_spec(self) -> Optional[FeatureSpec]:
        return None if self.augment_encoder is None else self.augment_encoder.specs[0]

    @property
    def num_fields(self) -> int:
        """How many field embeddings :meth:`combine` receives (the features, plus the augmented vector)."""
        return len(self.encoder.specs) + int(self.augment_encoder is not None)

    def augmented_vector(self, inputs) -> tf.Tensor:
        """DAT's augmented vector (Yu et al. 2021): ``[batch, output_dim]``, the embedding of the ``augment``
        input, fed to the tower as one more field; ``ValueError`` when the tower has none."""
        if self.augment_encoder is None:
            raise ValueError(f"{self.name} has no augmented vector: build it with augment=<an id feature spec>")
        return self.augment_encoder(inputs)[0]

    def fields(self, inputs, field_mask=None) -> List[tf.Tensor]:
        """The field embeddings :meth:`combine` reads: the features' (each times its column of ``field_mask``
        ``[batch, len(features)]`` when given), then the augmented vector (zeros in a masked call: a contrastive
        view must not see an id-unique vector)."""
        fields = self.encoder(inputs)
        if field_mask is not None:
            mask = tf.cast(field_mask, fields[0].dtype)
            fields = [f * mask[:, i:i + 1] for i, f in enumerate(fields)]
        if self.augment_encoder is not None:
            augmented = self.augmented_vector(inputs)
            fields.append(augmented if field_mask is None else tf.zeros_like(augmented))
        return fields

    def combine(self, fields: List[tf.Tensor], training=None) -> tf.Tensor:
        raise NotImplementedError

    def build(self, input_shape=None):
        # Build from real raw inputs of the specs' dtypes: Keras's default build feeds float placeholders,
        # which string features cannot take (this is what reloading a SavedModel calls).
        if not self.built:
            self.call({spec.name: spec.dummy_input() for spec in self.input_specs})
            self.built = True

    def call(self, inputs, training=None, field_mask=None):
        """``[batch, output_dim]`` embeddings of the raw ``inputs``; ``field_mask`` (``[batch, len(features)]``,
        0/1) zeroes features' field embeddings, as a contrastive view does."""
        return self.head(self.fields(inputs, field_mask), training=training)

    def head(self, fields: List[tf.Tensor], training=None) -> tf.Tensor:
        """:meth:`combine`, dropout, the projection to ``output_dim`` and the optional L2 normalisation, over the
        last axis (fields ``[batch, width]``, or ``[batch, K, width]`` for one row per interest)."""
        x = self.combine(fields, training=training)
        x = self.projection(self._dropout(x, training=training))
        if self.l2_normalize:
            x = tf.math.l2_normalize(x, axis=-1)
        return x

    def history_spec(self, tower: str) -> FeatureSpec:
        """The tower's only ``SequenceFeature`` (the history); ``ValueError`` naming ``tower`` otherwise."""
        sequences = [s for s in self.encoder.specs if isinstance(s, SequenceFeature)]
        if len(sequences) != 1:
            raise ValueError(f"{tower} needs exactly one SequenceFeature (the history) among its features, got "
                             f"{[f'{s.name}:{s.kind}' for s in self.encoder.specs]}")
        return sequences[0]

    def sequence_feature(self, name: Optional[str] = None) -> str:
        """The name of the list feature :meth:`encode_sequence` returns: ``name`` if given, else the tower's only
        ``SequenceFeature`` (or, without one, its only list feature); ``ValueError`` naming the candidates
        otherwise."""
        lists = [s for s in self.encoder.specs if s.width is not None]
        if name is not None:
            if name not in [s.name for s in lists]:
                raise ValueError(f"{self.name}: {name!r} is not a list feature of this tower "
                                 f"(list features: {[s.name for s in lists]})")
            return name
        sequences = [s for s in lists if isinstance(s, SequenceFeature)] or lists
        if len(sequences) != 1:
            raise ValueError(f"{self.name}: name the sequence feature to encode, the tower has "
                             f"{len(sequences)} candidates {[s.name for s in sequences]} (SequenceFeature first)")
        return sequences[0].name

    def encode_sequence(self, inputs, name: Optional[str] = None) -> Tuple[tf.Tensor, tf.Tensor]:
        """The unpooled embeddings of the tower's sequence feature (see :meth:`sequence_feature`):
        ``([batch, max_len, d] float, mask [batch, max_len] bool)``, the mask true on non-empty slots, in the
        order of the raw input (most recent first for a history). These are the field embeddings the pooled
        vector of :meth:`call` is built from; multi-interest extractors and sequence losses read them."""
        return self.encoder.sequence(inputs, self.sequence_feature(name))

    def call_with_sequence(self, inputs, training=None, name: Optional[str] = None):
        """``(pooled [batch, output_dim], sequence [batch, max_len, d], mask [batch, max_len])``: :meth:`call`
        and :meth:`encode_sequence` of the same inputs."""
        sequence, mask = self.encode_sequence(inputs, name)
        return self(inputs, training=training), sequence, mask

    def get_config(self):
        return {**model_base_config(self, super().get_config()),
                "features": [s.to_dict() for s in self.encoder.specs], "output_dim": self.output_dim,
                "l2_normalize": self.l2_normalize, "dropout": self.dropout_rate,
                "augment": None if self.augment_spec is None else self.augment_spec.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def run_config_options(cls, config) -> dict:
        """Constructor arguments of this tower class read from a RunConfig, besides the shared ones (a subclass
        hook; the base reads none)."""
        return {}

    @classmethod
    def from_split(cls, specs: Sequence[FeatureSpec], config, split) -> Tuple[List[FeatureSpec], dict]:
        """(specs, extra constructor arguments) of this tower class for a RunConfig and a split: inputs and
        tables a tower reads from the data beyond the shared specs (a subclass hook; the base adds none)."""
        return list(specs), {}

    @classmethod
    def from_hidden_units(cls, features: Sequence[SpecLike], hidden_units: Sequence[int], **kwargs) -> "Tower":
        """The tower for a RunConfig's ``hidden_units`` list (subclasses map it onto their own arguments)."""
        return cls(features, hidden_units=hidden_units, **kwargs)
