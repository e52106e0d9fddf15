"""The TFX pipeline: the protocol split as a Beam transform, blessing rules, argument checks, the Kubeflow V2
spec, ExampleValidator stopping a bad CSV, and an end-to-end LocalDagRunner run (cached rerun, crippled run
neither blessed nor pushed)."""
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

from tfrec_recall.data import leave_last_out  # noqa: E402
from tfrec_recall.data.protocol import (EVAL, HISTORY, ROW_NUMBER, TEST, TRAIN, assign_user,  # noqa: E402
                                        read_split_examples, to_example, write_interactions_csv,
                                        write_interactions_tfrecord)
from tfrec_recall.pipeline_steps import judge  # noqa: E402

from pipelines.pipeline import COMPONENT_IDS, create_pipeline  # noqa: E402
from pipelines.runners import compile_kubeflow_v2, executions, metadata_path  # noqa: E402

# A small pipeline model: 2 epochs of a narrow YouTubeDNN (the run takes about 100 s here).
SMALL = {"epochs": 2, "embedding_dim": 16, "output_dim": 16, "hidden_units": [32], "batch_size": 256,
         "num_negatives": 256}


# --------------------------------------------------------------------------------------------------------
# The protocol, one user at a time and as a Beam transform

def test_assign_user_golden_with_timestamp_ties():
    events = [{"user_id": "u", "item_id": "d", "timestamp": 5, ROW_NUMBER: 3},
              {"user_id": "u", "item_id": "b", "timestamp": 2, ROW_NUMBER: 2},
              {"user_id": "u", "item_id": "c", "timestamp": 2, ROW_NUMBER: 1},  # tie at t=2: row 1 first
              {"user_id": "u", "item_id": "a", "timestamp": 1, ROW_NUMBER: 0}]
    out = assign_user(events, history_length=1)
    # time order a, c, b, d -> train a, c; eval b; test d. Histories: most recent training item first, at most 1.
    assert [(s, r["item_id"], r[HISTORY], r["position"]) for s, r in out] == [
        (TRAIN, "a", [], 0), (TRAIN, "c", ["a"], 1), (EVAL, "b", ["c"], 2), (TEST, "d", ["c"], 3)]
    # Fewer than 3 interactions: training only.
    assert [s for s, _ in assign_user(events[:2])] == [TRAIN, TRAIN]
    with pytest.raises(ValueError, match="history_length must be a positive integer, got 0"):
        assign_user(events, history_length=0)


def test_beam_transform_matches_library_split(small_data, tmp_path):
    import apache_beam as beam
    import tensorflow as tf
    from pipelines.transforms import LeaveLastOut
    raw = []
    for row, r in enumerate(small_data.interactions.itertuples(index=False)):
        raw.append(tf.train.Example(features=tf.train.Features(feature={
            "user_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.user_id.encode()])),
            "item_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.item_id.encode()])),
            "timestamp": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(r.timestamp)])),
            ROW_NUMBER: tf.train.Feature(int64_list=tf.train.Int64List(value=[row])),
        })).SerializeToString())
    with beam.Pipeline() as pipeline:
        splits = pipeline | beam.Create(raw) | LeaveLastOut(history_length=10)
        for name, records in splits.items():
            _ = records | f"Write{name}" >> beam.io.WriteToTFRecord(str(tmp_path / f"Split-{name}" / "part"),
                                                                  file_name_suffix=".gz")
    got = read_split_examples(str(tmp_path), history_length=10)
    expected = leave_last_out(small_data, history_length=10)
    for name in ("train", "valid", "test"):
        a = getattr(got, name)[["user_id", "item_id", "timestamp", "history"]]
        b = getattr(expected, name)[["user_id", "item_id", "timestamp", "history"]]
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)
    assert got.train_items == expected.train_items
    assert list(got.data.items) == list(expected.data.items)


