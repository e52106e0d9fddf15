"""The pipeline in production: the pipeline image (Dockerfile consistency, the compiled spec naming it), pusher
versions that never collide (local disk and TensorFlow's ``ram://``), input CSVs with extra columns (dropped and
named, while every other anomaly still stops the run), and pipeline storage through tf.io.gfile (``ram://``)."""
import configparser
import importlib.metadata
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

import tfrec_recall  # noqa: E402,F401  (selects tf-keras before TensorFlow is imported)
import tensorflow as tf  # noqa: E402

from pipelines.components import DROPPED_COLUMNS, AnomaliesFound, check_anomalies, sort_anomalies  # noqa: E402
from pipelines.pipeline import data_components, default_schema  # noqa: E402
from pipelines.pusher import existing_version, push_version  # noqa: E402
from pipelines.runners import DEFAULT_IMAGE, compile_kubeflow_v2, executions, metadata_path, run_local  # noqa: E402
from tests.test_pipeline import _pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "pipelines" / "Dockerfile"


# --------------------------------------------------------------------------------------------------------
# The pipeline image

def _lock_versions() -> dict:
    pins = (re.fullmatch(r"([A-Za-z0-9_.\-\[\],]+)==(\S+)", line.strip())
            for line in (REPO / "requirements.lock").read_text().splitlines())
    return {m.group(1).split("[")[0].lower(): m.group(2) for m in pins if m}


