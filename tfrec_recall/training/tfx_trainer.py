"""The TFX Trainer's ``run_fn``, a thin library function (no tfx import here).

``pipelines/`` points the Trainer at :func:`run_fn` by its import path, so no module file is copied or
pip-installed. The other steps' work lives by role: :mod:`tfrec_recall.evaluation.blessing` (the
``RetrievalEvaluator``) and :mod:`tfrec_recall.export.pipeline_export` (the index-and-export step and the
infra check).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

# Pipeline examples carry ids and history only (no side-feature tables), so the presets run without them.
PIPELINE_OVERRIDES = {"use_side_features": False}


def trainer_config(custom_config: Optional[Mapping[str, Any]]):
    """The RunConfig a Trainer's ``custom_config`` asks for: ``{"preset": NAME, "config": {KEY: VALUE}}``."""
    from tfrec_recall.config import DEFAULT_PRESET, ConfigError, load_config
    custom = dict(custom_config or {})
    unknown = sorted(set(custom) - {"preset", "config", "evaluate_every"})
    if unknown:
        raise ConfigError(f"custom_config key {unknown[0]!r} is not one of 'preset', 'config', 'evaluate_every'")
    overrides = {**PIPELINE_OVERRIDES, **dict(custom.get("config") or {})}
    return load_config(custom.get("preset", DEFAULT_PRESET), overrides=overrides)


def examples_uri(files: Sequence[str]) -> str:
    """The Examples artifact URI behind a Trainer's ``train_files`` (``<uri>/Split-train/*``)."""
    if not files:
        raise ValueError("train_files is empty: the Trainer got no examples")
    split_dir = os.path.dirname(files[0])
    if not os.path.basename(split_dir).startswith("Split-"):
        raise ValueError(f"train_files {files[0]!r} is not inside a TFX Examples split directory (Split-<name>)")
    return os.path.dirname(split_dir)


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (``Trainer(run_fn="tfrec_recall.training.tfx_trainer.run_fn")``).

    Reads the protocol splits the pipeline wrote, builds the model from ``custom_config`` (a preset plus
    overrides), fits it (``train_args.num_steps``, when set, caps training at that many batches) and writes the
    run directory (both towers as SavedModels, candidate embeddings, metrics and plots) into
    ``fn_args.serving_model_dir``."""
    from tfrec_recall.data.protocol import read_split_examples
    from tfrec_recall.training import save_run, train
    config = trainer_config(fn_args.custom_config)
    uri = examples_uri(list(fn_args.train_files))
    split = read_split_examples(uri, config.history_length)
    logger.info("training on %s", split.describe())
    evaluate_every = int((fn_args.custom_config or {}).get("evaluate_every", 1))
    result = train(config, split, evaluate_every=evaluate_every, verbose=2, max_steps=fn_args.train_steps)
    save_run(result, split, fn_args.serving_model_dir, config, {"source": "tfx_examples", "examples": uri})
    logger.info("test metrics: %s", result.metrics)
