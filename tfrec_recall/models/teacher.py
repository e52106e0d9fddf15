"""A teacher for knowledge distillation: :class:`CrossFeatureRanker`, a small ranking model that scores
(user, item) pairs from both sides' features jointly, and :func:`train_teacher`, which fits it pointwise.

The ranker is a Deep & Cross Network (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network and Practical
Lessons for Web-scale Learning to Rank Systems", eq. 1: ``x_{l+1} = x_0 * (W x_l + b) + x_l``, the TFRS
``Cross`` layer) over the concatenated field embeddings of the user and the item, followed by a ReLU MLP and
one logit. Unlike the two towers it crosses user and item features before scoring, so its in-batch scores are
the soft targets :class:`~tfrec_recall.tasks.distillation.DistillationLoss` distils into the student (Hinton et
al. 2015, "Distilling the Knowledge in a Neural Network").

:func:`train_teacher` trains it with binary cross-entropy on the split's training rows as positives and, for
each, ``num_negatives`` items drawn uniformly from the corpus as negatives (pointwise negative sampling, as in
He et al. 2017, "Neural Collaborative Filtering", sec. 3.1).
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec_recall._validation import require_finite_positive, require_int, require_positive_int
from tfrec_recall.data.schema import ITEM_ID
from tfrec_recall.data.split import Split
from tfrec_recall.data.tfdata import to_tensors
from tfrec_recall.evaluation.evaluate import corpus_arrays
from tfrec_recall.features import FeatureEncoder, FeatureSpec, SpecLike, as_spec, feature_arrays
from tfrec_recall.layers.towers.base import check_units, model_base_config

LABEL = "label"


@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class CrossFeatureRanker(tf.keras.Model):
    """One logit per (user, item) row: both sides' fields encoded (:class:`FeatureEncoder`), concatenated,
    crossed by ``cross_layers`` DCN ``Cross`` layers (>= 0), then a ReLU MLP of ``hidden_units`` and a
    one-unit output. ``call(features) -> [B]`` reads the query and candidate features of the same rows;
    :meth:`score_pairs` scores every query row against every candidate row. Query and candidate feature names
    must be disjoint (a batch carries each name once)."""

    def __init__(self, query_features: Sequence[SpecLike], candidate_features: Sequence[SpecLike],
                 hidden_units: Sequence[int] = (64,), cross_layers: int = 2, **kwargs):
        super().__init__(**kwargs)
        sides = {"query_features": [as_spec(s) for s in query_features],
                 "candidate_features": [as_spec(s) for s in candidate_features]}
        for name, specs in sides.items():
            if not specs:
                raise ValueError(f"{name} must name at least one feature spec, got {list(specs)!r}")
        shared = sorted({s.name for s in sides["query_features"]} & {s.name for s in sides["candidate_features"]})
        if shared:
            raise ValueError(f"query_features and candidate_features must have disjoint names, both have {shared}")
        self.query_encoder = FeatureEncoder(sides["query_features"], name="query_features")
        self.candidate_encoder = FeatureEncoder(sides["candidate_features"], name="candidate_features")
        self.hidden_units = check_units("hidden_units", hidden_units)
        self.cross_layers = require_int("cross_layers", cross_layers, 0)
        self.crosses = [tfrs.layers.dcn.Cross(name=f"cross_{i}") for i in range(self.cross_layers)]
        self.hidden = [tf.keras.layers.Dense(u, activation="relu", name=f"hidden_{i}")
                       for i, u in enumerate(self.hidden_units)]
        self.logit = tf.keras.layers.Dense(1, name="logit")

    def query_feature_specs(self) -> List[FeatureSpec]:
        return list(self.query_encoder.specs)

    def candidate_feature_specs(self) -> List[FeatureSpec]:
        return list(self.candidate_encoder.specs)

    def build(self, input_shape=None):
        # Built from raw inputs of the specs' dtypes, as the towers are: Keras's default build feeds float
        # placeholders, which string features cannot take (this is what reloading a SavedModel calls). The save
        # spec (the serving inputs, any batch size) is set here too, so a model only built, or only used through
        # score_pairs, can be saved.
        if not self.built:
            self.call({**self.query_encoder.dummy_inputs(), **self.candidate_encoder.dummy_inputs()})
            self._set_save_spec({s.name: s.tensor_spec() for s in self.query_encoder.specs
                                 + self.candidate_encoder.specs})
            self.built = True

    def get_build_config(self):
        # Built from the specs alone: no input shape to record, only that it was built (what a .keras file
        # needs to build the model before loading its variables).
        return {"input_shape": None} if self.built else None

    def build_from_config(self, config):
        self.build(None)

    def _encode(self, encoder: FeatureEncoder, features) -> tf.Tensor:
        return tf.concat(encoder(features), axis=-1)

    def _head(self, x0: tf.Tensor) -> tf.Tensor:
        """Logits ``[rows]`` of concatenated (query, candidate) field embeddings ``[rows, d]``."""
        x = x0
        for cross in self.crosses:
            x = cross(x0, x)
        for layer in self.hidden:
            x = layer(x)
        return tf.squeeze(self.logit(x), axis=-1)

    def call(self, features, training=None):
        """``[B]`` logits of the (query, candidate) pairs of the rows of ``features``."""
        return self._head(tf.concat([self._encode(self.query_encoder, features),
                                     self._encode(self.candidate_encoder, features)], axis=-1))

    def score_pairs(self, query_features, candidate_features, training=False) -> tf.Tensor:
        """``[Bq, Bc]`` logits: entry ``[i, j]`` scores query row i of ``query_features`` with candidate row j
        of ``candidate_features`` (what ``call`` gives for that pair). Each side is encoded once; the pairs
        are formed by repeating / tiling the encoded rows."""
        query = self._encode(self.query_encoder, query_features)  # [Bq, dq]
        candidate = self._encode(self.candidate_encoder, candidate_features)  # [Bc, dc]
        num_queries, num_candidates = tf.shape(query)[0], tf.shape(candidate)[0]
        pairs = tf.concat([tf.repeat(query, num_candidates, axis=0), tf.tile(candidate, [num_queries, 1])], axis=-1)
        return tf.reshape(self._head(pairs), tf.stack([num_queries, num_candidates]))

    def get_config(self):
        return {**model_base_config(self, super().get_config()),
                "query_features": [s.to_dict() for s in self.query_encoder.specs],
                "candidate_features": [s.to_dict() for s in self.candidate_encoder.specs],
                "hidden_units": list(self.hidden_units), "cross_layers": self.cross_layers}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _candidate_rows(split: Split, num_negatives: int, seed: int) -> np.ndarray:
    """``[n_train, 1 + num_negatives]`` corpus rows (of ``split.data.items``, sorted): column 0 each training
    row's positive item, the others items drawn uniformly from the corpus (seeded; a draw may hit the row's
    positive or another item of the user, a label noise of about 1 / #items)."""
    items = np.asarray(split.data.items).astype(str)
    positives = split.train[ITEM_ID].astype(str).to_numpy()
    rows = np.searchsorted(items, positives)
    unknown = (rows >= len(items)) | (items[np.minimum(rows, len(items) - 1)] != positives)
    if unknown.any():
        missing = sorted(set(positives[unknown]))[:5]
        raise ValueError(f"training items missing from the corpus (split.data.items), e.g. {missing}")
    negatives = np.random.default_rng(seed).integers(0, len(items), size=(len(positives), num_negatives))
    return np.concatenate([rows[:, None], negatives], axis=1)