def _instructions(path: Path):
    """A Dockerfile as ``(KEYWORD, arguments)`` pairs: continuation lines joined, comments and blanks left out."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    out = []
    for line in re.sub(r"\\\s*\n", " ", "\n".join(lines)).splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(arguments.split())))
    return out


def _first(instructions, keyword: str, pattern: str) -> int:
    found = [i for i, (k, args) in enumerate(instructions) if k == keyword and re.search(pattern, args)]
    assert found, f"no {keyword} matching {pattern!r} in {DOCKERFILE}"
    return found[0]


def test_default_image_is_the_pipeline_image_at_the_package_version():
    assert DEFAULT_IMAGE == f"tfrec-recall-pipeline:{importlib.metadata.version('tfrec_recall')}"
    readme = (REPO / "pipelines" / "README.md").read_text()
    name = DEFAULT_IMAGE.split(":")[0]
    assert "docker build -f pipelines/Dockerfile -t " + name in readme
    assert re.search(r"docker push \S*" + re.escape(name), readme)
    assert "--image" in readme


def test_dockerfile_installs_the_lock_and_the_package():
    steps = _instructions(DOCKERFILE)
    # The base is the TFX image of the locked tfx version (the components' executors come from it).
    assert steps[0] == ("FROM", f"gcr.io/tfx-oss-public/tfx:{_lock_versions()['tfx']}")
    # TFX's executor entry point imports TensorFlow before tfrec_recall can select tf-keras.
    assert _first(steps, "ENV", r"(^|\s)TF_USE_LEGACY_KERAS=1(\s|$)") > 0
    lock = _first(steps, "RUN", r"python -m pip install .*-r requirements\.lock")
    assert _first(steps, "COPY", r"(^|\s)requirements\.lock\s") < lock
    package = _first(steps, "RUN", r"python -m pip install (--\S+ )*\.(\s|$)")
    copied = " ".join(args for k, args in steps[:package] if k == "COPY")
    sources = ("pyproject.toml", "setup.cfg", "README.md", "tfrec_recall", "pipelines")
    assert all(re.search(rf"(^|\s){re.escape(s)}\s", copied) for s in sources), copied
    assert lock < package and re.search(r"import tfrec_recall.*pipelines\.pipeline", steps[package][1])
    # The build context keeps exactly what is copied (.venv alone is about 3 GB).
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and {f"!{s}" for s in sources + ("requirements.lock",)} <= set(ignore)


def test_package_build_contains_pipelines_and_its_schemas():
    """``pip install .`` in the image must make ``pipelines`` importable with its packaged schemas."""
    from setuptools import find_packages
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    include = setup["options.packages.find"]["include"].split()
    packages = find_packages(str(REPO), include=include)
    assert {"tfrec_recall", "pipelines"} <= set(packages), include
    patterns = setup["options.package_data"]["pipelines"].split()
    packaged = {p.name for pattern in patterns for p in (REPO / "pipelines").glob(pattern)}
    assert {Path(default_schema(t)).name for t in ("string", "int")} <= packaged, patterns


def _images(spec: dict) -> set:
    executors = spec["pipelineSpec"]["deploymentSpec"]["executors"]
    return {e["container"]["image"] for e in executors.values() if "container" in e}


def test_compile_names_the_pipeline_image_by_default(tmp_path, capsys):
    from tfrec_recall import cli
    (tmp_path / "data").mkdir()
    common = ["pipeline", "compile", "--target", "kubeflow-v2", "--data", str(tmp_path / "data"),
              "--pipeline-root", "gs://b/root", "--serving-dir", "gs://b/serving"]
    assert cli.main(common + ["--output", str(tmp_path / "default.json")]) == 0
    assert _images(json.loads((tmp_path / "default.json").read_text())) == {DEFAULT_IMAGE}
    override = "europe-docker.pkg.dev/project/repo/tfrec-recall-pipeline:0.1.0"
    assert cli.main(common + ["--output", str(tmp_path / "override.json"), "--image", override]) == 0
    assert _images(json.loads((tmp_path / "override.json").read_text())) == {override}
    assert "wrote the Kubeflow V2 pipeline spec" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# Pusher versions

def _fake_saved_model(path: str, manifest: dict, payload: bytes) -> str:
    tf.io.gfile.makedirs(f"{path}/assets")
    with tf.io.gfile.GFile(f"{path}/saved_model.pb", "wb") as f:
        f.write(payload)
    with tf.io.gfile.GFile(f"{path}/assets/manifest.json", "w") as f:
        f.write(json.dumps(manifest, sort_keys=True))
    return path


def _root(tmp_path, filesystem: str) -> str:
    return str(tmp_path) if filesystem == "local" else f"ram://{tmp_path.name}"


@pytest.mark.parametrize("filesystem", ["local", "ram"])
def test_pushes_in_the_same_second_get_sequential_versions(tmp_path, monkeypatch, filesystem):
    root = _root(tmp_path, filesystem)
    a = _fake_saved_model(f"{root}/export-a", {"candidates_sha256": "aa", "created": "2026-01-01T00:00:00"}, b"A")
    b = _fake_saved_model(f"{root}/export-b", {"candidates_sha256": "bb", "created": "2026-01-01T00:00:00"}, b"B")
    serving = f"{root}/serving"
    monkeypatch.setattr(time, "time", lambda: 1_767_225_600.0)  # one frozen second: unix-time names would collide
    assert existing_version(serving, a) is None  # nothing there yet (the directory does not exist)
    assert [push_version(serving, a), push_version(serving, b)] == ["1", "2"]
    assert sorted(n.rstrip("/") for n in tf.io.gfile.listdir(serving)) == ["1", "2"]
    for version, payload in (("1", b"A"), ("2", b"B")):
        with tf.io.gfile.GFile(f"{serving}/{version}/saved_model.pb", "rb") as f:
            assert f.read() == payload
    # The same manifest (a re-blessed copy of export a elsewhere) is recognised; a new one is not.
    again = _fake_saved_model(f"{root}/rerun/export-a", {"candidates_sha256": "aa", "created": "2026-01-01T00:00:00"},
                              b"A")
    assert (existing_version(serving, again), existing_version(serving, b)) == ("1", "2")
    c = _fake_saved_model(f"{root}/export-c", {"candidates_sha256": "cc", "created": "2026-01-01T00:00:01"}, b"C")
    assert existing_version(serving, c) is None
    # A half-copied version (no saved_model.pb yet) is never "the same model", and its number is not reused.
    tf.io.gfile.makedirs(f"{serving}/3/assets")
    tf.io.gfile.copy(f"{c}/assets/manifest.json", f"{serving}/3/assets/manifest.json")
    assert existing_version(serving, c) is None
    assert push_version(serving, c) == "4"


def test_pusher_executor_pushes_once_on_ram(tmp_path):
    from tfx.proto import pusher_pb2
    from tfx.types import standard_artifacts, standard_component_specs as specs
    from tfx.utils import proto_utils
    from pipelines.pusher import Executor
    root = f"ram://{tmp_path.name}"
    destination = proto_utils.proto_to_json(pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=f"{root}/serving")))

    def push(run: int, manifest: dict) -> str:
        model = standard_artifacts.Model()
        model.uri = f"{root}/model-{run}"
        _fake_saved_model(f"{model.uri}/Format-Serving", manifest, b"pb")
        blessing = standard_artifacts.ModelBlessing()
        blessing.set_int_custom_property("blessed", 1)
        pushed = standard_artifacts.PushedModel()
        pushed.uri = f"{root}/pushed-{run}"
        Executor().Do({specs.MODEL_KEY: [model], specs.MODEL_BLESSING_KEY: [blessing]},
                      {specs.PUSHED_MODEL_KEY: [pushed]}, {specs.PUSH_DESTINATION_KEY: destination})
        assert pushed.get_int_custom_property("pushed") == 1
        assert tf.io.gfile.exists(f"{pushed.uri}/saved_model.pb")  # TFX's archive of the pushed model
        return pushed.get_string_custom_property("pushed_version")

    assert [push(0, {"m": 1}), push(1, {"m": 2}), push(2, {"m": 2})] == ["1", "2", "2"]
    assert sorted(n.rstrip("/") for n in tf.io.gfile.listdir(f"{root}/serving")) == ["1", "2"]


# --------------------------------------------------------------------------------------------------------
# Input columns the schema does not name

def _schema(id_type: str = "string"):
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2
    with tf.io.gfile.GFile(default_schema(id_type), "r") as f:
        return text_format.Parse(f.read(), schema_pb2.Schema())


def _anomalies(columns: dict, baseline: bool = True, dataset: str = ""):
    """An Anomalies proto as ExampleValidator writes it: ``columns`` maps a column to its reason type names."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2
    proto = anomalies_pb2.Anomalies()
    if baseline:
        proto.baseline.CopyFrom(_schema())
    for column, reasons in columns.items():
        info = proto.anomaly_info[column]
        info.severity = anomalies_pb2.AnomalyInfo.ERROR
        info.short_description = "New column" if reasons == ["SCHEMA_NEW_COLUMN"] else "Multiple errors"
        info.description = f"{column}: {', '.join(reasons)}"
        for reason in reasons:
            info.reason.add(type=anomalies_pb2.AnomalyInfo.Type.Value(reason), short_description=reason)
    if dataset:
        proto.dataset_anomaly_info.short_description = dataset
        proto.dataset_anomaly_info.description = dataset
    return proto


