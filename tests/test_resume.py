"""Resumable training: a run killed after some epochs goes on from its last finished epoch with the same weights,
optimizer state, early-stopping counters and history; other settings are refused; a state caught mid-write is
never read."""
from pathlib import Path
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall import cli, training
from tfrec_recall.config import ConfigError, load_config
from tfrec_recall.data import leave_last_out, make_synthetic
from tfrec_recall.training.resume import STATE_FILE, ResumeState, fingerprint, latest_state

SMALL = {"epochs": 3, "embedding_dim": 16, "output_dim": 16, "hidden_units": [16], "batch_size": 256,
         "patience": 5}


class Killed(Exception):
    pass


class KillAfter(tf.keras.callbacks.Callback):
    """Stands for a SIGKILL at the end of epoch ``epoch`` (1-based), after the run's state was written; keeps
    the weights and optimizer step the killed process had."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.weights = self.model.get_weights()
            self.step = int(self.model.optimizer.iterations.numpy())
            raise Killed


class WeightsAtStart(tf.keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = self.model.get_weights()
        self.step = int(self.model.optimizer.iterations.numpy())


def test_resumed_run_starts_from_the_killed_epoch(small_split, tmp_path):
    config = load_config("youtube_dnn", overrides={**SMALL, "epochs": 2})
    kill = KillAfter(1)
    with pytest.raises(Killed):
        training.train(config, small_split, verbose=0, resume_dir=str(tmp_path), callbacks=[kill])
    assert latest_state(tmp_path).endswith("epoch-0001")
    start = WeightsAtStart()
    result = training.train(config, small_split, verbose=0, resume_dir=str(tmp_path), callbacks=[start])
    assert start.step == kill.step > 0  # the optimizer (Adam's step and slots) goes on, it does not restart
    assert len(start.weights) == len(kill.weights)
    for before, after in zip(kill.weights, start.weights):
        np.testing.assert_array_equal(before, after)
    steps_per_epoch = kill.step  # the killed run finished one epoch
    assert int(result.model.optimizer.iterations.numpy()) == 2 * steps_per_epoch  # one more epoch, not two
    assert len(result.history["loss"]) == len(result.history["val_HR@50"]) == 2  # the killed run's epoch kept
    best = result.best_epoch
    assert result.history["val_HR@50"][best - 1] == max(result.history["val_HR@50"])
    assert result.valid_metrics["HR@50"] == pytest.approx(max(result.history["val_HR@50"]), abs=1e-6)


def test_a_finished_state_trains_no_more(small_split, tmp_path):
    config = load_config("youtube_dnn", overrides={**SMALL, "epochs": 1})
    first = training.train(config, small_split, verbose=0, resume_dir=str(tmp_path))
    again = training.train(config, small_split, verbose=0, resume_dir=str(tmp_path))
    assert int(again.model.optimizer.iterations.numpy()) == int(first.model.optimizer.iterations.numpy())
    assert again.history == first.history
    assert again.valid_metrics["HR@50"] == pytest.approx(first.valid_metrics["HR@50"], abs=1e-6)
    longer = training.train(config.replace(epochs=2), small_split, verbose=0, resume_dir=str(tmp_path))
    assert len(longer.history["loss"]) == 2  # epochs may grow on resumption


def _stopper_model():
    model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_early_stopping_counters_and_best_weights_are_restored(tmp_path):
    model = _stopper_model()
    stopper = tf.keras.callbacks.EarlyStopping(monitor="val_HR@50", mode="max", restore_best_weights=True)
    stopper.set_model(model)
    stopper.on_train_begin()
    stopper.wait, stopper.best, stopper.best_epoch = 2, 0.25, 3
    stopper.best_weights = [np.full(w.shape, 7.0, np.float32) for w in model.get_weights()]
    saving = ResumeState(tmp_path, {"config": {}, "train_rows": 1, "train_sha256": "x"}, stopper)
    saving.set_model(model)
    saving.on_epoch_end(4, {"loss": 1.5, "val_HR@50": 0.2})
    fresh = tf.keras.callbacks.EarlyStopping(monitor="val_HR@50", mode="max", restore_best_weights=True)
    fresh.on_train_begin()
    loading = ResumeState(tmp_path, {"config": {}, "train_rows": 1, "train_sha256": "x"}, fresh)
    loading.on_train_begin()
    assert (fresh.wait, fresh.best, fresh.best_epoch) == (2, 0.25, 3)
    for weights in fresh.best_weights:
        np.testing.assert_array_equal(weights, 7.0)
    assert loading.initial_epoch == 5 and loading.history == {"loss": [1.5], "val_HR@50": [0.2]}
    assert not loading.stopped


def test_other_settings_or_data_are_refused(small_split, small_data, tmp_path):
    config = load_config("youtube_dnn", overrides={**SMALL, "epochs": 1})
    training.train(config, small_split, verbose=0, resume_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"differs in: learning_rate\).*delete that directory"):
        training.train(config.replace(learning_rate=0.5), small_split, verbose=0, resume_dir=str(tmp_path))
    other = leave_last_out(make_synthetic(num_users=300, num_items=200, num_categories=8, mean_interactions=15,
                                          seed=4), history_length=10)
    with pytest.raises(ConfigError, match=r"the training data \([\d,]+ rows then, [\d,]+ now\)"):
        training.train(config, other, verbose=0, resume_dir=str(tmp_path))
    assert fingerprint(config, small_split) == fingerprint(config.replace(epochs=9), small_split)


def test_a_state_caught_mid_write_is_never_read(tmp_path):
    run = {"config": {}, "train_rows": 1, "train_sha256": "x"}
    (tmp_path / "epoch-0002").mkdir()
    (tmp_path / "epoch-0002" / STATE_FILE).write_text(json.dumps(
        {"epochs_done": 2, "stopped": False, "history": {"loss": [2.0, 1.0]}, "fingerprint": run,
         "early_stopping": None}))
    (tmp_path / "epoch-0003").mkdir()  # no state.json: not finished (a rename cannot leave this; still ignored)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".epoch-0003.tmp-{dead.pid}"  # what a kill during the write leaves
    left.mkdir()
    state = ResumeState(tmp_path, run)
    assert state.initial_epoch == 2 and state.history == {"loss": [2.0, 1.0]}
    assert not left.exists()


def test_resume_refuses_max_steps(small_split, tmp_path):
    config = load_config("youtube_dnn", overrides=SMALL)
    with pytest.raises(ValueError, match="resume_dir works by epochs; it cannot be combined with max_steps"):
        training.train(config, small_split, max_steps=3, resume_dir=str(tmp_path))


@pytest.mark.slow
def test_cli_run_killed_by_sigkill_resumes(tmp_path):
    """The real thing: ``tfrec-recall train`` is SIGKILLed once its first epoch's state is written; the same
    command (with more epochs allowed) resumes it and saves the whole run, leaving nothing behind."""
    data = make_synthetic(num_users=120, num_items=80, num_categories=4, mean_interactions=10, seed=3)
    csv = tmp_path / "interactions.csv"
    data.interactions[["user_id", "item_id", "timestamp"]].to_csv(csv, index=False)
    conf = tmp_path / "small.yaml"
    conf.write_text("embedding_dim: 16\noutput_dim: 16\nhidden_units: [16]\nbatch_size: 256\npatience: 0\n")
    out = tmp_path / "run"
    command = ["train", "--dataset", "csv", "--data-dir", str(csv), "--model", "youtube_dnn", "--config",
               str(conf), "--out", str(out), "--quiet", "--history-length", "10"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "tfrec_recall.cli", *command, "--epochs", "200"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_dir = tmp_path / ".run.resume"
    deadline = time.monotonic() + 600
    while latest_state(state_dir) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before its first state was written"
    killed_at = json.loads((Path(latest_state(state_dir)) / STATE_FILE).read_text())["epochs_done"]
    assert not out.exists()
    assert cli.main([*command, "--epochs", str(killed_at + 1)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == killed_at + 1
    assert not state_dir.exists() and (out / "logs").is_dir()
