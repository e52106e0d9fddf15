"""The run directory: what ``train`` leaves behind and ``recommend`` / ``export`` / the pipeline read.

A saved model directory holds:

* ``config.yaml``: the run configuration and the dataset arguments;
* ``checkpoint/``: a ``tf.train.Checkpoint`` of the whole model (towers, estimator state, optimizer);
* ``query_tower/`` and ``candidate_tower/``: Keras SavedModels taking raw features;
* ``candidates.npz``: the corpus ids, their embeddings (for ``recommend``) and training interaction counts
  (``counts``, for the most-popular baseline the pipeline's evaluator compares with), and for Deep Retrieval each
  item's paths (``paths`` [n, J, D], -1 for an unused slot);
* ``path_structure/`` (Deep Retrieval only): the structure model's config (``config.json``) and weights;
* ``metrics.json``, ``history.json`` and ``training.png`` (loss and HR@K per epoch);
* ``request.json``: raw query features of two validation users (a sample request for smoke tests);
* ``logs/`` (when training wrote TensorBoard logs): scalars and the item-embedding projector
  (``tensorboard --logdir <run>/logs``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

from tfrec_recall import storage
from tfrec_recall._atomic import atomic_directory
from tfrec_recall.config import RunConfig
from tfrec_recall.data.schema import USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.data.streaming import StreamingSplit
from tfrec_recall.evaluation.baselines import training_counts
from tfrec_recall.evaluation.evaluate import corpus_arrays, embed, embed_queries
from tfrec_recall.features import FeatureSpec, feature_arrays
from tfrec_recall.training.fit import TrainResult, plot_history
from tfrec_recall.training.multi_worker import is_chief, require_strategy, worker_dir


REQUEST_FILE = "request.json"


def sample_request(split: Split, specs: Sequence[FeatureSpec], rows: int = 2) -> Dict[str, list]:
    """Raw query features of the first ``rows`` validation users (training users when there is no validation
    split), as JSON-ready lists: a ready-made request for smoke tests of an export. Inputs the model fills in
    at serving time (the example age) are left out, as the serving signature leaves them out."""
    specs = [s for s in specs if s.serving_default is None]
    if isinstance(split, StreamingSplit):
        return _streamed_request(split, specs, rows)
    frame = split.valid if len(split.valid) else split.train
    arrays = feature_arrays(frame.head(rows), split.data, specs)
    return {name: np.asarray(a).tolist() for name, a in arrays.items()}


def _streamed_request(source: StreamingSplit, specs: Sequence[FeatureSpec], rows: int) -> Dict[str, list]:
    from tfrec_recall.data.streaming import examples_dataset
    from tfrec_recall.evaluation.evaluate import decoded_strings
    batch = next(iter(examples_dataset(source.valid_files, {s.name: s.width for s in specs}, rows,
                                          schema=source.schema())))
    decoded = {name: decoded_strings(v.numpy()) for name, v in batch.items()}
    return {name: a.tolist() for name, a in decoded.items()}


LOGS_DIR = "logs"


def save_run(result: TrainResult, split: Union[Split, StreamingSplit], out_dir, config: RunConfig,
             dataset_args: Mapping[str, Any], log_dir: Optional[str] = None,
             strategy: Optional[tf.distribute.Strategy] = None) -> str:
    """Writes the model directory (a local path or a URI) atomically: everything goes to a temporary sibling,
    moved into place at the end (``config.yaml``, which ``load_run`` looks for first, written last).
    ``log_dir`` (the TensorBoard directory given to ``train``) is moved into the run as ``logs/``.

    With a multi-worker ``strategy`` every worker calls this (saving may run collective ops), but only the chief
    writes ``out_dir`` and moves ``log_dir``; another worker writes the run to a temporary that is removed
    (:mod:`tfrec_recall.training.multi_worker`) and leaves ``log_dir`` alone. Returns ``out_dir``."""
    chief = is_chief(require_strategy(strategy))
    if chief and log_dir is not None and not storage.isdir(log_dir):
        raise FileNotFoundError(f"log_dir {str(log_dir)!r} is not a directory (the log_dir given to train)")
    out = storage.path_str(out_dir).rstrip("/")
    with worker_dir(out, strategy) as target:
        _save_run_to(result, split, target, config, dataset_args, log_dir if chief else None)
    return out


def _save_run_to(result: TrainResult, split: Split, out: str, config: RunConfig, dataset_args: Mapping[str, Any],
                 log_dir: Optional[str]) -> None:
    """The body of :func:`save_run`, writing to ``out``."""
    if storage.exists(out) and not storage.is_empty_dir(out):
        raise FileExistsError(f"--out {out!r} exists and is not empty; choose a new directory")
    storage.rmtree(out)  # empty (checked above): the move needs the name free
    storage.makedirs(storage.parent(out))
    with atomic_directory(out, last=(CONFIG_FILE,)) as tmp:
        _write_models(result.model, split, tmp)
        storage.write_json(storage.join(tmp, "metrics.json"), {
            "test": result.metrics, "valid": result.valid_metrics, "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds})
        storage.write_json(storage.join(tmp, "history.json"), result.history)
        storage.write_json(storage.join(tmp, REQUEST_FILE),
                           sample_request(split, result.model.query_tower.serving_specs), indent=None)
        plot_history(result.history, storage.join(tmp, "training.png"))
        if log_dir is not None:
            storage.move_directory(log_dir, storage.join(tmp, LOGS_DIR), last=())
        storage.write_text(storage.join(tmp, CONFIG_FILE), yaml.safe_dump(
            {"config": config.to_dict(), "dataset": dict(dataset_args)}, sort_keys=False))


CONFIG_FILE = "config.yaml"


def _write_models(model, split: Split, directory: str) -> None:
    """The checkpoint, both towers as SavedModels and the corpus embeddings (and Deep Retrieval's structure)."""
    tf.train.Checkpoint(model=model).write(storage.join(directory, "checkpoint", "ckpt"))
    model.query_tower.save(storage.join(directory, "query_tower"), save_format="tf", include_optimizer=False)
    model.candidate_tower.save(storage.join(directory, "candidate_tower"), save_format="tf", include_optimizer=False)
    if isinstance(split, StreamingSplit):
        from tfrec_recall.training.streaming import corpus_embeddings
        items, embeddings = corpus_embeddings(model, split)
        trained, counts = split.item_counts()
        counts = pd.Series(counts, index=trained.astype(str)).reindex(items.astype(str), fill_value=0).to_numpy()
    else:
        items = split.data.items
        embeddings = embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.input_specs))
        counts = training_counts(split)
    storage.save_npz(storage.join(directory, "candidates.npz"), ids=items.astype(str), embeddings=embeddings,
                     counts=np.asarray(counts, dtype=np.int64),
                     **_save_structure(model, items.astype(str), storage.join(directory, STRUCTURE_DIR)))


