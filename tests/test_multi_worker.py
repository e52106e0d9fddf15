"""Multi-worker training (MultiWorkerMirroredStrategy, TF_CONFIG with two workers on 127.0.0.1, one process
each): chief-only writes, DATA sharding of the global batch, and resumption after a worker is SIGKILLed.

The process tests share ONE job, to keep this file within minutes on a loaded 2-core machine (every worker
process pays 20-45 s of TensorFlow import and one to three minutes of tracing its training step):

1. two workers start ``python -m tfrec_recall.training.multi_worker`` for 2 epochs; once the chief's
   ``epoch-0001/state.json`` exists and both printed epoch 1, worker 1 is SIGKILLed mid-epoch 2, the chief
   (which then fails or hangs on its next collective) is given a grace period and killed too;
2. both are restarted with the same command, resume at epoch 2, finish and save the run.

The chief/temporary-directory helpers are also tested without processes.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall import storage, training
from tfrec_recall.config import load_config
from tfrec_recall.data import leave_last_out, make_synthetic
from tfrec_recall.training import multi_worker
from tfrec_recall.training.multi_worker import is_chief, task_of, worker_dir, write_dir
from tfrec_recall.training.resume import ResumeState, latest_state

from tests.conftest import chance_hit_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The job's arguments (the entry point's synthetic data: 200 users, 200 items, data seed 3): a global batch of 128
# gives 20 steps per epoch, 64 rows per worker per step.
JOB = ["--epochs", "2", "--batch-size", "128", "--num-users", "200", "--num-items", "200", "--dim", "8",
       "--preset", "youtube_dnn", "--seed", "0"]
START_TIMEOUT = 480  # s until epoch 1 is done in both workers (import + strategy + tracing on a loaded machine)
FINISH_TIMEOUT = 480  # s for the restarted job to finish


# -- the helpers, without processes ----------------------------------------------------------------------------

class _Clustered(tf.distribute.OneDeviceStrategy):
    """A one-device strategy that reports a cluster position, as a multi-worker strategy's resolver does."""

    def __init__(self, jobs, task_type, task_id):
        super().__init__("/cpu:0")
        spec = tf.train.ClusterSpec({job: [f"127.0.0.1:{1000 + i}" for i in range(n)] for job, n in jobs.items()})
        self._resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type=task_type,
                                                                              task_id=task_id)

    @property
    def cluster_resolver(self):
        return self._resolver


def test_chief_is_the_chief_task_or_worker_0_without_one():
    assert is_chief(None) and task_of(None) == (None, None)
    assert is_chief(tf.distribute.get_strategy())  # the default strategy: one process
    assert is_chief(_Clustered({"worker": 2}, "worker", 0))
    assert not is_chief(_Clustered({"worker": 2}, "worker", 1))
    assert is_chief(_Clustered({"chief": 1, "worker": 2}, "chief", 0))
    assert not is_chief(_Clustered({"chief": 1, "worker": 2}, "worker", 0))  # there is a chief: worker 0 is not
    assert not is_chief(_Clustered({"worker": 2, "evaluator": 1}, "evaluator", 0))
    assert task_of(_Clustered({"worker": 2}, "worker", 1)) == ("worker", 1)


def test_strategy_arguments_are_checked():
    with pytest.raises(TypeError, match=r"strategy must be None or a tf.distribute.Strategy, got 'mirrored'"):
        is_chief("mirrored")
    with pytest.raises(TypeError, match=r"strategy must be None or a tf.distribute.Strategy, got 3"):
        write_dir("/tmp/x", 3)
    with pytest.raises(ValueError, match=r"path must be a non-empty path, got ''"):
        write_dir("", None)


def test_write_dir_is_the_path_on_the_chief_and_a_removed_temporary_elsewhere(tmp_path):
    out = str(tmp_path / "run")
    assert write_dir(out, None) == out
    assert write_dir(out + "/", _Clustered({"worker": 2}, "worker", 0)) == out
    other = _Clustered({"worker": 2}, "worker", 1)
    assert write_dir(out, other) == str(tmp_path / f".run.worker-1.tmp-{os.getpid()}")
    with worker_dir(out, other) as target:
        storage.makedirs(storage.join(target, "x"))
        storage.write_text(storage.join(target, "x", "f.txt"), "1")
        assert storage.listdir(str(tmp_path)) == [f".run.worker-1.tmp-{os.getpid()}"]
    assert storage.listdir(str(tmp_path)) == []  # the non-chief's copy is gone, and nothing is at out
    with pytest.raises(RuntimeError, match="boom"):
        with worker_dir(out, other) as target:
            storage.makedirs(target)
            raise RuntimeError("boom")
    assert storage.listdir(str(tmp_path)) == []  # removed after a failure too
    with worker_dir(out, _Clustered({"worker": 2}, "worker", 0)) as target:
        storage.makedirs(target)
    assert storage.listdir(str(tmp_path)) == ["run"]  # the chief's stays
    with worker_dir(None, other) as target:
        assert target is None


