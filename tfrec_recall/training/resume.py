"""Resumable training: the state of a run written at the end of every epoch, so a killed run goes on from its last
finished epoch instead of starting over.

A resume directory holds one ``epoch-NNNN/`` folder (written whole, then renamed into place, so a kill never leaves
a half-written state) with:

* ``ckpt*``: a ``tf.train.Checkpoint`` of the model and its optimizer (every variable: towers, frequency
  estimator, optimizer slots and step count);
* ``state.json``: the epochs done, the history so far, the early-stopping counters and the run's fingerprint (the
  configuration apart from ``epochs``, and a hash of the training rows);
* ``best_weights.npz``: the early-stopping best weights, when there are any.

Resuming with another configuration or other training data is refused, naming the keys that differ. What is not
restored: the order of the shuffled batches of the remaining epochs (the data is reshuffled from the seed), so a
resumed run is a valid continuation, not a bit-identical replay.

Under a multi-worker strategy every worker writes the state at every epoch's end (the checkpoint may run collective
ops), but only the chief's copy is kept in the directory; the others go to temporaries that are removed at once
(:mod:`tfrec_recall.training.multi_worker`). Every worker resumes from the chief's state, so the directory must
be one they all read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Dict, List, Mapping, Optional

import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._atomic import atomic_directory, remove_stale_temporaries
from tfrec_recall.config import ConfigError, RunConfig
from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.training.multi_worker import is_chief, require_strategy, worker_dir

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
BEST_WEIGHTS_FILE = "best_weights.npz"
CHECKPOINT_PREFIX = "ckpt"
_EPOCH_DIR = re.compile(r"epoch-(\d{4,})")


def fingerprint(config: RunConfig, split: Split) -> Dict[str, Any]:
    """What must not change between a killed run and its resumption: every configuration key but ``epochs``
    (a resumed run may train for longer), and the training rows."""
    digest = hashlib.sha256()
    for column in (USER_ID, ITEM_ID):
        digest.update("\x1f".join(split.train[column].astype(str)).encode())
    keys = {k: v for k, v in config.to_dict().items() if k != "epochs"}
    return {"config": keys, "train_rows": len(split.train), "train_sha256": digest.hexdigest()}


def latest_state(directory) -> Optional[str]:
    """The newest complete ``epoch-NNNN`` folder of ``directory`` (any path or URI); None when there is none."""
    done = [(int(m.group(1)), storage.join(directory, n)) for n in storage.listdir(directory)
            if (m := _EPOCH_DIR.fullmatch(n)) and storage.exists(storage.join(directory, n, STATE_FILE))]
    return max(done)[1] if done else None


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    keys = sorted(set(saved["config"]) | set(current["config"]))
    out = [k for k in keys if saved["config"].get(k) != current["config"].get(k)]
    if saved["train_sha256"] != current["train_sha256"]:
        out.append(f"the training data ({saved['train_rows']:,} rows then, {current['train_rows']:,} now)")
    return out


class ResumeState(tf.keras.callbacks.Callback):
    """Writes the run's state to ``directory`` at the end of every epoch and, when a state is already there,
    puts it back at the start of training. ``early_stopping`` (put it before this callback in ``fit``'s list) has
    its counters and best weights saved and restored too. ``initial_epoch`` (for ``fit``) and ``history`` (every
    epoch's logs, those before the resumption included) come from the state. ``strategy`` (the one the model is
    trained under) says whether this process may remove the temporaries a killed writer left (only the chief
    does); where each epoch's state is written follows the model's own strategy (only the chief's is kept)."""

    def __init__(self, directory, run_fingerprint: Mapping[str, Any],
                 early_stopping: Optional[tf.keras.callbacks.EarlyStopping] = None,
                 strategy: Optional[tf.distribute.Strategy] = None):
        super().__init__()
        self.directory = storage.makedirs(directory)
        self.fingerprint = dict(run_fingerprint)
        self.early_stopping = early_stopping
        if is_chief(require_strategy(strategy)):  # another worker must not remove what the chief is writing
            remove_stale_temporaries(self.directory, r"\.epoch-\d+\.tmp-(?P<pid>\d+)")
        self.state = self._read()
        self.initial_epoch = self.state["epochs_done"] if self.state else 0
        self.stopped = bool(self.state and self.state["stopped"])  # early stopping had ended the run
        self.history: Dict[str, List[float]] = dict(self.state["history"]) if self.state else {}

    def _read(self) -> Optional[Dict[str, Any]]:
        path = latest_state(self.directory)
        if path is None:
            return None
        state = storage.read_json(storage.join(path, STATE_FILE))
        changed = _differences(state["fingerprint"], self.fingerprint)
        if changed:
            raise ConfigError(f"{self.directory} holds the state of a killed run with other settings (differs in: "
                              f"{', '.join(changed)}); use the same settings to resume it, or delete that "
                              "directory to start over")
        state["path"] = path
        return state

    def restore_model(self, model: tf.keras.Model, batch: Mapping[str, tf.Tensor]) -> None:
        """Puts the saved variables back into ``model`` (compiled, not yet trained), when there is a state. The
        model and its optimizer are built first, by computing the losses of ``batch`` (not a training step: no
        weight, estimator or optimizer state changes), so every saved variable has its place and is checked."""
        if self.state is None:
            return
        model.compute_losses(batch, training=False)
        model.optimizer.build(model.trainable_variables)
        status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
            storage.join(self.state["path"], CHECKPOINT_PREFIX))
        status.assert_existing_objects_matched()
        logger.info("resumed training after epoch %d from %s", self.initial_epoch, self.state["path"])

    def on_train_begin(self, logs=None):
        stopper, saved = self.early_stopping, (self.state or {}).get("early_stopping")
        if stopper is None or saved is None:
            return
        stopper.wait, stopper.best, stopper.best_epoch = saved["wait"], saved["best"], saved["best_epoch"]
        path = storage.join(self.state["path"], BEST_WEIGHTS_FILE)
        if storage.exists(path):
            with storage.load_npz(path) as weights:
                stopper.best_weights = [weights[f"w{i}"] for i in range(len(weights.files))]

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        stopper = self.early_stopping
        state = {"epochs_done": epoch + 1, "stopped": bool(self.model.stop_training), "history": self.history,
                 "fingerprint": self.fingerprint,
                 "early_stopping": None if stopper is None else
                 {"wait": int(stopper.wait), "best": float(stopper.best), "best_epoch": int(stopper.best_epoch)}}
        # Every worker writes (the checkpoint may run collective ops); only the chief's copy stays.
        with worker_dir(self.directory, self.model.distribute_strategy) as directory:
            self._write(storage.join(directory, f"epoch-{epoch + 1:04d}"), state)
            if directory == self.directory:
                self._remove_older(epoch + 1)

    def _write(self, final: str, state: Mapping[str, Any]) -> None:
        """The state folder ``final``, written whole or not at all."""
        stopper = self.early_stopping
        with atomic_directory(final, last=(STATE_FILE,)) as tmp:  # a folder without state.json is never read
            tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer).write(
                storage.join(tmp, CHECKPOINT_PREFIX))
            if stopper is not None and stopper.best_weights is not None:
                storage.save_npz(storage.join(tmp, BEST_WEIGHTS_FILE),
                                 **{f"w{i}": w for i, w in enumerate(stopper.best_weights)})
            storage.write_text(storage.join(tmp, STATE_FILE), json.dumps(state))

    def _remove_older(self, epochs_done: int) -> None:
        """Only the newest state is kept."""
        for old in storage.listdir(self.directory):
            match = _EPOCH_DIR.fullmatch(old)
            if match and int(match.group(1)) < epochs_done:
                storage.rmtree(storage.join(self.directory, old))
