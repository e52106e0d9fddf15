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

def trainer_config(custom_config: Optional[Mapping[str, Any]]):
    """The RunConfig a Trainer's ``custom_config`` asks for: ``{"preset": NAME, "config": {KEY: VALUE}}``."""
    from tfrec_recall.config import DEFAULT_PRESET, ConfigError, load_config
    custom = dict(custom_config or {})
    unknown = sorted(set(custom) - {"preset", "config", "evaluate_every"})
    if unknown:
        raise ConfigError(f"custom_config key {unknown[0]!r} is not one of 'preset', 'config', 'evaluate_every'")
    return load_config(custom.get("preset", DEFAULT_PRESET), overrides=dict(custom.get("config") or {}))


def examples_uri(files: Sequence[str]) -> str:
    """The Examples artifact URI behind a Trainer's ``train_files`` (``<uri>/Split-train/*``)."""
    if not files:
        raise ValueError("train_files is empty: the Trainer got no examples")
    split_dir = os.path.dirname(files[0])
    if not os.path.basename(split_dir).startswith("Split-"):
        raise ValueError(f"train_files {files[0]!r} is not inside a TFX Examples split directory (Split-<name>)")
    return os.path.dirname(split_dir)


def training_input(config, examples: str, vocabulary_dir: str):
    """What the Trainer trains on: a :class:`~tfrec_recall.data.streaming.StreamingSplit` over the split examples,
    with vocabularies and item counts (and, for examples joined with side-feature tables, the side columns'
    statistics) written by the Beam jobs into ``vocabulary_dir``, when ``config`` streams
    (:func:`~tfrec_recall.training.streaming.require_streamable`); otherwise the split read into memory, side
    tables included (logged with the reason)."""
    from tfrec_recall.config import ConfigError
    from tfrec_recall.data.protocol import read_split_examples
    from tfrec_recall.data.streaming import StreamingSplit, write_vocabularies
    from tfrec_recall.training.streaming import require_streamable
    try:
        require_streamable(config)
    except ConfigError as reason:
        logger.warning("training in memory (the split is read whole): %s", reason)
        return read_split_examples(examples, config.history_length)
    write_vocabularies(examples, vocabulary_dir)
    return StreamingSplit.from_examples(examples, vocabulary_dir, config.history_length)


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (``Trainer(run_fn="tfrec_recall.training.tfx_trainer.run_fn")``).

    Builds the model from ``custom_config`` (a preset plus overrides) and fits it on the protocol splits the
    pipeline wrote: streamed through the Trainer's TFXIO ``DataAccessor`` with Beam-computed vocabulary files
    (kept in ``fn_args.model_run_dir``) when the configuration streams, else read into memory
    (:func:`training_input`). ``train_args.num_steps``, when set, caps training at that many batches. Writes
    the run directory (both towers as SavedModels, candidate embeddings, metrics and plots) into
    ``fn_args.serving_model_dir``."""
    from tfrec_recall import storage
    from tfrec_recall.data.streaming import StreamingSplit
    from tfrec_recall.training import save_run, train
    config = trainer_config(fn_args.custom_config)
    uri = examples_uri(list(fn_args.train_files))
    data = training_input(config, uri, storage.join(fn_args.model_run_dir, "vocabularies"))
    logger.info("training on %s", data.describe())
    evaluate_every = int((fn_args.custom_config or {}).get("evaluate_every", 1))
    kwargs = {}
    if isinstance(data, StreamingSplit) and getattr(fn_args, "data_accessor", None) is not None:
        kwargs["dataset_factory"] = fn_args.data_accessor.tf_dataset_factory
    result = train(config, data, evaluate_every=evaluate_every, verbose=2, max_steps=fn_args.train_steps, **kwargs)
    save_run(result, data, fn_args.serving_model_dir, config, {"source": "tfx_examples", "examples": uri})
    logger.info("test metrics: %s", result.metrics)
