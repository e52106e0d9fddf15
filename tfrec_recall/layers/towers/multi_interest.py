"""Multi-interest user towers: the history -> K interest vectors ``[batch, K, output_dim]`` and an interest
mask ``[batch, K]`` (:meth:`MultiInterestTower.interest_mask`), served by searching each interest and merging
(:class:`~tfrec_recall.retrievers.MultiQueryRetriever`) and trained with a multi-interest scorer
(:class:`~tfrec_recall.layers.interest.LabelAwareAttentionScorer`).

Every tower extracts K interests from the unpooled history embeddings (a subclass's :meth:`extract`), then
concatenates the user's other fields (user id, side features, ...) to each interest and applies the shared MLP
(``hidden_units``, ReLU: MIND's H layers after the interests, Sec. 3.4), the projection and the L2
normalisation of :class:`~tfrec_recall.layers.towers.Tower` to each interest.

* :class:`MINDTower` (``mind``): B2I dynamic routing (Li et al. 2019), and the dynamic number of interests
  K_u = max(1, min(K, log2 |history|)) (eq. 4; log2 rounded down, the paper leaves the rounding open).
* :class:`ComiRecDRTower` (``comirec_dr``): ComiRec-DR's capsule routing (Cen et al. 2020).
* :class:`ComiRecSATower` (``comirec_sa``): ComiRec-SA's self-attentive extraction over the history (attention
  steered by learned positions), optionally after the SASRec encoder (``encoder_blocks`` > 0).

MIND routes a user's n behaviours into its K_u capsules alone (Algorithm 1); ComiRec keeps all K interests of
any non-empty history, as the paper does (a history shorter than K gives K vectors all the same: ComiRec-DR's
maps differ per position and interest, ComiRec-SA's heads weigh the behaviours differently; their merged
answers never repeat an item). An empty history has one valid interest, a learned default vector.
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from tfrec_recall.features import SpecLike
from tfrec_recall.layers.interest.extractors import (ROUTING_MAPS, B2IRouting, CapsuleRouting,
                                                     CausalSelfAttentionEncoder, SelfAttentiveExtraction)
from tfrec_recall.layers.towers.base import register_tower
from tfrec_recall.layers.towers.mlp import MLPTower
from tfrec_recall._validation import require_dropout, require_int, require_positive_int


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class MultiInterestTower(MLPTower):
    """Base multi-interest tower (module docstring); subclasses implement :meth:`extract`."""

    query_only = True
    multi_interest = True
    label_aware_power = float("inf")  # training's label-aware attention power p (RunConfig: label_aware_power)

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (), num_interests: int = 4,
                 activation: str = "relu", output_dim: int = 64, l2_normalize: bool = True, dropout: float = 0.0,
                 **kwargs):
        super().__init__(features, hidden_units=hidden_units, activation=activation, output_dim=output_dim,
                         l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        self.num_interests = require_positive_int("num_interests", num_interests)
        history = self.history_spec(type(self).__name__)
        self.history_name = history.name
        self.history_length = history.width
        self.history_index = self.encoder.feature_names.index(history.name)
        self.empty_interest = self.add_weight(name="empty_interest", shape=(history.embedding_dim,),
                                              initializer=tf.keras.initializers.RandomNormal(stddev=0.05))

    def extract(self, sequence: tf.Tensor, mask: tf.Tensor, training=None) -> tf.Tensor:
        """K interests ``[batch, K, d]`` of the history embeddings ``[batch, L, d]`` and mask ``[batch, L]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract(sequence, mask, training)")

    def num_valid(self, lengths: tf.Tensor) -> tf.Tensor:
        """How many interests are valid for histories of ``lengths`` real behaviours: K, or 1 (the default
        interest) for an empty history."""
        return tf.where(lengths > 0, self.num_interests, 1)

    def history_lengths(self, inputs) -> tf.Tensor:
        """``[batch]`` int32: the number of real (non-empty) behaviours in each history."""
        raw = tf.reshape(inputs[self.history_name], [-1, self.history_length])
        return tf.reduce_sum(tf.cast(tf.not_equal(raw, ""), tf.int32), axis=1)

    def interest_mask(self, inputs) -> tf.Tensor:
        """``[batch, K]`` bool: true on each user's valid interests (the first :meth:`num_valid`)."""
        valid = self.num_valid(self.history_lengths(inputs))
        return tf.range(self.num_interests)[None, :] < valid[:, None]

    def interests(self, inputs, training=None) -> tf.Tensor:
        """The extracted interests ``[batch, K, d]`` before the MLP; an empty history's are the default."""
        sequence, mask = self.encode_sequence(inputs, self.history_name)
        extracted = self.extract(sequence, mask, training=training)
        empty = ~tf.reduce_any(mask, axis=1)
        return tf.where(empty[:, None, None], self.empty_interest[None, None, :], extracted)

    def call(self, inputs, training=None, field_mask=None):
        interests = self.interests(inputs, training=training)
        others = [f for i, f in enumerate(self.fields(inputs, field_mask)) if i != self.history_index]
        repeated = [tf.repeat(f[:, None, :], self.num_interests, axis=1) for f in others]
        return self.head([interests] + repeated, training=training)

    def get_config(self):
        return {**super().get_config(), "num_interests": self.num_interests}

    @classmethod
    def run_config_options(cls, config) -> dict:
        return {"num_interests": config.num_interests}


