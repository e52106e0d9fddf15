"""The gRPC serving path: GrpcClient against `tfrec-recall serve` in a subprocess (TF Serving's
PredictionService / ModelService), bad requests, hot reload, retries, the REST client, the `query` CLI, and
the same checks against a real tensorflow_model_server when one is on PATH."""
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.export import export_retrieval_model
from tfrec_recall.index import BruteForce
from tfrec_recall.serving.client import GrpcClient, RestClient
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

AVAILABLE, END = ModelVersionStatus.AVAILABLE, ModelVersionStatus.END


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, small_split):
    from tfrec_recall import train as training
    model, items, embeddings = tiny_model
    base = tmp_path_factory.mktemp("serving") / "recall"
    export_retrieval_model(model, (items, embeddings), index=BruteForce(max_k=10), export_dir_base=base, k=10)
    features = training.feature_arrays(small_split.test.head(20), small_split.data, model.query_tower.encoder.specs)
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
        assert {"serving_default", "serve_examples", "query_embedding"} <= set(signatures.signature_def)
        assert set(signatures.signature_def["serving_default"].outputs) == {"item_ids", "scores"}


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
    code, _ = _error(lambda: client.predict({"history": np.array([["a"]], dtype=object)}))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert sleeps == [0.05, 0.1, 0.2]
    with pytest.raises(ValueError, match=r"timeout must be > 0 seconds, got 0"):
        GrpcClient("127.0.0.1:1", "m", timeout=0)


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
