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
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import tensorflow as tf

from tfrec_recall._atomic import atomic_directory, remove_stale_temporaries
from tfrec_recall.config import ConfigError, RunConfig
from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split

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


def latest_state(directory) -> Optional[Path]:
    """The newest complete ``epoch-NNNN`` folder of ``directory``; None when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in directory.iterdir()
            if (m := _EPOCH_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
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
    epoch's logs, those before the resumption included) come from the state."""

    def __init__(self, directory, run_fingerprint: Mapping[str, Any],
                 early_stopping: Optional[tf.keras.callbacks.EarlyStopping] = None):
        super().__init__()
        self.directory = Path(directory)
        self.fingerprint = dict(run_fingerprint)
        self.early_stopping = early_stopping
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory, r"\.epoch-\d+\.tmp-(?P<pid>\d+)")
        self.state = self._read()
        self.initial_epoch = self.state["epochs_done"] if self.state else 0
        self.stopped = bool(self.state and self.state["stopped"])  # early stopping had ended the run
        self.history: Dict[str, List[float]] = dict(self.state["history"]) if self.state else {}

    def _read(self) -> Optional[Dict[str, Any]]:
        path = latest_state(self.directory)
        if path is None:
            return None
        state = json.loads((path / STATE_FILE).read_text())
        changed = _differences(state["fingerprint"], self.fingerprint)
        if changed:
            raise ConfigError(f"{self.directory} holds the state of a killed run with other settings (differs in: "
                              f"{', '.join(changed)}); use the same settings to resume it, or delete that "
                              "directory to start over")
        state["path"] = str(path)
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
            str(Path(self.state["path"]) / CHECKPOINT_PREFIX))
        status.assert_existing_objects_matched()
        logger.info("resumed training after epoch %d from %s", self.initial_epoch, self.state["path"])

    def on_train_begin(self, logs=None):
        stopper, saved = self.early_stopping, (self.state or {}).get("early_stopping")
        if stopper is None or saved is None:
            return
        stopper.wait, stopper.best, stopper.best_epoch = saved["wait"], saved["best"], saved["best_epoch"]
        path = Path(self.state["path"]) / BEST_WEIGHTS_FILE
        if path.is_file():
            with np.load(path, allow_pickle=False) as weights:
                stopper.best_weights = [weights[f"w{i}"] for i in range(len(weights.files))]

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        stopper = self.early_stopping
        state = {"epochs_done": epoch + 1, "stopped": bool(self.model.stop_training), "history": self.history,
                 "fingerprint": self.fingerprint,
                 "early_stopping": None if stopper is None else
                 {"wait": int(stopper.wait), "best": float(stopper.best), "best_epoch": int(stopper.best_epoch)}}
        final = self.directory / f"epoch-{epoch + 1:04d}"
        with atomic_directory(final) as tmp:
            tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer).write(str(tmp / CHECKPOINT_PREFIX))
            if stopper is not None and stopper.best_weights is not None:
                np.savez(tmp / BEST_WEIGHTS_FILE, **{f"w{i}": w for i, w in enumerate(stopper.best_weights)})
            (tmp / STATE_FILE).write_text(json.dumps(state))
        for old in self.directory.iterdir():  # only the newest state is kept
            match = _EPOCH_DIR.fullmatch(old.name)
            if match and int(match.group(1)) < epoch + 1:
                shutil.rmtree(old, ignore_errors=True)
