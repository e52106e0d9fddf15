"""``tfrec-recall serve``: a local gRPC server speaking TF Serving's API over versioned export directories.

It implements ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
``tensorflow.serving.ModelService`` (``GetModelStatus``) over model directories laid out as TF Serving reads
them (``BASE/<version>/saved_model.pb``, versions named as in ``tfrec_recall.serving.versions``). It is the
local and test server; production serves the same directories from ``tensorflow_model_server`` (see
serving/README.md for which index needs which server).

* One directory (``--model-dir``, ``--model-name``): it loads the newest version, polls for newer ones and
  switches when one loads; a version that fails to load is reported by GetModelStatus (state END, the error)
  while the previous one keeps serving.
* A TF Serving model config file (``--model-config-file``, see ``model_config``): each model's
  ``model_version_policy`` (latest N / specific / all) says which versions are loaded side by side, and its
  ``version_labels`` name versions; a request picks one by ``model_spec.version`` or
  ``model_spec.version_label`` (none: the newest loaded). As in TF Serving, a label naming a version that is
  not loaded stops the server at start, and an unknown label in a request is INVALID_ARGUMENT.
* Any signature of the export is served by its name (``model_spec.signature_name``, default
  ``serving_default``), e.g. ``serve_with_exclusions``, whose ``exclude_item_ids`` input (``[batch, None]``
  string, padded with ``""``) lists item ids to leave out per query; its width may differ per request.
* It binds to 127.0.0.1 unless told otherwise.
* Bad requests (unknown model, version or label, unknown / missing input, wrong dtype or rank, empty or
  oversized batch) get INVALID_ARGUMENT or NOT_FOUND with a message naming the field; the server keeps serving.
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

from tfrec_recall.serving.model_config import VersionPolicy, load_model_config
from tfrec_recall.serving.versions import versions_in

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


class UnknownLabelError(LookupError):
    """A request's version_label is not configured for the model."""


