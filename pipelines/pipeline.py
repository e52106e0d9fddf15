"""``create_pipeline``: raw interactions -> validated protocol splits -> trained, evaluated, exported, checked
and (only when blessed) pushed retrieval model.

    ExampleGen (CsvExampleGen | ImportExampleGen) -> StatisticsGen -> ImportSchemaGen -> ExampleValidator
      -> ProtocolSplit (Beam: leave-last-out + causal history; stops on anomalies, except input columns the
         schema does not name, which it drops and names in a warning)
      [-> JoinSideFeatures (Beam: the user and item side-feature tables, each read by its own ImportExampleGen,
          UserFeaturesGen / ItemFeaturesGen, joined onto the split examples; only when tables are given)]
      -> Trainer (run_fn = tfrec_recall.training.tfx_trainer.run_fn)
      -> RetrievalEvaluator (blesses a model that beats the most-popular ranker by ``popularity_margin`` HR@50
         and does not fall behind the latest blessed model, which the Resolver finds, by more than ``margin``)
      -> RetrievalExporter (SavedModel with the index inside) -> ExportInfraCheck (fresh process)
      -> Pusher (filesystem, versioned; only blessed and infra-blessed models; a model already in the
         serving directory is not copied again)

The schema is fixed (``pipelines/schema``), not inferred: a schema inferred from the same data cannot notice a
dropped column or a changed type, which is what ExampleValidator is here to catch. A column the schema does not
name (e.g. ``rating``) is ExampleValidator's "New column" anomaly; ProtocolSplit tolerates that one only, and
the protocol split reads the schema's columns only, so the extra column is dropped.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

from tfx import v1 as tfx

from pipelines.pusher import Pusher
from tfrec_recall.config import DEFAULT_PRESET
from tfrec_recall.retrievers import index_names

from pipelines.components import (ExportInfraCheck, JoinSideFeatures, ProtocolSplit, RetrievalEvaluator,
                                  RetrievalExporter)
from tfrec_recall.data.side_tables import SideFeatures

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema")
DATA_FORMATS = ("csv", "tfrecord")
ID_TYPES = ("string", "int")
RUN_FN = "tfrec_recall.training.tfx_trainer.run_fn"
RAW_SPLIT = "interactions"
COMPONENT_IDS = ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "ProtocolSplit", "Trainer",
                 "latest_blessed_model_resolver", "RetrievalEvaluator", "RetrievalExporter", "ExportInfraCheck",
                 "Pusher")
SIDE_COMPONENT_IDS = {"user": "UserFeaturesGen", "item": "ItemFeaturesGen", "join": "JoinSideFeatures"}
TABLE_SPLIT = "table"


def default_schema(id_type: str) -> str:
    if id_type not in ID_TYPES:
        raise ValueError(f"id_type must be one of {ID_TYPES}, got {id_type!r}")
    return os.path.join(SCHEMA_DIR, f"interactions_{id_type}_ids.pbtxt")


def _check(condition: bool, name: str, value, what: str) -> None:
    if not condition:
        raise ValueError(f"{name} {what}, got {value!r}")


def data_components(data_root: str, data_format: str, schema_file: str, history_length: int) -> list:
    """The pipeline's first components, raw input -> validated protocol splits: ExampleGen, StatisticsGen,
    SchemaGen (ImportSchemaGen of ``schema_file``), ExampleValidator and ProtocolSplit (the last one's
    ``split_examples`` feed the Trainer and the Evaluator). Arguments as in :func:`create_pipeline`."""
    _check(data_format in DATA_FORMATS, "data_format", data_format, f"must be one of {DATA_FORMATS}")
    # One raw split: ProtocolSplit makes train / eval / test by the protocol, not by hash buckets.
    raw = tfx.proto.Output(split_config=tfx.proto.SplitConfig(splits=[
        tfx.proto.SplitConfig.Split(name=RAW_SPLIT, hash_buckets=1)]))
    if data_format == "csv":
        example_gen = tfx.components.CsvExampleGen(input_base=data_root, output_config=raw)
    else:
        example_gen = tfx.components.ImportExampleGen(input_base=data_root, output_config=raw)
    example_gen = example_gen.with_id("ExampleGen")
    statistics = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema = tfx.components.ImportSchemaGen(schema_file=schema_file).with_id("SchemaGen")
    validator = tfx.components.ExampleValidator(statistics=statistics.outputs["statistics"],
                                                schema=schema.outputs["schema"])
    split = ProtocolSplit(examples=example_gen.outputs["examples"], anomalies=validator.outputs["anomalies"],
                          history_length=history_length)
    return [example_gen, statistics, schema, validator, split]


def side_feature_components(split, side_features: Optional[SideFeatures], user_features_root: Optional[str],
                            item_features_root: Optional[str]) -> list:
    """``[UserFeaturesGen?, ItemFeaturesGen?, JoinSideFeatures]`` over ``split``'s examples (an ImportExampleGen of
    gzipped TFRecord table examples per table given; see ``tfrec_recall.data.side_tables``), or ``[]`` when
    ``side_features`` declares no column. A table root is needed exactly when its entity has columns."""
    side = side_features or SideFeatures()
    for entity, root in (("user", user_features_root), ("item", item_features_root)):
        columns = [name for name, _ in getattr(side, entity)]
        _check(bool(columns) == (root is not None), f"{entity}_features_root", root,
               f"must be given exactly when side_features declares {entity} columns (it declares {columns})")
    if not side:
        return []
    one_split = tfx.proto.Output(split_config=tfx.proto.SplitConfig(splits=[
        tfx.proto.SplitConfig.Split(name=TABLE_SPLIT, hash_buckets=1)]))
    tables = {entity: tfx.components.ImportExampleGen(input_base=root, output_config=one_split)
              .with_id(SIDE_COMPONENT_IDS[entity])
              for entity, root in (("user", user_features_root), ("item", item_features_root)) if root is not None}
    join = JoinSideFeatures(split_examples=split.outputs["split_examples"], side_features_json=side.to_json(),
                            **{f"{entity}_features": gen.outputs["examples"] for entity, gen in tables.items()}
                            ).with_id(SIDE_COMPONENT_IDS["join"])
    return [*tables.values(), join]


def _export_index(index: Optional[str], run_config) -> str:
    """The exported index's name: ``index`` checked against the registered ones and the trained model, or the
    model's own when None (its beam search for a Deep Retrieval model, exact search otherwise)."""
    from tfrec_recall.export.run_index import DEEP_RETRIEVAL
    if index is None:
        return DEEP_RETRIEVAL if run_config.deep_retrieval else "brute_force"
    choices = index_names() + (DEEP_RETRIEVAL,)
    _check(index in choices, "index", index, f"must be one of {choices}")
    _check(index != DEEP_RETRIEVAL or run_config.deep_retrieval, "index", index,
           "needs a model trained with deep_retrieval: true (set it in the preset or config)")
    return index


