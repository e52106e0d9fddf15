"""Custom TFX components of the retrieval pipeline, as ``@component`` functions with typed artifacts.

The work is done by library functions (``tfrec_recall.training.tfx_trainer``, ``tfrec_recall.evaluation.blessing``,
``tfrec_recall.export.pipeline_export`` and ``tfrec_recall.data.protocol``); these wrappers only move artifacts
and record results in ML Metadata.

* ``ProtocolSplit``: refuses to go on when ExampleValidator found anomalies (the error lists them), except
  columns the schema does not name ("New column" only): those are dropped, named in a warning and in the
  ``dropped_columns`` property of ``split_examples``. Then splits the validated interactions by PROTOCOL.md
  with causal history in a Beam transform -> train / eval / test.
* ``JoinSideFeatures``: the split examples joined with the user and item side-feature tables (each an
  ImportExampleGen output) in Beam (``tfrec_recall.data.side_jobs``): every example with its user's and item's
  columns, plus a ``corpus`` split (each corpus item with its columns) and ``side_features.json``.
* ``RetrievalEvaluator``: full-corpus HR@K, Recall@K, NDCG@K and coverage of the trained model on the eval and test
  splits, of the most-popular ranker (``tfrec_recall.evaluation.baselines``) on the same rows, and of the latest blessed
  model when the Resolver found one, on the same data. Blesses only when the model's HR@50 beats the most-popular
  ranker's by ``popularity_margin`` (absolute), meets the optional absolute thresholds and does not fall behind
  the latest blessed model by more than ``margin``. Writes metrics.json, report.html and report.png. A model whose
  configuration streams is evaluated from the split files chunk by chunk (``ExamplesEvaluator``), the split is
  never read whole; other models on the split read into memory.
* ``RetrievalExporter``: the SavedModel with the index inside (``Format-Serving``), in TF Serving's layout.
* ``ExportInfraCheck``: loads that export in a fresh process and answers one request; an ``InfraBlessing``.
"""
# No "from __future__ import annotations": TFX reads the component signatures at definition time.

import json
import os
from typing import Dict, List, Tuple

import apache_beam as beam
from absl import logging
from tfx import v1 as tfx
from tfx.dsl.component.experimental.annotations import BeamComponentParameter
from tfx.components.util import examples_utils
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils
from tfx.types.standard_artifacts import ExampleAnomalies, Examples, InfraBlessing, Model, ModelBlessing, ModelEvaluation

import tensorflow as tf  # after tfx and tfrec_recall's selection of tf-keras

from tfrec_recall.data.protocol import SPLITS

InputArtifact = tfx.dsl.components.InputArtifact
OutputArtifact = tfx.dsl.components.OutputArtifact
Parameter = tfx.dsl.components.Parameter

SERVING_SUBDIR = "Format-Serving"  # where TFX's Pusher looks for a Model artifact's SavedModel
DROPPED_COLUMNS = "dropped_columns"  # ProtocolSplit's split_examples: JSON list of the input columns dropped


class AnomaliesFound(RuntimeError):
    """ExampleValidator found the data does not match the schema."""


def _schema_diffs(anomalies_uri: str):
    """``(split name, Anomalies proto)`` for every split of an ExampleAnomalies artifact."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2
    out = []
    for path in sorted(tf.io.gfile.glob(os.path.join(anomalies_uri, "Split-*", "SchemaDiff.pb"))):
        proto = anomalies_pb2.Anomalies()
        with tf.io.gfile.GFile(path, "rb") as f:
            proto.ParseFromString(f.read())
        out.append((os.path.basename(os.path.dirname(path))[len("Split-"):], proto))
    return out


def _is_extra_column(column: str, info, schema_columns) -> bool:
    """True when every reason of this anomaly is SCHEMA_NEW_COLUMN and the schema does not name the column."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2
    new_column = anomalies_pb2.AnomalyInfo.SCHEMA_NEW_COLUMN
    return bool(info.reason) and all(r.type == new_column for r in info.reason) and column not in schema_columns


def _line(split: str, where: str, info) -> str:
    return f"{split}: {where}: {info.short_description} ({info.description})"


def sort_anomalies(proto, split: str) -> Tuple[List[str], List[str]]:
    """``(extra columns, problems)`` of one split's Anomalies proto. Extra columns are columns in the data that
    the schema (the proto's ``baseline``) does not name, whose only anomaly is "New column": the protocol split
    reads the schema's columns only, so they are dropped. Problems are one line per other anomaly
    (``split: column 'name': short (description)``), a dataset-level one included; they stop the run. Without
    a baseline schema no column is known to be extra, so every anomaly is a problem."""
    schema_columns = {f.name for f in proto.baseline.feature} | {f.name for f in proto.baseline.sparse_feature}
    extra, problems = [], []
    for column, info in sorted(proto.anomaly_info.items()):
        if proto.HasField("baseline") and _is_extra_column(column, info, schema_columns):
            extra.append(column)
        else:
            problems.append(_line(split, f"column {column!r}", info))
    if proto.HasField("dataset_anomaly_info"):
        problems.append(_line(split, "dataset", proto.dataset_anomaly_info))
    return extra, problems