STRUCTURE_DIR = "path_structure"


def _save_structure(model, ids: np.ndarray, directory: str) -> Dict[str, np.ndarray]:
    """Deep Retrieval's structure model (config and weights, in ``directory``) and the items' paths (returned as
    ``{"paths": [n, J, D]}`` in the order of ``ids``); nothing for other models."""
    from tfrec_recall.tasks.path_likelihood import PathStructureLoss
    losses = [x for x in getattr(model, "auxiliary_losses", []) if isinstance(x, PathStructureLoss)]
    if not losses:
        return {}
    loss, = losses
    s = loss.structure
    storage.makedirs(directory)
    storage.write_json(storage.join(directory, "config.json"), tf.keras.layers.serialize(s), indent=None)
    tf.train.Checkpoint(structure=s).write(storage.join(directory, "ckpt"))
    return {"paths": loss.paths_of(ids)}


def _load_structure(directory: str, input_dim: int):
    """The saved structure model, built for ``input_dim``-d query vectors and its weights restored."""
    s = tf.keras.layers.deserialize(storage.read_json(storage.join(directory, "config.json")))
    s(tf.zeros([1, input_dim]), tf.zeros([1, 1, s.num_layers], tf.int32))  # creates every variable
    tf.train.Checkpoint(structure=s).read(storage.join(directory, "ckpt")).assert_consumed()
    return s