def test_write_dir_removes_what_a_killed_process_of_the_same_task_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    for name in (f".run.worker-1.tmp-{pid}", f".run.worker-2.tmp-{pid}", f".other.worker-1.tmp-{pid}"):
        storage.makedirs(str(tmp_path / name))
    write_dir(str(tmp_path / "run"), _Clustered({"worker": 3}, "worker", 1))
    # worker 1's own leftover for "run" is removed; another task's, or another path's, are not its business
    assert storage.listdir(str(tmp_path)) == [f".other.worker-1.tmp-{pid}", f".run.worker-2.tmp-{pid}"]


@pytest.mark.slow
def test_a_non_chief_resume_state_and_run_directory_leave_nothing_behind(tmp_path, small_split):
    """A non-chief writes its state and its run to temporaries that are removed: the resume directory and the
    run's parent stay as the chief will fill them."""
    other = _Clustered({"worker": 2}, "worker", 1)
    config = load_config("youtube_dnn", overrides={"epochs": 1, "embedding_dim": 8, "output_dim": 8,
                                                   "hidden_units": [8], "batch_size": 64})
    with other.scope():
        model = training.build_model(config, small_split)
        model.compile(optimizer=training.make_optimizer(config))
        batch = next(iter(training.make_dataset(training.training_arrays(model, small_split), 64)))
        model.compute_losses(batch)  # builds the variables
    resume_dir = str(tmp_path / "resume")
    state = ResumeState(resume_dir, {"config": {}, "train_rows": 0, "train_sha256": ""}, strategy=other)
    state.set_model(model)
    state.on_epoch_end(0, {"loss": 1.0})
    assert model.distribute_strategy is other
    assert latest_state(resume_dir) is None and storage.listdir(resume_dir) == []
    assert storage.listdir(str(tmp_path)) == ["resume"]
    result = training.TrainResult(model, {"loss": [1.0]}, {}, 0.0)
    out = training.save_run(result, small_split, str(tmp_path / "run"), config, {"name": "synthetic"},
                            log_dir=str(tmp_path / "absent-logs"), strategy=other)
    assert out == str(tmp_path / "run")
    assert storage.listdir(str(tmp_path)) == ["resume"]  # no run (the chief writes it), no temporary


def test_train_refuses_a_global_batch_the_replicas_cannot_share(small_split, mirrored_strategy):
    config = load_config("youtube_dnn", overrides={"epochs": 1, "batch_size": 65})
    with pytest.raises(ValueError, match=r"batch_size \(the global batch\) must be a multiple of the strategy's 2 "
                                         r"replicas, got 65"):
        training.train(config, small_split, strategy=mirrored_strategy)
    rows = len(small_split.train)
    with pytest.raises(ValueError, match=rf"batch_size must be <= the {rows} training rows under a strategy .*"
                                         rf"got {rows + 2 - rows % 2}"):
        training.train(config.replace(batch_size=rows + 2 - rows % 2), small_split, strategy=mirrored_strategy)
    with pytest.raises(TypeError, match=r"strategy must be None or a tf.distribute.Strategy, got 'mwms'"):
        training.train(config.replace(batch_size=64), small_split, strategy="mwms")


def test_entry_point_arguments_are_checked():
    with pytest.raises(ValueError, match=r"--batch-size must be >= 1, got 0"):
        multi_worker._check_args(multi_worker._parse_args(["--out", "o", "--resume-dir", "r", "--batch-size", "0"]))
    with pytest.raises(ValueError, match=r"--tf-config must be JSON, got '\{oops'"):
        multi_worker._check_args(multi_worker._parse_args(["--out", "o", "--resume-dir", "r", "--tf-config", "{oops"]))
    with pytest.raises(ValueError, match=r"--tf-config must be a JSON object with 'cluster' and 'task'"):
        multi_worker._check_args(multi_worker._parse_args(["--out", "o", "--resume-dir", "r", "--tf-config", "[]"]))
    with pytest.raises(ValueError, match=r"--collective-timeout must be > 0 seconds, got -1.0"):
        multi_worker._check_args(multi_worker._parse_args(["--out", "o", "--resume-dir", "r",
                                                           "--collective-timeout", "-1"]))


# -- the two-worker job ----------------------------------------------------------------------------------------

