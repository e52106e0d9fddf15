"""Build, train, evaluate, save and load retrieval models: what the CLI, the benchmarks and notebooks call.

A saved model directory holds:

* ``config.yaml``: the run configuration and the dataset arguments;
* ``checkpoint/``: a ``tf.train.Checkpoint`` of the whole model (towers, estimator state, optimizer);
* ``query_tower/`` and ``candidate_tower/``: Keras SavedModels taking raw features;
* ``candidates.npz``: the corpus ids and their embeddings (for ``recommend``);
* ``metrics.json``, ``history.json`` and ``training.png`` (loss and HR@K per epoch);
* ``request.json``: raw query features of two validation users (a sample request for smoke tests).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

from tfrec_recall.callbacks import StopOnNonFiniteLoss
from tfrec_recall.config import RunConfig
from tfrec_recall._atomic import atomic_directory
from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.features import FeatureSpec, feature_arrays, specs_from_split
from tfrec_recall.layers.frequency import StreamingFrequencyEstimator
from tfrec_recall.layers.sampling import CorpusNegativeSampler
from tfrec_recall.layers.towers import TOWERS
from tfrec_recall.losses import RetrievalTask
from tfrec_recall.metrics import RetrievalEvaluation, full_corpus_metrics
from tfrec_recall.models.two_tower import TwoTower

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    tf.keras.utils.set_random_seed(seed)


def _tower(kind: str, specs: Sequence[FeatureSpec], config: RunConfig, name: str):
    kwargs = dict(output_dim=config.output_dim, l2_normalize=config.l2_normalize, dropout=config.dropout, name=name)
    if kind == "residual":
        width = config.hidden_units[0] if config.hidden_units else 128
        return TOWERS[kind](specs, width=width, num_blocks=max(1, len(config.hidden_units)), **kwargs)
    return TOWERS[kind](specs, hidden_units=config.hidden_units, **kwargs)


def corpus_arrays(split: Split, specs: Sequence[FeatureSpec]) -> Dict[str, np.ndarray]:
    """Raw candidate features of every item in the corpus (sorted ids)."""
    return feature_arrays(pd.DataFrame({ITEM_ID: split.data.items}), split.data, specs)


def build_model(config: RunConfig, split: Split) -> TwoTower:
    specs = specs_from_split(split, embedding_dim=config.embedding_dim,
                             side_embedding_dim=config.side_embedding_dim,
                             history_length=config.history_length, pooling=config.pooling,
                             use_side_features=config.use_side_features, use_user_id=config.use_user_id,
                             use_history=config.use_history)
    query_tower = _tower(config.query_tower, specs["query"], config, "query_tower")
    candidate_tower = _tower(config.candidate_tower, specs["candidate"], config, "candidate_tower")
    estimator = None
    if config.logq_correction and config.negatives != "global":  # global negatives: the sampler's own u(y)
        estimator = StreamingFrequencyEstimator(num_buckets=config.estimator_buckets,
                                                num_hashes=config.estimator_hashes, alpha=config.estimator_alpha,
                                                name="frequency_estimator")
    sampler = None
    if config.negatives in ("mixed", "global"):
        counts = split.train[ITEM_ID].value_counts().reindex(split.data.items, fill_value=0).to_numpy()
        sampler = CorpusNegativeSampler(corpus_arrays(split, specs["candidate"]), id_feature=ITEM_ID,
                                        counts=counts, beta=config.negative_beta,
                                        num_negatives=config.num_negatives, seed=config.seed,
                                        name="negative_sampler")
    task = RetrievalTask(temperature=config.temperature, remove_accidental_hits=config.remove_accidental_hits,
                         num_hard_negatives=config.num_hard_negatives,
                         in_batch_negatives=config.negatives != "global", name="retrieval")
    return TwoTower(query_tower, candidate_tower, task, frequency_estimator=estimator, negative_sampler=sampler,
                    logq_correction=config.logq_correction)


def _optimizer(config: RunConfig):
    if config.optimizer == "adagrad":
        return tf.keras.optimizers.Adagrad(config.learning_rate)
    return tf.keras.optimizers.Adam(config.learning_rate)


def training_arrays(model: TwoTower, split: Split) -> Dict[str, np.ndarray]:
    specs = model.query_tower.encoder.specs + model.candidate_tower.encoder.specs
    return feature_arrays(split.train, split.data, specs, with_weight=True)


def evaluate(model: TwoTower, split: Split, which: str = "test", ks: Sequence[int] = (10, 50, 100),
             progress: bool = False) -> Dict[str, float]:
    """PROTOCOL.md metrics of ``model`` on the split's ``valid`` or ``test`` rows over the full corpus."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    return evaluate_towers(model.query_tower, model.candidate_tower, split, which, ks, progress)


