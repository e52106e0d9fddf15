"""ParallelTower: the parallel two-tower of the recall-model survey: a DNN branch beside explicit
feature-interaction branches, all reading the same field embeddings, their outputs concatenated (or first
gated by squeeze-excitation) before the tower's projection.

Branches (``x_0`` is the concatenation of the field embeddings, ``v_i`` field ``i`` projected to
``interaction_dim`` by its own linear map, fields having different widths):

* DNN (always on): the ReLU MLP of :class:`MLPTower` over ``x_0``.
* ``"cross"``: DCN-V2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network", eq. 1)
  ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``, ``cross_layers`` TFRS ``Cross`` layers (eq. 2's low-rank
  ``W = U V`` with ``cross_projection_dim``) -> ``[B, sum_i d_i]``.
* ``"fm"``: the second-order factorization machine (Rendle 2010, eq. 1, in the ``O(kn)`` form of Lemma 3.1)
  kept as a vector, the bi-interaction pooling of NFM (He & Chua 2017, eq. 4) / DeepFM's FM component:
  ``sum_{i<j} v_i ⊙ v_j = 0.5 * ((sum_i v_i)^2 - sum_i v_i^2)`` -> ``[B, interaction_dim]``.
* ``"cin"``: xDeepFM's Compressed Interaction Network (Lian et al. 2018, eq. 6) over ``X^0 = [v_1; ...; v_F]``
  ``[B, F, D]``: ``X^k_{h,*} = sum_{i,j} W^{k,h}_{ij} (X^{k-1}_{i,*} ⊙ X^0_{j,*})``, ``cin_units[k]`` maps in
  layer ``k``; every layer's maps are sum-pooled over ``D`` (eq. 7) and concatenated -> ``[B, sum(cin_units)]``.

``combine="concat"`` concatenates the branch outputs (DNN first, then ``branches`` in the order given);
``combine="senet"`` first scales each branch output by a squeeze-excitation weight (Hu et al. 2018, as FiBiNET
applies it to fields, here to branches): squeeze each output to its mean, excite Dense(ReLU) ->
Dense(num_branches, sigmoid). The base :class:`Tower` then applies dropout, the projection to ``output_dim``
and the L2 normalisation.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec_recall.features import SpecLike
from tfrec_recall.layers.towers.base import register_tower
from tfrec_recall.layers.towers.mlp import MLPTower
from tfrec_recall._validation import is_int, require_int

PARALLEL_BRANCHES = ("cross", "fm", "cin")  # the explicit-interaction branches beside the (always-on) DNN
BRANCH_COMBINES = ("concat", "senet")


def _check_branches(branches) -> tuple:
    names = list(branches) if isinstance(branches, (list, tuple)) else branches
    if (not isinstance(branches, (list, tuple)) or not names
            or any(n not in PARALLEL_BRANCHES for n in names) or len(set(names)) != len(names)):
        raise ValueError(f"branches must be a non-empty list of distinct names from {PARALLEL_BRANCHES}, "
                         f"got {names!r}")
    return tuple(names)


def _check_cin_units(units) -> tuple:
    values = list(units) if isinstance(units, (list, tuple)) else units
    if not isinstance(units, (list, tuple)) or not values or any(not is_int(u) or u < 1 for u in values):
        raise ValueError(f"cin_units must be a non-empty list of positive integers, got {values!r}")
    return tuple(int(u) for u in values)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class CompressedInteraction(tf.keras.layers.Layer):
    """xDeepFM's CIN (Lian et al. 2018, eq. 6 and the sum pooling of eq. 7): ``[B, F, D]`` -> ``[B, sum(units)]``.

    ``kernels[k]`` has shape ``[units[k], H_{k-1}, F]`` (``H_0 = F``): ``kernels[k][h, i, j]`` is ``W^{k,h}_{ij}``.
    Every layer's maps feed both the next layer and the output (no split-half connections)."""

    def __init__(self, units: Sequence[int] = (16, 16), **kwargs):
        super().__init__(**kwargs)
        self.units = _check_cin_units(units)
        self.kernels: List[tf.Variable] = []

    def build(self, input_shape):
        num_fields = int(input_shape[1])
        previous = num_fields
        for k, h in enumerate(self.units):
            self.kernels.append(self.add_weight(name=f"kernel_{k}", shape=(h, previous, num_fields),
                                                initializer="glorot_uniform"))
            previous = h
        super().build(input_shape)

    def call(self, x0):
        x, pooled = x0, []
        for kernel in self.kernels:
            x = tf.einsum("hij,bid,bjd->bhd", kernel, x, x0)  # eq. 6
            pooled.append(tf.reduce_sum(x, axis=-1))  # eq. 7: sum over the embedding dimension
        return tf.concat(pooled, axis=-1)

    def get_config(self):
        return {**super().get_config(), "units": list(self.units)}


def fm_interaction(projected: List[tf.Tensor]) -> tf.Tensor:
    """Rendle 2010 eq. 1's pairwise term as a vector (Lemma 3.1; NFM's bi-interaction pooling):
    ``0.5 * ((sum_i v_i)^2 - sum_i v_i^2) = sum_{i<j} v_i ⊙ v_j``, ``[B, D]`` from ``F`` tensors ``[B, D]``."""
    v = tf.stack(projected, axis=1)
    total = tf.reduce_sum(v, axis=1)
    return 0.5 * (tf.square(total) - tf.reduce_sum(tf.square(v), axis=1))


