"""ScaNN through scann's TensorFlow ops (custom ops: a SavedModel holding this index loads only where
``import scann`` has registered them, e.g. a TF Serving build with the ScaNN ops; ScaNN runs on CPU only).

Configure with the builder-style :class:`ScaNNConfig`, validated when built and again against the corpus
size when indexing::

    config = ScaNNConfig().tree(num_leaves=1000, num_leaves_to_search=50).score_ah(2).reorder(100)
    index = ScaNN(config, max_k=100).index(ids, embeddings)

Tuning (``target_recall``, default 0.95; ``None`` turns it off): after the searcher is built,
``num_leaves_to_search`` and ``num_reordering_candidates`` are raised until recall@max_k against exact search,
measured on ``tuning_queries`` queries near the corpus, reaches the target (or every leaf is searched and every
candidate re-scored); see :mod:`tfrec_recall.retrievers.tuning`. Both are search-time arguments of scann's searcher
(``leaves_to_search``, ``pre_reorder_num_neighbors``), so tuning does not rebuild the tree. The tuned values
replace them in ``self.config`` (and so in ``get_config`` and ``parameters``). Reordering candidates are raised
only when the config reorders (``num_reordering_candidates`` not ``None``), and are never fewer than k.
"""
from __future__ import annotations

import dataclasses
import numbers
import uuid
from typing import Optional

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_int, require_positive_int
from tfrec_recall.retrievers.base import TopKIndex
from tfrec_recall.retrievers.registry import register_index
from tfrec_recall.retrievers.tuning import DEFAULT_TARGET_RECALL, TuningResult, check_tuning_arguments, tune_search


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
    :class:`ScaNNConfig`; ``None`` for the defaults), with the search raised after building until the measured
    recall@max_k reaches ``target_recall`` (``tuning_queries`` queries with ``tuning_noise``, seeded by
    ``seed``)."""

    def __init__(self, config: Optional[ScaNNConfig] = None, max_k: int = 100,
                 target_recall: Optional[float] = DEFAULT_TARGET_RECALL, tuning_queries: int = 1000,
                 tuning_noise: float = 0.5, seed: int = 0, **kwargs):
        super().__init__(max_k=max_k, **kwargs)
        if config is not None and not isinstance(config, ScaNNConfig):
            raise ValueError(f"config must be a ScaNNConfig, got {config!r} ({type(config).__name__})")
        self.config = config or ScaNNConfig()
        self.target_recall, self.tuning_queries, self.tuning_noise = check_tuning_arguments(
            target_recall, tuning_queries, tuning_noise)
        self.seed = require_int("seed", seed, minimum=0)
        self.tuning: Optional[TuningResult] = None
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
        if self.target_recall is not None:
            self._tune(embeddings)

    def _tune(self, embeddings: np.ndarray) -> None:
        """Raises the leaves searched (and the reordering candidates) until the measured recall@max_k reaches
        ``target_recall``; the searcher is not rebuilt."""
        c, n = self.config, len(embeddings)
        start, maximum = {"num_leaves_to_search": c.num_leaves_to_search}, {"num_leaves_to_search": c.num_leaves}
        if c.num_reordering_candidates is not None:
            start["num_reordering_candidates"] = c.num_reordering_candidates
            maximum["num_reordering_candidates"] = max(n, c.num_reordering_candidates)

        def search(queries, setting, k):
            return self._search_with(tf.constant(queries), k, dataclasses.replace(c, **setting))[1].numpy()

        self.tuning = tune_search(search, embeddings, min(self.max_k, n), start, maximum, self.target_recall,
                                  self.tuning_queries, self.tuning_noise, self.seed)
        self.config = dataclasses.replace(c, **self.tuning.setting)

    def _search(self, queries, k):
        return self._search_with(queries, k, self.config)

    def _search_with(self, queries, k: int, config: ScaNNConfig):
        """Searches with ``config``'s leaves to search and reordering candidates (at least k)."""
        from scann.scann_ops.py import scann_ops
        searcher = scann_ops.searcher_from_module(self._module)
        reorder = None if config.num_reordering_candidates is None else max(k, config.num_reordering_candidates)
        result = searcher.search_batched_parallel(queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder,
                                                  leaves_to_search=config.num_leaves_to_search)
        return tf.cast(result.distances, tf.float32), tf.cast(result.indices, tf.int32)

    def get_config(self) -> dict:
        return {**super().get_config(), "config": dataclasses.asdict(self.config),
                "target_recall": self.target_recall, "tuning_queries": self.tuning_queries,
                "tuning_noise": self.tuning_noise, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict) -> "ScaNN":
        """Takes the ScaNN configuration as the dict ``get_config`` writes (or a :class:`ScaNNConfig`)."""
        config = dict(config)
        if isinstance(config.get("config"), dict):
            config["config"] = ScaNNConfig(**config["config"])
        return super().from_config(config)

    def parameters(self) -> dict:
        return {**super().parameters(), **dataclasses.asdict(self.config), "target_recall": self.target_recall,
                "tuning_queries": self.tuning_queries, "tuning_noise": self.tuning_noise, "seed": self.seed}
