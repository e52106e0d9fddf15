"""Multi-worker training with ``tf.distribute.MultiWorkerMirroredStrategy``: which process writes, and an entry
point that runs one worker of a job.

Chief-only writes. Every worker runs the same ``fit`` and the same callbacks, in the same order, because saving
can run collective ops (TensorFlow's rule for this strategy: reading a sync-on-read variable, such as a Keras
metric's in a checkpoint, reduces across the workers, and a variable created under the strategy, such as the
projector's embedding, broadcasts its initial value from the chief): a worker that skipped a save could leave the
others waiting. So every worker saves, but only the chief (task type ``chief``,
or ``worker`` 0 when the cluster has no chief) saves where it was asked; any other worker gets from
:func:`write_dir` a temporary sibling ``.<name>.<task type>-<task id>.tmp-<pid>`` of the path, removed again
by :func:`worker_dir` when the save is done (the pattern of Keras' own ``distributed_file_utils``). The resume
state (:class:`~tfrec_recall.training.resume.ResumeState`), the TensorBoard logs and the run directory
(:func:`~tfrec_recall.training.run_dir.save_run`) go through :func:`worker_dir`.

Resumption after a lost worker: the package's own ``ResumeState`` (made multi-worker safe here), not
``tf.keras.callbacks.BackupAndRestore``. Both checkpoint the model and its optimizer at every epoch's end and
restart from the last finished epoch; ``ResumeState`` also keeps what ``BackupAndRestore`` does not, and what a
resumed run of this package needs to go on as the same run: the history of the epochs before the failure, the
early-stopping counters and best weights, and a fingerprint of the configuration and training rows that refuses
to resume with other settings. Its checkpoint holds every model variable (towers, the frequency estimator's
state) and the optimizer's slots and step. Every worker restores from the chief's state, so the resume
directory must be one that all workers read (a shared file system or a bucket URI in a real cluster); when a
worker dies, the others fail or hang on their next collective, the job is restarted with the same command,
and every worker goes on from the last epoch the chief finished.

Entry point (one process per worker)::

    python -m tfrec_recall.training.multi_worker --out DIR --resume-dir DIR [--epochs N] [--tf-config JSON]

reads ``TF_CONFIG`` (or ``--tf-config``, set into the environment before TensorFlow is imported), trains a
preset on the synthetic data, prints one JSON line per finished epoch (``{"event": "epoch", "epoch": 1-based,
"loss": ..., ...}``) and a last ``{"event": "done", ...}`` line, and saves the run (chief only) to ``--out``.
This module imports TensorFlow only inside its functions, so that the entry point can set ``TF_CONFIG`` first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Tuple

from tfrec_recall import storage
from tfrec_recall._atomic import remove_stale_temporaries

if TYPE_CHECKING:
    import tensorflow as tf

def require_strategy(strategy) -> Optional["tf.distribute.Strategy"]:
    """``strategy`` if it is None or a ``tf.distribute`` strategy; ``TypeError`` naming the value otherwise."""
    if strategy is None:
        return None
    import tensorflow as tf
    if not isinstance(strategy, (tf.distribute.Strategy, tf.compat.v1.distribute.Strategy)):
        raise TypeError(f"strategy must be None or a tf.distribute.Strategy, got {strategy!r}")
    return strategy


def task_of(strategy) -> Tuple[Optional[str], Optional[int]]:
    """(task type, task id) of this process in ``strategy``'s cluster; (None, None) without a cluster (no
    strategy, a strategy on one machine, or a multi-worker strategy started without ``TF_CONFIG``)."""
    resolver = getattr(require_strategy(strategy), "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, None
    return str(resolver.task_type), int(resolver.task_id)


def is_chief(strategy) -> bool:
    """True when this process writes the job's outputs: no cluster, task type ``chief``, or ``worker`` 0 of a
    cluster without a ``chief`` job (the rule of TensorFlow's multi-worker strategy)."""
    task_type, task_id = task_of(strategy)
    if task_type is None or task_type == "chief":
        return True
    jobs = strategy.cluster_resolver.cluster_spec().jobs
    return task_type == "worker" and task_id == 0 and "chief" not in jobs


def _temporary_pattern(path, task_type: str, task_id: int) -> str:
    """The regex (with group ``pid``) of the temporary names :func:`write_dir` gives this task for ``path``."""
    return rf"\.{re.escape(storage.name(path))}\.{re.escape(task_type)}-{task_id}\.tmp-(?P<pid>\d+)"


def write_dir(path, strategy) -> str:
    """Where this process writes what belongs at ``path`` (a local path or URI): ``path`` itself on the chief
    (or without a multi-worker cluster), else the temporary sibling ``.<name>.<task type>-<task id>.tmp-<pid>``.
    On a non-chief, temporaries an earlier (killed) process of the same task left for ``path`` are removed."""
    path = storage.path_str(path).rstrip("/")
    if not path:
        raise ValueError(f"path must be a non-empty path, got {path!r}")
    if is_chief(strategy):
        return path
    task_type, task_id = task_of(strategy)
    parent = storage.parent(path)
    remove_stale_temporaries(parent, _temporary_pattern(path, task_type, task_id))
    return storage.join(parent, f".{storage.name(path)}.{task_type}-{task_id}.tmp-{os.getpid()}")


@contextlib.contextmanager
def worker_dir(path, strategy) -> Iterator[Optional[str]]:
    """Yields :func:`write_dir` of ``path`` (None for a None ``path``); on a non-chief the temporary is empty
    when the block starts and removed when it ends (with or without an error), so nothing of it is left."""
    if path is None:
        yield None
        return
    target = write_dir(path, strategy)
    if target == storage.path_str(path).rstrip("/"):
        yield target
        return
    storage.rmtree(target)
    try:
        yield target
    finally:
        storage.rmtree(target)


# -- the entry point ---------------------------------------------------------------------------------------------

def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfrec_recall.training.multi_worker",
                                     description="Run one worker of a multi-worker training job on synthetic data.")
    parser.add_argument("--out", required=True, help="run directory the chief writes (must be absent or empty)")
    parser.add_argument("--resume-dir", required=True, help="resume state, shared by every worker")
    parser.add_argument("--tf-config", help="TF_CONFIG JSON, set into the environment before TensorFlow starts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--preset", default="youtube_dnn")
    parser.add_argument("--batch-size", type=int, default=64, help="the GLOBAL batch, split over the replicas")
    parser.add_argument("--dim", type=int, default=8, help="embedding_dim, output_dim and the hidden layer's width")
    parser.add_argument("--num-users", type=int, default=300)
    parser.add_argument("--num-items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (the data's seed is fixed: 3)")
    parser.add_argument("--evaluate-every", type=int, default=0, help="validation every N epochs (0: at the end)")
    parser.add_argument("--collective-timeout", type=float, default=None,
                        help="seconds a collective may wait for a lost peer before failing (default: no limit)")
    parser.add_argument("--no-strategy", action="store_true", help="train in this process alone, no strategy")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    """Errors naming the flag and its value."""
    for flag in ("epochs", "batch_size", "dim", "num_users", "num_items"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.evaluate_every < 0:
        raise ValueError(f"--evaluate-every must be >= 0, got {args.evaluate_every}")
    if args.collective_timeout is not None and not args.collective_timeout > 0:
        raise ValueError(f"--collective-timeout must be > 0 seconds, got {args.collective_timeout}")
    if args.tf_config is not None:
        try:
            value = json.loads(args.tf_config)
        except json.JSONDecodeError as error:
            raise ValueError(f"--tf-config must be JSON, got {args.tf_config!r}: {error}") from None
        if not isinstance(value, dict) or "cluster" not in value or "task" not in value:
            raise ValueError(f"--tf-config must be a JSON object with 'cluster' and 'task', got {args.tf_config!r}")


def free_ports(n: int) -> list:
    """``n`` ports of 127.0.0.1 the OS reports free (bound to port 0, then released), for a local job's
    ``TF_CONFIG``."""
    import socket
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_strategy(collective_timeout: Optional[float] = None) -> "tf.distribute.Strategy":
    """A ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``; call it before TensorFlow runs any op.
    ``collective_timeout`` (seconds) makes a collective fail instead of waiting forever for a lost peer."""
    import tfrec_recall  # noqa: F401  (selects tf-keras before TensorFlow is imported)
    import tensorflow as tf
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def epoch_printer(task: Tuple[Optional[str], Optional[int]]) -> "tf.keras.callbacks.Callback":
    """A callback printing one JSON line per finished epoch: ``event``, the 1-based ``epoch``, this process's
    ``task_type`` / ``task_id``, the epoch's ``steps``, ``seconds``, ``first_step_seconds`` (to the end of its
    first step: with the tracing, in a first epoch), ``step_seconds`` (the mean step after the first: from the end
    of the first step to the end of the last) and the epoch's logs (``loss``...)."""
    import tensorflow as tf
    clock = {"start": 0.0, "steps": 0, "first_end": 0.0, "last_end": 0.0}

    def begin(epoch, logs=None):
        clock.update(start=time.perf_counter(), steps=0)

    def batch_end(batch, logs=None):
        clock["steps"] += 1
        clock["last_end"] = time.perf_counter()
        if clock["steps"] == 1:
            clock["first_end"] = clock["last_end"]

    def end(epoch, logs=None):
        steps, first, last = clock["steps"], clock["first_end"], clock["last_end"]
        _emit({"event": "epoch", "epoch": epoch + 1, "task_type": task[0], "task_id": task[1], "steps": steps,
               "seconds": time.perf_counter() - clock["start"], "first_step_seconds": first - clock["start"],
               "step_seconds": (last - first) / (steps - 1) if steps > 1 else None,
               **{k: float(v) for k, v in (logs or {}).items()}})

    return tf.keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_train_batch_end=batch_end, on_epoch_end=end)


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _data(args: argparse.Namespace):
    from tfrec_recall.data import leave_last_out, make_synthetic
    data = make_synthetic(num_users=args.num_users, num_items=args.num_items, num_categories=8,
                          mean_interactions=15, seed=3)
    return leave_last_out(data, history_length=10)


