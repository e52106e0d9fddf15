"""tfrec_recall: recall (candidate retrieval) models on Keras, TensorFlow Recommenders and TFX.

TFRS 0.7.3 needs Keras 2 (`tf-keras`), so this module selects it before TensorFlow is imported.
"""
import os
import sys

__version__ = "0.1.0"


def _select_legacy_keras() -> None:
    current = os.environ.get("TF_USE_LEGACY_KERAS")
    if "tensorflow" in sys.modules:
        # TensorFlow decided which Keras `tf.keras` is when it was first imported.
        tf = sys.modules["tensorflow"]
        keras_version = getattr(getattr(tf, "keras", None), "__version__", None)
        module_name = getattr(getattr(tf, "keras", None), "__name__", "")
        if (keras_version or "").startswith("3") or (module_name.startswith("keras") and "tf_keras" not in module_name):
            raise ImportError(
                "tfrec_recall needs Keras 2 (tf-keras) but TensorFlow was already imported with Keras 3 active "
                f"(tf.keras is {module_name!r}, version {keras_version!r}). Import tfrec_recall before "
                "tensorflow, or set TF_USE_LEGACY_KERAS=1 in the environment before starting Python."
            )
    elif current not in (None, "1", "true", "True"):
        raise ImportError(
            f"TF_USE_LEGACY_KERAS={current!r} selects Keras 3, but tfrec_recall (through TFRS 0.7.3) needs "
            "Keras 2: unset it or set TF_USE_LEGACY_KERAS=1."
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


_select_legacy_keras()

# The main classes and functions at the top level (``import tfrec_recall as tr; tr.TwoTower(...)``), imported
# on first use so that ``import tfrec_recall`` stays cheap and still runs before TensorFlow. Names never equal
# a submodule's (``tr.training`` is the package, ``tr.train`` its function).
_PUBLIC = {
    "TwoTower": "tfrec_recall.models",
    "RetrievalTask": "tfrec_recall.tasks",
    "MLPTower": "tfrec_recall.layers", "SENetTower": "tfrec_recall.layers", "ResidualTower": "tfrec_recall.layers",
    "YouTubeDNNTower": "tfrec_recall.layers", "StreamingFrequencyEstimator": "tfrec_recall.layers",
    "CorpusNegativeSampler": "tfrec_recall.layers",
    "BruteForce": "tfrec_recall.retrievers", "IVF": "tfrec_recall.retrievers", "ScaNN": "tfrec_recall.retrievers",
    "ScaNNConfig": "tfrec_recall.retrievers", "MultiQueryRetriever": "tfrec_recall.retrievers",
    "make_synthetic": "tfrec_recall.data", "leave_last_out": "tfrec_recall.data",
    "make_dataset": "tfrec_recall.data.tfdata", "RetrievalEvaluation": "tfrec_recall.training",
    "specs_from_split": "tfrec_recall.features", "feature_arrays": "tfrec_recall.features",
    "RunConfig": "tfrec_recall.config", "load_config": "tfrec_recall.config",
    "train": "tfrec_recall.training", "evaluate": "tfrec_recall.evaluation",
    "export_retrieval_model": "tfrec_recall.export",
    # The two-tower options (README "Two-tower options")
    "ParallelTower": "tfrec_recall.layers.towers", "ExampleAgeFeature": "tfrec_recall.features",
    "AdaptiveMimicLoss": "tfrec_recall.tasks.dat", "CategoryAlignmentLoss": "tfrec_recall.tasks.dat",
    "ContrastiveLoss": "tfrec_recall.tasks.contrastive", "DistillationLoss": "tfrec_recall.tasks.distillation",
    "CrossFeatureRanker": "tfrec_recall.models.teacher", "train_teacher": "tfrec_recall.models.teacher",
    "make_drifting": "tfrec_recall.data",
    # Sequence and multi-interest user models (README "Sequence and multi-interest user models")
    "SelfAttentiveTower": "tfrec_recall.layers.towers", "MINDTower": "tfrec_recall.layers.towers",
    "ComiRecSATower": "tfrec_recall.layers.towers", "ComiRecDRTower": "tfrec_recall.layers.towers",
    "LabelAwareAttentionScorer": "tfrec_recall.layers.interest", "make_multi_interest": "tfrec_recall.data",
    "interest_recovery": "tfrec_recall.evaluation", "intra_list_diversity": "tfrec_recall.evaluation",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tfrec_recall' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
