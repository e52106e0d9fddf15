"""Exact top-k by one matmul over all candidates, in stock TensorFlow ops (serves from stock TF Serving on CPU
and GPU hosts). Candidates are stored in float32, or float16 / bfloat16 to halve memory and memory traffic
(scores are computed in the storage precision and returned as float32)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfrec_recall.retrievers.base import TopKIndex
from tfrec_recall.retrievers.registry import register_index

DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}


@register_index("brute_force")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class BruteForce(TopKIndex):
    """Exact inner-product top-k; ``storage_dtype`` (float32, float16, bfloat16) stores the candidates."""

    def __init__(self, max_k: int = 100, storage_dtype: str = "float32", **kwargs):
        super().__init__(max_k=max_k, **kwargs)
        if not isinstance(storage_dtype, str) or storage_dtype not in DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(DTYPES)}, got {storage_dtype!r}")
        self.storage_dtype = storage_dtype
        self.candidates = None

    def _build_index(self, embeddings: np.ndarray) -> None:
        dtype = DTYPES[self.storage_dtype]
        self.candidates = tf.Variable(tf.cast(embeddings, dtype), trainable=False, name="candidates")

    def _search(self, queries, k):
        scores = tf.linalg.matmul(tf.cast(queries, self.candidates.dtype), self.candidates, transpose_b=True)
        top, rows = tf.math.top_k(tf.cast(scores, tf.float32), k=k)
        return top, rows

    def get_config(self) -> dict:
        return {**super().get_config(), "storage_dtype": self.storage_dtype}

    def parameters(self) -> dict:
        return {**super().parameters(), "storage_dtype": self.storage_dtype}

    def recall_report(self):
        """Exact search in float32 (recall 1 by construction); ``None`` (not measured) in lower precision."""
        if self.ids is None or self.storage_dtype != "float32":
            return None
        return {"k": self.max_k, "target_recall": None, "measured_recall": 1.0, "met_target": True,
                "setting": {}, "num_queries": 0, "tried": [], "exact": True}