def _write_anomalies(uri: Path, split_protos: dict) -> str:
    for split, proto in split_protos.items():
        tf.io.gfile.makedirs(str(uri / f"Split-{split}"))
        with tf.io.gfile.GFile(str(uri / f"Split-{split}" / "SchemaDiff.pb"), "wb") as f:
            f.write(proto.SerializeToString())
    return str(uri)


def test_new_columns_are_tolerated_and_named(tmp_path, caplog):
    proto = _anomalies({"rating": ["SCHEMA_NEW_COLUMN"], "genre": ["SCHEMA_NEW_COLUMN"]})
    assert sort_anomalies(proto, "interactions") == (["genre", "rating"], [])
    uri = _write_anomalies(tmp_path / "anomalies", {"interactions": proto, "more": _anomalies({
        "rating": ["SCHEMA_NEW_COLUMN"]})})
    with caplog.at_level("WARNING"):
        assert check_anomalies(uri) == ["genre", "rating"]
    assert "they are dropped: genre, rating" in caplog.text
    assert check_anomalies(_write_anomalies(tmp_path / "clean", {"interactions": _anomalies({})})) == []


@pytest.mark.parametrize("columns, baseline, dataset, message", [
    ({"timestamp": ["SCHEMA_MISSING_COLUMN"]}, True, "", r"interactions: column 'timestamp': Multiple errors"),
    ({"item_id": ["UNEXPECTED_DATA_TYPE"]}, True, "", r"column 'item_id'.*UNEXPECTED_DATA_TYPE"),
    # "New column" for a column the schema names is not an extra column.
    ({"weight": ["SCHEMA_NEW_COLUMN"]}, True, "", r"column 'weight'"),
    # A new column with a second problem stops the run too.
    ({"rating": ["SCHEMA_NEW_COLUMN", "UNEXPECTED_DATA_TYPE"]}, True, "", r"column 'rating'"),
    # Without the baseline schema no column is known to be extra.
    ({"rating": ["SCHEMA_NEW_COLUMN"]}, False, "", r"column 'rating': New column"),
    ({"rating": ["SCHEMA_NEW_COLUMN"]}, True, "Low number of examples", r"interactions: dataset: Low number"),
], ids=["missing", "type", "known-column", "mixed", "no-baseline", "dataset"])
def test_other_anomalies_still_stop_the_run(tmp_path, columns, baseline, dataset, message):
    proto = _anomalies({**columns, "genre": ["SCHEMA_NEW_COLUMN"]}, baseline=baseline, dataset=dataset)
    uri = _write_anomalies(tmp_path / "anomalies", {"interactions": proto})
    with pytest.raises(AnomaliesFound, match=f"ExampleValidator found anomalies(.|\\n)*{message}"):
        check_anomalies(uri)


