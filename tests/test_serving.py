"""The gRPC serving path: GrpcClient against `tfrec-recall serve` in a subprocess (TF Serving's
PredictionService / ModelService), bad requests, hot reload, retries, the REST client, the `query` CLI,
serving/models.config's version labels (and the Pusher naming versions as models.config expects), and the
same checks against a real tensorflow_model_server when one is on PATH."""
import contextlib
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.export import export_retrieval_model
from tfrec_recall.retrievers import BruteForce
from tfrec_recall.serving.client import GrpcClient, RestClient
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

AVAILABLE, END = ModelVersionStatus.AVAILABLE, ModelVersionStatus.END
MODELS_CONFIG = Path(__file__).resolve().parents[1] / "serving" / "models.config"


def _features(model, split):
    """Inputs of the export's serving signature for 20 test queries."""
    from tfrec_recall import training
    return training.feature_arrays(split.test.head(20), split.data, model.query_tower.encoder.specs)


def _export(tiny_model, base, k):
    model, items, embeddings = tiny_model
    return export_retrieval_model(model, (items, embeddings), index=BruteForce(max_k=k), export_dir_base=base, k=k)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, small_split):
    model, items, embeddings = tiny_model
    base = tmp_path_factory.mktemp("serving") / "recall"
    _export(tiny_model, base, k=10)
    features = _features(model, small_split)
    expected = tf.saved_model.load(str(base / "1")).signatures["serving_default"](
        **{k: tf.constant(v) for k, v in features.items()})
    process = subprocess.Popen(
        [sys.executable, "-m", "tfrec_recall.cli", "serve", "--model-dir", str(base), "--model-name", "recall",
         "--port", "0", "--poll-seconds", "0.5", "--max-batch-size", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _wait_for_port(process)
    yield {"base": base, "port": port, "model": model, "items": items, "embeddings": embeddings,
           "features": features, "expected": expected, "process": process}
    process.terminate()
    process.wait(timeout=30)


@contextlib.contextmanager
def serving_exports(root, names):
    """One `tfrec-recall serve` process answering the exports under ``root / name`` as models ``name`` (a
    model config file written to ``root``); yields the port, stops the server on exit."""
    config = root / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{name}" model_platform: "tensorflow" }}\n' for name in names) + "}\n")
    process = subprocess.Popen([sys.executable, "-m", "tfrec_recall.cli", "serve", "--model-config-file",
                                str(config), "--port", "0", "--poll-seconds", "5"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield _wait_for_port(process)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_for_port(process, timeout=180):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(lines))
            continue
        lines.append(line)
        match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # drain output
            return int(match.group(1))
    raise TimeoutError("server did not start:\n" + "".join(lines))


def _client(served, **kwargs):
    return GrpcClient(f"127.0.0.1:{served['port']}", "recall", **kwargs)


def test_predict_matches_the_export_and_batches(served):
    with _client(served, max_batch_size=7) as client:  # 20 queries -> 3 requests
        out = client.predict(served["features"])
        np.testing.assert_array_equal(out["item_ids"], served["expected"]["item_ids"].numpy())
        np.testing.assert_allclose(out["scores"], served["expected"]["scores"].numpy(), rtol=1e-5, atol=1e-6)
        results = client.query(served["features"])
        assert len(results) == 20 and len(results[0]) == 10
        assert results[0][0][0] == served["expected"]["item_ids"].numpy()[0, 0].decode()


def test_status_and_metadata(served):
    with _client(served) as client:
        status = client.status().model_version_status
        assert [(s.version, s.state) for s in status] == [(1, AVAILABLE)]
        from tensorflow_serving.apis import get_model_metadata_pb2
        signatures = get_model_metadata_pb2.SignatureDefMap()
        client.metadata().metadata["signature_def"].Unpack(signatures)
        assert {"serving_default", "serve_with_exclusions", "serve_examples", "query_embedding"} <= \
            set(signatures.signature_def)
        assert set(signatures.signature_def["serve_with_exclusions"].inputs) == \
            set(signatures.signature_def["serving_default"].inputs) | {"exclude_item_ids"}
        assert set(signatures.signature_def["serving_default"].outputs) == {"item_ids", "scores"}


def _exclusions(served):
    """Per query: its 15 best items when unfiltered (longer than k = 10 and the history width), an unknown id;
    the first query excludes nothing."""
    tensors = {k: tf.constant(v) for k, v in served["features"].items()}
    queries = served["model"].query_tower(tensors).numpy()
    best = np.asarray(served["items"]).astype(str)[np.argsort(-(queries @ served["embeddings"].T), axis=1)]
    return [[]] + [list(best[q, :15]) + ["not-an-item"] for q in range(1, len(queries))]


def test_exclusions_round_trip_through_server_and_client(served):
    exclude = _exclusions(served)
    loaded = tf.saved_model.load(str(served["base"] / "1"))
    from tfrec_recall.serving.client import exclusion_array
    padded = exclusion_array(exclude, len(exclude))
    assert padded.shape == (20, 16) and padded[0].tolist() == [""] * 16
    expected = loaded.signatures["serve_with_exclusions"](
        **{k: tf.constant(v) for k, v in served["features"].items()}, exclude_item_ids=tf.constant(padded))
    with _client(served, max_batch_size=7) as client:
        out = client.predict(served["features"], exclude=exclude)
        np.testing.assert_array_equal(out["item_ids"], expected["item_ids"].numpy())
        results = client.query(served["features"], exclude=exclude)
        for row, excluded in zip(results, exclude):
            assert len(row) == 10 and not {item for item, _ in row} & set(excluded)
        assert results[0] == client.query(served["features"])[0]  # no exclusions: the old signature's answer
        with pytest.raises(ValueError, match=r"exclude has 2 rows but the features have 20 queries"):
            client.predict(served["features"], exclude=[["a"], ["b"]])
        with pytest.raises(ValueError, match=r"exclude\[1\] holds 7 \(int\); item ids are strings"):
            client.predict(served["features"], exclude=[[]] + [[7]] * 19)


def test_bad_exclusions_get_errors_naming_the_input(served):
    features = served["features"]
    with _client(served, signature_name="serve_with_exclusions") as client:
        code, details = _error(lambda: client.predict({**features, "exclude_item_ids": np.ones((20, 3))}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs['exclude_item_ids']: dtype float32 but the signature expects string" in details
        code, details = _error(lambda: client.predict({**features, "exclude_item_ids": np.array(["a"] * 20)}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs['exclude_item_ids']: shape [20] but the signature expects [None, None]" in details
        code, details = _error(lambda: client.predict(features))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing input 'exclude_item_ids'" in details
        assert len(client.query(features, exclude=[["x"]] * 20)) == 20  # still serving


def _error(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served):
    features = served["features"]
    with _client(served) as client:
        code, details = _error(lambda: client.predict({**features, "shoe_size": np.ones(20)}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown input 'shoe_size'" in details
        code, details = _error(lambda: client.predict({k: v for k, v in features.items() if k != "history"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing input 'history'" in details
        numeric = next(k for k, v in features.items() if v.dtype.kind == "f")
        code, details = _error(lambda: client.predict({**features, numeric: np.array(["x"] * 20, dtype=object)}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"inputs['{numeric}']: dtype string" in details
        code, details = _error(lambda: client.predict({**features, "history": features["history"][:, 0]}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "inputs['history']: shape [20]" in details
        empty = {k: v[:0] for k, v in features.items()}
        client_big = _client(served, max_batch_size=1000)
        code, details = _error(lambda: client_big.predict({k: np.concatenate([v] * 4) for k, v in features.items()}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch size 80 exceeds the server's max batch size 64" in details
        from tensorflow_serving.apis import predict_pb2
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "recall"
        for name, value in empty.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, shape=value.shape))
        code, details = _error(lambda: client.prediction.Predict(request, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty batch" in details
    code, details = _error(lambda: GrpcClient(f"127.0.0.1:{served['port']}", "nope").predict(features))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in details
    code, details = _error(lambda: _client(served, version=99).predict(features))
    assert code == grpc.StatusCode.NOT_FOUND and "version 99 is not available" in details
    with _client(served) as client:  # still serving
        assert len(client.query(features)) == 20


def test_new_versions_are_picked_up_and_broken_ones_do_not_take_over(served):
    base = served["base"]
    broken = base / "2"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a saved model")
    with _client(served) as client:
        _until(lambda: any(s.version == 2 and s.state == END for s in client.status().model_version_status))
        status = {s.version: s for s in client.status().model_version_status}
        assert status[1].state == AVAILABLE and status[2].status.error_message  # version 2 ended with its error
        assert client.predict(served["features"])["item_ids"].shape == (20, 10)
        export_retrieval_model(served["model"], (served["items"], served["embeddings"]),
                               index=BruteForce(max_k=5), export_dir_base=base, k=5)  # version 3, k=5
        _until(lambda: client.predict(served["features"])["item_ids"].shape == (20, 5))
        status = {s.version: s.state for s in client.status().model_version_status}
        assert status[3] == AVAILABLE and status[1] == END


def _until(condition, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError("condition not reached within the timeout")


def test_query_cli(served, capsys):
    from tfrec_recall import cli
    history = [list(h) for h in served["features"]["history"][:2].astype(str)]
    short = [[i for i in h if i][:3] for h in history]  # short lists, padded by the CLI
    code = cli.main(["query", "--server", f"127.0.0.1:{served['port']}", "--model", "recall",
                     "--features", json.dumps({"history": short})])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("query 0: ") and "query 1: " in out
    assert cli.main(["query", "--server", f"127.0.0.1:{served['port']}", "--model", "recall",
                     "--features", '{"shoe": [1]}']) == 2
    assert "unknown input 'shoe'" in capsys.readouterr().err


def test_client_retries_unavailable_with_backoff(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here after the socket closes
    sleeps = []
    monkeypatch.setattr("tfrec_recall.serving.client.time.sleep", sleeps.append)
    client = GrpcClient(f"127.0.0.1:{port}", "recall", retries=3, backoff=0.05, timeout=2)
    with pytest.raises(ConnectionError, match=rf"^cannot reach the model server at 127\.0\.0\.1:{port} \(UNAVAILABLE "
                                              r"after 3 retries\): is `tfrec-recall serve` running there\?$"):
        client.predict({"history": np.array([["a"]], dtype=object)})
    assert sleeps == [0.05, 0.1, 0.2]
    with pytest.raises(ValueError, match=r"timeout must be > 0 seconds, got 0"):
        GrpcClient("127.0.0.1:1", "m", timeout=0)


def test_client_sends_numeric_inputs_as_the_signature_takes_them(monkeypatch):
    """float32 features and int64 ones (SDM's history timestamps) from any numeric array; the dtypes are read
    from the signature (stubbed here: no server)."""
    client = GrpcClient("127.0.0.1:1", "m")
    monkeypatch.setattr(client, "input_dtypes", lambda signature: {"age": np.dtype(np.float32),
                                                                    "history_times": np.dtype(np.int64)})
    arrays = {"age": np.array([25, 31]), "history_times": np.array([[1.7e9, 1.6e9], [5.0, 0.0]]),
              "other": np.array([1.5, 2.5]), "history": np.array([["a"], ["b"]], dtype=object)}
    out = client._numeric_dtypes(arrays, "serving_default")
    assert out["age"].dtype == np.float32 and out["history_times"].dtype == np.int64
    assert out["other"].dtype == np.float32 and out["history"].dtype == object  # unlisted numeric: float32
    assert out["history_times"][0, 0] == 1_700_000_000  # no float32 rounding (which would give 1_700_000_000 +- 64)
    with pytest.raises(ValueError, match=r"features\['history_times'\]: the signature takes int64, got non-integer"):
        client._numeric_dtypes({"history_times": np.array([[1.5]])}, "serving_default")
    client.close()


def test_rest_client_against_a_local_stub():
    seen, failures = [], [1]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if failures[0]:
                failures[0] -= 1
                self.send_response(503)
                self.end_headers()
                return
            n = len(body["inputs"]["history"])
            payload = {"outputs": {"item_ids": [["i1", "i2", ""]] * n, "scores": [[0.9, 0.5, float("-inf")]] * n}}
            data = json.dumps(payload).replace("-Infinity", "-1e30").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RestClient(f"http://127.0.0.1:{server.server_address[1]}", "recall", version=3, backoff=0.01)
        results = client.query({"history": [["a", "b"], ["c", ""]]})
    finally:
        server.shutdown()
    assert results == [[("i1", 0.9), ("i2", 0.5)]] * 2  # padding ids dropped
    assert seen[-1][0] == "/v1/models/recall/versions/3:predict" and len(seen) == 2  # one 503 retried
    assert seen[-1][1] == {"signature_name": "serving_default", "inputs": {"history": [["a", "b"], ["c", ""]]}}


@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None,
                    reason="tensorflow_model_server is not on PATH (it cannot be installed on these machines)")
def test_real_tensorflow_model_server(served):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(["tensorflow_model_server", f"--port={port}", "--model_name=recall",
                                f"--model_base_path={served['base']}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        with GrpcClient(f"127.0.0.1:{port}", "recall", retries=30, backoff=0.5) as client:
            _until(lambda: client.status().model_version_status[0].state == AVAILABLE)
            out = client.predict(served["features"])
            assert out["item_ids"].shape[0] == 20
    finally:
        process.terminate()
        process.wait(timeout=30)


# --------------------------------------------------------------------------------------------------------
# serving/models.config: specific versions and version labels, served by `tfrec-recall serve
# --model-config-file`; the Pusher names versions the way the file refers to them.

def _repo_models_config(base_path: str):
    """serving/models.config as parsed by TF Serving, with the one model's base_path replaced."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
    config = text_format.Parse(MODELS_CONFIG.read_text(), model_server_config_pb2.ModelServerConfig())
    assert len(config.model_config_list.config) == 1, "the test expects models.config to configure one model"
    config.model_config_list.config[0].base_path = base_path
    return config


def _write_config(config, path: Path) -> Path:
    from google.protobuf import text_format
    path.write_text(text_format.MessageToString(config))
    return path


# The exports' k per version: version 1 answers 10 items per query, version 2 answers 5.
K_BY_VERSION = {1: 10, 2: 5}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_model, small_split):
    root = tmp_path_factory.mktemp("labelled")
    for version, k in sorted(K_BY_VERSION.items()):
        assert Path(_export(tiny_model, root / "recall", k=k)).name == str(version)
    config = _repo_models_config("recall")  # relative: resolved against the config file's directory
    config_file = _write_config(config, root / "models.config")
    process = subprocess.Popen(
        [sys.executable, "-m", "tfrec_recall.cli", "serve", "--model-config-file", str(config_file),
         "--port", "0", "--poll-seconds", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _wait_for_port(process)
    yield {"root": root, "port": port, "config": config, "config_file": config_file,
           "features": _features(tiny_model[0], small_split)}
    process.terminate()
    process.wait(timeout=30)


def _predict_request(features, **spec):
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "recall"
    for field, value in spec.items():
        if field == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, field, value)
    for name, value in features.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_models_config_answers_each_version_label(labelled):
    labels = dict(labelled["config"].model_config_list.config[0].version_labels)
    assert labels == {"stable": 1, "canary": 2}  # what serving/models.config says today
    with GrpcClient(f"127.0.0.1:{labelled['port']}", "recall") as client:
        for label, version in sorted(labels.items()):
            response = client.prediction.Predict(_predict_request(labelled["features"], version_label=label),
                                                 timeout=10)
            assert response.model_spec.version.value == version, label
            assert tf.make_ndarray(response.outputs["item_ids"]).shape == (20, K_BY_VERSION[version]), label
        by_number = client.prediction.Predict(_predict_request(labelled["features"], version=1), timeout=10)
        newest = client.prediction.Predict(_predict_request(labelled["features"]), timeout=10)
        assert by_number.model_spec.version.value == 1 and newest.model_spec.version.value == 2
        assert [(s.version, s.state) for s in client.status().model_version_status] == [(1, AVAILABLE),
                                                                                          (2, AVAILABLE)]
    with GrpcClient(f"127.0.0.1:{labelled['port']}", "recall", version_label="canary") as client:
        assert len(client.query(labelled["features"])[0]) == K_BY_VERSION[2]
        assert [s.version for s in client.status().model_version_status] == [2]


def test_unknown_version_label_names_the_known_ones(labelled):
    with GrpcClient(f"127.0.0.1:{labelled['port']}", "recall", version_label="prod") as client:
        with pytest.raises(grpc.RpcError, match=r"model_spec\.version_label: unknown version label 'prod' for "
                                                r"model 'recall'; known labels: \['canary', 'stable'\]") as info:
            client.predict(labelled["features"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with GrpcClient(f"127.0.0.1:{labelled['port']}", "recall", version=3) as client:
        code, details = _error(lambda: client.predict(labelled["features"]))
        assert code == grpc.StatusCode.NOT_FOUND and "version 3 is not available (serving versions 1, 2)" in details
    with GrpcClient(f"127.0.0.1:{labelled['port']}", "recall") as client:  # still serving
        assert len(client.query(labelled["features"])) == 20


def test_label_naming_a_version_not_loaded_stops_the_server_at_start(labelled, capsys):
    from tfrec_recall import cli
    config = _repo_models_config(str(labelled["root"] / "recall"))
    model = config.model_config_list.config[0]
    model.model_version_policy.specific.versions.append(3)
    model.version_labels["canary"] = 3  # no version 3 on disk
    path = _write_config(config, labelled["root"] / "bad.config")
    assert cli.main(["serve", "--model-config-file", str(path), "--port", "0"]) == 2
    assert re.search(r"version_labels\['canary'\]: model 'recall' version 3 is not loaded \(no such version "
                     r"directory.*loaded versions: \[1, 2\]", capsys.readouterr().err)
    model.model_version_policy.ClearField("specific")
    model.model_version_policy.latest.num_versions = 1  # loads version 2 only
    model.version_labels["canary"] = 2
    _write_config(config, path)
    assert cli.main(["serve", "--model-config-file", str(path), "--port", "0"]) == 2
    assert "version_labels['stable']: model 'recall' version 1 is not loaded (model_version_policy latest 1 " \
           "does not load it" in capsys.readouterr().err


def test_serve_arguments_and_config_errors(tmp_path, capsys):
    from tfrec_recall import cli
    from tfrec_recall.serving.model_config import parse_model_config
    assert cli.main(["serve", "--model-config-file", str(MODELS_CONFIG), "--model-name", "recall"]) == 2
    assert "--model-config-file names the models; drop --model-name" in capsys.readouterr().err
    assert cli.main(["serve", "--model-dir", str(tmp_path)]) == 2
    assert "serve needs --model-dir and --model-name, or --model-config-file" in capsys.readouterr().err
    assert cli.main(["serve", "--model-config-file", str(tmp_path / "nope.config")]) == 2
    assert "--model-config-file" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"version_labels\['canary'\]: version 3 is not one of "
                                         r"model_version_policy\.specific\.versions \[1, 2\]"):
        parse_model_config(MODELS_CONFIG.read_text().replace("value: 2", "value: 3"), tmp_path)
    with pytest.raises(ValueError, match=r"model_platform: 'onnx' is not served here"):
        parse_model_config('model_config_list { config { name: "m" base_path: "b" model_platform: "onnx" } }',
                           tmp_path)
    (model,) = parse_model_config('model_config_list { config { name: "m" base_path: "b" } }', tmp_path)
    assert model.base_path == str(tmp_path / "b") and model.policy.describe() == "latest 1"


def test_version_naming_yields_the_versions_models_config_refers_to():
    from tfrec_recall.serving.versions import next_version
    model = _repo_models_config("/unused").model_config_list.config[0]
    names = []
    for _ in model.model_version_policy.specific.versions:  # one push per configured version
        names.append(str(next_version(names)))
    assert [int(n) for n in names] == sorted(model.model_version_policy.specific.versions) == [1, 2]
    assert set(model.version_labels.values()) <= {int(n) for n in names}
    assert next_version(["2/", "10", ".tmp-11-123", "assets"]) == 11  # fileio names may end in "/"
    assert next_version(["1700000000"]) == 1700000001  # after TFX's unix-time versions


def test_pusher_writes_sequential_versions_once_each(labelled, tmp_path):
    from tfx.proto import pusher_pb2
    from tfx.types import standard_artifacts, standard_component_specs as specs
    from tfx.utils import proto_utils
    from pipelines.pusher import Executor
    serving = tmp_path / "serving"
    destination = proto_utils.proto_to_json(pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=str(serving))))

    def push(export: Path, run: int) -> str:
        model = standard_artifacts.Model()
        model.uri = str(tmp_path / f"model-{run}")
        shutil.copytree(export, Path(model.uri) / "Format-Serving")
        blessing = standard_artifacts.ModelBlessing()
        blessing.set_int_custom_property("blessed", 1)
        pushed = standard_artifacts.PushedModel()
        pushed.uri = str(tmp_path / f"pushed-{run}")
        Executor().Do({specs.MODEL_KEY: [model], specs.MODEL_BLESSING_KEY: [blessing]},
                      {specs.PUSHED_MODEL_KEY: [pushed]}, {specs.PUSH_DESTINATION_KEY: destination})
        assert pushed.get_int_custom_property("pushed") == 1
        return pushed.get_string_custom_property("pushed_version")

    exports = labelled["root"] / "recall"
    assert [push(exports / "1", 0), push(exports / "2", 1), push(exports / "2", 2)] == ["1", "2", "2"]
    assert sorted(p.name for p in serving.iterdir()) == ["1", "2"]  # the re-blessed model was not copied again
    for version in ("1", "2"):
        assert (serving / version / "assets" / "manifest.json").read_bytes() == \
            (exports / version / "assets" / "manifest.json").read_bytes()
    model = _repo_models_config("/unused").model_config_list.config[0]
    assert sorted(model.model_version_policy.specific.versions) == [1, 2]
