"""TF Serving's REST API for ``tfrec-recall serve`` (``serve(..., rest_port=N)``), over the same models as gRPC.

* ``POST /v1/models/NAME[/versions/N | /labels/LABEL]:predict`` with ``{"signature_name": ..., "instances":
  [...]}`` (row format: one object per query, or one value per query when the signature has one input) or
  ``{"inputs": {...}}`` (columnar: one batch per input, or the batch itself for a one-input signature);
  answers ``{"predictions": [...]}`` (rows) or ``{"outputs": {...}}`` (columns). Strings may be given as
  ``{"b64": "..."}`` (e.g. serve_examples' serialized tf.Examples).
* ``GET /v1/models/NAME[/versions/N | /labels/LABEL]``: the versions' status; ``GET .../metadata``: the
  signature definitions.

Requests go through the gRPC services' checks (``server.PredictionService``), so a bad request gets the same
message, with TF Serving's HTTP code for its gRPC status, as ``{"error": "..."}``. Stdlib only (a
``ThreadingHTTPServer`` in a thread).
"""
from __future__ import annotations

import base64
import http.server
import json
import logging
import re
import threading
from typing import Optional

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # as the gRPC server's max_receive_message_length
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.INTERNAL: 500}
ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<suffix>:predict|/metadata)?/?$")