def run_worker(args: argparse.Namespace, strategy) -> dict:
    """Trains ``args.preset`` on the synthetic split under ``strategy`` (None: this process alone), saves the run
    (chief) and removes the resume state once the run is saved; returns the ``done`` record."""
    from tfrec_recall.config import load_config
    from tfrec_recall.training.fit import train
    from tfrec_recall.training.run_dir import save_run
    split = _data(args)
    config = load_config(args.preset, overrides={
        "epochs": args.epochs, "batch_size": args.batch_size, "embedding_dim": args.dim, "output_dim": args.dim,
        "hidden_units": [args.dim], "seed": args.seed, "history_length": 10})
    log_dir = storage.join(args.resume_dir, "logs")
    task = task_of(strategy)
    result = train(config, split, evaluate_every=args.evaluate_every, verbose=0, callbacks=[epoch_printer(task)],
                   log_dir=log_dir, resume_dir=args.resume_dir, strategy=strategy)
    dataset_args = {"name": "synthetic", "num_users": args.num_users, "num_items": args.num_items, "seed": 3}
    save_run(result, split, args.out, config, dataset_args, log_dir=log_dir, strategy=strategy)
    chief = is_chief(strategy)
    if chief:
        storage.rmtree(args.resume_dir)  # the run is saved: nothing to resume
    return {"event": "done", "task_type": task[0], "task_id": task[1], "chief": chief,
            "epochs": len(result.history.get("loss", [])), "loss": result.history.get("loss", []),
            "valid": result.valid_metrics, "train_seconds": result.train_seconds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one worker (see the module docstring); returns the exit status."""
    args = _parse_args(argv)
    _check_args(args)
    if args.tf_config is not None:
        os.environ["TF_CONFIG"] = args.tf_config  # before TensorFlow is imported
    strategy = None if args.no_strategy else make_strategy(args.collective_timeout)
    _emit(run_worker(args, strategy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