def evaluate_towers(query_tower, candidate_tower, split: Split, which: str = "test",
                    ks: Sequence[int] = (10, 50, 100), progress: bool = False) -> Dict[str, float]:
    rows = getattr(split, which)
    # One query per user; a user with several held-out items (random split) has them all as positives.
    grouped = rows.groupby(USER_ID, sort=False)
    positives_by_user = grouped[ITEM_ID].agg(list)
    users = rows.drop_duplicates(USER_ID).reset_index(drop=True)
    items = split.data.items
    index = {item: i for i, item in enumerate(items)}
    candidates = embed(candidate_tower, corpus_arrays(split, candidate_tower.encoder.specs))
    queries = embed(query_tower, feature_arrays(users, split.data, query_tower.encoder.specs))
    positives = [[index[i] for i in positives_by_user[u]] for u in users[USER_ID]]
    exclude = [[index[i] for i in split.train_items.get(u, [])] for u in users[USER_ID]]
    return full_corpus_metrics(queries, candidates, positives, exclude, ks=ks, progress=progress)


def embed(tower, arrays: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
    outputs = [tower(batch, training=False).numpy() for batch in make_dataset(arrays, batch_size)]
    return np.concatenate(outputs, axis=0)


@dataclasses.dataclass
class TrainResult:
    model: TwoTower
    history: Dict[str, List[float]]
    metrics: Dict[str, float]  # test split, of the model returned
    train_seconds: float
    valid_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)  # validation, same model
    best_epoch: Optional[int] = None  # 1-based epoch whose weights were kept (None: no model selection)


def _selection_callbacks(model, config: RunConfig, split: Split, evaluate_every: int) -> list:
    """Validation metrics every ``evaluate_every`` epochs and, with ``config.patience`` > 0, early stopping
    on ``config.selection_metric`` with the best epoch's weights restored."""
    if not evaluate_every or not len(split.valid):
        return []
    keys = sorted({f"HR@{k}" for k in config.ks} | {f"NDCG@{config.ks[0]}", config.selection_metric})
    out = [RetrievalEvaluation(lambda: evaluate(model, split, "valid", config.ks), every=evaluate_every, keys=keys)]
    if config.patience:
        out.append(tf.keras.callbacks.EarlyStopping(monitor="val_" + config.selection_metric, mode="max",
                                                    patience=config.patience, restore_best_weights=True))
    return out


def train(config: RunConfig, split: Split, *, evaluate_every: int = 1, verbose: int = 1,
          callbacks: Sequence[tf.keras.callbacks.Callback] = (), max_steps: Optional[int] = None) -> TrainResult:
    """Builds and fits a model on ``split.train`` (the validation and test items are never trained on).

    Every ``evaluate_every`` epochs (0: never) the model is evaluated on the validation split; with
    ``config.patience`` > 0 training stops after that many epochs without improvement of
    ``config.selection_metric`` and the best epoch's weights are restored (``best_epoch``). A NaN or infinite
    loss raises :class:`~tfrec_recall.callbacks.NonFiniteLossError`. Returns validation and test metrics of
    the returned model. ``max_steps`` (e.g. a TFX Trainer's ``train_args.num_steps``) trains exactly that many
    batches as one epoch instead of ``config.epochs`` passes."""
    if max_steps is not None:
        require_positive_int("max_steps", max_steps)
    set_seed(config.seed)
    model = build_model(config, split)
    model.compile(optimizer=_optimizer(config))
    dataset = make_dataset(training_arrays(model, split), config.batch_size, shuffle=True, seed=config.seed,
                           repeat=max_steps is not None)
    epochs = config.epochs
    if max_steps is not None:
        dataset, epochs = dataset.take(max_steps), 1
    guard = StopOnNonFiniteLoss(f"learning_rate={config.learning_rate}, temperature={config.temperature}")
    selection = _selection_callbacks(model, config, split, evaluate_every)
    start = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, verbose=verbose, callbacks=[guard, *selection, *callbacks])
    seconds = time.perf_counter() - start
    stopper = [c for c in selection if isinstance(c, tf.keras.callbacks.EarlyStopping)]
    best_epoch = stopper[0].best_epoch + 1 if stopper and stopper[0].best_weights is not None else None
    valid = evaluate(model, split, "valid", config.ks) if len(split.valid) else {}
    metrics = evaluate(model, split, "test", config.ks) if len(split.test) else {}
    return TrainResult(model, {k: [float(x) for x in v] for k, v in history.history.items()}, metrics, seconds,
                       valid, best_epoch)


