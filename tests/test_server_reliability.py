"""`tfrec-recall serve` under bad input and a changing model folder: non-finite and oversized inputs, shapes
checked before conversion, output filters, serve_examples errors, the unimplemented TF Serving methods, the
version watcher (mid-copy, deleted, missing folder, non-int64 names), port and option checks, the REST API
(with RestClient) and the client's one-line error for an unreachable server. The server runs in-process."""
import json
import logging
import re
import shutil
import socket
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, inference_pb2, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from tests.test_serving import _export, _features
from tfrec_recall.serving.client import GrpcClient, RestClient
from tfrec_recall.serving.rest import RequestError, _Context, make_rest_server, stop_rest_server
from tfrec_recall.serving.server import (ModelRepository, PortInUseError, PredictionService, _check_outputs,
                                         make_server, serve)
from tfrec_recall.serving.versions import version_of


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, small_split):
    base = tmp_path_factory.mktemp("reliability") / "recall"
    _export(tiny_model, base, k=10)
    repository = ModelRepository("recall", base, poll_seconds=60)
    server, port = make_server(repository, port=0, workers=4, max_batch_size=64)
    server.start()
    rest, rest_port = make_rest_server(repository, port=0, max_batch_size=64)
    features = _features(tiny_model[0], small_split)
    yield {"base": base, "port": port, "rest_port": rest_port, "repository": repository, "features": features,
           "numeric": next(k for k, v in features.items() if v.dtype.kind == "f")}
    stop_rest_server(rest)
    server.stop(grace=None)


