"""SDM's building blocks (Lv et al. 2019, "SDM: Sequential Deep Matching Model for Online Large-scale
Recommender System", Sec. 3): the current session of a history, the user attention that pools a set of vectors
by the user's profile, and the gated fusion of the short- and long-term preferences.

* :func:`current_session`: Sec. 3.1's session rule on a most-recent-first history: the latest behaviour and
  every older one reached without a gap above ``gap`` between adjacent behaviours, at most ``max_length``
  behaviours (the paper merges adjacent behaviours less than a time gap apart and caps the session's length).
* :class:`UserAttentionPooling`: eq. 7-8 (short term) and eq. 9-10 (long term): ``a_k = softmax_k(x_k^T e_u)``
  over the real positions, ``sum_k a_k x_k``; ``e_u`` is mapped linearly to the vectors' width (the paper's
  dimensions agree by construction).
* :class:`GatedFusion`: eq. 11-12: ``G = sigmoid(W_1 e_u + W_2 s + W_3 p + b)``, ``o = (1 - G) * p + G * s``.
"""
from __future__ import annotations

import tensorflow as tf

from tfrec_recall._validation import require_positive_int


def current_session(times: tf.Tensor, mask: tf.Tensor, gap: float, max_length: int) -> tf.Tensor:
    """``[B, L]`` bool: the positions of the latest session in a most-recent-first history with timestamps
    ``times`` ``[B, L]`` and real positions ``mask``: position 0 if real, then each next (older) position while it
    is real, at most ``gap`` older than the one before it, and within the first ``max_length``."""
    times = tf.cast(times, tf.float64)
    steps = tf.abs(times[:, :-1] - times[:, 1:]) <= gap  # position i + 1 joins i's session
    joins = tf.concat([tf.ones_like(times[:, :1], tf.bool), steps], axis=1) & tf.cast(mask, tf.bool)
    prefix = tf.math.cumprod(tf.cast(joins, tf.int32), axis=1) > 0
    return prefix & (tf.range(tf.shape(times)[1]) < max_length)[None, :]


def masked_softmax(logits: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Softmax over the last axis on the ``mask``'s positions, 0 elsewhere (all 0 when none is real)."""
    mask = tf.cast(mask, tf.bool)
    weights = tf.nn.softmax(tf.where(mask, logits, tf.cast(-1e9, logits.dtype)), axis=-1)
    return weights * tf.cast(mask, logits.dtype)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class UserAttentionPooling(tf.keras.layers.Layer):
    """``call(vectors [B, L, width], mask [B, L], user [B, u])`` -> ``[B, width]``: SDM's user attention (module
    docstring) with ``e_u`` mapped to ``width`` by a learned matrix (no bias); zeros for a row without real
    positions."""

    def __init__(self, width: int, **kwargs):
        super().__init__(**kwargs)
        self.width = require_positive_int("width", width)
        self.query = tf.keras.layers.Dense(width, use_bias=False, name="user_query")

    def attention(self, vectors, mask, user) -> tf.Tensor:
        """The weights ``a`` ``[B, L]``."""
        return masked_softmax(tf.einsum("bld,bd->bl", vectors, self.query(user)), mask)

    def call(self, vectors, mask, user):
        return tf.einsum("bl,bld->bd", self.attention(vectors, mask, user), vectors)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class GatedFusion(tf.keras.layers.Layer):
    """``call(user [B, u], short [B, d], long [B, d])`` -> ``[B, d]``: SDM's gate (module docstring);
    ``W_1``, ``W_2`` without bias, ``W_3`` with the gate's bias ``b``."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = require_positive_int("units", units)
        self.from_user = tf.keras.layers.Dense(units, use_bias=False, name="w1")
        self.from_short = tf.keras.layers.Dense(units, use_bias=False, name="w2")
        self.from_long = tf.keras.layers.Dense(units, name="w3")

    def gate(self, user, short, long) -> tf.Tensor:
        return tf.sigmoid(self.from_user(user) + self.from_short(short) + self.from_long(long))

    def call(self, user, short, long):
        gate = self.gate(user, short, long)
        return (1.0 - gate) * long + gate * short

    def get_config(self):
        return {**super().get_config(), "units": self.units}
