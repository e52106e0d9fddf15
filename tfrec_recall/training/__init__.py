"""Training: models from a RunConfig (``build``), fitting with model selection (``fit``), the run directory
(``run_dir``), callbacks, and the TFX Trainer's ``run_fn`` (``tfx_trainer``, imported only by its path)."""
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.evaluation.evaluate import corpus_arrays, embed, evaluate, evaluate_towers
from tfrec_recall.features import feature_arrays
from tfrec_recall.training.build import build_model, make_optimizer, set_seed, training_arrays
from tfrec_recall.training.callbacks import NonFiniteLossError, RetrievalEvaluation, StopOnNonFiniteLoss
from tfrec_recall.training.fit import TrainResult, plot_history, train
from tfrec_recall.training.resume import ResumeState, latest_state
from tfrec_recall.training.run_dir import (REQUEST_FILE, LoadedRun, load_run, load_run_config, recommend,
                                           sample_request, save_run)

__all__ = ["build_model", "make_optimizer", "set_seed", "training_arrays", "train", "TrainResult", "plot_history",
           "save_run", "load_run", "load_run_config", "LoadedRun", "recommend", "sample_request", "REQUEST_FILE",
           "ResumeState", "latest_state",
           "NonFiniteLossError", "RetrievalEvaluation", "StopOnNonFiniteLoss", "evaluate", "evaluate_towers",
           "embed", "corpus_arrays", "feature_arrays", "make_dataset"]
