"""Fit a model from a RunConfig: early stopping on a validation metric with best-epoch restore, a guard
against non-finite losses, and the training-curve plot."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._validation import require_positive_int
from tfrec_recall.config import RunConfig
from tfrec_recall.data.split import Split
from tfrec_recall.data.streaming import StreamingSplit
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.evaluation.evaluate import corpus_arrays, embed, evaluate
from tfrec_recall.models.base import index_split_corpus
from tfrec_recall.models.two_tower import TwoTower
from tfrec_recall.training.build import build_model, make_optimizer, set_seed, training_arrays
from tfrec_recall.training.callbacks import RetrievalEvaluation, StopOnNonFiniteLoss
from tfrec_recall.training.deep_retrieval import MStep, PathEMStep, deep_retrieval_index
from tfrec_recall.training.multi_worker import require_strategy, worker_dir
from tfrec_recall.training.resume import ResumeState, fingerprint
from tfrec_recall.training.tensorboard import item_titles, require_log_dir, tensorboard_callbacks


@dataclasses.dataclass
class TrainResult:
    model: TwoTower
    history: Dict[str, List[float]]
    metrics: Dict[str, float]  # test split, of the model returned
    train_seconds: float
    valid_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)  # validation, same model
    best_epoch: Optional[int] = None  # 1-based epoch whose weights were kept (None: no model selection)


def _retriever(model, config: RunConfig, split: Split):
    """What evaluation searches: None (exact search over the candidate tower's vectors), or for Deep Retrieval
    its beam-search index over the corpus with the current paths (also what ``recommend`` then searches)."""
    if not config.deep_retrieval:
        return None
    embeddings = embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.input_specs))
    items = np.asarray(split.data.items).astype(str)
    # max_k = the corpus: evaluation lengthens a list whose tie block (e.g. items sharing the unknown-id vector)
    # crosses the cut-off until the block closes; a list is only as long as the beam's items
    return deep_retrieval_index(model, items, embeddings, beam_width=config.dr_beam_width, rerank=config.dr_rerank,
                                max_k=len(items))


def _evaluate(model, config: RunConfig, split: Split, which: str) -> Dict[str, float]:
    retriever = _retriever(model, config, split)
    if retriever is None:  # exact search: evaluate's own default
        return evaluate(model, split, which, config.ks)
    return evaluate(model, split, which, config.ks, retriever=retriever)


def _em_callbacks(model, config: RunConfig, split: Split, arrays) -> list:
    """Deep Retrieval's M-step after every ``dr_epochs_per_round`` epochs (none for other models)."""
    if not config.deep_retrieval:
        return []
    step = MStep(beam_width=config.dr_mstep_beam_width, alpha=config.dr_alpha, batch_size=config.batch_size)
    specs = model.candidate_tower.input_specs
    return [PathEMStep(arrays, step, every=config.dr_epochs_per_round,
                       item_vectors=lambda: embed(model.candidate_tower, corpus_arrays(split, specs)))]


def _selection_callbacks(model, config: RunConfig, split: Split, evaluate_every: int) -> list:
    """Validation metrics every ``evaluate_every`` epochs and, with ``config.patience`` > 0, early stopping
    on ``config.selection_metric`` with the best epoch's weights restored."""
    if not len(split.valid):
        return []
    return selection_callbacks(config, lambda: _evaluate(model, config, split, "valid"), evaluate_every)


def selection_callbacks(config: RunConfig, evaluate_fn, evaluate_every: int) -> list:
    """``evaluate_fn()`` (validation metrics) every ``evaluate_every`` epochs (0: never) and early stopping on
    ``config.selection_metric``, shared by the in-memory and the streamed paths."""
    if not evaluate_every:
        return []
    keys = sorted({f"HR@{k}" for k in config.ks} | {f"NDCG@{config.ks[0]}", config.selection_metric})
    out = [RetrievalEvaluation(evaluate_fn, every=evaluate_every, keys=keys)]
    if config.patience:
        out.append(tf.keras.callbacks.EarlyStopping(monitor="val_" + config.selection_metric, mode="max",
                                                    patience=config.patience, restore_best_weights=True))
    return out


def _logging_callbacks(model, split: Split, log_dir: Optional[str]) -> list:
    """TensorBoard scalars and, at the end of training, the corpus item embeddings for the projector."""
    if log_dir is None:
        return []
    items = split.data.items.astype(str)

    def embed_items():
        return items, embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.input_specs))

    return tensorboard_callbacks(log_dir, embed_items, item_titles(split.data, items))