# ----------------------------------------------------------------------------------------------------------
# Saving and loading

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
    fig.savefig(path, dpi=100)
    plt.close(fig)


REQUEST_FILE = "request.json"


def sample_request(split: Split, specs: Sequence[FeatureSpec], rows: int = 2) -> Dict[str, list]:
    """Raw query features of the first ``rows`` validation users (training users when there is no validation
    split), as JSON-ready lists: a ready-made request for smoke tests of an export."""
    frame = split.valid if len(split.valid) else split.train
    arrays = feature_arrays(frame.head(rows), split.data, specs)
    return {name: np.asarray(a).tolist() for name, a in arrays.items()}


def save_run(result: TrainResult, split: Split, out_dir, config: RunConfig, dataset_args: Mapping[str, Any]) -> Path:
    """Writes the model directory atomically: everything goes to a temporary sibling, renamed at the end."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty; choose a new directory")
    if out.exists():
        out.rmdir()  # empty (checked above): the rename needs the name free
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        model = result.model
        (tmp / "config.yaml").write_text(yaml.safe_dump({"config": config.to_dict(), "dataset": dict(dataset_args)},
                                                        sort_keys=False))
        tf.train.Checkpoint(model=model).write(str(tmp / "checkpoint" / "ckpt"))
        model.query_tower.save(str(tmp / "query_tower"), save_format="tf", include_optimizer=False)
        model.candidate_tower.save(str(tmp / "candidate_tower"), save_format="tf", include_optimizer=False)
        items = split.data.items
        embeddings = embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.encoder.specs))
        np.savez(tmp / "candidates.npz", ids=items.astype(str), embeddings=embeddings)
        (tmp / "metrics.json").write_text(json.dumps({"test": result.metrics, "valid": result.valid_metrics,
                                                      "best_epoch": result.best_epoch,
                                                      "train_seconds": result.train_seconds}, indent=2))
        (tmp / "history.json").write_text(json.dumps(result.history, indent=2))
        (tmp / REQUEST_FILE).write_text(json.dumps(sample_request(split, model.query_tower.encoder.specs)))
        plot_history(result.history, tmp / "training.png")
    return out


@dataclasses.dataclass
class LoadedRun:
    config: RunConfig
    dataset: Dict[str, Any]
    query_tower: tf.keras.Model
    candidate_tower: tf.keras.Model
    candidate_ids: np.ndarray
    candidate_embeddings: np.ndarray


def load_run_config(model_dir) -> RunConfig:
    """The RunConfig saved with a run, without loading its models."""
    from tfrec_recall.config import from_dict
    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--model-dir {str(model_dir)!r} has no config.yaml: not a directory written by "
                                "`tfrec-recall train`")
    return from_dict(yaml.safe_load(path.read_text())["config"])


def load_run(model_dir) -> LoadedRun:
    from tfrec_recall.config import from_dict
    d = Path(model_dir)
    for name in ("config.yaml", "query_tower", "candidate_tower", "candidates.npz"):
        if not (d / name).exists():
            raise FileNotFoundError(f"--model-dir {str(d)!r} has no {name}: not a directory written by "
                                    "`tfrec-recall train`")
    saved = yaml.safe_load((d / "config.yaml").read_text())
    candidates = np.load(d / "candidates.npz", allow_pickle=False)
    return LoadedRun(from_dict(saved["config"]), saved["dataset"],
                     tf.keras.models.load_model(str(d / "query_tower"), compile=False),
                     tf.keras.models.load_model(str(d / "candidate_tower"), compile=False),
                     candidates["ids"], candidates["embeddings"])


def recommend(run: LoadedRun, split: Split, user_ids: Sequence[str], k: int = 10,
              exclude_seen: bool = True) -> Dict[str, List[tuple]]:
    """Top-k (item id, score) per user, from the user's training history and features."""
    known = set(split.train_items)
    for user in user_ids:
        if user not in known:
            raise KeyError(f"user_id {user!r} has no training interactions in {split.data.name!r}")
    rows = pd.DataFrame({USER_ID: list(user_ids),
                         "history": [tuple(split.train_items[u][::-1][:split.history_length]) for u in user_ids]})
    queries = embed(run.query_tower, feature_arrays(rows, split.data, run.query_tower.encoder.specs))
    scores = queries @ run.candidate_embeddings.T
    index = {item: i for i, item in enumerate(run.candidate_ids)}
    out = {}
    for row, user in enumerate(user_ids):
        s = scores[row].copy()
        if exclude_seen:
            s[[index[i] for i in split.train_items[user] if i in index]] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        out[user] = [(str(run.candidate_ids[i]), float(s[i])) for i in top]
    return out