@pytest.mark.slow
def test_extra_csv_column_is_dropped_by_the_first_steps(tmp_path, small_data):
    """ExampleGen -> StatisticsGen -> SchemaGen -> ExampleValidator -> ProtocolSplit on a CSV with a ``rating``
    column: ExampleValidator reports it, ProtocolSplit drops it and names it, the splits are the library's."""
    from tfx import v1 as tfx
    from tfrec_recall.data import leave_last_out
    from tfrec_recall.data.protocol import ROW_NUMBER, read_split_examples
    frame = small_data.interactions[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
    rating = np.random.default_rng(7).integers(1, 6, size=len(frame))
    (tmp_path / "data").mkdir()
    frame.assign(rating=rating, **{ROW_NUMBER: np.arange(len(frame))}).to_csv(tmp_path / "data" / "x.csv",
                                                                               index=False)
    root = str(tmp_path / "root")
    components = data_components(str(tmp_path / "data"), "csv", default_schema("string"), history_length=10)
    store = tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path(root))
    run_local(tfx.dsl.Pipeline(pipeline_name="test-extra-column", pipeline_root=root, components=components,
                               metadata_connection_config=store))
    ran = {e.component: e for e in executions(metadata_path(root))}
    first = ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "ProtocolSplit")
    assert {c: e.state for c, e in ran.items()} == {c: "COMPLETE" for c in first}
    assert check_anomalies(ran["ExampleValidator"].outputs["anomalies"]["uri"]) == ["rating"]  # it was reported
    split = ran["ProtocolSplit"].outputs["split_examples"]
    assert json.loads(split[DROPPED_COLUMNS]) == ["rating"]
    record = next(iter(tf.data.TFRecordDataset(tf.io.gfile.glob(f"{split['uri']}/Split-train/*"),
                                               compression_type="GZIP").take(1)))
    assert "rating" not in tf.train.Example.FromString(record.numpy()).features.feature
    got, expected = read_split_examples(split["uri"], history_length=10), leave_last_out(small_data, 10)
    for name in ("train", "valid", "test"):
        columns = ["user_id", "item_id", "timestamp", "history"]
        pd.testing.assert_frame_equal(getattr(got, name)[columns].reset_index(drop=True),
                                      getattr(expected, name)[columns].reset_index(drop=True), check_dtype=False)


# --------------------------------------------------------------------------------------------------------
# Storage through tf.io.gfile (run last: it needs tfrec_recall.data.protocol on tf.io.gfile too)