class ModelRepository:
    """The loaded versions of one model, chosen by a version policy, and what happened to each version seen.

    The default policy (``latest`` 1) is the single-directory mode: the newest loadable version. With
    ``latest`` N, ``specific`` or ``all`` (from a model config file) several versions are loaded at once, and
    ``labels`` map version labels to versions. A version that fails to load is not retried; a loaded version
    stays loaded until the policy drops it for a newer one."""

    def __init__(self, name: str, base_path, poll_seconds: float = 2.0, policy: VersionPolicy = VersionPolicy(),
                 labels: Optional[Dict[str, int]] = None, source: str = "--model-dir"):
        self.name = name
        self.base_path = Path(base_path)
        if not self.base_path.is_dir():
            raise FileNotFoundError(f"{source} {str(self.base_path)!r} is not a directory")
        self.poll_seconds, self.policy, self.labels = poll_seconds, policy, dict(labels or {})
        self._lock = threading.Lock()
        self._loaded: Dict[int, LoadedVersion] = {}  # guarded by _lock
        self._status: Dict[int, tuple] = {}  # version -> (state, error message or ""); guarded by _lock
        self._stop = threading.Event()
        self.refresh()
        if not self._loaded:
            tried = "; ".join(f"version {v}: {e}" for v, (_, e) in sorted(self.status().items()))
            raise RuntimeError(f"model {name!r}: no loadable version under {self.base_path} "
                               f"({tried or 'no version directories'}; policy {policy.describe()})")
        self._check_labels()

    def _check_labels(self) -> None:
        """TF Serving refuses a label naming a version that is not loaded; so does this server."""
        loaded = self.loaded_versions()
        for label, version in sorted(self.labels.items()):
            if version not in loaded:
                raise RuntimeError(f"version_labels[{label!r}]: model {self.name!r} version {version} is not "
                                   f"loaded ({self._why_not_loaded(version)}; loaded versions: {loaded}; "
                                   f"base_path {self.base_path})")

    def _why_not_loaded(self, version: int) -> str:
        error = self.status().get(version, ("", ""))[1]
        if error:
            return f"it failed to load: {error}"
        if version not in self.versions_on_disk():
            return "no such version directory with a saved_model.pb"
        return f"model_version_policy {self.policy.describe()} does not load it"

    def versions_on_disk(self):
        return versions_in(p.name for p in self.base_path.iterdir()
                           if p.is_dir() and (p / "saved_model.pb").exists())

    def loaded_versions(self):
        with self._lock:
            return sorted(self._loaded)

    @property
    def current(self) -> Optional[LoadedVersion]:
        """The newest loaded version (what a request without a version gets)."""
        with self._lock:
            return self._loaded[max(self._loaded)] if self._loaded else None

    def status(self) -> Dict[int, tuple]:
        """A snapshot of every version seen: version -> (state, error message)."""
        with self._lock:
            return dict(self._status)

    def _set_status(self, version: int, state: str, error: str = "") -> None:
        with self._lock:
            self._status[version] = (state, error)

    def _candidates(self):
        """Versions the policy may serve, newest first: on disk or loaded, not failed before."""
        failed = {v for v, (state, error) in self.status().items() if state == "END" and error}
        versions = set(self.versions_on_disk()) | set(self.loaded_versions())
        if self.policy.kind == "specific":
            versions &= set(self.policy.versions)
        return sorted(versions - failed, reverse=True)

    def _load(self, version: int) -> bool:
        """Loads one version; a failure is recorded (state END with the error), logged and not raised."""
        try:
            self._set_status(version, "LOADING")
            loaded = LoadedVersion(version, self.base_path / str(version))
        except Exception as error:  # a broken version must not take the server down
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            logger.error("model %s version %d failed to load: %s", self.name, version, message)
            self._set_status(version, "END", message)
            return False
        with self._lock:
            self._loaded[version] = loaded
            self._status[version] = ("AVAILABLE", "")
        logger.warning("model %s: serving version %d", self.name, version)
        return True

    def refresh(self) -> None:
        """Loads the versions the policy wants and unloads the ones it no longer wants. For ``latest`` N these
        are the N newest loadable versions, so a version that fails to load leaves the older one serving."""
        limit = self.policy.num_versions if self.policy.kind == "latest" else None
        kept, loaded = [], set(self.loaded_versions())
        for version in self._candidates():
            if limit is not None and len(kept) >= limit:
                break
            if version in loaded or self._load(version):
                kept.append(version)
        with self._lock:
            for version in [v for v in self._loaded if v not in kept]:
                del self._loaded[version]
                self._status[version] = ("END", "")
                logger.warning("model %s: unloaded version %d", self.name, version)

    def watch(self) -> threading.Thread:
        def loop():
            while not self._stop.wait(self.poll_seconds):
                self.refresh()
        thread = threading.Thread(target=loop, daemon=True, name=f"version-watcher-{self.name}")
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def label_version(self, label: str) -> int:
        if label not in self.labels:
            raise UnknownLabelError(f"unknown version label {label!r} for model {self.name!r}; known labels: "
                                    f"{sorted(self.labels) or 'none (no version_labels configured)'}")
        return self.labels[label]

    def get(self, version: Optional[int] = None, label: Optional[str] = None) -> LoadedVersion:
        """The loaded version a request asks for: by ``version``, by ``label``, or the newest."""
        if label:
            version = self.label_version(label)
        with self._lock:
            if version is None:
                return self._loaded[max(self._loaded)]
            if version in self._loaded:
                return self._loaded[version]
            serving = sorted(self._loaded)
        named = f" (label {label!r})" if label else ""
        raise LookupError(f"model {self.name!r} version {version}{named} is not available (serving "
                          f"version{'s' if len(serving) > 1 else ''} {', '.join(map(str, serving))})")


def load_repositories(config_file, poll_seconds: float = 2.0) -> Dict[str, ModelRepository]:
    """One repository per model of a TF Serving model config file (see ``model_config``)."""
    return {model.name: ModelRepository(model.name, model.base_path, poll_seconds, model.policy, model.labels,
                                        source=f"base_path of model {model.name!r}")
            for model in load_model_config(config_file)}


def _abort(context, code, message):
    context.abort(code, message)


def _as_models(models) -> Dict[str, ModelRepository]:
    """``{name: repository}`` from one repository or a mapping of them."""
    return {models.name: models} if isinstance(models, ModelRepository) else dict(models)


def _repository(models: Dict[str, ModelRepository], name: str, context) -> ModelRepository:
    if name not in models:
        _abort(context, grpc.StatusCode.NOT_FOUND, f"model_spec.name: unknown model {name!r}; this server serves "
                                                   f"{', '.join(repr(n) for n in sorted(models))}")
    return models[name]