@register_tower("parallel")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ParallelTower(MLPTower):
    """A DNN branch plus the explicit interaction ``branches`` (any of :data:`PARALLEL_BRANCHES`) over the
    same field embeddings, combined by ``combine`` (one of :data:`BRANCH_COMBINES`); see the module docstring."""

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (128,),
                 branches: Sequence[str] = ("cross",), combine: str = "concat", cross_layers: int = 2,
                 cross_projection_dim: Optional[int] = None, interaction_dim: int = 16,
                 cin_units: Sequence[int] = (16, 16), activation: str = "relu", output_dim: int = 64,
                 l2_normalize: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(features, hidden_units=hidden_units, activation=activation, output_dim=output_dim,
                         l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        self.branches = _check_branches(branches)
        if combine not in BRANCH_COMBINES:
            raise ValueError(f"combine must be one of {BRANCH_COMBINES}, got {combine!r}")
        self.combine_mode = combine  # not ``self.combine``: that is the Tower method
        self.cross_layers = require_int("cross_layers", cross_layers, minimum=1)
        if cross_projection_dim is not None and not (is_int(cross_projection_dim) and cross_projection_dim >= 1):
            raise ValueError(f"cross_projection_dim must be None or a positive integer, got {cross_projection_dim!r}")
        self.cross_projection_dim = None if cross_projection_dim is None else int(cross_projection_dim)
        self.interaction_dim = require_int("interaction_dim", interaction_dim, minimum=1)
        self.cin_units = _check_cin_units(cin_units)
        self._build_branches()

    def _build_branches(self) -> None:
        self.cross = [tfrs.layers.dcn.Cross(projection_dim=self.cross_projection_dim, name=f"cross_{i}")
                      for i in range(self.cross_layers)] if "cross" in self.branches else []
        uses_fields = "fm" in self.branches or "cin" in self.branches
        # One linear map per field to interaction_dim, shared by fm and cin (fields differ in width).
        self.field_projections = [tf.keras.layers.Dense(self.interaction_dim, use_bias=False,
                                                        name=f"field_projection_{i}")
                                  for i in range(self.num_fields)] if uses_fields else []
        self.cin = CompressedInteraction(self.cin_units, name="cin") if "cin" in self.branches else None
        # SE over so few branches (2 to 4): no reduction in the excitation's hidden layer.
        senet = self.combine_mode == "senet"
        self.branch_excite_1 = tf.keras.layers.Dense(self.num_branches, activation="relu",
                                                     name="branch_excite_1") if senet else None
        self.branch_excite_2 = tf.keras.layers.Dense(self.num_branches, activation="sigmoid",
                                                     name="branch_excite_2") if senet else None

    @property
    def num_branches(self) -> int:
        """The DNN plus the interaction branches."""
        return 1 + len(self.branches)

    def branch_widths(self) -> Dict[str, int]:
        """The width of each branch output, in combine order."""
        fields = sum(self.encoder.output_dims) + (self.output_dim if self.augment_encoder is not None else 0)
        widths = {"dnn": self.hidden_units[-1] if self.hidden_units else fields,
                  "cross": fields, "fm": self.interaction_dim, "cin": sum(self.cin_units)}
        return {name: widths[name] for name in ("dnn",) + self.branches}

    def cross_network(self, x0: tf.Tensor) -> tf.Tensor:
        """DCN-V2 eq. 1 stacked ``cross_layers`` times over ``x0``."""
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return x

    def branch_outputs(self, fields: List[tf.Tensor], training=None) -> Dict[str, tf.Tensor]:
        """Every branch's output ``[B, width]`` by name: ``"dnn"`` first, then ``branches`` in order."""
        x0 = tf.concat(fields, axis=-1)
        out = {"dnn": self.run_mlp(x0, training=training)}
        projected = [p(f) for p, f in zip(self.field_projections, fields)]
        for name in self.branches:
            if name == "cross":
                out[name] = self.cross_network(x0)
            elif name == "fm":
                out[name] = fm_interaction(projected)
            else:
                out[name] = self.cin(tf.stack(projected, axis=1))
        return out

    def branch_weights(self, outputs: List[tf.Tensor]) -> tf.Tensor:
        """Squeeze-excitation weights ``[B, num_branches]`` in (0, 1): each output squeezed to its mean
        (``combine="senet"`` only)."""
        if self.branch_excite_1 is None:
            raise ValueError(f"{self.name}: branch_weights needs combine='senet', got {self.combine_mode!r}")
        squeezed = tf.stack([tf.reduce_mean(o, axis=-1) for o in outputs], axis=-1)
        return self.branch_excite_2(self.branch_excite_1(squeezed))

    def combine(self, fields, training=None):
        outputs = list(self.branch_outputs(fields, training=training).values())
        if self.combine_mode == "senet":
            weights = self.branch_weights(outputs)
            outputs = [o * weights[:, i:i + 1] for i, o in enumerate(outputs)]
        return tf.concat(outputs, axis=-1)

    def get_config(self):
        return {**super().get_config(), "branches": list(self.branches), "combine": self.combine_mode,
                "cross_layers": self.cross_layers, "cross_projection_dim": self.cross_projection_dim,
                "interaction_dim": self.interaction_dim, "cin_units": list(self.cin_units)}

    @classmethod
    def run_config_options(cls, config) -> dict:
        """The constructor arguments a RunConfig sets beyond the common tower ones."""
        return {"branches": tuple(config.parallel_branches), "combine": config.parallel_combine}
