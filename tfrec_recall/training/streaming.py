"""Training and evaluation from a :class:`~tfrec_recall.data.streaming.StreamingSplit`: the model's lookups read
the Beam-written vocabulary files by path, training batches stream from the split's record files through TFXIO,
and evaluation streams the validation / test examples (each carries its user's training items to exclude).

What needs whole tables in memory is refused with a ``ConfigError`` naming the key: the example age, towers
that read more than the id, history and side-feature inputs (SDM), category alignment, contrastive learning,
distillation and Deep Retrieval. Ids, history, side features (examples joined with the tables by
:mod:`tfrec_recall.data.side_jobs`), logQ, in-batch / mixed / global negatives and DAT on the ids stream.
"""
from __future__ import annotations

import hashlib
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._validation import require_positive_int
from tfrec_recall.config import ConfigError, RunConfig
from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.streaming import DatasetFactory, StreamingSplit, examples_dataset
from tfrec_recall.evaluation.evaluate import embed
from tfrec_recall.evaluation.streamed import (DEFAULT_USERS_PER_CHUNK, check_chunking, corpus_inputs,
                                              evaluate_examples)
from tfrec_recall.features import FeatureSpec, IdFeature, SequenceFeature
from tfrec_recall.features.specs import HISTORY
from tfrec_recall.layers.towers import tower_class
from tfrec_recall.layers.towers.base import Tower
from tfrec_recall.models.two_tower import TwoTower
from tfrec_recall.training.auxiliary import auxiliary_losses
from tfrec_recall.training.build import assemble_model, set_seed, tower
from tfrec_recall.training.callbacks import StopOnNonFiniteLoss
from tfrec_recall.training.fit import TrainResult, _compiled_model, _scope, selection_callbacks, sharded_by_data
from tfrec_recall.training.multi_worker import require_strategy, worker_dir
from tfrec_recall.training.resume import ResumeState
from tfrec_recall.training.tensorboard import require_log_dir, tensorboard_callbacks

# config key -> the value that streams (what the other values need is held in memory)
_STREAMABLE = {"example_age": False, "category_alignment_weight": 0.0,
               "contrastive_weight": 0.0, "distillation_weight": 0.0, "deep_retrieval": False}


def require_streamable(config: RunConfig) -> None:
    """``ConfigError`` naming the first key whose value needs the whole data in memory (module docstring)."""
    for key, value in _STREAMABLE.items():
        if getattr(config, key) != value:
            raise ConfigError(f"config key {key!r}: streaming input supports only {value!r} (it needs tables "
                              f"held in memory), got {getattr(config, key)!r}")
    for key in ("query_tower", "candidate_tower"):
        if tower_class(getattr(config, key)).from_split.__func__ is not Tower.from_split.__func__:
            raise ConfigError(f"config key {key!r}: {getattr(config, key)!r} reads inputs beyond ids and history "
                              "from the in-memory split; it does not stream yet")
    for key, entity in (("dat_query_feature", USER_ID), ("dat_candidate_feature", ITEM_ID)):
        if config.dat and getattr(config, key) != entity:
            raise ConfigError(f"config key {key!r}: streaming DAT augments the id ({entity!r}), got "
                              f"{getattr(config, key)!r}")


def streaming_specs(config: RunConfig, source: StreamingSplit) -> Dict[str, List[FeatureSpec]]:
    """The feature specs of ``specs_from_split`` for ids, history and side features, with vocabularies read from
    the source's files (the same tokens in the same order as the in-memory vocabularies of the training rows)."""
    items = source.vocabulary_file(ITEM_ID)
    query: List[FeatureSpec] = []
    if config.use_user_id:
        query.append(IdFeature(USER_ID, config.embedding_dim, vocabulary_file=source.vocabulary_file(USER_ID)))
    if config.use_history:
        query.append(SequenceFeature(HISTORY, config.embedding_dim, vocabulary_file=items,
                                     max_len=config.history_length or source.history_length,
                                     pooling=config.pooling))
    candidate: List[FeatureSpec] = [IdFeature(ITEM_ID, config.embedding_dim, vocabulary_file=items)]
    if config.use_side_features:
        side = source.side_specs(config.side_embedding_dim)
        query, candidate = query + side["query"], candidate + side["candidate"]
    return {"query": query, "candidate": candidate}


def _augment(config: RunConfig, source: StreamingSplit, entity: str) -> Optional[IdFeature]:
    if not config.dat:
        return None
    return IdFeature(entity, config.output_dim, vocabulary_file=source.vocabulary_file(entity))


def build_streaming_model(config: RunConfig, source: StreamingSplit) -> TwoTower:
    """The model of ``config`` over the source's vocabulary files (refuses what does not stream)."""
    require_streamable(config)
    specs = streaming_specs(config, source)
    query = tower(config.query_tower, specs["query"], config, "query_tower", _augment(config, source, USER_ID))
    candidate = tower(config.candidate_tower, specs["candidate"], config, "candidate_tower",
                      _augment(config, source, ITEM_ID))
    corpus, counts = None, None
    if config.negatives in ("mixed", "global"):
        corpus = corpus_arrays(specs["candidate"], source)
        trained, trained_counts = source.item_counts()
        by_id = dict(zip(trained, trained_counts))
        counts = np.asarray([by_id.get(i, 0) for i in corpus[ITEM_ID]], dtype=np.float64)
    # only DAT's losses remain possible here (require_streamable refused the ones that read the split)
    return assemble_model(config, query, candidate, corpus=corpus, counts=counts,
                          auxiliary=auxiliary_losses(config, None, query, candidate))


