"""The Dual Augmented Two-tower model's losses (Yu et al. 2021, "A Dual Augmented Two-tower Model for Online
Large-scale Recommendation", DLP-KDD; DAT).

* Augmented vectors: each tower reads one more field, the embedding ``a`` of an id (``Tower(augment=...)``: a
  per-user vector a_u in the query tower, a per-item vector a_v in the candidate tower), of the towers' output
  width. Serving needs nothing extra: the vector is looked up from the same raw inputs.
* Adaptive-Mimic Mechanism (the paper's loss_u and loss_v): ``loss_u = mean over positive pairs of
  ||a_u - p_v||^2`` and ``loss_v = mean of ||a_v - p_u||^2``, the other tower's output ``p`` held constant
  (stop-gradient), so each
  augmented vector learns the positive interactions of the other side. In-batch softmax batches hold positive
  pairs only (label 1), so the mean is over the batch. :class:`AdaptiveMimicLoss` with ``side="query"`` is
  loss_u (its ``weight`` lambda_u), ``side="candidate"`` loss_v (lambda_v).
* Category Alignment Loss (the paper's loss_CA, after Deep CORAL, Sun & Saenko 2016, eq. 1-3): with C(S) the
  covariance of the item vectors of the batch's items in category S, ``loss_CA = sum over categories S_i other
  than the batch's majority one S_major of ||C(S_major) - C(S_i)||_F^2 / (4 d^2)``, transferring what the majority
  category's item vectors learnt to the small categories. Categories with fewer than 2 items in the batch are
  skipped.
"""
from __future__ import annotations

from typing import List

import tensorflow as tf

from tfrec_recall.features import FeatureSpec, SpecLike, as_spec
from tfrec_recall.tasks.auxiliary import AuxiliaryLoss, first_of

SIDES = ("query", "candidate")


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class AdaptiveMimicLoss(AuxiliaryLoss):
    """DAT's adaptive-mimic loss of one side (module docstring): ``side="query"``: mean_b ||a_u(b) -
    stop_gradient(p_v(b))||^2 over the batch's positive pairs; ``side="candidate"``: mean_b ||a_v(b) -
    stop_gradient(p_u(b))||^2. The model's tower of that side must have an augmented vector."""

    def __init__(self, side: str = "query", weight: float = 1.0, **kwargs):
        super().__init__(weight=weight, **kwargs)
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.side = side

    def _tower(self, model):
        return getattr(model, f"{self.side}_tower")

    def check_model(self, model) -> None:
        tower = self._tower(model)
        if getattr(tower, "augment_encoder", None) is None:
            raise ValueError(f"AdaptiveMimicLoss(side={self.side!r}) needs the {self.side} tower to have an "
                             f"augmented vector (build the tower with augment=<id feature spec>)")

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        augmented = self._tower(self.model).augmented_vector(features)
        other = candidate_embeddings if self.side == "query" else query_embeddings
        target = tf.stop_gradient(tf.cast(other, augmented.dtype))
        return tf.reduce_mean(tf.reduce_sum(tf.square(augmented - target), axis=-1))

    def get_config(self):
        return {**super().get_config(), "side": self.side}


def category_covariances(vectors: tf.Tensor, groups: tf.Tensor, num_groups):
    """``(covariances [G, d, d], counts [G])`` of the rows of ``vectors`` ``[B, d]`` in each group (``groups``
    ``[B]`` in ``[0, num_groups)``): unbiased (divided by n_g - 1); groups with n_g < 2 get 0. Memory is
    O(B d^2) whatever the number of categories: only the batch's own categories are groups."""
    counts = tf.math.unsorted_segment_sum(tf.ones_like(vectors[:, 0]), groups, num_groups)  # [G]
    sums = tf.math.unsorted_segment_sum(vectors, groups, num_groups)  # [G, d]
    outer = vectors[:, :, None] * vectors[:, None, :]  # [B, d, d]
    second = tf.math.unsorted_segment_sum(outer, groups, num_groups)  # [G, d, d]: sum over members of x x^T
    n = counts[:, None, None]
    centred = second - sums[:, :, None] * sums[:, None, :] / tf.maximum(n, 1.0)
    return tf.where(n >= 2.0, centred / tf.maximum(n - 1.0, 1.0), tf.zeros_like(centred)), counts


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class CategoryAlignmentLoss(AuxiliaryLoss):
    """DAT's category alignment loss (module docstring) over the batch's candidate (item) vectors. ``category``
    is the spec of an item feature holding each item's category: an id feature, or a list feature whose first
    value is the item's category (e.g. the first listed genre); values outside its vocabulary form one more
    category. The loss reads that raw feature from the batch (:meth:`feature_specs`)."""

    reads_query_embeddings = False  # the candidate tower's alone: fits a multi-interest model too

    def __init__(self, category: SpecLike, weight: float = 1.0, **kwargs):
        super().__init__(weight=weight, **kwargs)
        spec = as_spec(category)
        if spec.dtype != tf.string or not getattr(spec, "has_vocabulary", False):
            raise ValueError(f"category must be a categorical feature spec with a vocabulary, got {spec.name!r} "
                             f"of kind {spec.kind!r}")
        self.category = spec
        self._lookup = tf.keras.layers.StringLookup(vocabulary=spec.lookup_vocabulary(), num_oov_indices=1,
                                                    name="category_lookup")

    def feature_specs(self) -> List[FeatureSpec]:
        return [self.category]

    def call(self, features, query_embeddings, candidate_embeddings, training=False):
        if self.category.name not in features:
            raise KeyError(f"category feature {self.category.name!r} is not in the batch; got {sorted(features)}")
        index = self._lookup(first_of(tf.convert_to_tensor(features[self.category.name])))
        categories, groups = tf.unique(index)  # the batch's categories, in order of first appearance
        num_groups = tf.shape(categories)[0]
        vectors = tf.cast(candidate_embeddings, tf.float32)
        covariances, counts = category_covariances(vectors, groups, num_groups)
        # The majority category (ties: the lowest category index, whatever the batch order).
        major = tf.argmin(tf.where(counts == tf.reduce_max(counts), categories, tf.reduce_max(categories) + 1))
        distances = tf.reduce_sum(tf.square(covariances - covariances[major][None]), axis=[1, 2])  # [G]
        others = tf.logical_and(counts >= 2.0, tf.not_equal(tf.range(num_groups, dtype=major.dtype), major))
        d = tf.cast(tf.shape(vectors)[1], tf.float32)
        return tf.reduce_sum(tf.where(others, distances, 0.0)) / (4.0 * d * d)

    def get_config(self):
        return {**super().get_config(), "category": self.category.to_dict()}