def check_anomalies(anomalies_uri: str) -> List[str]:
    """The extra columns (see :func:`sort_anomalies`) of an ExampleAnomalies artifact, sorted, logged as a
    warning; raises :class:`AnomaliesFound` listing every other anomaly."""
    extra, problems = set(), []
    for split, proto in _schema_diffs(anomalies_uri):
        columns, lines = sort_anomalies(proto, split)
        extra.update(columns)
        problems += lines
    if problems:
        raise AnomaliesFound("ExampleValidator found anomalies in the input data; the run stops before "
                             "training:\n  " + "\n  ".join(problems))
    if extra:
        logging.warning("the input data has columns the schema does not name; they are dropped: %s",
                        ", ".join(sorted(extra)))
    return sorted(extra)


def _split_uris(examples) -> Dict[str, str]:
    return {name: artifact_utils.get_split_uri([examples], name)
            for name in artifact_utils.decode_split_names(examples.split_names)}


@tfx.dsl.components.component(use_beam=True)
def ProtocolSplit(examples: InputArtifact[Examples], anomalies: InputArtifact[ExampleAnomalies],
                  split_examples: OutputArtifact[Examples], history_length: Parameter[int] = 50,
                  beam_pipeline: BeamComponentParameter[beam.Pipeline] = None) -> None:
    from pipelines.transforms import LeaveLastOut
    dropped = check_anomalies(anomalies.uri)
    split_examples.set_string_custom_property(DROPPED_COLUMNS, json.dumps(dropped))
    inputs = _split_uris(examples)
    split_examples.split_names = artifact_utils.encode_split_names(list(SPLITS))
    examples_utils.set_payload_format(split_examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
    examples_utils.set_file_format(split_examples, "tfrecords_gzip")
    with beam_pipeline as pipeline:
        raw = [pipeline | f"Read[{name}]" >> beam.io.ReadFromTFRecord(os.path.join(uri, "*"))
               for name, uri in sorted(inputs.items())]
        splits = (raw | "Flatten" >> beam.Flatten()) | "LeaveLastOut" >> LeaveLastOut(history_length)
        for name in SPLITS:
            prefix = os.path.join(artifact_utils.get_split_uri([split_examples], name), "data_tfrecord")
            _ = splits[name] | f"Write[{name}]" >> beam.io.WriteToTFRecord(prefix, file_name_suffix=".gz")


def _table_files(examples) -> List[str]:
    """The record files of every split of a side table's Examples artifact."""
    if examples is None:
        return []
    return sorted(f for uri in _split_uris(examples).values() for f in tf.io.gfile.glob(os.path.join(uri, "*")))


@tfx.dsl.components.component(use_beam=True)
def JoinSideFeatures(split_examples: InputArtifact[Examples], joined_examples: OutputArtifact[Examples],
                     user_features: InputArtifact[Examples] = None, item_features: InputArtifact[Examples] = None,
                     side_features_json: Parameter[str] = "{}", num_shards: Parameter[int] = 4,
                     beam_pipeline: BeamComponentParameter[beam.Pipeline] = None) -> None:
    from tfrec_recall.data.side_jobs import add_join
    from tfrec_recall.data.side_tables import CORPUS, SideFeatures, write_side_features_file
    side = SideFeatures.from_json(side_features_json, "side_features_json")
    joined_examples.split_names = artifact_utils.encode_split_names(list(SPLITS) + [CORPUS])
    examples_utils.set_payload_format(joined_examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
    examples_utils.set_file_format(joined_examples, "tfrecords_gzip")
    with beam_pipeline as pipeline:
        add_join(pipeline, split_examples.uri, joined_examples.uri, side, user_files=_table_files(user_features),
                 item_files=_table_files(item_features), num_shards=num_shards)
    write_side_features_file(joined_examples.uri, side)


@tfx.dsl.components.component
def RetrievalEvaluator(examples: InputArtifact[Examples], model: InputArtifact[Model],
                       evaluation: OutputArtifact[ModelEvaluation], blessing: OutputArtifact[ModelBlessing],
                       baseline_model: InputArtifact[Model] = None,
                       thresholds_json: Parameter[str] = "{}",
                       compare_metrics_json: Parameter[str] = '["HR@50", "NDCG@10"]',
                       margin: Parameter[float] = 0.01, popularity_margin: Parameter[float] = 0.02,
                       blessing_split: Parameter[str] = "eval",
                       ks_json: Parameter[str] = "[10, 50, 100]") -> None:
    from tfrec_recall.evaluation.blessing import EXAMPLE_SPLITS, ExamplesEvaluator, judge, write_report
    thresholds, compare, ks = json.loads(thresholds_json), json.loads(compare_metrics_json), json.loads(ks_json)
    if blessing_split not in EXAMPLE_SPLITS:
        raise ValueError(f"blessing_split must be one of {sorted(EXAMPLE_SPLITS)}, got {blessing_split!r}")
    model_dir = os.path.join(model.uri, SERVING_SUBDIR)
    evaluator = ExamplesEvaluator(examples.uri, model_dir, ks)  # every run ranked over this model's corpus
    metrics = evaluator.metrics(model_dir)
    popularity = evaluator.popularity()  # the most-popular ranker on the same rows and corpus
    baseline, baseline_dir = None, None
    if baseline_model is not None and baseline_model.id != model.id:
        baseline_dir = os.path.join(baseline_model.uri, SERVING_SUBDIR)
        baseline = evaluator.metrics(baseline_dir)
    verdict = judge(metrics[blessing_split], thresholds, baseline[blessing_split] if baseline else None, margin,
                    compare, popularity=popularity[blessing_split], popularity_margin=popularity_margin)
    result = {"blessed": verdict["blessed"], "checks": verdict["checks"], "blessing_split": blessing_split,
              "margin": margin, "popularity_margin": popularity_margin, "model": model.uri, "model_id": model.id,
              "baseline_model": baseline_model.uri if baseline else None,
              "baseline_model_id": baseline_model.id if baseline else None,
              "metrics": metrics, "popularity_metrics": popularity, "baseline_metrics": baseline,
              "candidates": len(evaluator.corpus()[0]),
              "examples_read": {name: ("streamed" if evaluator.streams(path) else "in memory") if path else None
                                for name, path in (("model", model_dir), ("baseline_model", baseline_dir))}}
    write_report(evaluation.uri, result)
    _record_verdict(result, verdict, model, baseline_model if baseline else None, evaluation, blessing)


def _record_verdict(result, verdict, model, baseline_model, evaluation, blessing) -> None:
    """The blessing (BLESSED / NOT_BLESSED file and custom properties) and the evaluation's ML Metadata
    properties: the blessing split's metrics and the most-popular ranker's (``popularity_<metric>``)."""
    blessed = int(verdict["blessed"])
    blessing.set_int_custom_property("blessed", blessed)
    blessing.set_string_custom_property("current_model", model.uri)
    blessing.set_int_custom_property("current_model_id", model.id)
    if baseline_model is not None:
        blessing.set_string_custom_property("baseline_model", baseline_model.uri)
        blessing.set_int_custom_property("baseline_model_id", baseline_model.id)
    with tf.io.gfile.GFile(os.path.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"), "w") as f:
        f.write(json.dumps(verdict, indent=2))
    split = result["blessing_split"]
    evaluation.set_int_custom_property("blessed", blessed)
    evaluation.set_float_custom_property("popularity_margin", float(result["popularity_margin"]))
    for prefix, values in (("", result["metrics"][split]), ("popularity_", result["popularity_metrics"][split])):
        for name, value in values.items():
            evaluation.set_float_custom_property(prefix + name, float(value))


@tfx.dsl.components.component
def RetrievalExporter(model: InputArtifact[Model], exported_model: OutputArtifact[Model],
                      index: Parameter[str] = "brute_force", k: Parameter[int] = 100) -> None:
    from tfrec_recall.export.pipeline_export import export_for_serving
    export_for_serving(os.path.join(model.uri, SERVING_SUBDIR), os.path.join(exported_model.uri, SERVING_SUBDIR),
                       index=index, k=k)
    exported_model.set_string_custom_property("index", index)
    exported_model.set_int_custom_property("k", k)


@tfx.dsl.components.component
def ExportInfraCheck(model: InputArtifact[Model], blessing: OutputArtifact[InfraBlessing],
                     timeout_seconds: Parameter[int] = 600) -> None:
    from tfrec_recall.export.pipeline_export import smoke_test_export
    result = smoke_test_export(os.path.join(model.uri, SERVING_SUBDIR), timeout=timeout_seconds)
    blessing.set_int_custom_property("blessed", int(result["ok"]))
    if not result["ok"]:
        blessing.set_string_custom_property("error", result["error"][:2000])
    with tf.io.gfile.GFile(os.path.join(blessing.uri, "INFRA_BLESSED" if result["ok"] else "INFRA_NOT_BLESSED"),
                           "w") as f:
        f.write(json.dumps(result, indent=2))
