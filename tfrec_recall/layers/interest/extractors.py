"""Sequence encoders and interest extractors: a user's behaviour sequence -> a sequence state or K interests.

Inputs are the unpooled history embeddings ``sequence [B, L, d]`` and their ``mask [B, L]`` (true on real
behaviours), in the raw input's order: most recent first, padding last
(:meth:`tfrec_recall.layers.towers.Tower.encode_sequence`). Padded positions never change an output.

* :func:`squash` and :func:`dynamic_routing`: the capsule routing shared by MIND and ComiRec-DR.
* :class:`B2IRouting`: MIND's behaviour-to-interest routing (Li et al. 2019, "Multi-Interest Network with
  Dynamic Routing for Recommendation at Tmall", Sec. 3.3, Algorithm 1): one bilinear map ``S`` shared by all
  behaviour-interest pairs, routing logits started from a fixed normal draw.
* :class:`CapsuleRouting`: ComiRec-DR's routing (Cen et al. 2020, "Controllable Multi-Interest Framework for
  Recommendation", Sec. 3.2): a bilinear map ``W_ij`` per behaviour position i and interest j, logits started
  at 0 as in the dynamic routing it applies (Sabour et al. 2017, Procedure 1).
* :class:`SelfAttentiveExtraction`: ComiRec-SA's extraction (Cen et al. 2020, Sec. 3.2, eq. 2-3):
  ``A = softmax(W_2^T tanh(W_1 H))`` over the positions, ``V_u = H A``.
* :class:`CausalSelfAttentionEncoder`: SASRec's encoder (Kang & McAuley 2018, "Self-Attentive Sequential
  Recommendation", Sec. III-B/C): learned positions, blocks of causal multi-head self-attention and a
  point-wise feed-forward network, each with a residual connection, layer normalisation and dropout.
"""
from __future__ import annotations

import tensorflow as tf

from tfrec_recall._validation import (require_dropout, require_finite_nonnegative, require_int,
                                      require_positive_int)

SQUASH_EPSILON = 1e-9


def squash(z: tf.Tensor) -> tf.Tensor:
    """The capsule non-linearity (Sabour et al. 2017, eq. 1; MIND eq. 5): ``||z||^2 / (1 + ||z||^2) z / ||z||``
    over the last axis; 0 for z = 0."""
    norm2 = tf.reduce_sum(tf.square(z), axis=-1, keepdims=True)
    return z * (norm2 / (1.0 + norm2)) / tf.sqrt(norm2 + SQUASH_EPSILON)


def dynamic_routing(predictions: tf.Tensor, logits: tf.Tensor, mask: tf.Tensor, iterations: int,
                    interest_mask=None) -> tf.Tensor:
    """Routing by agreement: ``iterations`` times, ``w_ij = softmax_j(b_ij)`` (over the interests j),
    ``z_j = sum_i w_ij p_{j|i}`` over the real behaviours i, ``u_j = squash(z_j)``, ``b_ij += <u_j, p_{j|i}>``.

    ``predictions`` p_{j|i}: ``[B, L, d]`` when shared by every interest (MIND's ``S e_i``) or ``[B, K, L, d]``;
    ``logits`` b: ``[B or 1, K, L]``; ``mask`` ``[B, L]``; ``interest_mask`` ``[B, K]`` (optional): the
    capsules a user routes into (MIND's K_u, Algorithm 1 line 1): the softmax runs over those only, and the
    others come out 0. Returns the interests ``u`` ``[B, K, d]``."""
    shared = predictions.shape.rank == 3
    weigh, agree = ("bkl,bld->bkd", "bkd,bld->bkl") if shared else ("bkl,bkld->bkd", "bkd,bkld->bkl")
    valid = tf.cast(mask, predictions.dtype)[:, None, :]
    logits = tf.cast(logits, predictions.dtype)
    if interest_mask is not None:
        closed = ~tf.cast(interest_mask, tf.bool)[:, :, None]
        logits = tf.where(closed, tf.cast(-1e9, logits.dtype), logits)  # stays closed: agreement adds < 1e9
    interests = None
    for step in range(iterations):
        weights = tf.nn.softmax(logits, axis=1) * valid
        interests = squash(tf.einsum(weigh, weights, predictions))
        if step < iterations - 1:
            logits = logits + tf.einsum(agree, interests, predictions)
    return interests