def create_pipeline(*, pipeline_name: str, pipeline_root: str, data_root: str, serving_dir: str,
                    data_format: str = "csv", id_type: str = "string", schema_file: Optional[str] = None,
                    history_length: int = 50, preset: str = DEFAULT_PRESET,
                    side_features: Optional[SideFeatures] = None, user_features_root: Optional[str] = None,
                    item_features_root: Optional[str] = None,
                    config: Optional[Mapping[str, Any]] = None, train_steps: Optional[int] = None,
                    thresholds: Optional[Mapping[str, float]] = None,
                    compare_metrics: Sequence[str] = ("HR@50", "NDCG@10"), margin: float = 0.01,
                    popularity_margin: float = 0.02,
                    blessing_split: str = "eval", index: Optional[str] = None, k: int = 100,
                    enable_cache: bool = True, metadata_path: Optional[str] = None,
                    beam_pipeline_args: Sequence[str] = ()) -> tfx.dsl.Pipeline:
    """The retrieval pipeline; a pure function of its arguments (nothing is read or written here).

    Args:
      pipeline_name / pipeline_root: TFX's; artifacts go under ``pipeline_root``.
      data_root: a directory of interaction CSV files (``data_format="csv"``) or of gzipped TFRecord files of
        ``tf.Example`` (``"tfrecord"``) with ``user_id``, ``item_id``, ``timestamp`` and optionally ``weight``
        and ``row_number`` (see ``tfrec_recall.data.protocol``).
      serving_dir: the model base path pushed to (``<serving_dir>/<N>/saved_model.pb``, N sequential from 1), which
        ``tfrec-recall serve`` and TF Serving read.
      id_type: ``"string"`` or ``"int"`` ids in the input (selects the packaged schema); ``schema_file``
        replaces the packaged schema altogether.
      side_features / user_features_root / item_features_root: the side-feature columns and kinds, and the
        directories of the user and item tables (gzipped TFRecords of table examples, e.g. written by
        ``tfrec_recall.data.side_tables.write_feature_table``), joined onto the split examples by
        JoinSideFeatures; the model uses them when its preset does (and ``config`` does not turn them off).
      preset / config: a ``tfrec_recall.config`` preset and overrides of its keys (the Trainer's
        ``custom_config``); ``train_steps`` caps training at that many batches (TFX ``train_args.num_steps``).
      popularity_margin / thresholds / compare_metrics / margin: the blessing, on ``blessing_split``. The
        model's HR@50 must beat the most-popular ranker's (``tfrec_recall.evaluation.baselines.most_popular_metrics``:
        items by training count, the same rows and protocol) by more than ``popularity_margin``, an ABSOLUTE
        difference of HR@50 (0.02: two percentage points), not a ratio. Every ``thresholds`` metric must be
        >= its absolute bound (default none). Every ``compare_metrics`` metric must not fall more than
        ``margin`` (absolute) below the latest blessed model's, recomputed on the same data.
      index / k: the index exported with the model (a registered name, or ``"deep_retrieval"``: the beam search
        of a model trained with ``deep_retrieval: true``; None: that for such a model, else ``"brute_force"``) and
        the number of results it returns. The evaluator measures the model's own retrieval (exact search, or a Deep
        Retrieval model's beam search), whichever index is exported.
      metadata_path: an SQLite ML Metadata file (local runs); None leaves the connection to the orchestrator.
      beam_pipeline_args: passed to every Beam-based component (e.g. ``--runner=FlinkRunner``).
    """
    from tfrec_recall.config import PRESETS, ConfigError
    from tfrec_recall.evaluation.blessing import EXAMPLE_SPLITS, POPULARITY_METRIC
    from tfrec_recall.training.tfx_trainer import trainer_config
    _check(isinstance(pipeline_name, str) and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,127}", pipeline_name) is not None,
           "pipeline_name", pipeline_name, "must be lower-case letters, digits and '-' (Kubeflow V2's rule)")
    for name, value in (("pipeline_root", pipeline_root), ("data_root", data_root), ("serving_dir", serving_dir)):
        _check(isinstance(value, str) and bool(value), name, value, "must be a non-empty path")
    _check(data_format in DATA_FORMATS, "data_format", data_format, f"must be one of {DATA_FORMATS}")
    _check(blessing_split in EXAMPLE_SPLITS, "blessing_split", blessing_split, f"must be one of {list(EXAMPLE_SPLITS)}")
    _check(isinstance(history_length, int) and history_length >= 1, "history_length", history_length,
           "must be a positive integer")
    _check(isinstance(k, int) and k >= 1, "k", k, "must be a positive integer")
    _check(train_steps is None or (isinstance(train_steps, int) and train_steps >= 1), "train_steps",
           train_steps, "must be None or a positive integer")
    for name, value in (("margin", margin), ("popularity_margin", popularity_margin)):
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
               and value >= 0, name, value, "must be a finite number >= 0")
    _check(preset in PRESETS, "preset", preset, f"must be one of {sorted(PRESETS)}")
    schema_file = schema_file or default_schema(id_type)
    thresholds = dict(thresholds or {})
    _check(side_features is None or isinstance(side_features, SideFeatures), "side_features", side_features,
           "must be a tfrec_recall.data.side_tables.SideFeatures or None")
    # without tables no preset may ask for side features; with them, the preset (and config) decide
    overrides = {**({} if side_features else {"use_side_features": False}), **dict(config or {}),
                 "history_length": history_length}
    _check(not overrides.get("use_side_features") or bool(side_features), "config", {"use_side_features": True},
           "needs side-feature tables: pass side_features and the user / item feature roots")
    try:  # validate the whole configuration now, not in the Trainer an hour later
        run_config = trainer_config({"preset": preset, "config": overrides})
    except ConfigError as error:
        raise ValueError(f"config: {error}") from None
    metric_names = {f"{m}@{k_}" for m in ("HR", "Recall", "NDCG", "Coverage") for k_ in run_config.ks}
    for name in list(thresholds) + list(compare_metrics):
        _check(name in metric_names, "metric", name, f"is not computed (ks {list(run_config.ks)}); "
               f"use one of {sorted(metric_names)}")
    _check(POPULARITY_METRIC in metric_names, "config ks", list(run_config.ks),
           f"must include {POPULARITY_METRIC.split('@')[1]}: the popularity check compares {POPULARITY_METRIC}")
    index = _export_index(index, run_config)

    data = data_components(data_root, data_format, schema_file, history_length)
    data += side_feature_components(data[-1], side_features, user_features_root, item_features_root)
    examples = data[-1].outputs["joined_examples" if side_features else "split_examples"]
    trainer = tfx.components.Trainer(
        run_fn=RUN_FN, examples=examples,
        train_args=tfx.proto.TrainArgs(num_steps=train_steps or 0),
        eval_args=tfx.proto.EvalArgs(num_steps=0),
        custom_config={"preset": preset, "config": overrides})
    resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = RetrievalEvaluator(
        examples=examples, model=trainer.outputs["model"],
        baseline_model=resolver.outputs["model"], thresholds_json=json.dumps(thresholds, sort_keys=True),
        compare_metrics_json=json.dumps(list(compare_metrics)), margin=float(margin),
        popularity_margin=float(popularity_margin),
        blessing_split=blessing_split, ks_json=json.dumps(list(run_config.ks)))
    exporter = RetrievalExporter(model=trainer.outputs["model"], index=index, k=k)
    infra_check = ExportInfraCheck(model=exporter.outputs["exported_model"])
    pusher = Pusher(
        model=exporter.outputs["exported_model"], model_blessing=evaluator.outputs["blessing"],
        infra_blessing=infra_check.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_dir)))
    components = [*data, trainer, resolver, evaluator, exporter, infra_check, pusher]
    metadata = (tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
                if metadata_path else None)
    return tfx.dsl.Pipeline(pipeline_name=pipeline_name, pipeline_root=pipeline_root, components=components,
                            enable_cache=enable_cache, metadata_connection_config=metadata,
                            beam_pipeline_args=list(beam_pipeline_args))
