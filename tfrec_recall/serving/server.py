"""``tfrec-recall serve``: a local gRPC server speaking TF Serving's API over a versioned export directory.

It implements ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
``tensorflow.serving.ModelService`` (``GetModelStatus``) for one model directory laid out as TF Serving reads
it (``BASE/<version>/saved_model.pb``). It is the local and test server; production serves the same
directory from ``tensorflow_model_server`` (see serving/README.md for which index needs which server).

* It loads the newest version, polls for newer ones and switches when one loads; a version that fails to
  load is reported by GetModelStatus (state END, the error) while the previous one keeps serving.
* It binds to 127.0.0.1 unless told otherwise.
* Bad requests (unknown model or version, unknown / missing input, wrong dtype or rank, empty or oversized
  batch) get INVALID_ARGUMENT or NOT_FOUND with a message naming the field; the server keeps serving.
* ScaNN exports need the ScaNN ops: the server imports scann when it is installed.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path
from typing import Dict, Optional

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc, predict_pb2)
from tensorflow_serving.apis import status_pb2

logger = logging.getLogger(__name__)

try:  # registers the ScaNN ops so ScaNN exports load
    import scann  # noqa: F401  (import registers the ops)
    HAVE_SCANN = True
except ImportError:  # the server still serves brute-force and IVF exports
    HAVE_SCANN = False


class LoadedVersion:
    def __init__(self, version: int, path: Path):
        self.version = version
        self.path = path
        self.model = tf.saved_model.load(str(path))
        self.signatures = dict(self.model.signatures)
        self.input_specs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}
        # SignatureDefs for GetModelMetadata, parsed once at load.
        from tensorflow.core.protobuf import saved_model_pb2
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        self.signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in proto.meta_graphs[0].signature_def.items():
            if name != "__saved_model_init_op":
                self.signature_map.signature_def[name].CopyFrom(signature)


class ModelRepository:
    """Versions of one model: the serving one, and what happened to each version seen."""

    def __init__(self, name: str, base_path, poll_seconds: float = 2.0):
        self.name = name
        self.base_path = Path(base_path)
        if not self.base_path.is_dir():
            raise FileNotFoundError(f"--model-dir {str(self.base_path)!r} is not a directory")
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self.current: Optional[LoadedVersion] = None
        self._status: Dict[int, tuple] = {}  # version -> (state, error message or ""); guarded by _lock
        self._stop = threading.Event()
        self.refresh()
        if self.current is None:
            tried = "; ".join(f"version {v}: {e}" for v, (_, e) in sorted(self.status().items()))
            raise RuntimeError(f"no loadable version under {self.base_path} ({tried or 'no version directories'})")

    def versions_on_disk(self):
        return sorted(int(p.name) for p in self.base_path.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists())

    def status(self) -> Dict[int, tuple]:
        """A snapshot of every version seen: version -> (state, error message)."""
        with self._lock:
            return dict(self._status)

    def _set_status(self, version: int, state: str, error: str = "") -> None:
        with self._lock:
            self._status[version] = (state, error)

    def refresh(self) -> None:
        """Loads the newest version not tried yet; keeps the current one if it fails."""
        for version in sorted(self.versions_on_disk(), reverse=True):
            if self.current is not None and version <= self.current.version:
                return
            if self.status().get(version, ("",))[0] == "END":
                continue  # failed before; not retried
            try:
                self._set_status(version, "LOADING")
                loaded = LoadedVersion(version, self.base_path / str(version))
            except Exception as error:  # a broken version must not take the server down
                message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                logger.error("model %s version %d failed to load: %s", self.name, version, message)
                self._set_status(version, "END", message)
                continue
            with self._lock:
                previous = self.current
                self.current = loaded
                self._status[version] = ("AVAILABLE", "")
                if previous is not None:
                    self._status[previous.version] = ("END", "")
            logger.warning("model %s: serving version %d", self.name, version)
            return

    def watch(self) -> threading.Thread:
        def loop():
            while not self._stop.wait(self.poll_seconds):
                self.refresh()
        thread = threading.Thread(target=loop, daemon=True, name="version-watcher")
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def get(self, version: Optional[int]) -> LoadedVersion:
        current = self.current
        if version is None or version == current.version:
            return current
        raise LookupError(f"model {self.name!r} version {version} is not available (serving version "
                          f"{current.version})")


def _abort(context, code, message):
    context.abort(code, message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, repository: ModelRepository, max_batch_size: int = 1024):
        self.repository = repository
        self.max_batch_size = max_batch_size

    def _resolve(self, model_spec, context) -> LoadedVersion:
        if model_spec.name != self.repository.name:
            _abort(context, grpc.StatusCode.NOT_FOUND,
                   f"model_spec.name: unknown model {model_spec.name!r}; this server serves {self.repository.name!r}")
        version = model_spec.version.value if model_spec.HasField("version") else None
        if model_spec.version_label:
            _abort(context, grpc.StatusCode.NOT_FOUND,
                   f"model_spec.version_label: unknown label {model_spec.version_label!r}")
        try:
            return self.repository.get(version)
        except LookupError as error:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"model_spec.version: {error}")

    def Predict(self, request, context):
        loaded = self._resolve(request.model_spec, context)
        signature = request.model_spec.signature_name or "serving_default"
        if signature not in loaded.signatures:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"model_spec.signature_name: unknown signature {signature!r}; have {sorted(loaded.signatures)}")
        specs = loaded.input_specs[signature]
        unknown = sorted(set(request.inputs) - set(specs))
        if unknown:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"inputs: unknown input {unknown[0]!r}; signature {signature!r} takes {sorted(specs)}")
        missing = sorted(set(specs) - set(request.inputs))
        if missing:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"inputs: missing input {missing[0]!r}; signature {signature!r} takes {sorted(specs)}")
        tensors, batch = {}, None
        for name, spec in specs.items():
            proto = request.inputs[name]
            if proto.dtype != spec.dtype.as_datatype_enum:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"inputs[{name!r}]: dtype {tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else 'unset'} "
                       f"but the signature expects {spec.dtype.name}")
            try:
                value = tf.make_ndarray(proto)
            except Exception as error:  # malformed TensorProto content
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{name!r}]: malformed tensor: {error}")
            if value.ndim != spec.shape.rank or not spec.shape.is_compatible_with(value.shape):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"inputs[{name!r}]: shape {list(value.shape)} but the signature expects "
                       f"{spec.shape.as_list()} (None = any)")
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"inputs[{name!r}]: batch size {value.shape[0]} differs from the other inputs' {batch}")
            tensors[name] = tf.constant(value, dtype=spec.dtype)
        if not batch:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "inputs: empty batch (batch size 0)")
        if batch > self.max_batch_size:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"inputs: batch size {batch} exceeds the server's max batch size {self.max_batch_size}")
        try:
            outputs = loaded.signatures[signature](**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"inputs: {str(error).splitlines()[0]}")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.repository.name
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = signature
        wanted = set(request.output_filter) or set(outputs)
        for name, value in outputs.items():
            if name in wanted:
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response

    def GetModelMetadata(self, request, context):
        loaded = self._resolve(request.model_spec, context)
        fields = set(request.metadata_field) or {"signature_def"}
        if fields != {"signature_def"}:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"metadata_field: only 'signature_def' is supported, got {sorted(fields)}")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.repository.name
        response.model_spec.version.value = loaded.version
        response.metadata["signature_def"].Pack(loaded.signature_map)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    STATES = {"LOADING": get_model_status_pb2.ModelVersionStatus.LOADING,
              "AVAILABLE": get_model_status_pb2.ModelVersionStatus.AVAILABLE,
              "END": get_model_status_pb2.ModelVersionStatus.END}

    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def GetModelStatus(self, request, context):
        if request.model_spec.name != self.repository.name:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"model_spec.name: unknown model {request.model_spec.name!r}")
        wanted = request.model_spec.version.value if request.model_spec.HasField("version") else None
        response = get_model_status_pb2.GetModelStatusResponse()
        items = sorted(self.repository.status().items())
        if wanted is not None:
            items = [(v, s) for v, s in items if v == wanted]
            if not items:
                _abort(context, grpc.StatusCode.NOT_FOUND, f"model_spec.version: version {wanted} was never seen")
        for version, (state, error) in items:
            status = response.model_version_status.add()
            status.version = version
            status.state = self.STATES[state]
            status.status.CopyFrom(status_pb2.StatusProto(error_code=3 if error else 0, error_message=error))
        return response


def make_server(repository: ModelRepository, host: str = "127.0.0.1", port: int = 8500, workers: int = 8,
                max_batch_size: int = 1024):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(repository, max_batch_size), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(repository), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


def serve(model_dir, model_name: str, host: str = "127.0.0.1", port: int = 8500, poll_seconds: float = 2.0,
          workers: int = 8, max_batch_size: int = 1024) -> None:
    repository = ModelRepository(model_name, model_dir, poll_seconds)
    server, bound = make_server(repository, host, port, workers, max_batch_size)
    server.start()
    repository.watch()
    print(f"serving model {model_name!r} version {repository.current.version} on {host}:{bound} "
          f"(PredictionService, ModelService; polling {model_dir} every {poll_seconds:g} s)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        repository.stop()
        server.stop(grace=2)