def test_to_example_round_trip_and_bad_field():
    from tfrec_recall.data.protocol import parse_interaction
    import tensorflow as tf
    example = to_example({"user_id": "u1", "item_id": "i2", "timestamp": 7, "weight": 0.5, "position": 0,
                          HISTORY: ["i1"]})
    assert parse_interaction(example)["item_id"] == "i2"
    bad = tf.train.Example()
    bad.features.feature["user_id"].bytes_list.value.append(b"u1")
    bad.features.feature["item_id"].bytes_list.value.append(b"i1")
    bad.features.feature["timestamp"].bytes_list.value.append(b"yesterday")
    with pytest.raises(ValueError, match="field 'timestamp': has type bytes_list"):
        parse_interaction(bad)


def test_pipeline_inputs_are_written_once(small_data, tmp_path):
    path = write_interactions_csv(small_data, tmp_path / "in" / "interactions.csv")
    written = pd.read_csv(path)
    assert list(written.columns) == ["user_id", "item_id", "timestamp", ROW_NUMBER]
    assert written[ROW_NUMBER].tolist() == list(range(len(small_data.interactions)))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_interactions_csv(small_data, path)
    assert [p.name for p in (tmp_path / "in").iterdir()] == ["interactions.csv"]  # no temporary left


# --------------------------------------------------------------------------------------------------------
# Blessing rules and arguments

def test_judge_thresholds_and_baseline_margin():
    metrics = {"HR@50": 0.30, "NDCG@10": 0.10, "users": 100}
    ok = judge(metrics, {"HR@50": 0.25}, baseline={"HR@50": 0.305, "NDCG@10": 0.12}, margin=0.01,
               compare=["HR@50"])
    assert ok["blessed"]  # 0.30 >= 0.25 and 0.30 >= 0.305 - 0.01 = 0.295
    worse = judge(metrics, {"HR@50": 0.25}, baseline={"HR@50": 0.32, "NDCG@10": 0.12}, margin=0.01,
                  compare=["HR@50", "NDCG@10"])
    # 0.30 < 0.32 - 0.01 = 0.31 and 0.10 < 0.12 - 0.01 = 0.11: both baseline checks fail
    assert not worse["blessed"]
    assert [c["passed"] for c in worse["checks"]] == [True, False, False]
    assert not judge(metrics, {"HR@50": 0.31})["blessed"]
    with pytest.raises(ValueError, match="metric 'HR@20' is not computed"):
        judge(metrics, {"HR@20": 0.1})
    with pytest.raises(ValueError, match="margin must be >= 0, got -0.1"):
        judge(metrics, {}, margin=-0.1)


def _pipeline(root: Path, **overrides):
    args = dict(pipeline_name="test-pipeline", pipeline_root=str(root / "root"), data_root=str(root / "data"),
                serving_dir=str(root / "serving"), metadata_path=metadata_path(str(root / "root")),
                config=SMALL, history_length=10, k=20)
    args.update(overrides)
    return create_pipeline(**args)