def _widths(specs: Sequence[FeatureSpec]) -> Dict[str, Optional[int]]:
    return {spec.name: spec.width for spec in specs}


def training_dataset(model: TwoTower, config: RunConfig, source: StreamingSplit, *, max_steps: Optional[int] = None,
                     strategy=None, shuffle_buffer: int = 100_000,
                     dataset_factory: Optional[DatasetFactory] = None) -> tf.data.Dataset:
    """The shuffled training batches of the model's training features, streamed from the train files. Under a
    strategy: whole global batches, sharded by DATA (as the in-memory path)."""
    widths = _widths(model.training_feature_specs())
    if model.weight_feature is not None:
        widths[model.weight_feature] = None
    dataset = examples_dataset(source.train_files, widths, config.batch_size, shuffle=True, seed=config.seed,
                               shuffle_buffer=shuffle_buffer, num_epochs=None if max_steps else 1,
                               drop_remainder=strategy is not None, dataset_factory=dataset_factory,
                               schema=source.schema())
    dataset = sharded_by_data(dataset, strategy)
    return dataset.take(max_steps) if max_steps else dataset


def corpus_arrays(specs: Sequence[FeatureSpec], source: StreamingSplit, batch_size: int = 4096
                  ) -> Dict[str, np.ndarray]:
    """The candidate inputs ``specs`` of every corpus item (of the three splits and of the item table), sorted by
    id as ``split.data.items`` in memory: from the corpus vocabulary when the specs read the id alone, else from
    the corpus split's examples (:func:`~tfrec_recall.evaluation.streamed.corpus_inputs`)."""
    return corpus_inputs(specs, source.corpus(), source.corpus_files, source.side, batch_size)


def corpus_embeddings(model: TwoTower, source: StreamingSplit):
    """(corpus ids, their candidate embeddings): :func:`corpus_arrays` through the candidate tower."""
    arrays = corpus_arrays(model.candidate_tower.input_specs, source)
    return arrays[ITEM_ID].astype(str), embed(model.candidate_tower, arrays)


