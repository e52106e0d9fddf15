"""Auxiliary losses: the base class every extra training loss derives from, and :class:`AlignmentLoss`.

A model (:class:`~tfrec_recall.models.RetrievalModel`) adds ``sum_i weight_i * aux_i`` to its main loss and logs
each auxiliary loss under its layer name. A loss

* is called with ``(features, query_embeddings, candidate_embeddings, training)`` and returns a scalar;
* may read the model it was added to (:attr:`AuxiliaryLoss.model`, e.g. to run the candidate tower on other
  inputs, or to read a tower's augmented vectors): the model calls :meth:`AuxiliaryLoss.attach` when the loss is
  added, and keeps the reference outside TensorFlow's tracking, so it changes no checkpoint;
* may need raw features the towers do not read (a category for an alignment loss, a teacher's inputs): it lists
  their specs in :meth:`AuxiliaryLoss.feature_specs`, and the training arrays carry them.
"""
from __future__ import annotations

from typing import List

import tensorflow as tf

from tfrec_recall._validation import require_finite_nonnegative


class _ModelRef:
    """A plain holder (Keras neither tracks nor saves what it holds): the model a loss was added to."""

    def __init__(self):
        self.model = None


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class AuxiliaryLoss(tf.keras.layers.Layer):
    """Base of the auxiliary losses: ``call(features, query_embeddings, candidate_embeddings, training)`` ->
    a scalar, added to the model's loss times ``weight`` (a finite number >= 0) and logged under the layer's
    ``name``. ``features`` is the raw batch; the embeddings are the towers' outputs for it ([B, d] each).
    A loss that reads the query embeddings (``reads_query_embeddings``, true unless a subclass says otherwise)
    is refused by a model whose query tower gives K interests per user ([B, K, d])."""

    reads_query_embeddings = True

    def __init__(self, weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = require_finite_nonnegative("weight", weight)
        self._model_ref = _ModelRef()

    def attach(self, model) -> None:
        """Called by the model the loss is added to; a loss belongs to one model."""
        if self._model_ref.model is not None and self._model_ref.model is not model:
            raise ValueError(f"auxiliary loss {self.name!r} already belongs to model {self._model_ref.model.name!r}")
        if self.reads_query_embeddings and getattr(model, "multi_interest", False):
            raise ValueError(f"auxiliary loss {self.name!r} ({type(self).__name__}) reads one query vector per "
                             f"user, but the query tower {type(model.query_tower).__name__} gives K interests")
        self._model_ref.model = model
        self.check_model(model)

    def check_model(self, model) -> None:
        """Raises when ``model`` lacks what the loss reads (a subclass hook; the base accepts any model)."""

    @property
    def model(self):
        if self._model_ref.model is None:
            raise ValueError(f"auxiliary loss {self.name!r} is not attached to a model: add it with "
                             "model.add_auxiliary_loss(loss) or TwoTower(..., auxiliary_losses=[...])")
        return self._model_ref.model

    def feature_specs(self) -> List:
        """Specs of raw features the loss reads besides the towers' own (carried in the training batch)."""
        return []

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        raise NotImplementedError(f"{type(self).__name__} must implement call(features, query_embeddings, "
                                  "candidate_embeddings, training)")

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class AlignmentLoss(AuxiliaryLoss):
    """Alignment of positive pairs (Wang & Isola 2020, "Understanding Contrastive Representation Learning
    through Alignment and Uniformity on the Hypersphere", eq. 4): the mean over the batch of
    ``||f(x_i) - f(y_i)||_2 ** alpha`` between each query embedding and its positive candidate's embedding.
    ``alpha`` > 0 (the paper's default 2)."""

    def __init__(self, weight: float = 1.0, alpha: float = 2.0, **kwargs):
        super().__init__(weight=weight, **kwargs)
        if require_finite_nonnegative("alpha", alpha) == 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        difference = query_embeddings - tf.cast(candidate_embeddings, query_embeddings.dtype)
        squared = tf.reduce_sum(tf.square(difference), axis=-1)
        # ||d||^alpha = (||d||^2)^(alpha / 2); the floor keeps the gradient finite at d = 0 for alpha < 2.
        return tf.reduce_mean(tf.pow(tf.maximum(squared, 1e-12), self.alpha / 2.0))

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


def first_of(values: tf.Tensor) -> tf.Tensor:
    """``[B]`` strings: a scalar string feature as is, or the first slot of a ``[B, L]`` padded list feature."""
    return values if values.shape.rank == 1 else values[:, 0]


def dedupe_specs(specs) -> List:
    """``specs`` with later specs of an already-seen name dropped; the same name with a different spec raises."""
    seen = {}
    for spec in specs:
        if spec.name in seen and seen[spec.name] != spec:
            raise ValueError(f"feature {spec.name!r} is declared twice with different specs: {seen[spec.name]} "
                             f"and {spec}")
        seen.setdefault(spec.name, spec)
    return list(seen.values())