@register_tower("mind")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class MINDTower(MultiInterestTower):
    """MIND (Li et al. 2019): B2I routing (:class:`B2IRouting`: ``routing_iterations`` rounds, logits from a
    fixed N(0, ``routing_std``^2) draw) and K_u = max(1, min(K, floor(log2 n))) valid interests. Trained with
    the label-aware attention at p = 2 unless configured (Sec. 3.5; p is chosen on validation)."""

    label_aware_power = 2.0

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (), num_interests: int = 4,
                 routing_iterations: int = 3, routing_std: float = 1.0, routing_seed: int = 0, **kwargs):
        super().__init__(features, hidden_units=hidden_units, num_interests=num_interests, **kwargs)
        require_positive_int("routing_iterations", routing_iterations)  # errors name the tower's arguments
        require_int("routing_seed", routing_seed, minimum=0)
        self.routing = B2IRouting(num_interests, routing_iterations, routing_std, routing_seed, name="b2i_routing")

    def extract(self, sequence, mask, training=None):
        # Algorithm 1: K_u capsules for the user's n behaviours, routed into alone.
        lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
        valid = tf.range(self.num_interests)[None, :] < self.num_valid(lengths)[:, None]
        return self.routing(sequence, mask, valid)

    def num_valid(self, lengths):
        # floor(log2 n) for n >= 1, by float log2 with a guard against rounding just below an exact power of 2.
        n = tf.cast(tf.maximum(lengths, 1), tf.float32)
        log2 = tf.floor(tf.math.log(n) / math.log(2.0) + 1e-6)
        return tf.clip_by_value(tf.cast(log2, tf.int32), 1, self.num_interests)

    def get_config(self):
        return {**super().get_config(), "routing_iterations": self.routing.iterations,
                "routing_std": self.routing.routing_std, "routing_seed": self.routing.seed}

    @classmethod
    def run_config_options(cls, config) -> dict:
        return {**super().run_config_options(config), "routing_iterations": config.routing_iterations}


@register_tower("comirec_dr")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ComiRecDRTower(MultiInterestTower):
    """ComiRec-DR (Cen et al. 2020): :class:`CapsuleRouting` over the history, ``routing_iterations`` rounds,
    ``routing_maps`` "per_position" (the paper) or "per_interest" (shared over the positions)."""

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (), num_interests: int = 4,
                 routing_iterations: int = 3, routing_maps: str = "per_position", **kwargs):
        super().__init__(features, hidden_units=hidden_units, num_interests=num_interests, **kwargs)
        require_positive_int("routing_iterations", routing_iterations)
        if routing_maps not in ROUTING_MAPS:
            raise ValueError(f"routing_maps must be one of {ROUTING_MAPS}, got {routing_maps!r}")
        self.routing = CapsuleRouting(num_interests, routing_iterations, routing_maps, name="capsule_routing")

    def extract(self, sequence, mask, training=None):
        return self.routing(sequence, mask)

    def get_config(self):
        return {**super().get_config(), "routing_iterations": self.routing.iterations,
                "routing_maps": self.routing.maps_kind}

    @classmethod
    def run_config_options(cls, config) -> dict:
        return {**super().run_config_options(config), "routing_iterations": config.routing_iterations,
                "routing_maps": config.routing_maps}


@register_tower("comirec_sa")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ComiRecSATower(MultiInterestTower):
    """ComiRec-SA (Cen et al. 2020): :class:`SelfAttentiveExtraction` (``attention_units``; None: 4 d as in the
    authors' code) attending over the history embeddings plus learned positions and summing the embeddings (as
    the authors' code does: the positions steer the attention, the interests stay in the items' space); with
    ``encoder_blocks`` > 0, attending over and summing the states of the SASRec encoder instead (which adds its
    own positions)."""

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (), num_interests: int = 4,
                 attention_units=None, encoder_blocks: int = 0, encoder_heads: int = 1,
                 attention_dropout: float = 0.2, **kwargs):
        super().__init__(features, hidden_units=hidden_units, num_interests=num_interests, **kwargs)
        dim = self.encoder.specs[self.history_index].embedding_dim
        units = 4 * dim if attention_units is None else require_positive_int("attention_units", attention_units)
        self.extraction = SelfAttentiveExtraction(num_interests, units, name="self_attentive_extraction")
        self.encoder_blocks = require_int("encoder_blocks", encoder_blocks, minimum=0)
        self.encoder_heads = require_positive_int("encoder_heads", encoder_heads)
        self.attention_dropout = require_dropout("attention_dropout", attention_dropout)
        self.sequence_encoder = CausalSelfAttentionEncoder(self.history_length, encoder_blocks,
                                                           encoder_heads, attention_dropout,
                                                           name="self_attention") if encoder_blocks else None
        self.positions = None if encoder_blocks else self.add_weight(
            name="positions", shape=(self.history_length, dim), initializer="glorot_normal")

    def extract(self, sequence, mask, training=None):
        if self.sequence_encoder is not None:
            return self.extraction(self.sequence_encoder(sequence, mask, training=training), mask)
        return self.extraction(sequence + self.positions[None], mask, values=sequence)

    def get_config(self):
        return {**super().get_config(), "attention_units": self.extraction.attention_units,
                "encoder_blocks": self.encoder_blocks, "encoder_heads": self.encoder_heads,
                "attention_dropout": self.attention_dropout}

    @classmethod
    def run_config_options(cls, config) -> dict:
        return {**super().run_config_options(config), "encoder_heads": config.attention_heads,
                "attention_dropout": config.attention_dropout}
