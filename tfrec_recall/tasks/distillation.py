"""Knowledge distillation into the two-tower student: :class:`DistillationLoss`, an auxiliary loss pulling the
student's in-batch scores towards a frozen teacher's scores on the same in-batch candidates.

Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", sec. 2: the student matches the teacher's
softened distribution ``softmax(t / tau)`` with its own ``softmax(s / tau)``, and the loss is scaled by
``tau ** 2`` so that its gradients keep the same magnitude whatever the temperature. In retrieval the teacher
is typically a more expressive ranking model that sees the (user, item) features jointly (e.g.
:class:`~tfrec_recall.models.teacher.CrossFeatureRanker`, a Deep & Cross Network, Wang et al. 2021), which the
two towers cannot (the distillation row of the survey's training-objective table).
"""
from __future__ import annotations

from typing import List, Optional

import tensorflow as tf

from tfrec_recall._validation import require_finite_positive, require_positive_int
from tfrec_recall.tasks.auxiliary import AuxiliaryLoss

_serialize = tf.keras.utils.serialize_keras_object
_deserialize = tf.keras.utils.deserialize_keras_object


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class DistillationLoss(AuxiliaryLoss):
    """KL distillation of a teacher's in-batch scores (Hinton et al. 2015, sec. 2).

    With B queries in the batch, the candidates are the first ``N = min(num_candidates or B, B)`` rows of the
    batch (their in-batch positives). The student's logits are those its own softmax uses: the dot products
    ``s = query_embeddings @ candidate_embeddings[:N]^T / T`` ([B, N]), T the retrieval task's temperature when
    the loss is attached to a model with one (1 otherwise); the teacher's are
    ``t = teacher.score_pairs(features, features[:N], training=False)`` ([B, N], every query row against every
    candidate row; no gradient flows into the teacher). The loss is

        ``tau ** 2 * mean_i KL(softmax(t_i / tau) || softmax(s_i / tau))``.

    Distilling the logits of the student's softmax (Hinton et al.) matters with L2-normalised towers: raw
    cosines in [-1, 1] could not reach a peaked teacher distribution at tau = 1.

    ``teacher``: a Keras layer or model with ``score_pairs(query_features, candidate_features, training)``
    returning ``[Bq, Bc]`` logits; it is frozen (``trainable = False``). Its ``query_feature_specs()`` and
    ``candidate_feature_specs()``, when it has them, are the raw features :meth:`feature_specs` asks the
    training batch to carry. The teacher's scores cost ``O(B * N)`` pair evaluations per step: bound ``N``
    with ``num_candidates`` (``None`` or a positive integer) for large batches.
    """

    def __init__(self, teacher: tf.keras.layers.Layer, weight: float = 1.0, temperature: float = 1.0,
                 num_candidates: Optional[int] = None, **kwargs):
        super().__init__(weight=weight, **kwargs)
        if not isinstance(teacher, tf.keras.layers.Layer) or not callable(getattr(teacher, "score_pairs", None)):
            raise ValueError("teacher must be a Keras layer or model with a score_pairs(query_features, "
                             f"candidate_features, training) method, got {teacher!r}")
        self.temperature = require_finite_positive("temperature", temperature)
        self.num_candidates = None if num_candidates is None else require_positive_int("num_candidates",
                                                                                       num_candidates)
        teacher.trainable = False
        self.teacher = teacher

    @property
    def trainable_weights(self):
        """Empty: the teacher stays frozen even when its flag is set again (``model.trainable = True`` sets every
        sublayer's flag, and so does loading a SavedModel), so no optimizer ever sees its variables."""
        return []

    @property
    def non_trainable_weights(self):
        self._update_trackables()
        return self._dedup_weights(self._trainable_weights + self._non_trainable_weights
                                   + self._gather_children_attribute("variables"))

    def feature_specs(self) -> List:
        """The teacher's query and candidate feature specs (raw features the training batch must carry)."""
        specs = []
        for method in ("query_feature_specs", "candidate_feature_specs"):
            if callable(getattr(self.teacher, method, None)):
                specs += list(getattr(self.teacher, method)())
        return specs

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        query = tf.cast(query_embeddings, tf.float32)
        batch = tf.shape(query)[0]
        n = batch if self.num_candidates is None else tf.minimum(self.num_candidates, batch)
        candidates = tf.cast(candidate_embeddings, tf.float32)[:n]
        student = tf.matmul(query, candidates, transpose_b=True) / self._student_temperature()  # [B, N]
        candidate_features = {key: value[:n] for key, value in features.items()}
        teacher = tf.stop_gradient(tf.cast(self.teacher.score_pairs(features, candidate_features, training=False),
                                           tf.float32))
        tau = self.temperature
        teacher_log_p = tf.nn.log_softmax(teacher / tau, axis=-1)
        student_log_p = tf.nn.log_softmax(student / tau, axis=-1)
        kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)  # [B]
        return tau ** 2 * tf.reduce_mean(kl)

    def _student_temperature(self) -> float:
        model = self._model_ref.model
        temperature = getattr(getattr(model, "task", None), "temperature", None)
        return float(temperature) if temperature else 1.0

    def get_config(self):
        return {**super().get_config(), "teacher": _serialize(self.teacher), "temperature": self.temperature,
                "num_candidates": self.num_candidates}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = _deserialize(config["teacher"])
        return cls(**config)