def _scope(strategy):
    """The strategy's scope; no scope without one (the single-process path)."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _compiled_model(config: RunConfig, split, strategy, build=build_model):
    """``build(config, split)``'s model, built and compiled in the strategy's scope (when there is one)."""
    with _scope(strategy):
        model = build(config, split)
        model.compile(optimizer=make_optimizer(config))
    if strategy is not None:
        # The logged values are already the global batch's (the loss trackers' sync-on-read variables sum over
        # every replica): take the first replica's. tf-keras 2.16's default ("auto" = "sum") adds them up once
        # more across the workers, which logs a 2-worker loss twice over.
        model.distribute_reduction_method = "first"
    return model


def _require_distributable(config: RunConfig, rows: int, strategy) -> None:
    """Under a strategy the global ``batch_size`` must split evenly over the replicas and fill at least one batch
    (every batch is whole: incomplete ones are dropped)."""
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size (the global batch) must be a multiple of the strategy's {replicas} replicas, "
                         f"got {config.batch_size}")
    if config.batch_size > rows:
        raise ValueError(f"batch_size must be <= the {rows} training rows under a strategy (incomplete batches are "
                         f"dropped, so there would be no step), got {config.batch_size}")


def _training_dataset(arrays, config: RunConfig, max_steps: Optional[int], strategy) -> tf.data.Dataset:
    """The shuffled training batches. Under a strategy: whole global batches only (each replica gets an equal
    share) and sharding by DATA: every worker builds the same seeded in-memory dataset and keeps its own part of
    each global batch, so the workers train on different rows."""
    dataset = make_dataset(arrays, config.batch_size, shuffle=True, seed=config.seed, repeat=max_steps is not None,
                           drop_remainder=strategy is not None)
    dataset = sharded_by_data(dataset, strategy)
    return dataset.take(max_steps) if max_steps is not None else dataset


def sharded_by_data(dataset: tf.data.Dataset, strategy) -> tf.data.Dataset:
    """Under a strategy, ``dataset`` sharded by DATA (every worker keeps its part of each global batch)."""
    if strategy is None:
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _resume_state(config: RunConfig, split: Split, resume_dir, stopper, strategy) -> Optional[ResumeState]:
    if resume_dir is None:
        return None
    return ResumeState(resume_dir, fingerprint(config, split), stopper, strategy=strategy)


def _result(model, config: RunConfig, split: Split, history, resume: Optional[ResumeState], stopper,
            seconds: float) -> TrainResult:
    """Validation and test metrics of the trained model, its serving index, and the whole run's history."""
    best_epoch = stopper.best_epoch + 1 if stopper is not None and stopper.best_weights is not None else None
    valid = _evaluate(model, config, split, "valid") if len(split.valid) else {}
    metrics = _evaluate(model, config, split, "test") if len(split.test) else {}
    if config.deep_retrieval:  # so that train(...).model.recommend(user_features, k) answers
        _retriever(model, config, split)  # the beam-search index over the corpus with the final paths
    else:
        index_split_corpus(model, split)
    history = resume.history if resume is not None else history  # with the epochs before a resumption
    return TrainResult(model, {k: [float(x) for x in v] for k, v in history.items()}, metrics, seconds,
                       valid, best_epoch)