def _request(features, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "recall"
    request.model_spec.signature_name = signature
    for name, value in features.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def _predict(served, request):
    """The answer of an in-process PredictionService (errors raise RequestError)."""
    service = PredictionService(served["repository"], max_batch_size=64)
    return service.Predict(request, _Context())


def _refused(served, request, code=grpc.StatusCode.INVALID_ARGUMENT, service=None):
    service = service or PredictionService(served["repository"], max_batch_size=64)
    with pytest.raises(RequestError) as info:
        service.Predict(request, _Context())
    assert info.value.code == code, info.value.message
    return info.value.message


def _rpc_error(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_infinite_numeric_inputs_are_refused_and_nan_means_missing(served):
    features, numeric = served["features"], served["numeric"]
    for bad in (np.inf, -np.inf):
        value = features[numeric].copy()
        value[3] = bad
        message = _refused(served, _request({**features, numeric: value}))
        assert message == (f"inputs[{numeric!r}]: non-finite value {bad} at [3]; numeric inputs must be finite "
                           f"(NaN = missing)")
    value = features[numeric].copy()
    value[3] = np.nan  # the training mean, as in serve_examples
    response = _predict(served, _request({**features, numeric: value}))
    assert np.isfinite(tf.make_ndarray(response.outputs["scores"])[3]).all()


def test_huge_finite_inputs_get_an_error_not_nan_scores(served):
    """3e38 in a numeric input: whether the math overflows depends on the weights (standardised, then dense
    layers and a normalisation); either way never an OK answer with non-finite scores. The error path itself is
    pinned by test_output_check_allows_the_padding_filler_only."""
    features, numeric = served["features"], served["numeric"]
    value = features[numeric].copy()
    value[0::2], value[1::2] = 3e38, -3e38  # one sign or the other overflows a unit that reads the input
    with GrpcClient(f"127.0.0.1:{served['port']}", "recall") as client:
        try:
            response = client.prediction.Predict(_request({**features, numeric: value}), timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.search(r"the model gave non-finite values for query \d+; its inputs are outside the range",
                             error.details())
            return
    ids, scores = (tf.make_ndarray(response.outputs[k]) for k in ("item_ids", "scores"))
    assert np.isfinite(scores[ids != b""]).all()


def test_output_check_allows_the_padding_filler_only():
    ids = np.array([[b"a", b""]], dtype=object)
    _check_outputs({"item_ids": ids, "scores": np.array([[0.5, -np.inf]], np.float32)}, _Context())  # padding
    with pytest.raises(RequestError, match=r"outputs\['scores'\]: the model gave non-finite values for query 1"):
        _check_outputs({"item_ids": np.concatenate([ids, ids]),
                        "scores": np.array([[0.5, -np.inf], [np.nan, 0.1]], np.float32)}, _Context())
    with pytest.raises(RequestError, match=r"outputs\['query_embedding'\]: the model gave non-finite values"):
        _check_outputs({"query_embedding": np.array([[np.inf]], np.float32)}, _Context())


def test_declared_sizes_are_checked_before_conversion(served):
    """A few hundred bytes declaring 10^8 strings (one value, repeated by tf.make_ndarray) are refused at once."""
    request = _request(served["features"])
    history = request.inputs["history"]
    width = history.tensor_shape.dim[1].size
    history.ClearField("string_val")
    history.string_val.append(b"x")
    history.tensor_shape.dim[0].size = 10 ** 8 // width
    assert request.ByteSize() < 2000
    with GrpcClient(f"127.0.0.1:{served['port']}", "recall") as client:
        code, details = _rpc_error(lambda: client.prediction.Predict(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"inputs: batch size {10 ** 8 // width} exceeds the server's max batch size 64"
    examples = _request({"examples": np.array([b"x"], dtype=object)}, signature="serve_examples")
    examples.inputs["examples"].tensor_shape.dim[0].size = 10 ** 8
    assert _refused(served, examples) == "inputs: batch size 100000000 exceeds the server's max batch size 64"


def test_request_size_limit_answers_resource_exhausted(served):
    """Within the batch limit: one string declared as [2, 10^7] exclusions; and a configured small limit."""
    request = _request({k: v[:2] for k, v in served["features"].items()}, signature="serve_with_exclusions")
    request.inputs["exclude_item_ids"].CopyFrom(tf.make_tensor_proto(np.array([[b"x"]], dtype=object)))
    request.inputs["exclude_item_ids"].tensor_shape.dim[0].size = 2
    request.inputs["exclude_item_ids"].tensor_shape.dim[1].size = 10 ** 7
    with GrpcClient(f"127.0.0.1:{served['port']}", "recall") as client:
        code, details = _rpc_error(lambda: client.prediction.Predict(request, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"inputs: the request declares 2000\d{4} values \(inputs\['exclude_item_ids'\] shape "
                        r"\[2, 10000000\]\), over this server's limit of \d+", details), details
    small = PredictionService(served["repository"], max_batch_size=64, max_request_values=100)
    message = _refused(served, _request(served["features"]), grpc.StatusCode.RESOURCE_EXHAUSTED, service=small)
    assert message.startswith("inputs: the request declares ") and message.endswith("over this server's limit of 100")


def test_malformed_shapes_get_clear_errors(served):
    features = served["features"]
    request = _request(features)
    request.inputs["history"].tensor_shape.dim[0].size = -1
    message = _refused(served, request)
    assert message.startswith("inputs['history']: shape [-1, ") and "has a negative dimension" in message
    request = _request(features)
    request.inputs["history"].tensor_shape.unknown_rank = True
    assert _refused(served, request).startswith("inputs['history']: unknown rank")
    request = _request(features)
    del request.inputs["history"].string_val[-5:]
    dims = [d.size for d in request.inputs["history"].tensor_shape.dim]
    assert _refused(served, request) == (f"inputs['history']: shape {dims} declares {dims[0] * dims[1]} values "
                                         f"but the tensor holds {dims[0] * dims[1] - 5}")


def test_unknown_output_filter_names_the_outputs(served):
    request = _request(served["features"])
    request.output_filter.append("score")
    assert _refused(served, request) == ("output_filter: unknown output 'score'; signature 'serving_default' "
                                         "gives ['item_ids', 'scores']")
    request.output_filter[:] = ["scores"]
    assert set(_predict(served, request).outputs) == {"scores"}


def test_serve_examples_errors_name_the_example_and_feature(served):
    numeric = served["numeric"]
    good = tf.train.Example()  # every feature missing: "" or the training mean
    bad = tf.train.Example()
    bad.features.feature[numeric].bytes_list.value.append(b"old")  # a string where a float is parsed
    examples = np.array([good.SerializeToString(), bad.SerializeToString()], dtype=object)
    message = _refused(served, _request({"examples": examples}, signature="serve_examples"))
    assert message.startswith("inputs['examples'][1]: ") and f"Key: {numeric}" in message, message
    examples = np.array([good.SerializeToString(), b"\xff not a proto"], dtype=object)
    assert _refused(served, _request({"examples": examples}, signature="serve_examples")).startswith(
        "inputs['examples'][1]: ")


def test_classify_regress_multi_inference_are_unimplemented_without_traceback(served, caplog):
    channel = grpc.insecure_channel(f"127.0.0.1:{served['port']}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    requests = {"Classify": classification_pb2.ClassificationRequest(),
                "Regress": regression_pb2.RegressionRequest(),
                "MultiInference": inference_pb2.MultiInferenceRequest()}
    with caplog.at_level(logging.INFO):
        for method, request in requests.items():
            code, details = _rpc_error(lambda: getattr(stub, method)(request, timeout=30))
            assert code == grpc.StatusCode.UNIMPLEMENTED
            assert details.startswith(f"{method} is not implemented by this server") and "use Predict" in details
    channel.close()
    records = [r for r in caplog.records if "UNIMPLEMENTED" in r.getMessage() or r.exc_info]
    assert len(records) == 3 and not any(r.exc_info for r in records)


# ----------------------------------------------------------------------------------------------------------
# The version watcher, driven by refresh() (what each poll calls).

@pytest.fixture(scope="module")
def export_dir(served):
    return served["base"] / "1"


def _status(repository):
    return {v: state for v, (state, _) in repository.status().items()}


def test_a_version_caught_mid_copy_is_retried_when_complete(export_dir, tmp_path, caplog):
    base = tmp_path / "recall"
    shutil.copytree(export_dir, base / "1")
    repository = ModelRepository("recall", base, poll_seconds=60)
    (base / "2").mkdir()
    shutil.copy(export_dir / "saved_model.pb", base / "2")  # the copy has just started
    with caplog.at_level(logging.INFO, logger="tfrec_recall.serving.server"):
        repository.refresh()
        assert _status(repository)[2] == "END" and repository.loaded_versions() == [1]
        repository.refresh()  # unchanged: not retried
        assert repository.status()[2][1] and repository.loaded_versions() == [1]
        (base / "2" / "variables").mkdir()  # the copy goes on: retried, failing again
        shutil.copy(export_dir / "variables" / "variables.index", base / "2" / "variables")
        repository.refresh()
        shutil.copytree(export_dir, base / "2", dirs_exist_ok=True)  # the copy completes
        repository.refresh()
    assert repository.loaded_versions() == [2] and _status(repository) == {1: "END", 2: "AVAILABLE"}
    # One warning for the incomplete version, then INFO while it changes: a copy does not flood the log.
    levels = [r.levelname for r in caplog.records if "version 2 is not loadable" in r.getMessage()]
    assert levels == ["WARNING", "INFO"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_deleted_version_is_unloaded_and_a_missing_folder_keeps_serving(export_dir, tmp_path, caplog):
    base = tmp_path / "recall"
    for version in ("1", "2"):
        shutil.copytree(export_dir, base / version)
    repository = ModelRepository("recall", base, poll_seconds=60)
    assert repository.loaded_versions() == [2]
    shutil.rmtree(base / "2")
    repository.refresh()
    assert repository.loaded_versions() == [1] and _status(repository) == {1: "AVAILABLE", 2: "END"}
    base.rename(tmp_path / "away")
    with caplog.at_level(logging.WARNING):
        repository.refresh()
        repository.refresh()
    assert repository.loaded_versions() == [1] and repository.get().version == 1
    assert [r.getMessage() for r in caplog.records if "is missing" in r.getMessage()] == [
        f"model recall: base path {base} is missing; still serving versions [1]"]
    (tmp_path / "away").rename(base)
    shutil.rmtree(base / "1")
    repository.refresh()
    assert repository.loaded_versions() == []
    with pytest.raises(LookupError, match=r"model 'recall' has no version loaded \(none loadable under "):
        repository.get()


def test_the_watcher_survives_a_failing_poll(export_dir, tmp_path, caplog):
    base = tmp_path / "recall"
    shutil.copytree(export_dir, base / "1")
    repository = ModelRepository("recall", base, poll_seconds=0.01)
    calls, polled_again = [], threading.Event()

    def refresh():
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("the folder vanished mid-listing")
        polled_again.set()
    repository.refresh = refresh
    with caplog.at_level(logging.ERROR):
        thread = repository.watch()
        assert polled_again.wait(timeout=60)
    repository.stop()
    thread.join(timeout=60)
    assert any("polling" in r.getMessage() and "the folder vanished mid-listing" in r.getMessage()
               for r in caplog.records)


def test_version_names_that_are_not_int64_are_skipped_with_a_warning(export_dir, tmp_path, caplog):
    base = tmp_path / "recall"
    shutil.copytree(export_dir, base / "1")
    shutil.copytree(export_dir, base / "99999999999999999999")
    with caplog.at_level(logging.WARNING):
        repository = ModelRepository("recall", base, poll_seconds=60)
        repository.refresh()
    assert repository.loaded_versions() == [1]
    warnings = [r.getMessage() for r in caplog.records if "not a valid int64" in r.getMessage()]
    assert warnings == [f"model recall: skipping version directory {base / '99999999999999999999'}: not a valid "
                        f"int64 version"]
    assert version_of("9223372036854775807") == 2 ** 63 - 1 and version_of("9223372036854775808") is None
    assert version_of("\u0663") is None and version_of("12/") == 12  # a non-ASCII digit is no version


# ----------------------------------------------------------------------------------------------------------
# Ports and options.

def test_a_port_in_use_is_refused(served):
    with pytest.raises(PortInUseError, match=rf"--port {served['port']}: cannot bind 127\.0\.0\.1:"):
        make_server(served["repository"], port=served["port"])
    with pytest.raises(PortInUseError, match=rf"--rest-port {served['rest_port']}: cannot bind"):
        make_rest_server(served["repository"], port=served["rest_port"])


@pytest.mark.parametrize("option, message", [
    ({"port": 70000}, r"--port must be in 1\.\.65535 \(or 0: pick a free port\), got 70000"),
    ({"port": -1}, r"--port must be in 1\.\.65535 \(or 0: pick a free port\), got -1"),
    ({"rest_port": 65536}, r"--rest-port must be in 1\.\.65535 \(or 0: pick a free port\), got 65536"),
    ({"poll_seconds": 0}, r"--poll-seconds must be > 0, got 0"),
    ({"poll_seconds": -1.5}, r"--poll-seconds must be > 0, got -1\.5"),
    ({"max_batch_size": 0}, r"--max-batch-size must be an integer >= 1, got 0"),
    ({"workers": 0}, r"--workers must be an integer >= 1, got 0"),
])
def test_serve_refuses_bad_options_before_loading(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        serve(tmp_path / "nothing", "recall", **option)


def test_the_cli_reports_a_bad_port_in_one_line(tmp_path, capsys):
    from tfrec_recall import cli
    assert cli.main(["serve", "--model-dir", str(tmp_path), "--model-name", "m", "--port", "70000"]) == 2
    assert capsys.readouterr().err == ("tfrec-recall serve: error: --port must be in 1..65535 (or 0: pick a free "
                                       "port), got 70000\n")


# ----------------------------------------------------------------------------------------------------------
# REST.

def _http(served, path, body=None):
    url = f"http://127.0.0.1:{served['rest_port']}{path}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_client_gets_the_grpc_answers(served):
    features = {k: v[:5] for k, v in served["features"].items()}
    with GrpcClient(f"127.0.0.1:{served['port']}", "recall") as client:
        expected = client.query(features)
    results = RestClient(f"http://127.0.0.1:{served['rest_port']}", "recall", version=1).query(features)
    assert [[i for i, _ in row] for row in results] == [[i for i, _ in row] for row in expected]
    np.testing.assert_allclose([[s for _, s in row] for row in results],
                               [[s for _, s in row] for row in expected], rtol=1e-5)


def test_rest_row_format_status_and_metadata(served):
    features = {k: v[:3] for k, v in served["features"].items()}
    instances = [{k: np.asarray(v[i]).astype(str if v.dtype == object else v.dtype).tolist()
                  for k, v in features.items()} for i in range(3)]
    code, body = _http(served, "/v1/models/recall:predict", {"instances": instances})
    assert code == 200 and len(body["predictions"]) == 3
    assert set(body["predictions"][0]) == {"item_ids", "scores"} and len(body["predictions"][0]["item_ids"]) == 10
    assert _http(served, "/v1/models/recall/versions/1") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    code, body = _http(served, "/v1/models/recall/metadata")
    assert code == 200 and body["model_spec"] == {"name": "recall", "signature_name": "", "version": "1"}
    assert {"serving_default", "serve_examples"} <= set(body["metadata"]["signature_def"]["signature_def"])


def test_rest_errors_carry_the_grpc_messages(served):
    features = {k: v[:2] for k, v in served["features"].items()}
    columns = {k: v.astype(str).tolist() if v.dtype == object else v.tolist() for k, v in features.items()}
    code, body = _http(served, "/v1/models/recall:predict", {"inputs": {**columns, "shoe": [1, 2]}})
    assert code == 400 and body["error"].startswith("inputs: unknown input 'shoe'")
    code, body = _http(served, "/v1/models/nope:predict", {"inputs": columns})
    assert code == 404 and "unknown model 'nope'" in body["error"]
    code, body = _http(served, "/v1/models/recall:predict", {"instances": [], "inputs": columns})
    assert code == 400 and 'exactly one of "instances" (rows) or "inputs" (columns)' in body["error"]
    code, body = _http(served, "/v1/models/recall:predict", {"inputs": {**columns, "history": [["a", "b"], ["c"]]}})
    assert code == 400 and body["error"] == "inputs['history']: ragged lists (rows of different shapes)"
    numeric = served["numeric"]
    code, body = _http(served, "/v1/models/recall:predict", {"inputs": {**columns, numeric: [1e39, 1.0]}})
    assert code == 400 and body["error"].startswith(f"inputs[{numeric!r}]: non-finite value inf at [0]")


# ----------------------------------------------------------------------------------------------------------
# Client.

def test_the_query_cli_reports_an_unreachable_server_in_one_line(capsys, monkeypatch):
    from tfrec_recall import cli
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here after the socket closes
    monkeypatch.setattr("tfrec_recall.serving.client.time.sleep", lambda seconds: None)
    assert cli.main(["query", "--server", f"127.0.0.1:{port}", "--model", "recall",
                     "--features", '{"history": [["a"]]}']) == 2
    assert capsys.readouterr().err == (f"tfrec-recall query: error: cannot reach the model server at 127.0.0.1:"
                                       f"{port} (UNAVAILABLE after 3 retries): is `tfrec-recall serve` running "
                                       f"there?\n")


def test_the_query_cli_reports_a_server_error_in_one_line(served, capsys):
    from tfrec_recall import cli
    server = f"127.0.0.1:{served['port']}"
    assert cli.main(["query", "--server", server, "--model", "nope", "--features", '{"history": [["a"]]}']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tfrec-recall query: error: the server at {server} answered NOT_FOUND: ")
    assert "'nope'" in err and len(err.strip().splitlines()) == 1


def test_rest_client_reports_an_unreachable_server_in_one_line(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = []
    monkeypatch.setattr("tfrec_recall.serving.client.time.sleep", sleeps.append)
    client = RestClient(f"http://127.0.0.1:{port}", "recall", retries=2, backoff=0.05)
    with pytest.raises(ConnectionError, match=rf"^cannot reach the model server at http://127\.0\.0\.1:{port}/v1/"
                                              r"models/recall:predict \(.* after 2 retries\): is its REST endpoint"):
        client.query({"history": [["a"]]})
    assert sleeps == [0.05, 0.1]