class _Job:
    """Two worker processes of the entry point; stdout / stderr of each launch in ``logs``."""

    def __init__(self, job_dir, logs, ports):
        self.job_dir, self.logs, self.ports, self.launches = job_dir, logs, ports, 0
        self.procs = []

    def command(self, index):
        cluster = {"worker": [f"127.0.0.1:{p}" for p in self.ports]}
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        return [sys.executable, "-m", "tfrec_recall.training.multi_worker", "--out", str(self.job_dir / "run"),
                "--resume-dir", str(self.job_dir / "resume"), "--tf-config", config, *JOB]

    def start(self):
        self.launches += 1
        self.procs = []
        for index in range(2):
            out = open(self.logs / f"launch{self.launches}-worker{index}.out", "w")
            err = open(self.logs / f"launch{self.launches}-worker{index}.err", "w")
            self.procs.append(subprocess.Popen(self.command(index), stdout=out, stderr=err, cwd=ROOT))

    def records(self, index, launch=None):
        """The JSON lines worker ``index`` printed in ``launch`` (default: the latest)."""
        path = self.logs / f"launch{launch or self.launches}-worker{index}.out"
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]

    def failure(self, what):
        tails = [f"--- worker {i} stderr ---\n" + (self.logs / f"launch{self.launches}-worker{i}.err")
                 .read_text()[-3000:] for i in range(2)]
        return f"{what}\n" + "\n".join(tails)

    def stop(self):
        """SIGKILLs whatever is still running (the finally of every test)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)


def _wait_for_epoch_1(job):
    """Until the chief's epoch-1 state exists and both workers printed epoch 1 (a worker exiting fails)."""
    deadline = time.monotonic() + START_TIMEOUT
    state = job.job_dir / "resume" / "epoch-0001" / "state.json"
    while time.monotonic() < deadline:
        exited = [p.poll() for p in job.procs]
        if any(code is not None for code in exited):
            pytest.fail(job.failure(f"a worker ended before epoch 1 was done: exit codes {exited}"))
        printed = [any(r.get("epoch") == 1 for r in job.records(i)) for i in range(2)]
        if state.is_file() and all(printed):
            return
        time.sleep(0.2)
    pytest.fail(job.failure(f"epoch 1 not done in {START_TIMEOUT} s"))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Runs the job: SIGKILL of worker 1 during epoch 2, then a restart of both with the same command. Returns
    the job, what the resume directory held at the restart, and the seconds taken."""
    root = tmp_path_factory.mktemp("multi_worker")
    (root / "job").mkdir()
    (root / "logs").mkdir()
    job = _Job(root / "job", root / "logs", multi_worker.free_ports(2))
    start = time.monotonic()
    try:
        job.start()
        _wait_for_epoch_1(job)
        job.procs[1].send_signal(signal.SIGKILL)  # a worker lost mid-epoch 2
        job.procs[1].wait(timeout=30)
        try:
            job.procs[0].wait(timeout=20)  # the chief fails on its next collective, or hangs there
        except subprocess.TimeoutExpired:
            pass  # hanging is the other expected outcome; it is killed below
        job.stop()
        at_restart = latest_state(str(root / "job" / "resume"))
        job.start()
        codes = [p.wait(timeout=FINISH_TIMEOUT) for p in job.procs]
        assert codes == [0, 0], job.failure(f"the restarted workers exited with {codes}")
    finally:
        job.stop()
    return job, at_restart, time.monotonic() - start


@pytest.mark.slow
def test_both_workers_report_the_same_loss_and_resume_at_epoch_2(killed_and_resumed):
    job, at_restart, seconds = killed_and_resumed
    print(f"the killed and resumed 2-worker job took {seconds:.0f} s")
    assert at_restart is not None and at_restart.endswith("epoch-0001")  # killed during epoch 2
    first = [[r for r in job.records(i, launch=1) if r["event"] == "epoch"] for i in range(2)]
    assert [r["epoch"] for r in first[0]] == [1] and [r["epoch"] for r in first[1]] == [1]
    resumed = [[r for r in job.records(i) if r["event"] == "epoch"] for i in range(2)]
    assert [r["epoch"] for r in resumed[0]] == [r["epoch"] for r in resumed[1]] == [2]  # resumed at epoch 2
    for before, after in zip(first, resumed):
        assert before[0]["steps"] == after[0]["steps"] == 20  # 2,595 rows // 128: whole global batches only
    assert first[0][0]["loss"] == pytest.approx(first[1][0]["loss"], rel=1e-6)
    assert resumed[0][0]["loss"] == pytest.approx(resumed[1][0]["loss"], rel=1e-6)
    done = [job.records(i)[-1] for i in range(2)]
    assert [d["event"] for d in done] == ["done", "done"] and [d["chief"] for d in done] == [True, False]
    assert done[0]["loss"] == pytest.approx(done[1]["loss"], rel=1e-6)
    # the run's history joins the killed run's epoch 1 and the resumed epoch 2; training went on (loss fell)
    assert done[0]["loss"] == pytest.approx([first[0][0]["loss"], resumed[0][0]["loss"]], rel=1e-6)
    assert all(math.isfinite(x) for x in done[0]["loss"]) and done[0]["loss"][1] < done[0]["loss"][0]


@pytest.mark.slow
def test_only_the_chief_run_is_left(killed_and_resumed):
    job, _, _ = killed_and_resumed
    # the resume state is removed once the run is saved; no worker temporaries (of the run, the state or the logs)
    assert sorted(os.listdir(job.job_dir)) == ["run"]
    run = job.job_dir / "run"
    for name in ("config.yaml", "candidates.npz", "query_tower", "candidate_tower", "checkpoint", "history.json",
                 "metrics.json", "logs"):
        assert (run / name).exists(), name
    assert len(json.loads((run / "history.json").read_text())["loss"]) == 2
    assert training.load_run(str(run)).candidate_embeddings.shape == (200, 8)


@pytest.mark.slow
def test_the_two_worker_run_learns(killed_and_resumed):
    """Validation HR@50 above chance: k / (#items - #excluded training items) averaged over the validation users
    (tests/conftest.py), about 50 / 187 = 0.27 here."""
    job, _, _ = killed_and_resumed
    split = leave_last_out(make_synthetic(num_users=200, num_items=200, num_categories=8, mean_interactions=15,
                                          seed=3), history_length=10)
    chance = chance_hit_rate(split, 50, "valid")
    assert 0.2 < chance < 0.35
    assert job.records(0)[-1]["valid"]["HR@50"] > chance + 0.05


@pytest.mark.slow
def test_the_first_epoch_equals_one_process_on_the_same_global_batch(killed_and_resumed):
    """Epoch 1 of the two workers (each replica 64 rows of every 128-row global batch, in-batch negatives gathered
    across the workers) has the loss of one process training on the whole global batches: the same seeded
    shuffle, whole batches (the default strategy drops the remainder as the workers do), the same initial
    weights (the chief's, broadcast) and single-device gradients (tests/test_distributed.py)."""
    job, _, _ = killed_and_resumed
    split = leave_last_out(make_synthetic(num_users=200, num_items=200, num_categories=8, mean_interactions=15,
                                          seed=3), history_length=10)
    config = load_config("youtube_dnn", overrides={"epochs": 1, "batch_size": 128, "embedding_dim": 8,
                                                   "output_dim": 8, "hidden_units": [8], "seed": 0,
                                                   "history_length": 10})
    single = training.train(config, split, evaluate_every=0, verbose=0, strategy=tf.distribute.get_strategy())
    workers = job.records(0, launch=1)[0]["loss"]
    # (measured: 727.6913 in both; without whole batches one process logs 698.94, per-worker batches of 128
    # or per-replica negatives would differ by far more than the tolerance)
    assert workers == pytest.approx(single.history["loss"][0], rel=1e-4)


# -- the train command ------------------------------------------------------------------------------------------

def test_train_command_refuses_multi_worker_without_tf_config(tmp_path, monkeypatch, capsys):
    from tfrec_recall import cli
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--multi-worker"]) == 2
    assert "--multi-worker needs the TF_CONFIG environment variable" in capsys.readouterr().err
    monkeypatch.setenv("TF_CONFIG", "{oops")
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--multi-worker"]) == 2
    assert "--multi-worker: TF_CONFIG is not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_train_command_runs_as_two_workers(tmp_path):
    """`tfrec-recall train --multi-worker` on both workers of a TF_CONFIG cluster: the chief alone takes the run's
    lock (a second lock holder would fail at once) and writes --out; nothing else is left beside it."""
    from tfrec_recall.data.protocol import write_interactions_csv
    data = make_synthetic(num_users=200, num_items=200, num_categories=8, mean_interactions=15, seed=3)
    csv = write_interactions_csv(data, str(tmp_path / "interactions.csv"))
    cluster = {"worker": [f"127.0.0.1:{p}" for p in multi_worker.free_ports(2)]}
    command = [sys.executable, "-m", "tfrec_recall.cli", "train", "--dataset", "csv", "--data-dir", csv,
               "--model", "youtube_dnn", "--history-length", "10", "--epochs", "1", "--patience", "0", "--quiet",
               "--set", "batch_size=128", "--set", "embedding_dim=8", "--set", "output_dim=8",
               "--set", "hidden_units=[8]", "--out", str(tmp_path / "run"), "--multi-worker"]
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outputs = [p.communicate(timeout=FINISH_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "test metrics" in outputs[0][0] and "test metrics" in outputs[1][0]
    assert sorted(os.listdir(tmp_path)) == ["interactions.csv", "run"]  # no resume state, no temporaries
    assert {"config.yaml", "metrics.json", "logs", "query_tower"} <= set(os.listdir(tmp_path / "run"))
