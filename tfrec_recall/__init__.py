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