def evaluate_streaming(model: TwoTower, source: StreamingSplit, which: str = "test",
                       ks: Sequence[int] = (10, 50, 100), *, max_users: Optional[int] = None,
                       retriever=None, users_per_chunk: int = DEFAULT_USERS_PER_CHUNK) -> Dict[str, float]:
    """PROTOCOL.md metrics of ``model`` on the source's ``which`` ("valid" / "test") examples: one query per
    user, its held-out item the positive, its training items (the examples' ``exclude``) removed, ranked over
    the corpus; the same numbers as :func:`~tfrec_recall.evaluation.evaluate.evaluate` on the in-memory split.
    Users are read and ranked ``users_per_chunk`` at a time (:mod:`tfrec_recall.evaluation.streamed`), so memory
    is bounded by a chunk and the corpus, not by the number of users. ``max_users``: only the first that many
    users (a cheaper validation signal between epochs)."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    check_chunking(max_users, users_per_chunk)
    ids, embeddings = corpus_embeddings(model, source)
    return evaluate_examples(model.query_tower, ids, embeddings, source.files(which), source.schema(), ks,
                             retriever=retriever, max_users=max_users, users_per_chunk=users_per_chunk)


def _callbacks(model, config: RunConfig, source: StreamingSplit, evaluate_every: int,
               max_eval_users: Optional[int]) -> list:
    """Validation every ``evaluate_every`` epochs (0: never) and early stopping, as in ``train``."""
    return selection_callbacks(config, lambda: evaluate_streaming(model, source, "valid", config.ks,
                                                                  max_users=max_eval_users), evaluate_every)


def _compiled(config: RunConfig, source: StreamingSplit, strategy) -> TwoTower:
    if strategy is not None and config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size (the global batch) must be a multiple of the strategy's "
                         f"{strategy.num_replicas_in_sync} replicas, got {config.batch_size}")
    return _compiled_model(config, source, strategy, build=build_streaming_model)


def streaming_fingerprint(config: RunConfig, source: StreamingSplit) -> Dict[str, object]:
    """What must not change between a killed streamed run and its resumption (as
    :func:`~tfrec_recall.training.resume.fingerprint` for an in-memory split): every configuration key but
    ``epochs``, and the training data, identified by the training files' names and sizes and the Beam-written
    training vocabularies and item counts (rows: the sum of the counts)."""
    digest = hashlib.sha256()
    for path in sorted(source.train_files):
        digest.update(f"{storage.name(path)}\x1f{storage.gfile().stat(path).length}\x1e".encode())
    for path in (source.vocabulary_file(USER_ID), source.counts_file(ITEM_ID)):
        digest.update(storage.read_bytes(path))
    keys = {k: v for k, v in config.to_dict().items() if k != "epochs"}
    _, counts = source.item_counts()
    return {"config": keys, "train_rows": int(counts.sum()), "train_sha256": digest.hexdigest()}


def _resume(model: TwoTower, config: RunConfig, source: StreamingSplit, resume_dir, stopper, strategy,
            epochs: int):
    """(the ResumeState or None, the epoch to start at): the state in ``resume_dir`` put back into ``model``."""
    if resume_dir is None:
        return None, 0
    resume = ResumeState(resume_dir, streaming_fingerprint(config, source), stopper, strategy=strategy)
    widths = _widths(model.training_feature_specs())
    if model.weight_feature is not None:
        widths[model.weight_feature] = None
    batch = next(iter(examples_dataset(source.train_files, widths, config.batch_size, schema=source.schema())))
    with _scope(strategy):  # the optimizer slots restore_model builds must be the strategy's variables
        resume.restore_model(model, batch)
    # A run that early stopping had ended goes straight to the end (where the best weights are put back).
    return resume, epochs if resume.stopped else resume.initial_epoch


def _logging(model: TwoTower, source: StreamingSplit, log_dir: Optional[str]) -> list:
    """TensorBoard scalars and, at the end of training, the corpus item embeddings for the projector."""
    return [] if log_dir is None else tensorboard_callbacks(log_dir, lambda: corpus_embeddings(model, source))


def train_streaming(config: RunConfig, source: StreamingSplit, *, evaluate_every: int = 1, verbose: int = 1,
                    callbacks: Sequence[tf.keras.callbacks.Callback] = (), max_steps: Optional[int] = None,
                    strategy: Optional[tf.distribute.Strategy] = None, shuffle_buffer: int = 100_000,
                    max_eval_users: Optional[int] = None, evaluate_test: bool = True,
                    dataset_factory: Optional[DatasetFactory] = None, log_dir: Optional[str] = None,
                    resume_dir: Optional[str] = None) -> TrainResult:
    """Fits ``config``'s model on the source's training files, streamed (``shuffle_buffer`` records shuffled at a
    time), as :func:`~tfrec_recall.training.fit.train` does on an in-memory split: validation every
    ``evaluate_every`` epochs (on the first ``max_eval_users`` users when given), early stopping with best-epoch
    restore, a guard against non-finite losses, ``max_steps`` batches as one epoch, TensorBoard logs in
    ``log_dir`` and a resumable state in ``resume_dir`` (written by the chief alone under a multi-worker
    strategy). Returns validation and test metrics of the returned model (test only with ``evaluate_test``; both
    on every user) and indexes the corpus, so ``result.model.recommend`` answers. ``dataset_factory``: a TFX
    Trainer's ``data_accessor.tf_dataset_factory``."""
    if max_steps is not None:
        require_positive_int("max_steps", max_steps)
        if resume_dir is not None:
            raise ValueError("resume_dir works by epochs; it cannot be combined with max_steps")
    log_dir, strategy = require_log_dir(log_dir), require_strategy(strategy)
    set_seed(config.seed)
    model = _compiled(config, source, strategy)
    dataset = training_dataset(model, config, source, max_steps=max_steps, strategy=strategy,
                               shuffle_buffer=shuffle_buffer, dataset_factory=dataset_factory)
    selection = _callbacks(model, config, source, evaluate_every, max_eval_users)
    stopper = next((c for c in selection if isinstance(c, tf.keras.callbacks.EarlyStopping)), None)
    epochs = config.epochs if max_steps is None else 1
    resume, initial_epoch = _resume(model, config, source, resume_dir, stopper, strategy, epochs)
    guard = StopOnNonFiniteLoss(f"learning_rate={config.learning_rate}, temperature={config.temperature}")
    start = time.perf_counter()
    with worker_dir(log_dir, strategy) as logs_to:  # a non-chief's logs go to a temporary, removed afterwards
        history = model.fit(dataset, epochs=epochs, verbose=verbose, initial_epoch=initial_epoch,
                            callbacks=[guard, *selection, *([resume] if resume else []), *callbacks,
                                       *_logging(model, source, logs_to)]).history
    seconds = time.perf_counter() - start
    return _result(model, config, source, resume.history if resume else history, stopper, seconds,
                   evaluate_every, evaluate_test)


def _result(model: TwoTower, config: RunConfig, source: StreamingSplit, history, stopper, seconds: float,
            evaluate_every: int, evaluate_test: bool) -> TrainResult:
    """Validation and test metrics of the trained model, its serving index, and the whole run's history."""
    best_epoch = stopper.best_epoch + 1 if stopper is not None and stopper.best_weights is not None else None
    valid = evaluate_streaming(model, source, "valid", config.ks) if evaluate_every else {}
    test = evaluate_streaming(model, source, "test", config.ks) if evaluate_test else {}
    ids, embeddings = corpus_embeddings(model, source)
    model.index_candidates(ids, embeddings, index="brute_force", max_k=100)
    return TrainResult(model, {k: [float(x) for x in v] for k, v in history.items()}, test, seconds, valid,
                       best_epoch)