class _Extractor(tf.keras.layers.Layer):
    """Base of the interest extractors: ``call(sequence [B, L, d], mask [B, L]) -> [B, K, d]``."""

    def __init__(self, num_interests: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_interests = require_positive_int("num_interests", num_interests)

    def get_config(self):
        return {**super().get_config(), "num_interests": self.num_interests}


def _check_routing(iterations: int) -> int:
    return require_positive_int("iterations", iterations)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class B2IRouting(_Extractor):
    """MIND's B2I dynamic routing (module docstring): ``p_{j|i} = S e_i`` with one shared ``S [d, d]``, routing
    logits ``b_ij`` started, for every user afresh, from the same fixed draw of N(0, ``routing_std``^2)
    (``seed``; not trained: the paper's random initialisation, made deterministic so that serving answers
    the same twice), ``iterations`` rounds (3 in the paper)."""

    def __init__(self, num_interests: int = 4, iterations: int = 3, routing_std: float = 1.0, seed: int = 0,
                 **kwargs):
        super().__init__(num_interests, **kwargs)
        self.iterations = _check_routing(iterations)
        self.routing_std = require_finite_nonnegative("routing_std", routing_std)
        self.seed = require_int("seed", seed, minimum=0)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.bilinear = self.add_weight(name="bilinear", shape=(dim, dim), initializer="glorot_normal")
        super().build(input_shape)

    def initial_logits(self, length: int) -> tf.Tensor:
        """The fixed starting routing logits ``[K, length]``."""
        return tf.random.stateless_normal([self.num_interests, length], seed=[self.seed, 0],
                                          stddev=self.routing_std)

    def call(self, sequence, mask, interest_mask=None):
        """K interests ``[B, K, d]``; with ``interest_mask`` ``[B, K]``, routed into the valid capsules only."""
        predictions = tf.einsum("bld,de->ble", sequence, self.bilinear)
        logits = self.initial_logits(tf.shape(sequence)[1])[None]
        return dynamic_routing(predictions, logits, mask, self.iterations, interest_mask)

    def get_config(self):
        return {**super().get_config(), "iterations": self.iterations, "routing_std": self.routing_std,
                "seed": self.seed}


ROUTING_MAPS = ("per_position", "per_interest")


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class CapsuleRouting(_Extractor):
    """ComiRec-DR's routing (module docstring): ``p_{j|i} = W_ij e_i`` with a map ``W_ij [d, d]`` for each
    behaviour position i (the sequence length is fixed when the layer is built) and interest j
    (``maps="per_position"``, the paper's and the authors' ComiRec-DR), or one map ``W_j`` per interest shared by
    every position (``maps="per_interest"``: the authors' code's other bilinear type, with L times fewer
    weights); routing logits start at 0; ``iterations`` rounds (3 in the paper)."""

    def __init__(self, num_interests: int = 4, iterations: int = 3, maps: str = "per_position", **kwargs):
        super().__init__(num_interests, **kwargs)
        self.iterations = _check_routing(iterations)
        if maps not in ROUTING_MAPS:
            raise ValueError(f"maps must be one of {ROUTING_MAPS}, got {maps!r}")
        self.maps_kind = maps

    def build(self, input_shape):
        length, dim = input_shape[-2], int(input_shape[-1])
        if length is None and self.maps_kind == "per_position":
            raise ValueError("CapsuleRouting needs a fixed sequence length (one map per position), got shape "
                             f"{input_shape}")
        # Glorot scale of one d x d map (Keras's glorot on a 4-D shape would count L * K maps into the fan-in
        # and start every prediction near 0, where squash flattens the routing).
        positions = (int(length),) if self.maps_kind == "per_position" else ()
        self.maps = self.add_weight(name="maps", shape=positions + (self.num_interests, dim, dim),
                                    initializer=tf.keras.initializers.TruncatedNormal(stddev=(1.0 / dim) ** 0.5))
        super().build(input_shape)

    def call(self, sequence, mask):
        pattern = "bli,lkio->bklo" if self.maps_kind == "per_position" else "bli,kio->bklo"
        predictions = tf.einsum(pattern, sequence, self.maps)
        logits = tf.zeros([1, self.num_interests, tf.shape(sequence)[1]], sequence.dtype)
        return dynamic_routing(predictions, logits, mask, self.iterations)

    def get_config(self):
        return {**super().get_config(), "iterations": self.iterations, "maps": self.maps_kind}


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class SelfAttentiveExtraction(_Extractor):
    """ComiRec-SA's multi-interest extraction (Cen et al. 2020, eq. 2-3): ``a_k = softmax_i(w_{2,k}^T
    tanh(W_1 h_i))`` over the real positions i, interest ``k`` = ``sum_i a_{k,i} h_i``. ``W_1 [attention_units,
    d]`` and ``W_2 [attention_units, K]`` have no bias, as in the paper. A user without behaviours gets zeros."""

    def __init__(self, num_interests: int = 4, attention_units: int = 256, **kwargs):
        super().__init__(num_interests, **kwargs)
        self.attention_units = require_positive_int("attention_units", attention_units)
        self.hidden = tf.keras.layers.Dense(attention_units, activation="tanh", use_bias=False, name="w1")
        self.heads = tf.keras.layers.Dense(num_interests, use_bias=False, name="w2")

    def attention(self, sequence, mask) -> tf.Tensor:
        """The weights ``A`` ``[B, K, L]``: each interest's softmax over the real positions (0 on padding)."""
        logits = tf.transpose(self.heads(self.hidden(sequence)), [0, 2, 1])  # [B, K, L]
        valid = tf.cast(mask, tf.bool)[:, None, :]
        logits = tf.where(valid, logits, tf.cast(-1e9, logits.dtype))
        return tf.nn.softmax(logits, axis=-1) * tf.cast(valid, logits.dtype)

    def call(self, sequence, mask, values=None):
        """Interests ``[B, K, d]``: the attention over ``sequence`` applied to ``values`` ``[B, L, d']`` (default:
        ``sequence`` itself; the authors' code attends over the embeddings plus positions and sums the plain
        embeddings)."""
        return tf.einsum("bkl,bld->bkd", self.attention(sequence, mask), sequence if values is None else values)

    def get_config(self):
        return {**super().get_config(), "attention_units": self.attention_units}


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class CausalSelfAttentionEncoder(tf.keras.layers.Layer):
    """SASRec's encoder (module docstring) over a most-recent-first sequence ``[B, L, d]``: adds learned
    position embeddings (position 0 = the most recent behaviour), then ``num_blocks`` blocks of
    ``x += Dropout(MultiHeadAttention(LN(x)))`` and ``x += Dropout(FFN(LN(x)))`` (FFN: Dense(d, ReLU) ->
    Dense(d)), then a final layer normalisation. Causal: a behaviour attends to itself and to older ones only
    (positions j >= i), never to padding; padded positions output 0. The state at position 0 has seen the
    whole history: it is the user's sequence representation (:meth:`last_state`)."""

    def __init__(self, max_length: int, num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.max_length = require_positive_int("max_length", max_length)
        self.num_blocks = require_int("num_blocks", num_blocks, minimum=1)
        self.num_heads = require_positive_int("num_heads", num_heads)
        self.dropout_rate = require_dropout("dropout", dropout)
        self.dropout = tf.keras.layers.Dropout(self.dropout_rate)

    def build(self, input_shape):
        dim, length = int(input_shape[-1]), input_shape[-2]
        self._check_length(length)
        if dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide the sequence embedding width ({dim})")
        self.positions = self.add_weight(name="positions", shape=(self.max_length, dim), initializer="glorot_normal")
        self.blocks = [self._block(i, dim) for i in range(self.num_blocks)]
        self.final_norm = tf.keras.layers.LayerNormalization(name="final_norm")
        super().build(input_shape)

    def _check_length(self, length) -> None:
        if length is not None and int(length) > self.max_length:
            raise ValueError(f"the sequence has {int(length)} positions but the encoder learned max_length="
                             f"{self.max_length} position embeddings: truncate the history to {self.max_length} "
                             "or build the encoder with a larger max_length")

    def _block(self, i: int, dim: int) -> dict:
        return {"norm_1": tf.keras.layers.LayerNormalization(name=f"block_{i}_norm_1"),
                "attention": tf.keras.layers.MultiHeadAttention(self.num_heads, dim // self.num_heads,
                                                                dropout=self.dropout_rate, name=f"block_{i}_attention"),
                "norm_2": tf.keras.layers.LayerNormalization(name=f"block_{i}_norm_2"),
                "ffn_1": tf.keras.layers.Dense(dim, activation="relu", name=f"block_{i}_ffn_1"),
                "ffn_2": tf.keras.layers.Dense(dim, name=f"block_{i}_ffn_2")}

    def attention_mask(self, mask) -> tf.Tensor:
        """``[B, L, L]``: query i may attend key j when j >= i (j is not newer) and j is a real behaviour."""
        length = tf.shape(mask)[1]
        not_newer = tf.linalg.band_part(tf.ones([length, length], tf.bool), 0, -1)  # upper triangle: j >= i
        return not_newer[None] & tf.cast(mask, tf.bool)[:, None, :]

    def call(self, sequence, mask, training=None):
        self._check_length(sequence.shape[1])
        length = sequence.shape[1] if sequence.shape[1] is not None else tf.shape(sequence)[1]
        valid = tf.cast(mask, sequence.dtype)[..., None]
        x = self.dropout(sequence + self.positions[None, :length], training=training) * valid
        attend = self.attention_mask(mask)
        for block in self.blocks:
            y = block["norm_1"](x)
            x = x + self.dropout(block["attention"](y, y, attention_mask=attend, training=training),
                                 training=training)
            y = block["ffn_2"](block["ffn_1"](block["norm_2"](x)))
            x = (x + self.dropout(y, training=training)) * valid
        return self.final_norm(x) * valid

    @staticmethod
    def last_state(states: tf.Tensor) -> tf.Tensor:
        """The state of the most recent behaviour ``[B, d]`` (position 0)."""
        return states[:, 0]

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length, "num_blocks": self.num_blocks,
                "num_heads": self.num_heads, "dropout": self.dropout_rate}