def _pointwise_dataset(queries: Mapping[str, np.ndarray], corpus: Mapping[str, np.ndarray],
                       candidate_rows: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Batches of ``(features, label)``: example ``e`` pairs training row ``e // width`` with corpus row
    ``candidate_rows.flat[e]``, label 1 for column 0 (the positive). Only indices are shuffled: the query and
    corpus arrays are stored once and gathered per batch, never materialised per (row, negative) pair."""
    width = candidate_rows.shape[1]
    query_t, corpus_t = to_tensors(queries), to_tensors(corpus)
    flat_rows = tf.constant(candidate_rows.reshape(-1), tf.int64)

    def gather(example):
        features = {k: tf.gather(v, example // width) for k, v in query_t.items()}
        features.update({k: tf.gather(v, tf.gather(flat_rows, example)) for k, v in corpus_t.items()})
        return features, tf.cast(tf.equal(example % width, 0), tf.float32)

    total = int(candidate_rows.size)
    return (tf.data.Dataset.range(total).shuffle(total, seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def _fit(model: CrossFeatureRanker, dataset: tf.data.Dataset, epochs: int, learning_rate: float,
         verbose: int) -> None:
    """Adam on the mean binary cross-entropy of the logits. A plain loop rather than ``compile`` / ``fit``: the
    optimizer stays out of the model's tracked state, so a student holding the teacher checkpoints no optimizer
    slots of it; one traced step serves every batch size (the last, smaller batch is not traced again)."""
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    signature = {s.name: s.tensor_spec() for s in model.query_feature_specs() + model.candidate_feature_specs()}

    @tf.function(input_signature=[signature, tf.TensorSpec([None], tf.float32)])  # one trace, any batch size
    def step(features, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, model(features, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    for epoch in range(epochs):
        losses = [float(step(features, labels)) for features, labels in dataset]
        if verbose:
            print(f"teacher epoch {epoch + 1}/{epochs}: binary cross-entropy {np.mean(losses):.4f}", flush=True)


def _check_training_arguments(split, epochs, batch_size, num_negatives, learning_rate, seed, verbose) -> None:
    if not isinstance(split, Split):
        raise TypeError(f"split must be a tfrec_recall Split, got {type(split).__name__}")
    if len(split.train) == 0:
        raise ValueError("split has no training rows to train the teacher on")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_negatives", num_negatives)):
        require_positive_int(name, value)
    require_finite_positive("learning_rate", learning_rate)
    require_int("seed", seed, 0)
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")


def train_teacher(split: Split, query_specs: Sequence[SpecLike], candidate_specs: Sequence[SpecLike], *,
                  epochs: int = 3, batch_size: int = 512, num_negatives: int = 4, learning_rate: float = 1e-3,
                  hidden_units: Sequence[int] = (64,), cross_layers: int = 2, seed: int = 0,
                  verbose: int = 0) -> CrossFeatureRanker:
    """A :class:`CrossFeatureRanker` over ``query_specs`` / ``candidate_specs`` fitted with binary
    cross-entropy (Adam, ``learning_rate``) on ``split.train`` rows as positives and ``num_negatives`` uniform
    corpus items per row as negatives, for ``epochs`` epochs. Seeded: ``seed`` draws the negatives, shuffles
    the examples and, through ``tf.keras.utils.set_random_seed`` (global, as ``training.build.set_seed``),
    initialises the weights. ``verbose`` 0 is silent, 1 or 2 print the epoch's mean loss. To distil into a
    student, pass the student's own specs
    (``model.query_feature_specs()``, ``model.candidate_feature_specs()``) so that the training batch carries
    each feature once with one spec."""
    _check_training_arguments(split, epochs, batch_size, num_negatives, learning_rate, seed, verbose)
    tf.keras.utils.set_random_seed(seed)
    model = CrossFeatureRanker(query_specs, candidate_specs, hidden_units=hidden_units, cross_layers=cross_layers,
                               name="teacher")
    queries = feature_arrays(split.train, split.data, model.query_feature_specs(), training=True)
    corpus = corpus_arrays(split, model.candidate_feature_specs())
    dataset = _pointwise_dataset(queries, corpus, _candidate_rows(split, num_negatives, seed), batch_size, seed)
    model.build(None)
    _fit(model, dataset, epochs, learning_rate, verbose)
    return model

