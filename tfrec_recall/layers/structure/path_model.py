"""Deep Retrieval's structure model (Gao et al., "Learning a Retrievable Structure for Large-Scale
Recommendations", 2020): D layers of K codes; a path is one code per layer, c = (c_1, ..., c_D), and

    p(c | x) = prod_d p(c_d | x, c_1, ..., c_{d-1}),

where layer d is an MLP over the concatenation of the user embedding x and the embeddings of the codes chosen in
the layers before it, with a softmax over its K codes. Paths are int32 tensors of shape [..., D].

Beam search of width B keeps the B most probable prefixes after each layer (B * K extensions scored per layer),
unrolled over the D layers in stock TensorFlow ops, so it traces into a SavedModel signature without a Python
loop at serving time. With B >= K^D it enumerates every path with its exact probability.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_int, require_positive_int


def place_values(num_codes: int, num_layers: int) -> np.ndarray:
    """K^(D-1-d) for d = 0..D-1: the weight of each layer's code in a path's code."""
    return num_codes ** np.arange(num_layers - 1, -1, -1, dtype=np.int64)


def path_codes(paths, num_codes: int) -> np.ndarray:
    """Each path [..., D] as one int64, sum_d c_d K^(D-1-d) (its rank in the lexicographic order of paths)."""
    paths = np.asarray(paths, np.int64)
    return paths @ place_values(num_codes, paths.shape[-1])


def code_paths(codes, num_codes: int, num_layers: int) -> np.ndarray:
    """The inverse of :func:`path_codes`: int64 codes [...] -> paths [..., D]."""
    codes = np.asarray(codes, np.int64)
    return (codes[..., None] // place_values(num_codes, num_layers)) % num_codes


def check_beam_width(beam_width, num_codes: int, num_layers: int) -> int:
    """``beam_width`` must be in 1..K^D (more beams than paths cannot be kept)."""
    require_positive_int("beam_width", beam_width)
    paths = num_codes ** num_layers
    if beam_width > paths:
        raise ValueError(f"beam_width ({beam_width}) must be <= K^D = {num_codes}^{num_layers} = {paths}, the number "
                         f"of paths")
    return int(beam_width)


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class PathStructure(tf.keras.layers.Layer):
    """p(path | user) over D layers of K codes (Deep Retrieval's structure model).

    ``call(x, paths)`` gives log p(paths | x): ``x`` [batch, dim] user embeddings, ``paths`` [batch, J, D] codes,
    result [batch, J]. ``beam_search(x, beam_width)`` gives the ``beam_width`` most probable paths found by beam
    search, ([batch, B, D] int32 paths, [batch, B] log-probabilities), best first."""

    def __init__(self, num_layers: int = 3, num_codes: int = 100, code_dim: int = 16,
                 hidden_units: Sequence[int] = (64,), **kwargs):
        super().__init__(**kwargs)
        self.num_layers = require_positive_int("num_layers", num_layers)
        self.num_codes = require_int("num_codes", num_codes, minimum=2)
        self.code_dim = require_positive_int("code_dim", code_dim)
        if isinstance(hidden_units, (str, bytes)) or not isinstance(hidden_units, Sequence):
            raise ValueError(f"hidden_units must be a list of positive integers, got {hidden_units!r}")
        self.hidden_units = [require_positive_int("hidden_units", u) for u in hidden_units]
        # Layer d (0-based) reads the codes of layers 0..d-1 through their embedding tables.
        self.code_embeddings = [tf.keras.layers.Embedding(self.num_codes, self.code_dim, name=f"codes_{d}")
                                for d in range(self.num_layers - 1)]
        self.layer_mlps = [tf.keras.Sequential(
            [tf.keras.layers.Dense(u, activation="relu") for u in self.hidden_units]
            + [tf.keras.layers.Dense(self.num_codes)], name=f"layer_{d}") for d in range(self.num_layers)]

    @property
    def num_paths(self) -> int:
        return self.num_codes ** self.num_layers

    def layer_log_probs(self, x: tf.Tensor, prefix: tf.Tensor, d: int) -> tf.Tensor:
        """log p(c_d | x, prefix) over the K codes of layer ``d`` (0-based): ``x`` [..., dim], ``prefix`` [..., d]
        int codes of the layers before; result [..., K]."""
        parts = [x] + [self.code_embeddings[i](prefix[..., i]) for i in range(d)]
        return tf.nn.log_softmax(self.layer_mlps[d](tf.concat(parts, axis=-1)), axis=-1)

    def call(self, x, paths):
        paths = tf.convert_to_tensor(paths)
        x = tf.broadcast_to(tf.expand_dims(x, -2), tf.concat([tf.shape(paths)[:-1], tf.shape(x)[-1:]], 0))
        total = 0.0
        for d in range(self.num_layers):
            log_probs = self.layer_log_probs(x, paths[..., :d], d)
            total += tf.gather(log_probs, paths[..., d], batch_dims=len(paths.shape) - 1)
        return total

    def beam_search(self, x, beam_width: int) -> Tuple[tf.Tensor, tf.Tensor]:
        beam_width = check_beam_width(beam_width, self.num_codes, self.num_layers)
        batch = tf.shape(x)[0]
        paths = tf.zeros([batch, 1, 0], tf.int32)
        scores = tf.zeros([batch, 1], x.dtype)
        for d in range(self.num_layers):
            beams = min(beam_width, self.num_codes ** d)  # prefixes alive before layer d (static)
            inputs = tf.tile(x[:, None, :], [1, beams, 1])
            totals = scores[..., None] + self.layer_log_probs(inputs, paths, d)  # [batch, beams, K]
            keep = min(beam_width, beams * self.num_codes)
            scores, flat = tf.math.top_k(tf.reshape(totals, [batch, beams * self.num_codes]), k=keep)
            parents, codes = flat // self.num_codes, flat % self.num_codes
            paths = tf.concat([tf.gather(paths, parents, batch_dims=1), codes[..., None]], axis=-1)
        return paths, scores

    def get_config(self) -> dict:
        return {**super().get_config(), "num_layers": self.num_layers, "num_codes": self.num_codes,
                "code_dim": self.code_dim, "hidden_units": list(self.hidden_units)}
