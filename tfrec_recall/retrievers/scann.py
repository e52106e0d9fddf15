"""ScaNN through scann's TensorFlow ops (custom ops: a SavedModel holding this index loads only where
``import scann`` has registered them, e.g. a TF Serving build with the ScaNN ops; ScaNN runs on CPU only).

Configure with the builder-style :class:`ScaNNConfig`, validated when built and again against the corpus
size when indexing::

    config = ScaNNConfig().tree(num_leaves=1000, num_leaves_to_search=50).score_ah(2).reorder(100)
    index = ScaNN(config, max_k=100).index(ids, embeddings)
"""
from __future__ import annotations

import dataclasses
import numbers
import uuid
from typing import Optional

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_positive_int
from tfrec_recall.retrievers.base import TopKIndex
from tfrec_recall.retrievers.registry import register_index


@dataclasses.dataclass(frozen=True)
class ScaNNConfig:
    num_leaves: int = 1000
    num_leaves_to_search: int = 50
    training_iterations: int = 12
    training_sample_size: Optional[int] = None
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    num_reordering_candidates: Optional[int] = 100

    def __post_init__(self):
        for name in ("num_leaves", "num_leaves_to_search", "training_iterations", "dimensions_per_block"):
            require_positive_int(f"ScaNNConfig.{name}", getattr(self, name))
        for name in ("training_sample_size", "num_reordering_candidates"):
            if getattr(self, name) is not None:
                require_positive_int(f"ScaNNConfig.{name}", getattr(self, name))
        if self.num_leaves_to_search > self.num_leaves:
            raise ValueError(f"ScaNNConfig.num_leaves_to_search must be <= num_leaves ({self.num_leaves}), "
                             f"got {self.num_leaves_to_search}")
        threshold = self.anisotropic_quantization_threshold
        if not (isinstance(threshold, numbers.Real) and not isinstance(threshold, bool) and 0.0 <= threshold < 1.0):
            raise ValueError("ScaNNConfig.anisotropic_quantization_threshold must be in [0, 1), got "
                             f"{self.anisotropic_quantization_threshold!r}")

    # builder-style helpers, each returning a new validated config
    def tree(self, num_leaves: int, num_leaves_to_search: int, training_iterations: int = 12,
             training_sample_size: Optional[int] = None) -> "ScaNNConfig":
        return dataclasses.replace(self, num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                                   training_iterations=training_iterations,
                                   training_sample_size=training_sample_size)

    def score_ah(self, dimensions_per_block: int, anisotropic_quantization_threshold: float = 0.2) -> "ScaNNConfig":
        return dataclasses.replace(self, dimensions_per_block=dimensions_per_block,
                                   anisotropic_quantization_threshold=anisotropic_quantization_threshold)

    def reorder(self, num_reordering_candidates: Optional[int]) -> "ScaNNConfig":
        return dataclasses.replace(self, num_reordering_candidates=num_reordering_candidates)

    def check_corpus(self, num_candidates: int) -> None:
        if self.num_leaves > num_candidates:
            raise ValueError(f"ScaNNConfig.num_leaves ({self.num_leaves}) must be <= the number of candidates "
                             f"({num_candidates})")


@register_index("scann")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class ScaNN(TopKIndex):
    """ScaNN (tree + asymmetric hashing + optional exact reordering) as configured by ``config`` (a
    :class:`ScaNNConfig`; ``None`` for the defaults)."""

    def __init__(self, config: Optional[ScaNNConfig] = None, max_k: int = 100, **kwargs):
        super().__init__(max_k=max_k, **kwargs)
        if config is not None and not isinstance(config, ScaNNConfig):
            raise ValueError(f"config must be a ScaNNConfig, got {config!r} ({type(config).__name__})")
        self.config = config or ScaNNConfig()
        self._module = None

    def _build_index(self, embeddings: np.ndarray) -> None:
        from scann.scann_ops.py import scann_ops  # registers the ScaNN TF ops
        c = self.config
        c.check_corpus(len(embeddings))
        sample = c.training_sample_size or min(len(embeddings), 250_000)
        builder = scann_ops.builder(embeddings, self.max_k, "dot_product")
        builder = builder.tree(num_leaves=c.num_leaves, num_leaves_to_search=c.num_leaves_to_search,
                               training_sample_size=min(sample, len(embeddings)),
                               training_iterations=c.training_iterations)
        builder = builder.score_ah(c.dimensions_per_block,
                                   anisotropic_quantization_threshold=c.anisotropic_quantization_threshold)
        if c.num_reordering_candidates is not None:
            builder = builder.reorder(c.num_reordering_candidates)
        self._module = builder.build(shared_name=f"{self.name}/{uuid.uuid4()}").serialize_to_module()

    def _search(self, queries, k):
        from scann.scann_ops.py import scann_ops
        searcher = scann_ops.searcher_from_module(self._module)
        result = searcher.search_batched_parallel(queries, final_num_neighbors=k)
        return tf.cast(result.distances, tf.float32), tf.cast(result.indices, tf.int32)

    def get_config(self) -> dict:
        return {**super().get_config(), "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config: dict) -> "ScaNN":
        """Takes the ScaNN configuration as the dict ``get_config`` writes (or a :class:`ScaNNConfig`)."""
        config = dict(config)
        if isinstance(config.get("config"), dict):
            config["config"] = ScaNNConfig(**config["config"])
        return super().from_config(config)

    def parameters(self) -> dict:
        return {**super().parameters(), **dataclasses.asdict(self.config)}