def test_compile_writes_the_spec_to_a_uri(tmp_path):
    output = f"ram://{tmp_path.name}/specs/spec.json"
    assert compile_kubeflow_v2(_pipeline(tmp_path, metadata_path=None), output) == output
    with tf.io.gfile.GFile(output, "r") as f:
        spec = json.loads(f.read())
    assert spec["pipelineSpec"]["pipelineInfo"]["name"] == "test-pipeline" and _images(spec) == {DEFAULT_IMAGE}
    with pytest.raises(ValueError, match="output must name a file, got 'ram://x/'"):
        compile_kubeflow_v2(_pipeline(tmp_path, metadata_path=None), "ram://x/")


def test_cli_reads_data_and_config_uris(tmp_path, capsys):
    import yaml
    from tfrec_recall import cli
    root = f"ram://{tmp_path.name}"
    tf.io.gfile.makedirs(f"{root}/data")
    with tf.io.gfile.GFile(f"{root}/small.yaml", "w") as f:
        f.write(yaml.safe_dump({"epochs": 3, "embedding_dim": 16}))
    common = ["pipeline", "compile", "--target", "kubeflow-v2", "--pipeline-root", f"{root}/root",
              "--serving-dir", f"{root}/serving", "--output", f"{root}/spec.json"]
    assert cli.main(common + ["--data", f"{root}/data", "--config", f"{root}/small.yaml"]) == 0
    with tf.io.gfile.GFile(f"{root}/spec.json", "r") as f:
        trainer = json.dumps(json.loads(f.read())["pipelineSpec"]["root"]["dag"]["tasks"]["Trainer"])
    assert '\\"epochs\\": 3' in trainer and '\\"embedding_dim\\": 16' in trainer
    assert cli.main(common + ["--data", f"{root}/absent"]) == 2
    assert f"--data '{root}/absent' is neither a directory nor one of" in capsys.readouterr().err


def test_materialise_writes_builtin_data_under_a_uri_root_once(tmp_path, small_data, monkeypatch):
    from pipelines.cli import materialise
    from tfrec_recall.data import registry
    calls = []
    monkeypatch.setattr(registry, "load_dataset", lambda name, data_dir=None: calls.append(name) or small_data)
    root = f"ram://{tmp_path.name}/root"
    target = materialise("synthetic", root)
    assert target == f"{root}/data/synthetic" and calls == ["synthetic"]
    with tf.io.gfile.GFile(f"{target}/interactions.csv", "r") as f:
        written = pd.read_csv(f)
    assert list(written.columns) == ["user_id", "item_id", "timestamp", "row_number"]
    assert len(written) == len(small_data.interactions)
    assert materialise("synthetic", root) == target and calls == ["synthetic"]  # reused, not rewritten
    # the side tables beside it, as table examples, and the pipeline arguments that pass them
    import argparse
    from pipelines.cli import _side_inputs
    from tfrec_recall.data.side_tables import SideFeatures, parse_table_row
    flags = {"side_features": None, "user_features": None, "item_features": None}
    inputs = _side_inputs(argparse.Namespace(data="synthetic", pipeline_root=root, **flags))
    assert inputs["side_features"] == SideFeatures.of_data(small_data)
    assert inputs["item_features_root"] == f"{root}/data/synthetic-tables/items"
    files = tf.io.gfile.glob(f"{inputs['item_features_root']}/*")
    rows = [parse_table_row(r.numpy(), "item", inputs["side_features"].item)
            for r in tf.data.TFRecordDataset(files, "GZIP")]
    assert [key for key, _ in rows] == list(small_data.item_features.index)
    with pytest.raises(ValueError, match="--side-features: --data synthetic brings its own side tables"):
        _side_inputs(argparse.Namespace(data="synthetic", pipeline_root=root, **{**flags, "side_features": "s"}))
    with pytest.raises(ValueError, match="--user-features 'u' needs --side-features, the columns and kinds"):
        _side_inputs(argparse.Namespace(data=root, pipeline_root=root, **{**flags, "user_features": "u"}))
