"""Scorers: query embeddings x candidate embeddings -> logits ``[num_queries, num_candidates]``.

A :class:`~tfrec_recall.tasks.retrieval.RetrievalTask` computes its logits with a plugged-in scorer; the
variants are classes, not flags:

* :class:`DotScorer`: one query vector per user, ``s(u, y) = <u, y>`` (the default; what the task always did).
* :class:`MaxInterestScorer`: K interest vectors per user (MIND, ComiRec), ``s(u, y) = max_k <u_k, y>``
  over the user's valid interests: how a multi-interest user is served.
* :class:`LabelAwareAttentionScorer`: MIND's label-aware attention (Li et al. 2019): the user vector is an
  attention-weighted sum of the interests, the weights computed against the target item.

Every scorer is called as ``scorer(queries, candidates, targets=None, interest_mask=None)``: ``queries`` is
``[B, d]`` or ``[B, K, d]``, ``candidates`` ``[N, d]``, ``targets`` ``[B, d]`` the embeddings of each query's
positive item (the task passes them in training; only the label-aware scorer reads them) and
``interest_mask`` ``[B, K]`` (true on valid interests; read by the multi-interest scorers).
"""
from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

LARGE_NEGATIVE = -1e9  # the score of a masked interest


def _interests(queries: tf.Tensor, scorer: str) -> tf.Tensor:
    queries = tf.convert_to_tensor(queries)
    if queries.shape.rank is not None and queries.shape.rank != 3:
        raise ValueError(f"{scorer} needs queries of shape [batch, num_interests, dim], got {queries.shape}")
    return queries


def _interest_logits(queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
    """<u_k, y_n> for every user b, interest k and candidate n: ``[B, K, N]``."""
    return tf.einsum("bkd,nd->bkn", queries, tf.cast(candidates, queries.dtype))


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class Scorer(tf.keras.layers.Layer):
    """Base scorer: subclasses implement :meth:`call` (see the module docstring for the signature). It takes
    only the Keras layer arguments (``name``, ``trainable``, ``dtype``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def call(self, queries, candidates, targets=None, interest_mask=None):
        raise NotImplementedError(f"{type(self).__name__} must implement call(queries, candidates, targets, "
                                  "interest_mask)")

    def get_config(self):
        return super().get_config()


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class DotScorer(Scorer):
    """``s(u, y) = <u, y>``: queries ``[B, d]`` x candidates ``[N, d]`` -> ``[B, N]`` (one matmul)."""

    def call(self, queries, candidates, targets=None, interest_mask=None):
        if interest_mask is not None:
            raise ValueError("DotScorer scores one query vector per user and takes no interest_mask; use "
                             "MaxInterestScorer or LabelAwareAttentionScorer for multi-interest queries")
        return tf.linalg.matmul(queries, candidates, transpose_b=True)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class MaxInterestScorer(Scorer):
    """``s(u, y) = max_k <u_k, y>`` over the user's valid interests (``interest_mask`` [B, K], true = valid):
    queries ``[B, K, d]`` x candidates ``[N, d]`` -> ``[B, N]``. This is how MIND (Li et al. 2019, Sec. 3.6)
    and ComiRec serve a multi-interest user: each interest retrieves, and an item's score is its best one. A
    user whose interests are all masked scores ``LARGE_NEGATIVE`` (-1e9) everywhere."""

    def call(self, queries, candidates, targets=None, interest_mask=None):
        logits = _interest_logits(_interests(queries, "MaxInterestScorer"), candidates)
        if interest_mask is not None:
            valid = tf.cast(interest_mask, tf.bool)[:, :, None]
            logits = tf.where(valid, logits, tf.cast(LARGE_NEGATIVE, logits.dtype))
        return tf.reduce_max(logits, axis=1)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class LabelAwareAttentionScorer(Scorer):
    """MIND's label-aware attention (Li et al. 2019, "Multi-Interest Network with Dynamic Routing for
    Recommendation at Tmall", Sec. 3.5, the label-aware attention layer):

        v_u = Attention(e_i, V_u, V_u) = V_u softmax(pow(V_u^T e_i, p)),

    with V_u = [u_1 .. u_K] the user's interest capsules, e_i the label (target) item's embedding and ``pow``
    elementwise. The user vector is v_u = sum_k w_k u_k, w = softmax_k(<u_k, e_i>^p) over the valid
    interests (``interest_mask``); p = 0 weighs the interests equally, and as p grows the attention tends to
    the hard max (the interest with the largest score > 1 takes all the weight).

    * With ``targets`` ``[B, d]`` (training: each query's positive item is the label, as in the paper), each
      user's vector v_u is built once from its own target and scored against every candidate:
      ``s(u, y_n) = <v_u(target_u), y_n>``.
    * Without ``targets``, every candidate is its own label: ``s(u, y_n) = <v_u(y_n), y_n> =
      sum_k w_k(y_n) <u_k, y_n>``.

    ``p`` (``power``, default 2 as in the paper's experiments) is a number >= 0 or ``inf``: p = inf is the
    hard max, all the weight on the interest scoring highest against the label (what ComiRec trains with, Cen et
    al. 2020, Sec. 3.3: v_u = V_u[:, argmax(V_u^T e_i)]). Like the paper, ``pow``
    is the real power: a non-integer ``power`` gives NaN for negative scores <u_k, e_i>, so use it only with
    non-negative scores (e.g. non-negative embeddings); an integer ``power`` is defined for every score. The
    logits pow(score, p) overflow float32 (NaN weights) once |score| ** p exceeds ~3.4e38, so keep p modest for
    unnormalised embeddings (with L2-normalised ones |score| <= 1 and nothing overflows).
    """

    def __init__(self, power: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or math.isnan(power) or power < 0:
            raise ValueError(f"power must be a number >= 0 or inf, got {power!r}")
        self.power = float(power)

    def attention(self, scores: tf.Tensor, interest_mask: Optional[tf.Tensor] = None, axis: int = 1) -> tf.Tensor:
        """softmax over the interests (``axis``) of pow(scores, p), masked interests weighing 0; with p = inf
        the one-hot of the best valid interest."""
        hard = math.isinf(self.power)
        logits = scores if hard else tf.pow(scores, tf.cast(self.power, scores.dtype))
        if interest_mask is not None:
            valid = tf.cast(interest_mask, tf.bool)
            valid = valid[:, :, None] if scores.shape.rank == 3 else valid
            logits = tf.where(valid, logits, tf.cast(LARGE_NEGATIVE, logits.dtype))
        if hard:
            depth = tf.shape(logits)[axis]
            one_hot = tf.one_hot(tf.argmax(logits, axis=axis), depth, axis=axis, dtype=scores.dtype)
            return tf.stop_gradient(one_hot)
        return tf.nn.softmax(logits, axis=axis)

    def call(self, queries, candidates, targets=None, interest_mask=None):
        queries = _interests(queries, "LabelAwareAttentionScorer")
        candidates = tf.cast(candidates, queries.dtype)
        if targets is None:
            scores = _interest_logits(queries, candidates)  # [B, K, N]: every candidate its own label
            return tf.reduce_sum(self.attention(scores, interest_mask) * scores, axis=1)
        scores = tf.einsum("bkd,bd->bk", queries, tf.cast(targets, queries.dtype))
        user = tf.einsum("bk,bkd->bd", self.attention(scores, interest_mask), queries)
        return tf.linalg.matmul(user, candidates, transpose_b=True)

    def get_config(self):
        return {**super().get_config(), "power": self.power}