def train(config: RunConfig, split: Union[Split, StreamingSplit], *, evaluate_every: int = 1, verbose: int = 1,
          callbacks: Sequence[tf.keras.callbacks.Callback] = (), max_steps: Optional[int] = None,
          log_dir: Optional[str] = None, resume_dir: Optional[str] = None,
          strategy: Optional[tf.distribute.Strategy] = None, dataset_factory=None) -> TrainResult:
    """Builds and fits a model on ``split.train`` (the validation and test items are never trained on).

    Every ``evaluate_every`` epochs (0: never) the model is evaluated on the validation split; with
    ``config.patience`` > 0 training stops after that many epochs without improvement of
    ``config.selection_metric`` and the best epoch's weights are restored (``best_epoch``). A NaN or infinite
    loss raises :class:`~tfrec_recall.training.callbacks.NonFiniteLossError`. Returns validation and test metrics of
    the returned model. ``max_steps`` (e.g. a TFX Trainer's ``train_args.num_steps``) trains exactly that many
    batches as one epoch instead of ``config.epochs`` passes. With ``log_dir``, TensorBoard logs go there: epoch
    scalars (loss, validation metrics) and, after training, the returned model's item embeddings for the
    projector (:mod:`tfrec_recall.training.tensorboard`). With ``resume_dir``, the run's state is written there
    at the end of every epoch and a state already there is resumed from (:mod:`tfrec_recall.training.resume`).

    With ``strategy`` (e.g. a ``MultiWorkerMirroredStrategy``; every worker calls ``train`` alike) the model is
    built and compiled in its scope, ``config.batch_size`` is the GLOBAL batch (a multiple of the replicas;
    incomplete batches are dropped) and the training rows are sharded by DATA over the workers; the retrieval
    task gathers the in-batch candidates across replicas. Only the chief writes ``log_dir`` and ``resume_dir``;
    the other workers write to temporaries that are removed (:mod:`tfrec_recall.training.multi_worker`).
    Without a strategy, training runs in this process alone.

    ``split`` may be a :class:`~tfrec_recall.data.streaming.StreamingSplit` (record files and Beam-computed
    vocabularies): training then streams (:func:`tfrec_recall.training.streaming.train_streaming`, with the same
    logs and resumption; ``dataset_factory``: a TFX Trainer's ``data_accessor.tf_dataset_factory`` to read the
    files with)."""
    if isinstance(split, StreamingSplit):
        return _train_streamed(config, split, evaluate_every=evaluate_every, verbose=verbose, callbacks=callbacks,
                               max_steps=max_steps, log_dir=log_dir, resume_dir=resume_dir, strategy=strategy,
                               dataset_factory=dataset_factory)
    if dataset_factory is not None:
        raise ValueError("dataset_factory reads record files: it needs a StreamingSplit, not an in-memory Split")
    if max_steps is not None:
        require_positive_int("max_steps", max_steps)
        if resume_dir is not None:
            raise ValueError("resume_dir works by epochs; it cannot be combined with max_steps")
    log_dir, strategy = require_log_dir(log_dir), require_strategy(strategy)
    if strategy is not None:
        _require_distributable(config, len(split.train), strategy)
    set_seed(config.seed)
    model = _compiled_model(config, split, strategy)
    arrays = training_arrays(model, split)
    dataset = _training_dataset(arrays, config, max_steps, strategy)
    epochs = config.epochs if max_steps is None else 1
    guard = StopOnNonFiniteLoss(f"learning_rate={config.learning_rate}, temperature={config.temperature}")
    selection = _selection_callbacks(model, config, split, evaluate_every)
    stopper = next((c for c in selection if isinstance(c, tf.keras.callbacks.EarlyStopping)), None)
    resume = _resume_state(config, split, resume_dir, stopper, strategy)
    initial_epoch = 0
    if resume is not None:
        with _scope(strategy):  # the optimizer slots restore_model builds must be the strategy's variables
            resume.restore_model(model, next(iter(make_dataset(arrays, config.batch_size))))
        # A run that early stopping had ended goes straight to the end (where the best weights are put back).
        initial_epoch = epochs if resume.stopped else resume.initial_epoch
    start = time.perf_counter()
    with worker_dir(log_dir, strategy) as logs_to:  # a non-chief's logs go to a temporary, removed afterwards
        history = model.fit(dataset, epochs=epochs, verbose=verbose, initial_epoch=initial_epoch,
                            callbacks=[guard, *_em_callbacks(model, config, split, arrays), *selection,
                                       *([resume] if resume else []), *callbacks,
                                       *_logging_callbacks(model, split, logs_to)]).history
    return _result(model, config, split, history, resume, stopper, time.perf_counter() - start)


def _train_streamed(config: RunConfig, source: StreamingSplit, **kwargs) -> TrainResult:
    from tfrec_recall.training.streaming import train_streaming
    return train_streaming(config, source, **kwargs)


def plot_history(history: Mapping[str, Sequence[float]], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hr_keys = [k for k in history if k.startswith("val_HR@")]
    fig, axes = plt.subplots(1, 2 if hr_keys else 1, figsize=(10 if hr_keys else 5, 3.6), squeeze=False)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    axes[0, 0].plot(epochs, history.get("loss", []), marker="o")
    axes[0, 0].set(title="training loss", xlabel="epoch", ylabel="loss")
    if hr_keys:
        for key in sorted(hr_keys, key=lambda k: int(k.split("@")[1])):
            axes[0, 1].plot(np.arange(1, len(history[key]) + 1), history[key], marker="o", label=key[4:])
        axes[0, 1].set(title="validation hit rate", xlabel="epoch", ylabel="HR@K")
        axes[0, 1].legend()
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)