@dataclasses.dataclass
class LoadedRun:
    config: RunConfig
    dataset: Dict[str, Any]
    query_tower: tf.keras.Model
    candidate_tower: tf.keras.Model
    candidate_ids: np.ndarray
    candidate_embeddings: np.ndarray
    structure: Optional[Any] = None  # Deep Retrieval: the PathStructure
    candidate_paths: Optional[np.ndarray] = None  # Deep Retrieval: [n, J, D] paths of the candidates
    candidate_counts: Optional[np.ndarray] = None  # training interactions per candidate (None: an older run)


def load_run_config(model_dir) -> RunConfig:
    """The RunConfig saved with a run, without loading its models."""
    from tfrec_recall.config import from_dict
    path = storage.join(model_dir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"--model-dir {str(model_dir)!r} has no config.yaml: not a directory written by "
                                "`tfrec-recall train`")
    return from_dict(yaml.safe_load(storage.read_text(path))["config"])


def load_run(model_dir) -> LoadedRun:
    from tfrec_recall.config import from_dict
    d = storage.path_str(model_dir)
    missing = storage.first_missing(d, (CONFIG_FILE, "query_tower", "candidate_tower", "candidates.npz"))
    if missing is not None:
        raise FileNotFoundError(f"--model-dir {d!r} has no {missing}: not a directory written by "
                                "`tfrec-recall train`")
    saved = yaml.safe_load(storage.read_text(storage.join(d, CONFIG_FILE)))
    candidates = storage.load_npz(storage.join(d, "candidates.npz"))
    structure = None
    if storage.isdir(storage.join(d, STRUCTURE_DIR)):
        structure = _load_structure(storage.join(d, STRUCTURE_DIR), candidates["embeddings"].shape[1])
    return LoadedRun(from_dict(saved["config"]), saved["dataset"],
                     tf.keras.models.load_model(storage.join(d, "query_tower"), compile=False),
                     tf.keras.models.load_model(storage.join(d, "candidate_tower"), compile=False),
                     candidates["ids"], candidates["embeddings"], structure,
                     candidates["paths"] if "paths" in candidates.files else None,
                     candidates["counts"] if "counts" in candidates.files else None)


def recommend(run: LoadedRun, split: Split, user_ids: Sequence[str], k: int = 10,
              exclude_seen: bool = True) -> Dict[str, List[tuple]]:
    """Top-k (item id, score) per user, from the user's training history and features."""
    known = set(split.train_items)
    for user in user_ids:
        if user not in known:
            raise KeyError(f"user_id {user!r} has no training interactions in {split.data.name!r}")
    def recent(values):  # the last history_length, most recent first
        return tuple(values[::-1][:split.history_length])

    rows = pd.DataFrame({USER_ID: list(user_ids), "history": [recent(split.train_items[u]) for u in user_ids]})
    if split.train_times is not None:
        rows["history_times"] = [recent(split.train_times[u]) for u in user_ids]
    queries, mask = embed_queries(run.query_tower, feature_arrays(rows, split.data, run.query_tower.input_specs))
    scores = queries @ run.candidate_embeddings.T
    if mask is not None:  # K interests: an item's score is its best over the user's valid interests
        scores = np.where(mask[:, :, None], scores, -np.inf).max(axis=1)
    index = {item: i for i, item in enumerate(run.candidate_ids)}
    out = {}
    for row, user in enumerate(user_ids):
        s = scores[row].copy()
        if exclude_seen:
            s[[index[i] for i in split.train_items[user] if i in index]] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        out[user] = [(str(run.candidate_ids[i]), float(s[i])) for i in top]
    return out
