"""The SDM user tower (Lv et al. 2019, "SDM: Sequential Deep Matching Model for Online Large-scale Recommender
System"): one user vector fusing the short-term preference of the current session with the long-term preference
of the behaviours before it.

* The session (Sec. 3.1): :func:`~tfrec_recall.layers.interest.sessions.current_session` over the history and
  its timestamps (the ``history_times`` input, :class:`~tfrec_recall.features.SequenceTimesFeature`), split by
  ``session_gap`` (in the timestamps' unit) and capped at ``session_length`` behaviours.
* Short term (Sec. 3.3): each session item is its id embedding concatenated with its side-feature embeddings
  (``item_side``), run through an LSTM in time order (eq. 3-4), multi-head self-attention over the session
  (eq. 5-6) and the user attention (eq. 7-8).
* Long term (Sec. 3.4): one user attention per feature set over the behaviours before the session (item ids and
  each side feature; eq. 9-10), concatenated and ``tanh(W z + b)`` (eq. 11).
* The gate (Sec. 3.5, eq. 12): ``o = (1 - G) * p + G * s``; then the tower's projection and L2 normalisation.

``e_u``, the user profile the attentions and the gate read, is the concatenation of the tower's fields other
than the history (user id, user side features); a tower without any reads a learned vector instead. A user with
an empty history gets a learned default vector.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall.features import SequenceTimesFeature, SpecLike, as_spec
from tfrec_recall.layers.interest.sessions import GatedFusion, UserAttentionPooling, current_session
from tfrec_recall.layers.towers.base import register_tower
from tfrec_recall.layers.towers.mlp import MLPTower
from tfrec_recall._validation import require_dropout, require_finite_nonnegative, require_positive_int


def _times_spec(specs) -> SequenceTimesFeature:
    times = [s for s in specs if isinstance(s, SequenceTimesFeature)]
    if len(times) != 1:
        raise ValueError("SDMTower needs exactly one SequenceTimesFeature (the history's timestamps) among its "
                         f"features, got {[f'{s.name}:{s.kind}' for s in specs]}")
    return times[0]


@register_tower("sdm")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class SDMTower(MLPTower):
    """SDM (module docstring). ``item_side``: ``{feature name: the value of each history vocabulary item, in
    vocabulary order}`` (categorical item features; ``""`` for none); ``num_heads`` / ``attention_dropout``: the
    session self-attention's."""

    query_only = True

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (),
                 item_side: Optional[Mapping[str, Sequence[str]]] = None, side_embedding_dim: int = 16,
                 session_gap: float = 600.0, session_length: int = 10, num_heads: int = 1,
                 attention_dropout: float = 0.2, **kwargs):
        specs = [as_spec(f) for f in features]
        times = _times_spec(specs)
        super().__init__([s for s in specs if s is not times], hidden_units=hidden_units, **kwargs)
        self.times_spec = times
        history = self.history_spec("SDMTower")
        if self.times_spec.max_len != history.width:
            raise ValueError(f"{self.times_spec.name}.max_len ({self.times_spec.max_len}) must equal the history's "
                             f"max_len ({history.width}): one timestamp per behaviour")
        self.history_name, self.history_length = history.name, history.width
        self.history_index = self.encoder.feature_names.index(history.name)
        self.session_gap = require_finite_nonnegative("session_gap", session_gap)
        self.session_length = require_positive_int("session_length", session_length)
        self.side_embedding_dim = require_positive_int("side_embedding_dim", side_embedding_dim)
        self.attention_dropout = require_dropout("attention_dropout", attention_dropout)
        dim = history.embedding_dim
        if require_positive_int("num_heads", num_heads) and dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the history embedding width ({dim})")
        self.num_heads = num_heads
        self._build_side(history, item_side or {})
        self.lstm = tf.keras.layers.LSTM(dim, return_sequences=True, name="session_lstm")
        self.session_attention = tf.keras.layers.MultiHeadAttention(num_heads, dim // num_heads,
                                                                    dropout=attention_dropout, name="session_attention")
        self.short_pooling = UserAttentionPooling(dim, name="short_term_attention")
        self.long_pooling = [UserAttentionPooling(dim, name="long_term_attention_item")] + [
            UserAttentionPooling(side_embedding_dim, name=f"long_term_attention_{name}") for name in self.item_side]
        self.long_projection = tf.keras.layers.Dense(dim, activation="tanh", name="long_term")
        self.fusion = GatedFusion(dim, name="gate")
        self.empty_history = self.add_weight(name="empty_history", shape=(dim,),
                                             initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        # e_u when the tower has no field besides the history (a weight only then: Keras warns of unused ones)
        self.default_profile = None if self.num_fields > 1 else self.add_weight(
            name="default_profile", shape=(dim,), initializer=tf.keras.initializers.RandomNormal(stddev=0.05))

    def _build_side(self, history, item_side: Mapping[str, Sequence[str]]) -> None:
        """Per side feature: the code of each history vocabulary item (0: unknown) and an embedding table."""
        if item_side and not history.has_vocabulary:
            raise ValueError("item_side needs a history with a vocabulary (a hashed history has no item list)")
        self.item_side = {}
        self._side_codes, self.side_embeddings = {}, {}
        tokens = history.vocabulary_tokens() if item_side else ()
        for name, values in item_side.items():
            values = tuple("" if v is None else str(v) for v in values)
            if len(values) != len(tokens):
                raise ValueError(f"item_side[{name!r}] has {len(values)} values but the history vocabulary has "
                                 f"{len(tokens)} items: one value per item, in vocabulary order")
            labels = sorted({v for v in values if v})
            code = {v: i + 1 for i, v in enumerate(labels)}
            self.item_side[name] = values
            # index 0 of the lookup is the OOV / padding item: code 0 (unknown), as items without a value
            self._side_codes[name] = tf.constant([0] + [code.get(v, 0) for v in values], tf.int64)
            self.side_embeddings[name] = tf.keras.layers.Embedding(len(labels) + 1, self.side_embedding_dim,
                                                                   name=f"{name}_side_embedding")
        self.item_lookup = tf.keras.layers.StringLookup(vocabulary=history.lookup_vocabulary(), num_oov_indices=1,
                                                        name="item_side_lookup") if item_side else None

    @property
    def input_specs(self):
        specs = super().input_specs
        return specs[:self.history_index + 1] + [self.times_spec] + specs[self.history_index + 1:]

    def side_vectors(self, inputs) -> list:
        """``[batch, L, side_embedding_dim]`` per side feature, for each history position."""
        if self.item_lookup is None:
            return []
        indices = self.item_lookup(tf.reshape(inputs[self.history_name], [-1, self.history_length]))
        return [self.side_embeddings[name](tf.gather(self._side_codes[name], indices)) for name in self.item_side]

    def profile(self, fields) -> tf.Tensor:
        """``e_u`` ``[batch, width]``: the fields other than the history, or the learned default profile."""
        others = [f for i, f in enumerate(fields) if i != self.history_index]
        if self.default_profile is None:
            return tf.concat(others, axis=-1)
        return tf.tile(self.default_profile[None], [tf.shape(fields[0])[0], 1])

    def sessions(self, inputs, mask) -> tf.Tensor:
        """``[batch, L]`` bool: the positions of each user's current session."""
        times = tf.reshape(inputs[self.times_spec.name], [-1, self.history_length])
        return current_session(times, mask, self.session_gap, self.session_length)

    def short_term(self, items, session, user, training=None) -> tf.Tensor:
        """``s`` ``[batch, d]``: LSTM in time order, self-attention and user attention over the session."""
        length = min(self.session_length, self.history_length)
        items, session = items[:, :length], session[:, :length]
        count = tf.reduce_sum(tf.cast(session, tf.int32), axis=1)
        # The session is a prefix, most recent first: reversing that prefix puts it in time order.
        ordered = tf.reverse_sequence(items, count, seq_axis=1, batch_axis=0)
        states = self.lstm(ordered, mask=session, training=training)
        pairs = session[:, :, None] & session[:, None, :]
        states = self.session_attention(states, states, attention_mask=pairs, training=training)
        return self.short_pooling(states, session, user)

    def long_term(self, sequence, sides, before, user) -> tf.Tensor:
        """``p`` ``[batch, d]``: user attention over each feature set of the behaviours ``before`` the session."""
        pooled = [pool(vectors, before, user) for pool, vectors in zip(self.long_pooling, [sequence] + sides)]
        return self.long_projection(tf.concat(pooled, axis=-1))

    def call(self, inputs, training=None, field_mask=None):
        fields = self.fields(inputs, field_mask)
        user = self.profile(fields)
        sequence, mask = self.encode_sequence(inputs, self.history_name)
        sides = self.side_vectors(inputs)
        session = self.sessions(inputs, mask)
        short = self.short_term(tf.concat([sequence] + sides, axis=-1), session, user, training=training)
        long = self.long_term(sequence, sides, mask & ~session, user)
        fused = self.fusion(user, short, long)
        fused = tf.where(tf.reduce_any(mask, axis=1, keepdims=True), fused, self.empty_history[None, :])
        return self.head([fused], training=training)

    def get_config(self):
        return {**super().get_config(),
                "features": [s.to_dict() for s in self.encoder.specs] + [self.times_spec.to_dict()],
                "item_side": {name: list(values) for name, values in self.item_side.items()},
                "side_embedding_dim": self.side_embedding_dim, "session_gap": self.session_gap,
                "session_length": self.session_length, "num_heads": self.num_heads,
                "attention_dropout": self.attention_dropout}

    @classmethod
    def run_config_options(cls, config) -> dict:
        return {"session_gap": config.session_gap, "session_length": config.session_length,
                "num_heads": config.attention_heads, "attention_dropout": config.attention_dropout,
                "side_embedding_dim": config.side_embedding_dim}

    @classmethod
    def from_split(cls, specs, config, split):
        """The history's timestamps as one more input, and (with ``use_side_features``) the first value of each
        categorical item feature of every history vocabulary item."""
        from tfrec_recall.config import ConfigError
        from tfrec_recall.features import HISTORY_TIMES, SequenceFeature
        history = next((s for s in specs if isinstance(s, SequenceFeature)), None)
        if history is None:
            return list(specs), {}
        if split.train_times is None or HISTORY_TIMES not in split.train.columns:
            raise ConfigError("config key 'query_tower': sdm reads the history's timestamps (history_times), which "
                              "this split does not carry (the TFX pipeline's examples have none yet), got 'sdm'")
        extra = {"item_side": item_side_values(split.data, history.vocabulary_tokens()) if config.use_side_features else {}}
        return list(specs) + [SequenceTimesFeature(HISTORY_TIMES, max_len=history.width)], extra


def item_side_values(data, vocabulary) -> dict:
    """``{column: value per vocabulary item}`` for the categorical and multi-categorical item features of
    ``data`` (a list's first value: e.g. a movie's first listed genre); ``""`` where an item has none."""
    table = data.item_features
    if table is None or vocabulary is None:
        return {}
    out = {}
    for column in table.columns:
        if data.feature_kinds.get(column) not in ("categorical", "multi_categorical"):
            continue
        out[column] = [_first(v) for v in table[column].reindex(pd.Index(list(vocabulary)))]
    return out


def _first(value) -> str:
    if isinstance(value, (tuple, list, np.ndarray)):
        return str(value[0]) if len(value) else ""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