class RequestError(Exception):
    """A request refused with a gRPC status code and a message."""

    def __init__(self, code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Context:
    """The part of a gRPC servicer context the services use: ``abort`` raises a ``RequestError``."""

    def abort(self, code, message):
        raise RequestError(code, message)


def _model_spec(spec, match) -> None:
    spec.name = match["name"]
    if match["version"]:
        spec.version.value = int(match["version"])
    elif match["label"]:
        spec.version_label = match["label"]


def _bytes(value, where: str):
    """JSON strings (or ``{"b64": ...}``) as bytes, nested lists kept."""
    if isinstance(value, list):
        return [_bytes(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and set(value) == {"b64"}:
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as error:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: bad base64: {error}") from None
    if not isinstance(value, str):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {value!r} is not a string")
    return value.encode("utf-8")


def _flatten(value) -> list:
    return [x for v in value for x in _flatten(v)] if isinstance(value, list) else [value]


def _shape(value, where: str) -> list:
    """The shape of nested JSON lists; ragged lists are refused."""
    if not isinstance(value, list):
        return []
    shapes = [_shape(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if any(s != shapes[0] for s in shapes):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: ragged lists (rows of different shapes)")
    return [len(value)] + (shapes[0] if shapes else [])


def to_array(name: str, value, spec) -> np.ndarray:
    """One input's JSON value as an array of the signature's dtype (shape checks are the server's)."""
    where = f"inputs[{name!r}]"
    shape = _shape(value, where)
    if spec.dtype == tf.string:
        array = np.empty(shape, dtype=object)
        array.reshape(-1)[:] = _flatten(_bytes(value, where))
        return array
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"values of type {array.dtype} where the signature expects {spec.dtype.name}")
        if spec.dtype.is_integer and array.dtype.kind == "f" and not np.all(np.floor(array) == array):
            raise ValueError(f"non-integer values where the signature expects {spec.dtype.name}")
        with np.errstate(over="ignore"):  # a float beyond float32 becomes inf, which the server refuses
            return array.astype(spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {error}") from None


def _columns(body: dict, specs) -> dict:
    """``{input: JSON batch}`` from a columnar (``inputs``) or row (``instances``) request body."""
    if ("instances" in body) == ("inputs" in body):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           'the request body needs exactly one of "instances" (rows) or "inputs" (columns)')
    if "inputs" in body:
        inputs = body["inputs"]
        return inputs if isinstance(inputs, dict) else {name: inputs for name in specs if len(specs) == 1}
    rows = body["instances"]
    if not isinstance(rows, list):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, '"instances" must be a list, one entry per query')
    if len(specs) == 1 and not all(isinstance(r, dict) and set(r) == set(specs) for r in rows):
        return {next(iter(specs)): rows}
    names = set(specs)
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != names:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"instances[{index}]: has {got}; the signature takes {sorted(names)}")
    return {name: [row[name] for row in rows] for name in names}


def _json_value(value: np.ndarray):
    return _text(value.tolist()) if value.dtype == object else value.tolist()


def _text(value):
    """bytes as UTF-8 text (or ``{"b64": ...}``), in nested lists."""
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    return value


class RestApi:
    """The REST routes over a ``PredictionService`` and a ``ModelService`` (see ``server``)."""

    def __init__(self, prediction, model_service):
        self.prediction, self.model_service = prediction, model_service

    def predict(self, match, body) -> dict:
        if not isinstance(body, dict):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object")
        request = predict_pb2.PredictRequest()
        _model_spec(request.model_spec, match)
        request.model_spec.signature_name = body.get("signature_name") or "serving_default"
        loaded = self.prediction._resolve(request.model_spec, _Context())
        signature = request.model_spec.signature_name
        specs = loaded.input_specs.get(signature)
        if specs is None:
            self.prediction._signature(request, loaded, _Context())  # raises: unknown signature
        for name, value in _columns(body, specs).items():
            if name in specs:
                request.inputs[name].CopyFrom(tf.make_tensor_proto(to_array(name, value, specs[name])))
            else:  # the server's check names it
                request.inputs[name].dtype = tf.string.as_datatype_enum
        response = self.prediction.Predict(request, _Context())
        outputs = {name: _json_value(tf.make_ndarray(proto)) for name, proto in response.outputs.items()}
        if "inputs" in body:
            return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
        rows = range(len(next(iter(outputs.values()))))
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        return {"predictions": [{name: value[row] for name, value in outputs.items()} for row in rows]}

    def status(self, match) -> dict:
        request = get_model_status_pb2.GetModelStatusRequest()
        _model_spec(request.model_spec, match)
        response = self.model_service.GetModelStatus(request, _Context())
        return {"model_version_status": [
            {"version": str(s.version), "state": get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
             "status": {"error_code": "OK" if not s.status.error_code else "INVALID_ARGUMENT",
                        "error_message": s.status.error_message}} for s in response.model_version_status]}

    def metadata(self, match) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        _model_spec(request.model_spec, match)
        request.metadata_field.append("signature_def")
        response = self.prediction.GetModelMetadata(request, _Context())
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return {"model_spec": {"name": response.model_spec.name, "signature_name": "",
                               "version": str(response.model_spec.version.value)},
                "metadata": {"signature_def": json_format.MessageToDict(signatures,
                                                                        preserving_proto_field_name=True)}}


class _Handler(http.server.BaseHTTPRequestHandler):
    """The routes of ``ROUTE`` over ``api`` (set per server by ``_handler``)."""
    api: RestApi
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        match = ROUTE.match(self.path)
        if match is None or match["suffix"] == ":predict":
            return self._send(404, {"error": f"no such resource: GET {self.path}"})
        self._answer(lambda: self.api.metadata(match) if match["suffix"] else self.api.status(match))

    def do_POST(self):
        match = ROUTE.match(self.path)
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self.close_connection = True
            return self._send(411, {"error": f"Content-Length: {length!r} is not a byte count"})
        length = int(length)
        if match is None or match["suffix"] != ":predict":
            self._discard(length)
            return self._send(404, {"error": f"no such resource: POST {self.path} (use .../NAME:predict)"})
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._send(413, {"error": f"request body of {length} bytes, over {MAX_BODY_BYTES}"})
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as error:
            return self._send(400, {"error": f"the request body is not JSON: {error}"})
        self._answer(lambda: self.api.predict(match, body))

    def _discard(self, length: int) -> None:
        if length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _answer(self, call) -> None:
        try:
            payload = call()
        except RequestError as error:
            return self._send(HTTP_STATUS.get(error.code, 500), {"error": error.message})
        except Exception as error:  # a server bug: logged with its traceback, answered 500
            logger.exception("REST %s %s failed", self.command, self.path)
            return self._send(500, {"error": f"internal error: {type(error).__name__}: {error}"})
        self._send(200, payload)

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        logger.debug("REST %s", format % args)


def _handler(api: RestApi):
    return type("RestHandler", (_Handler,), {"api": api})


def make_rest_server(models, host: str = "127.0.0.1", port: int = 8501, max_batch_size: int = 1024,
                     max_request_values: Optional[int] = None):
    """A started REST server (in a daemon thread) for one ModelRepository or a ``{name: ModelRepository}``
    mapping, with the gRPC server's checks and limits; returns it and the bound port."""
    from tfrec_recall.serving.server import ModelService, PortInUseError, PredictionService, check_port
    check_port("--rest-port", port)
    api = RestApi(PredictionService(models, max_batch_size, max_request_values), ModelService(models))
    try:
        server = http.server.ThreadingHTTPServer((host, port), _handler(api))
    except OSError as error:
        raise PortInUseError(f"--rest-port {port}: cannot bind {host}:{port} (in use by another process?): "
                             f"{error.strerror or error}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="rest-server").start()
    return server, server.server_address[1]


def stop_rest_server(server: Optional[http.server.HTTPServer]) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
