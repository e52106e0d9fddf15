"""Training: models from a RunConfig (``build``), fitting with model selection (``fit``), the run directory
(``run_dir``), callbacks, multi-worker training (``multi_worker``), and the TFX Trainer's ``run_fn``
(``tfx_trainer``, imported only by its path).

The names below are imported on first use (PEP 562), so that importing this package does not import
TensorFlow: ``python -m tfrec_recall.training.multi_worker`` must set ``TF_CONFIG`` before TensorFlow starts.
"""
import importlib

_PUBLIC = {
    "make_dataset": "tfrec_recall.data.tfdata",
    "corpus_arrays": "tfrec_recall.evaluation.evaluate", "embed": "tfrec_recall.evaluation.evaluate",
    "evaluate": "tfrec_recall.evaluation.evaluate", "evaluate_towers": "tfrec_recall.evaluation.evaluate",
    "feature_arrays": "tfrec_recall.features",
    "build_model": "tfrec_recall.training.build", "make_optimizer": "tfrec_recall.training.build",
    "set_seed": "tfrec_recall.training.build", "training_arrays": "tfrec_recall.training.build",
    "NonFiniteLossError": "tfrec_recall.training.callbacks", "RetrievalEvaluation": "tfrec_recall.training.callbacks",
    "StopOnNonFiniteLoss": "tfrec_recall.training.callbacks",
    "TrainResult": "tfrec_recall.training.fit", "plot_history": "tfrec_recall.training.fit",
    "train": "tfrec_recall.training.fit",
    "ResumeState": "tfrec_recall.training.resume", "latest_state": "tfrec_recall.training.resume",
    "REQUEST_FILE": "tfrec_recall.training.run_dir", "LoadedRun": "tfrec_recall.training.run_dir",
    "load_run": "tfrec_recall.training.run_dir", "load_run_config": "tfrec_recall.training.run_dir",
    "recommend": "tfrec_recall.training.run_dir", "sample_request": "tfrec_recall.training.run_dir",
    "save_run": "tfrec_recall.training.run_dir",
    "is_chief": "tfrec_recall.training.multi_worker", "write_dir": "tfrec_recall.training.multi_worker",
    "worker_dir": "tfrec_recall.training.multi_worker",
}

# Submodules reachable as attributes (``training.fit``) without an import of their own, as before.
_SUBMODULES = ("auxiliary", "build", "callbacks", "deep_retrieval", "fit", "multi_worker", "path_assignment",
               "resume", "run_dir", "tensorboard")

__all__ = ["build_model", "make_optimizer", "set_seed", "training_arrays", "train", "TrainResult", "plot_history",
           "save_run", "load_run", "load_run_config", "LoadedRun", "recommend", "sample_request", "REQUEST_FILE",
           "ResumeState", "latest_state", "is_chief", "write_dir", "worker_dir",
           "NonFiniteLossError", "RetrievalEvaluation", "StopOnNonFiniteLoss", "evaluate", "evaluate_towers",
           "embed", "corpus_arrays", "feature_arrays", "make_dataset"]


def __getattr__(name: str):
    """Imports the module defining ``name`` (or the submodule ``name``) on first use and keeps the value (later
    lookups skip this)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tfrec_recall.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