def _resolve(models: Dict[str, ModelRepository], model_spec, context) -> LoadedVersion:
    """The loaded version a request's model_spec names (by version, by version_label, or the newest)."""
    repository = _repository(models, model_spec.name, context)
    choice = model_spec.WhichOneof("version_choice")
    try:
        return repository.get(model_spec.version.value if choice == "version" else None,
                              model_spec.version_label if choice == "version_label" else None)
    except UnknownLabelError as error:  # TF Serving: INVALID_ARGUMENT "Unrecognized servable version label"
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"model_spec.version_label: {error}")
    except LookupError as error:
        _abort(context, grpc.StatusCode.NOT_FOUND, f"model_spec.{choice or 'version'}: {error}")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models, max_batch_size: int = 1024):
        self.models = _as_models(models)
        self.max_batch_size = max_batch_size

    def _resolve(self, model_spec, context) -> LoadedVersion:
        return _resolve(self.models, model_spec, context)

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
        response.model_spec.name = request.model_spec.name
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
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        response.metadata["signature_def"].Pack(loaded.signature_map)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    STATES = {"LOADING": get_model_status_pb2.ModelVersionStatus.LOADING,
              "AVAILABLE": get_model_status_pb2.ModelVersionStatus.AVAILABLE,
              "END": get_model_status_pb2.ModelVersionStatus.END}

    def __init__(self, models):
        self.models = _as_models(models)

    def GetModelStatus(self, request, context):
        """Every version seen (loaded ones AVAILABLE), or the one named by model_spec.version / version_label."""
        spec = request.model_spec
        repository = _repository(self.models, spec.name, context)
        choice = spec.WhichOneof("version_choice")
        wanted = spec.version.value if choice == "version" else None
        if choice == "version_label":
            try:
                wanted = repository.label_version(spec.version_label)
            except UnknownLabelError as error:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"model_spec.version_label: {error}")
        items = sorted(repository.status().items())
        if wanted is not None:
            items = [(v, s) for v, s in items if v == wanted]
            if not items:
                _abort(context, grpc.StatusCode.NOT_FOUND, f"model_spec.version: version {wanted} was never seen")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, (state, error) in items:
            status = response.model_version_status.add()
            status.version = version
            status.state = self.STATES[state]
            status.status.CopyFrom(status_pb2.StatusProto(error_code=3 if error else 0, error_message=error))
        return response


def make_server(models, host: str = "127.0.0.1", port: int = 8500, workers: int = 8, max_batch_size: int = 1024):
    """A gRPC server (not started) for one ModelRepository or a ``{name: ModelRepository}`` mapping; returns
    it and the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(models, max_batch_size), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(models), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, bound


def _describe(repository: ModelRepository) -> str:
    labels = ", ".join(f"{label}={version}" for label, version in sorted(repository.labels.items()))
    versions = repository.loaded_versions()
    return (f"model {repository.name!r} version{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"
            + (f" (labels {labels})" if labels else ""))


def serve(model_dir=None, model_name: Optional[str] = None, host: str = "127.0.0.1", port: int = 8500,
          poll_seconds: float = 2.0, workers: int = 8, max_batch_size: int = 1024, model_config_file=None) -> None:
    """Serves ``model_dir`` as ``model_name`` (newest version), or the models of a TF Serving
    ``model_config_file`` (their version policies and labels); polls for new versions every ``poll_seconds``."""
    if model_config_file is not None and (model_dir is not None or model_name is not None):
        raise ValueError("serve: model_config_file names the models; do not also give model_dir / model_name")
    if model_config_file is None and (model_dir is None or model_name is None):
        raise ValueError("serve needs model_dir and model_name, or model_config_file")
    if model_config_file is not None:
        models, source = load_repositories(model_config_file, poll_seconds), str(model_config_file)
    else:
        models, source = _as_models(ModelRepository(model_name, model_dir, poll_seconds)), str(model_dir)
    server, bound = make_server(models, host, port, workers, max_batch_size)
    server.start()
    for repository in models.values():
        repository.watch()
    print(f"serving {'; '.join(_describe(r) for r in models.values())} on {host}:{bound} "
          f"(PredictionService, ModelService; polling {source} every {poll_seconds:g} s)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        for repository in models.values():
            repository.stop()
        server.stop(grace=2)
