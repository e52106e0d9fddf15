"""RetrievalModel: the base of the retrieval models (a ``tfrs.Model``).

It owns what every retrieval model shares, so a new model only says how it embeds queries and candidates and
what its main loss is (:meth:`RetrievalModel.embed_pair`, :meth:`RetrievalModel.retrieval_loss`,
:meth:`RetrievalModel.embed_candidates`, and ``call`` for the query embeddings):

* the train / test steps: ``fit`` logs ``loss`` (the total: main loss plus the weighted auxiliary losses) and
  ``retrieval_loss`` (the main loss alone) as means over the epoch's batches of the global batch's value,
  each auxiliary loss under its own name (the mean of its unweighted value), and ``regularization_loss``;
* the auxiliary-loss hook: ``auxiliary_losses`` (constructor) or :meth:`RetrievalModel.add_auxiliary_loss`
  take :class:`AuxiliaryLoss` layers, each called with ``(features, query_embeddings, candidate_embeddings,
  training)`` and returning a scalar; the total loss is ``main + sum_i weight_i * aux_i``. DAT's mimic and
  alignment losses (Yu et al. 2021, dual augmented two-tower), contrastive / self-supervised losses (e.g. Yao
  et al. 2021) and embedding penalties plug in the same way: subclass :class:`AuxiliaryLoss`, register it,
  implement ``call``; :class:`AlignmentLoss` is the built-in example. Under a distribution strategy each
  replica's main loss is the sum over its own queries, and each auxiliary loss (a per-replica mean) enters the
  replica's total divided by the number of replicas, so the replicas' totals sum to the single-device total;
* serving in one call: :meth:`RetrievalModel.index_candidates` builds a top-k index (brute force, IVF, ScaNN
  or any :class:`~tfrec_recall.retrievers.TopKIndex`) over the candidates, then
  :meth:`RetrievalModel.recommend` answers ``(scores [B, k], ids [B, k])`` for raw user features.

The index and the extra loss trackers are kept outside TensorFlow's object tracking: checkpoints and
SavedModels of a model hold the same variables as before they existed (older checkpoints still load).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec_recall._validation import require_positive_int
from tfrec_recall.evaluation.evaluate import corpus_arrays
from tfrec_recall.layers.towers import model_base_config
from tfrec_recall.retrievers.base import TopKIndex
from tfrec_recall.retrievers.multi_query import MultiQueryRetriever
from tfrec_recall.retrievers.registry import index_class
from tfrec_recall.tasks.auxiliary import AlignmentLoss, AuxiliaryLoss, dedupe_specs  # noqa: F401  (re-exported)

RESERVED_LOG_NAMES = ("loss", "retrieval_loss", "regularization_loss")
_serialize = tf.keras.utils.serialize_keras_object
_deserialize = tf.keras.utils.deserialize_keras_object


class _Untracked:
    """Holds objects outside TensorFlow's tracking (a plain object: Keras neither tracks nor saves what it
    holds), so that they change no checkpoint or SavedModel."""

    def __init__(self):
        self.trackers: Dict[str, tf.keras.metrics.Mean] = {}
        self.retriever = None  # the index, or a MultiQueryRetriever over it


def _padded_exclusions(exclude: Sequence[Sequence[str]], num_users: int) -> tf.Tensor:
    """``exclude`` (one list of item ids per user) as a ``[num_users, E]`` string tensor padded with ``""``."""
    if isinstance(exclude, (str, bytes)) or len(exclude) != num_users:
        raise ValueError(f"exclude must hold one list of item ids per user ({num_users} users), got "
                         f"{exclude!r:.200}")
    width = max([1] + [len(items) for items in exclude])
    rows = [[str(i) for i in items] + [""] * (width - len(items)) for items in exclude]
    return tf.constant(np.array(rows, dtype=object).reshape(num_users, width), tf.string)


class RetrievalModel(tfrs.Model):
    """Base retrieval model (see the module docstring). Subclasses implement ``call`` (query embeddings of
    raw features), :meth:`embed_pair`, :meth:`retrieval_loss` and :meth:`embed_candidates`, and extend
    ``get_config`` / :meth:`deserialize_config`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._untracked = _Untracked()
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self._untracked.trackers["retrieval_loss"] = tf.keras.metrics.Mean(name="retrieval_loss")
        self.auxiliary_losses: List[AuxiliaryLoss] = []

    # -- the auxiliary-loss hook ---------------------------------------------------------------------------
    def add_auxiliary_losses(self, losses: Sequence[AuxiliaryLoss]) -> None:
        """:meth:`add_auxiliary_loss` of each of ``losses`` (a subclass's ``auxiliary_losses`` argument: its
        ``__init__`` calls this last, once the towers a loss may check exist)."""
        if isinstance(losses, AuxiliaryLoss):
            raise TypeError("auxiliary_losses must be a sequence of AuxiliaryLoss layers, got one layer: wrap "
                            f"it in a list, [{losses.name!r}]")
        for loss in losses:
            self.add_auxiliary_loss(loss)

    def add_auxiliary_loss(self, loss: AuxiliaryLoss) -> None:
        """Adds ``loss`` (weighted by its ``weight``) to the training loss and logs it under ``loss.name``."""
        if not isinstance(loss, AuxiliaryLoss):
            raise TypeError(f"an auxiliary loss must be a tfrec_recall AuxiliaryLoss layer, got {loss!r}")
        taken = set(RESERVED_LOG_NAMES) | set(self._untracked.trackers)
        if loss.name in taken:
            raise ValueError(f"auxiliary loss name {loss.name!r} is already used by a logged value "
                             f"({sorted(taken)}); give the layer another name")
        loss.attach(self)
        self.auxiliary_losses.append(loss)
        self._untracked.trackers[loss.name] = tf.keras.metrics.Mean(name=loss.name)
        self.train_function = self.test_function = None  # the compiled steps are traced again with it

    @property
    def metrics(self):
        return super().metrics + list(self._untracked.trackers.values())

    # -- what subclasses implement -------------------------------------------------------------------------
    def embed_pair(self, features, training=False) -> Tuple[tf.Tensor, tf.Tensor]:
        """(query embeddings, positive candidate embeddings) of a training batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed_pair(features, training)")

    def retrieval_loss(self, features, query_embeddings, candidate_embeddings, training=False) -> tf.Tensor:
        """The main (retrieval) loss of the batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement retrieval_loss(features, "
                                  "query_embeddings, candidate_embeddings, training)")

    def embed_candidates(self, features, training=False) -> tf.Tensor:
        """Candidate embeddings of raw candidate features (what :meth:`index_candidates` indexes)."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed_candidates(features, training)")

    def candidate_feature_specs(self) -> list:
        """The feature specs of the raw candidate features :meth:`embed_candidates` reads."""
        raise NotImplementedError(f"{type(self).__name__} must implement candidate_feature_specs()")

    def query_feature_specs(self) -> list:
        """The feature specs of the raw query features ``call`` reads."""
        raise NotImplementedError(f"{type(self).__name__} must implement query_feature_specs()")

    def training_feature_specs(self) -> list:
        """Every raw feature a training batch carries: the query and candidate features, then those the
        auxiliary losses read (:meth:`AuxiliaryLoss.feature_specs`), each name once."""
        extra = [spec for loss in self.auxiliary_losses for spec in loss.feature_specs()]
        return dedupe_specs(self.query_feature_specs() + self.candidate_feature_specs() + extra)

    # -- losses and steps ----------------------------------------------------------------------------------
    def compute_losses(self, features, training=False) -> Dict[str, tf.Tensor]:
        """This replica's ``retrieval_loss``, each auxiliary loss by name (unweighted) and ``loss``, the total
        ``retrieval_loss + sum_i weight_i * aux_i / replicas``."""
        query, candidate = self.embed_pair(features, training=training)
        main = self.retrieval_loss(features, query, candidate, training=training)
        losses = {"retrieval_loss": main}
        total = main
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for aux in self.auxiliary_losses:
            value = tf.convert_to_tensor(aux(features, query, candidate, training=training))
            if value.shape.rank != 0:
                raise ValueError(f"auxiliary loss {aux.name!r} must return a scalar, got shape {value.shape}")
            losses[aux.name] = value
            total = total + tf.cast(aux.weight / replicas, main.dtype) * tf.cast(value, main.dtype)
        losses["loss"] = total
        return losses

    def compute_loss(self, features, training=False):
        return self.compute_losses(features, training=training)["loss"]

    def _regularization_loss(self):
        return tf.reduce_sum(tf.stack(self.losses)) if self.losses else 0.0

    def train_step(self, inputs):
        with tf.GradientTape() as tape:
            losses = self.compute_losses(inputs, training=True)
            regularization_loss = self._regularization_loss()
            total_loss = losses["loss"] + regularization_loss
        gradients = tape.gradient(total_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self._logs(losses, regularization_loss)

    def test_step(self, inputs):
        losses = self.compute_losses(inputs, training=False)
        return self._logs(losses, self._regularization_loss())

    def _logs(self, losses: Mapping[str, tf.Tensor], regularization_loss):
        # Each replica's loss sums its own queries: weights 1/R make the tracker's mean the global batch's sum.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.loss_tracker.update_state(losses["loss"] * replicas, sample_weight=1.0 / replicas)
        self._untracked.trackers["retrieval_loss"].update_state(losses["retrieval_loss"] * replicas,
                                                                 sample_weight=1.0 / replicas)
        for aux in self.auxiliary_losses:  # a per-replica mean: the tracker averages replicas and batches
            self._untracked.trackers[aux.name].update_state(losses[aux.name])
        logs = {metric.name: metric.result() for metric in self.metrics}
        logs["regularization_loss"] = regularization_loss
        return logs

    # -- serving: index once, recommend in one call --------------------------------------------------------
    def index_candidates(self, ids, candidates, index: Union[str, TopKIndex] = "brute_force", max_k: int = 100,
                         batch_size: int = 4096, **index_inputs) -> TopKIndex:
        """Builds the top-k index :meth:`recommend` searches and returns it. ``candidates`` is either raw
        candidate features (a mapping of arrays, embedded by :meth:`embed_candidates` in batches of
        ``batch_size``) or their embeddings ``[len(ids), d]``; ``index`` a registered index name
        (``brute_force``, ``ivf``, ``scann``; made with ``max_k``) or an unbuilt :class:`TopKIndex`. Indexing
        again replaces the previous index. ``index_inputs`` go to the index's ``index`` besides the ids and
        embeddings (e.g. a DeepRetrievalIndex's ``paths``)."""
        require_positive_int("batch_size", batch_size)
        if isinstance(index, str):
            index = index_class(index)(max_k=max_k)
        elif not isinstance(index, TopKIndex):
            raise TypeError(f"index must be an index name or a TopKIndex, got {index!r}")
        if isinstance(candidates, Mapping):
            candidates = self._embed_in_batches(candidates, batch_size)
        index.index(ids, candidates, **index_inputs)
        self._untracked.retriever = MultiQueryRetriever(index) if self.multi_interest else index
        return index

    def _embed_in_batches(self, features: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
        batches = tf.data.Dataset.from_tensor_slices(dict(features)).batch(batch_size)
        return np.concatenate([self.embed_candidates(b, training=False).numpy() for b in batches], axis=0)

    @property
    def retriever(self):
        """What :meth:`recommend` searches: the index built by :meth:`index_candidates` (``None`` before), in a
        :class:`MultiQueryRetriever` for a multi-interest model."""
        return self._untracked.retriever

    def recommend(self, user_features, k: int = 10,
                  exclude: Optional[Sequence[Sequence[str]]] = None) -> Tuple[tf.Tensor, tf.Tensor]:
        """``(scores [B, k] float32, ids [B, k] string)``: the best ``k`` indexed candidates for each user of
        the raw ``user_features`` batch, best first, leaving out ``exclude[b]`` (item ids) for user b."""
        if self._untracked.retriever is None:
            raise ValueError(f"{type(self).__name__}.recommend needs an index of the candidates: call "
                             "model.index_candidates(ids, candidate_features_or_embeddings) first")
        require_positive_int("k", k)
        queries = self(user_features, training=False)
        if exclude is not None:
            exclude = _padded_exclusions(exclude, int(queries.shape[0]))
        if self.multi_interest:
            return self._untracked.retriever(queries, k=k, exclude=exclude,
                                             query_mask=self.query_interest_mask(user_features))
        return self._untracked.retriever(queries, k=k, exclude=exclude)

    @property
    def multi_interest(self) -> bool:
        """True when ``call`` gives K query vectors per user (``[batch, K, d]``); subclasses say."""
        return False

    def query_interest_mask(self, features):
        """``[batch, K]`` bool, the valid query vectors of a multi-interest model; None otherwise."""
        return None

    # -- configuration -------------------------------------------------------------------------------------
    def get_config(self):
        return {**model_base_config(self, super().get_config()),
                "auxiliary_losses": [_serialize(loss) for loss in self.auxiliary_losses]}

    @classmethod
    def deserialize_config(cls, config: dict) -> dict:
        """``config`` with its serialised sublayers deserialised (subclasses add theirs)."""
        config = dict(config)
        config["auxiliary_losses"] = [_deserialize(loss) for loss in config.get("auxiliary_losses") or []]
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**cls.deserialize_config(config))


def index_split_corpus(model: RetrievalModel, split, index: Union[str, TopKIndex] = "brute_force",
                       max_k: int = 100) -> TopKIndex:
    """Indexes every item of ``split.data`` (sorted ids, their raw candidate features) with ``model``'s
    candidate embeddings: what ``training.train`` does after fitting, so ``train(...).model.recommend``
    answers."""
    features = corpus_arrays(split, model.candidate_feature_specs())
    return model.index_candidates(np.asarray(split.data.items).astype(str), features, index=index, max_k=max_k)