@pytest.mark.parametrize("change, message", [
    ({"data_format": "parquet"}, "data_format must be one of"),
    ({"index": "hnsw"}, "index must be one of"),
    ({"k": 0}, "k must be a positive integer, got 0"),
    ({"train_steps": -1}, "train_steps must be None or a positive integer, got -1"),
    ({"thresholds": {"HR@7": 0.1}}, "metric is not computed .*got 'HR@7'"),
    ({"config": {"epochs": "many"}}, "config key 'epochs'"),
    ({"id_type": "uuid"}, "id_type must be one of"),
    ({"margin": -1}, "margin must be a number >= 0, got -1"),
    ({"pipeline_name": "My_Pipeline"}, "pipeline_name must be lower-case letters"),
    ({"config": {"use_side_features": True}}, "pipeline's examples carry interactions only"),
])
def test_create_pipeline_rejects_bad_arguments(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _pipeline(tmp_path, **change)


def test_kubeflow_v2_spec_names_every_component(tmp_path):
    pipeline = _pipeline(tmp_path, metadata_path=None, beam_pipeline_args=["--direct_num_workers=2"])
    spec = json.loads(compile_kubeflow_v2(pipeline, str(tmp_path / "spec.json")).read_text())
    # Beam arguments reach the Beam-based steps.
    assert "--direct_num_workers=2" in json.dumps(spec["pipelineSpec"]["deploymentSpec"]["executors"]["ProtocolSplit_executor"])
    tasks = spec["pipelineSpec"]["root"]["dag"]["tasks"]
    # The Resolver compiles into one task per resolved channel ("<id>-model-resolver", ...).
    missing = [c for c in COMPONENT_IDS if not any(t == c or t.startswith(c + "-") for t in tasks)]
    assert not missing, missing
    # The custom steps run our code: their executors name our modules, the Trainer's parameters our run_fn.
    executors = json.dumps(spec["pipelineSpec"]["deploymentSpec"])
    assert "pipelines.components" in executors and "pipelines.pusher" in executors
    trainer = json.dumps(spec["pipelineSpec"]["root"]["dag"]["tasks"]["Trainer"])
    assert "tfrec_recall.pipeline_steps.run_fn" in trainer


def test_cli_compile(tmp_path, capsys):
    from tfrec_recall import cli
    (tmp_path / "data").mkdir()
    out = tmp_path / "spec.json"
    assert cli.main(["pipeline", "compile", "--target", "kubeflow-v2", "--output", str(out), "--data",
                     str(tmp_path / "data"), "--pipeline-root", "gs://bucket/root",
                     "--serving-dir", "gs://bucket/serving"]) == 0
    assert json.loads(out.read_text())["pipelineSpec"]["pipelineInfo"]["name"] == "tfrec-recall"


# --------------------------------------------------------------------------------------------------------
# Local runs

def _runs(root: Path):
    """Executions of the newest run, by component."""
    records = executions(metadata_path(str(root / "root")))
    last = records[-1].run_id
    return records, {e.component: e for e in records if e.run_id == last}


def test_bad_csv_is_stopped_by_example_validator(tmp_path, capsys):
    from tfrec_recall import cli
    data = tmp_path / "data"
    data.mkdir()
    # The timestamp column is missing.
    pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["i1", "i2", "i1"]}).to_csv(data / "x.csv",
                                                                                       index=False)
    code = cli.main(["pipeline", "run", "--data", str(data), "--pipeline-root", str(tmp_path / "root"),
                     "--serving-dir", str(tmp_path / "serving"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "ExampleValidator found anomalies" in err and "column 'timestamp': Column dropped" in err
    ran = {e.component: e.state for e in executions(metadata_path(str(tmp_path / "root")))}
    assert ran["ExampleValidator"] == "COMPLETE" and ran["ProtocolSplit"] == "FAILED"
    assert "Trainer" not in ran and not (tmp_path / "serving").exists()


def _query_pushed(serving: Path):
    import tensorflow as tf
    versions = sorted(p for p in serving.iterdir() if p.name.isdigit())
    request = json.loads((versions[-1] / "assets" / "request.json").read_text())
    fn = tf.saved_model.load(str(versions[-1])).signatures["serving_default"]
    out = fn(**{name: tf.constant(np.asarray(v, dtype=object)) for name, v in request.items()})
    return versions, out


def test_end_to_end_local_runs(tmp_path, small_data, monkeypatch, capsys):
    import yaml
    from tfrec_recall import cli
    from tfrec_recall import train as training
    write_interactions_csv(small_data, tmp_path / "data" / "interactions.csv")
    serving = tmp_path / "serving"
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))
    command = ["pipeline", "run", "--data", str(tmp_path / "data"), "--pipeline-root", str(tmp_path / "root"),
               "--serving-dir", str(serving), "--pipeline-name", "test-pipeline", "--config",
               str(tmp_path / "small.yaml"), "--history-length", "10", "--k", "20"]

    # 0. A run that fails in the Trainer keeps what finished before it. (TFX reloads the run_fn's module before
    #    each use, so the failure is planted one level down, in the training function run_fn imports.)
    def broken_train(*args, **kwargs):
        raise RuntimeError("simulated trainer failure")

    monkeypatch.setattr(training, "train", broken_train)
    assert cli.main(command) == 2
    assert "simulated trainer failure" in capsys.readouterr().err
    _, failed = _runs(tmp_path)
    assert failed["ProtocolSplit"].state == "COMPLETE" and failed["Trainer"].state == "FAILED"
    assert "Pusher" not in failed and not serving.exists()
    monkeypatch.undo()

    # 1. The rerun resumes after the finished components; every component has run to completion once, the
    #    model is blessed and pushed, and the pushed model answers a query through the export's signature.
    assert cli.main(command) == 0
    printed = capsys.readouterr().out
    assert "blessed: True" in printed and "pushed: True" in printed
    records, first = _runs(tmp_path)
    assert sorted(first) == sorted(COMPONENT_IDS)
    for component in ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "ProtocolSplit"):
        assert first[component].state == "CACHED", component
    # Each component completed exactly once over the failed run and its resume (the Resolver, which is not an
    # executor and not cached, resolves in every run).
    resolver = "latest_blessed_model_resolver"
    completed = [e.component for e in records if e.state == "COMPLETE" and e.component != resolver]
    assert sorted(completed) == sorted(c for c in COMPONENT_IDS if c != resolver)
    assert first[resolver].state == "COMPLETE"
    evaluation = json.loads(Path(first["RetrievalEvaluator"].outputs["evaluation"]["uri"], "metrics.json").read_text())
    assert evaluation["blessed"] and evaluation["baseline_model"] is None
    assert evaluation["metrics"]["eval"]["HR@50"] > 0.25  # random ranking gives 50/200 = 0.25
    assert Path(first["RetrievalEvaluator"].outputs["evaluation"]["uri"], "report.html").stat().st_size > 1000
    assert first["ExportInfraCheck"].outputs["blessing"]["blessed"] == 1
    assert first["Pusher"].outputs["pushed_model"]["pushed"] == 1
    versions, out = _query_pushed(serving)
    assert len(versions) == 1 and out["item_ids"].shape == (2, 20)
    assert set(out["item_ids"].numpy().astype(str).ravel()) <= set(small_data.interactions["item_id"])

    # 2. Unchanged inputs: everything up to the model is reused from the cache; the Evaluator (which now has
    #    a baseline) re-blesses the same model, and the Pusher does not copy it again.
    assert cli.main(command) == 0
    _, second = _runs(tmp_path)
    for component in ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "ProtocolSplit", "Trainer",
                      "RetrievalExporter", "ExportInfraCheck"):
        assert second[component].state == "CACHED", component
    assert second["Pusher"].outputs["pushed_model"]["pushed_version"] == versions[0].name
    assert sorted(p.name for p in serving.iterdir()) == [versions[0].name]

    # 3. A crippled model (one training step), fed through ImportExampleGen from TFRecords of the same data:
    #    it falls behind the latest blessed model, so it is not blessed and not pushed.
    tfrecords = tmp_path / "tfrecords"
    write_interactions_tfrecord(small_data, tfrecords / "interactions.tfrecord.gz")
    crippled = command[:]
    crippled[crippled.index("--data") + 1] = str(tfrecords)
    assert cli.main(crippled + ["--data-format", "tfrecord", "--train-steps", "1"]) == 0
    assert "blessed: False" in capsys.readouterr().out
    _, third = _runs(tmp_path)
    assert third["ExampleGen"].state == "COMPLETE" and third["Trainer"].state == "COMPLETE"
    assert third["RetrievalEvaluator"].outputs["blessing"]["blessed"] == 0
    report = json.loads(Path(third["RetrievalEvaluator"].outputs["evaluation"]["uri"], "metrics.json").read_text())
    assert report["baseline_model_id"] == first["Trainer"].outputs["model"]["id"]
    assert any(c["kind"] == "baseline" and not c["passed"] for c in report["checks"])
    assert third["Pusher"].outputs["pushed_model"]["pushed"] == 0
    assert sorted(p.name for p in serving.iterdir()) == [versions[0].name]
