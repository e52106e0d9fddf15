"""``tfrec-recall serve``: a local gRPC server speaking TF Serving's API over versioned export directories.

It implements ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``; ``Classify``,
``Regress`` and ``MultiInference`` answer UNIMPLEMENTED with one log line: the exports have predict signatures
only) and ``tensorflow.serving.ModelService`` (``GetModelStatus``) over model directories laid out as TF
Serving reads them (``BASE/<version>/saved_model.pb``, versions named as in ``tfrec_recall.serving.versions``).
With ``serve(..., rest_port=N)`` it also answers TF Serving's REST API on the same host
(``tfrec_recall.serving.rest``). It is the local and test server; production serves the same directories
from ``tensorflow_model_server`` (see serving/README.md for which index needs which server).

* One directory (``--model-dir``, ``--model-name``): it loads the newest version, polls for newer ones and
  switches when one loads; a version that fails to load is reported by GetModelStatus (state END, the error)
  while the previous one keeps serving, and is retried once its directory changes (a version caught
  mid-copy loads when the copy completes). A deleted version is unloaded; while the base path is missing the
  loaded versions keep serving; a failed poll is logged and the watcher polls again; a directory named by
  digits beyond int64 is skipped with a warning.
* A TF Serving model config file (``--model-config-file``, see ``model_config``): each model's
  ``model_version_policy`` (latest N / specific / all) says which versions are loaded side by side, and its
  ``version_labels`` name versions; a request picks one by ``model_spec.version`` or
  ``model_spec.version_label`` (none: the newest loaded). As in TF Serving, a label naming a version that is
  not loaded stops the server at start, and an unknown label in a request is INVALID_ARGUMENT.
* Any signature of the export is served by its name (``model_spec.signature_name``, default
  ``serving_default``), e.g. ``serve_with_exclusions``, whose ``exclude_item_ids`` input (``[batch, None]``
  string, padded with ``""``) lists item ids to leave out per query; its width may differ per request.
* It binds to 127.0.0.1 unless told otherwise, and refuses a port another process holds (no SO_REUSEPORT):
  ``PortInUseError``. Ports outside 0..65535 (0: pick a free one), ``poll_seconds <= 0`` and
  ``max_batch_size`` or ``workers`` below 1 are refused with a ``ValueError`` naming the flag.
* Bad requests get INVALID_ARGUMENT or NOT_FOUND with a message naming the field; the server keeps serving:
  unknown model, version, label, input or ``output_filter`` name (the known ones are listed); missing input;
  wrong dtype or rank, negative dimensions or a value count that does not match the declared shape (checked
  on the TensorProto's header, before any value is converted); an empty batch or one over
  ``max_batch_size``; ±inf in a numeric input (NaN stands for a missing value); a serve_examples example the
  parser refuses (named by index, with the feature). A request declaring more values than
  ``max_request_values`` (default: ``max_batch_size`` rows of every input's width, see
  ``request_value_limit``) gets RESOURCE_EXHAUSTED at once. A non-finite score of a real item (or any
  non-finite embedding) is not answered: INVALID_ARGUMENT (inputs outside the range the model computes with).
* ScaNN exports need the ScaNN ops: the server imports scann when it is installed.
"""
from __future__ import annotations

import logging
import re
import threading
from concurrent import futures
from typing import Dict, Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc, predict_pb2)
from tensorflow_serving.apis import status_pb2

from tfrec_recall import storage
from tfrec_recall.serving.model_config import VersionPolicy, load_model_config
from tfrec_recall.serving.versions import is_out_of_range, version_of

logger = logging.getLogger(__name__)
EXAMPLES_INPUT = "examples"  # tfrec_recall.export.EXAMPLES_INPUT: serve_examples' serialized tf.Examples

try:  # registers the ScaNN ops so ScaNN exports load
    import scann  # noqa: F401  (import registers the ops)
    HAVE_SCANN = True
except ImportError:  # the server still serves brute-force and IVF exports
    HAVE_SCANN = False


class LoadedVersion:
    def __init__(self, version: int, path: str):
        self.version = version
        self.path = path
        self.model = tf.saved_model.load(path)
        self.signatures = dict(self.model.signatures)
        self.input_specs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}
        self.output_names = {name: sorted(fn.structured_outputs) for name, fn in self.signatures.items()}
        # SignatureDefs for GetModelMetadata, parsed once at load.
        from tensorflow.core.protobuf import saved_model_pb2
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString(storage.read_bytes(storage.join(path, "saved_model.pb")))
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
    ``labels`` map version labels to versions. A version that fails to load is retried once its directory
    changes (e.g. it was caught mid-copy); a loaded version stays loaded until the policy drops it for a newer
    one or its directory is deleted. While the base path is missing, the loaded versions keep serving."""

    def __init__(self, name: str, base_path, poll_seconds: float = 2.0, policy: VersionPolicy = VersionPolicy(),
                 labels: Optional[Dict[str, int]] = None, source: str = "--model-dir"):
        self.name = name
        self.base_path = storage.path_str(base_path)
        if not storage.isdir(self.base_path):
            raise FileNotFoundError(f"{source} {self.base_path!r} is not a directory")
        if not poll_seconds > 0:
            raise ValueError(f"--poll-seconds must be > 0, got {poll_seconds!r}")
        self.poll_seconds, self.policy, self.labels = poll_seconds, policy, dict(labels or {})
        self._failed: Dict[int, tuple] = {}  # version -> its directory's fingerprint when it failed to load
        self._skipped: set = set()  # directory names warned about (not int64 versions)
        self._base_missing = False
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
        """Versions with a saved_model.pb; a digit name too large for int64 is skipped with a warning."""
        versions = []
        for name in storage.listdir(self.base_path):
            path = storage.join(self.base_path, name)
            if not (storage.isdir(path) and storage.exists(storage.join(path, "saved_model.pb"))):
                continue
            if is_out_of_range(name) and name not in self._skipped:
                self._skipped.add(name)
                logger.warning("model %s: skipping version directory %s: not a valid int64 version",
                               self.name, path)
            version = version_of(name)
            if version is not None:
                versions.append(version)
        return sorted(versions)

    def _fingerprint(self, version: int) -> tuple:
        """(path, size, mtime) of every file of a version directory: it changes while the version is copied."""
        root = storage.join(self.base_path, str(version))
        stats = ((f, storage.gfile().stat(storage.join(root, f))) for f in storage.walk_files(root))
        return tuple((f, stat.length, stat.mtime_nsec) for f, stat in stats)

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
        """Versions the policy may serve, newest first: on disk, not failed before in their current form."""
        versions = set(self.versions_on_disk())
        failed = {v for v, fingerprint in self._failed.items() if v in versions and self._fingerprint(v) == fingerprint}
        if self.policy.kind == "specific":
            versions &= set(self.policy.versions)
        return sorted(versions - failed, reverse=True)

    def _load(self, version: int) -> bool:
        """Loads one version; a failure is recorded (state END with the error), logged and not raised."""
        try:
            self._set_status(version, "LOADING")
            loaded = LoadedVersion(version, storage.join(self.base_path, str(version)))
        except Exception as error:  # a broken version must not take the server down
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            # Failing again in another form: most likely still being copied; said once, then only at INFO.
            level = logging.INFO if version in self._failed else logging.WARNING
            logger.log(level, "model %s version %d is not loadable (still being copied, or broken; retried when "
                              "its directory changes): %s", self.name, version, message)
            self._failed[version] = self._fingerprint(version)
            self._set_status(version, "END", message)
            return False
        self._failed.pop(version, None)
        with self._lock:
            self._loaded[version] = loaded
            self._status[version] = ("AVAILABLE", "")
        logger.warning("model %s: serving version %d", self.name, version)
        return True

    def refresh(self) -> None:
        """Loads the versions the policy wants and unloads the ones it no longer wants (or that were deleted).
        For ``latest`` N these are the N newest loadable versions, so a version that fails to load leaves the
        older one serving. A missing base path changes nothing (logged once)."""
        if not storage.isdir(self.base_path):
            if not self._base_missing:
                logger.error("model %s: base path %s is missing; still serving versions %s",
                             self.name, self.base_path, self.loaded_versions())
            self._base_missing = True
            return
        if self._base_missing:
            logger.warning("model %s: base path %s is back", self.name, self.base_path)
            self._base_missing = False
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
                try:
                    self.refresh()
                except Exception as error:  # e.g. the directory vanished mid-listing: log it, poll again
                    logger.error("model %s: polling %s failed, retrying in %g s: %s: %s", self.name,
                                 self.base_path, self.poll_seconds, type(error).__name__, error)
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
            if version is None and self._loaded:
                return self._loaded[max(self._loaded)]
            if version in self._loaded:
                return self._loaded[version]
            serving = sorted(self._loaded)
        if not serving:
            raise LookupError(f"model {self.name!r} has no version loaded (none loadable under {self.base_path})")
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


DEFAULT_UNKNOWN_WIDTH = 1024  # per-row values counted for a [batch, None] input in the default request limit
_VALUE_FIELDS = ("float_val", "double_val", "int_val", "int64_val", "string_val", "bool_val", "half_val",
                 "uint32_val", "uint64_val", "scomplex_val", "dcomplex_val")


def request_value_limit(specs, max_batch_size: int) -> int:
    """The default request size limit of a signature: ``max_batch_size`` rows of every input's width (a
    ``None`` width counts ``DEFAULT_UNKNOWN_WIDTH`` values)."""
    per_row = 0
    for spec in specs.values():
        width = 1
        for dim in spec.shape.as_list()[1:]:
            width *= DEFAULT_UNKNOWN_WIDTH if dim is None else dim
        per_row += width
    return max_batch_size * per_row


def _declared_shape(name: str, proto, spec, context) -> list:
    """The shape a TensorProto declares, checked against the signature before any value is converted."""
    if proto.tensor_shape.unknown_rank:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{name!r}]: unknown rank; the signature "
                                                          f"expects shape {spec.shape.as_list()} (None = any)")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
               f"inputs[{name!r}]: shape {dims} has a negative dimension; give every dimension's size")
    if len(dims) != spec.shape.rank or not spec.shape.is_compatible_with(dims):
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
               f"inputs[{name!r}]: shape {dims} but the signature expects {spec.shape.as_list()} (None = any)")
    return dims


def _values_present(proto) -> int:
    """How many values a TensorProto holds (tensor_content or its repeated value field)."""
    if proto.tensor_content:
        return len(proto.tensor_content) // tf.dtypes.as_dtype(proto.dtype).size
    return max(len(getattr(proto, field)) for field in _VALUE_FIELDS)


def _check_values(name: str, value: np.ndarray, context) -> None:
    """±inf in a numeric input is refused (NaN stands for a missing value: the training mean)."""
    if value.dtype.kind == "f" and np.isinf(value).any():
        where = tuple(int(i) for i in np.argwhere(np.isinf(value))[0])
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
               f"inputs[{name!r}]: non-finite value {value[where]} at {list(where)}; numeric inputs must be "
               f"finite (NaN = missing)")


def _check_outputs(outputs: Dict[str, np.ndarray], context) -> None:
    """A non-finite float output (a score of a real item, an embedding) is an error, not an answer: it comes
    from inputs outside what the model can compute with (e.g. float inputs near the float32 limit)."""
    ids = outputs.get("item_ids")
    for name, value in outputs.items():
        if value.dtype.kind != "f":
            continue
        bad = ~np.isfinite(value)
        if name == "scores" and ids is not None and ids.shape == value.shape:
            bad &= ids != b""  # -inf scores of "" padding ids are the index's filler
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"outputs[{name!r}]: the model gave non-finite values for query {row}; its inputs are outside "
                   f"the range the model computes with (e.g. a float input near the float32 limit)")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``Predict`` and ``GetModelMetadata``; ``Classify``, ``Regress`` and ``MultiInference`` answer
    UNIMPLEMENTED (the exports have predict signatures only). ``max_request_values``: the most values a
    request may declare over all its inputs (default: ``request_value_limit`` of the signature)."""

    def __init__(self, models, max_batch_size: int = 1024, max_request_values: Optional[int] = None):
        self.models = _as_models(models)
        self.max_batch_size, self.max_request_values = max_batch_size, max_request_values

    def _resolve(self, model_spec, context) -> LoadedVersion:
        return _resolve(self.models, model_spec, context)

    def _signature(self, request, loaded: LoadedVersion, context) -> str:
        """The requested signature, with its inputs and output_filter checked by name."""
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
        outputs = loaded.output_names[signature]
        unknown = sorted(set(request.output_filter) - set(outputs))
        if unknown:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"output_filter: unknown output {unknown[0]!r}; signature {signature!r} gives {outputs}")
        return signature

    def _check_sizes(self, request, specs, context) -> None:
        """Dtypes, shapes, batch and request size from the TensorProtos' headers, before any conversion."""
        batch, declared = None, 0
        limit = self.max_request_values or request_value_limit(specs, self.max_batch_size)
        for name, spec in sorted(specs.items()):  # sorted: the same input named first on every request
            proto = request.inputs[name]
            if proto.dtype != spec.dtype.as_datatype_enum:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"inputs[{name!r}]: dtype {tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else 'unset'} "
                       f"but the signature expects {spec.dtype.name}")
            dims = _declared_shape(name, proto, spec, context)
            self._check_batch(name, dims[0], batch, context)
            count, present = int(np.prod(dims, dtype=object)), _values_present(proto)
            batch, declared = dims[0], declared + count
            if declared > limit:
                _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"inputs: the request declares {declared} values (inputs[{name!r}] shape {dims}), over this "
                       f"server's limit of {limit}")
            if present != count and not (present == 1 and not proto.tensor_content):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"inputs[{name!r}]: shape {dims} declares {count} values but the tensor holds {present}")
        if not batch:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "inputs: empty batch (batch size 0)")

    def _check_batch(self, name: str, size: int, batch: Optional[int], context) -> None:
        if size > self.max_batch_size:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"inputs: batch size {size} exceeds the server's max batch size {self.max_batch_size}")
        if batch is not None and size != batch:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"inputs[{name!r}]: batch size {size} differs from the other inputs' {batch}")

    def _tensors(self, request, specs, context) -> Dict[str, tf.Tensor]:
        self._check_sizes(request, specs, context)
        tensors = {}
        for name, spec in specs.items():
            try:
                value = tf.make_ndarray(request.inputs[name])
            except Exception as error:  # malformed TensorProto content
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{name!r}]: malformed tensor: {error}")
            _check_values(name, value, context)
            tensors[name] = tf.constant(value, dtype=spec.dtype)
        return tensors

    def _run(self, loaded: LoadedVersion, signature: str, tensors, context) -> Dict[str, np.ndarray]:
        function = loaded.signatures[signature]
        try:
            return {name: value.numpy() for name, value in function(**tensors).items()}
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
            where = _failing_example(function, tensors) if list(tensors) == [EXAMPLES_INPUT] else ""
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"inputs{where}: {_error_line(error)}")

    def Predict(self, request, context):
        loaded = self._resolve(request.model_spec, context)
        signature = self._signature(request, loaded, context)
        tensors = self._tensors(request, loaded.input_specs[signature], context)
        outputs = self._run(loaded, signature, tensors, context)
        wanted = set(request.output_filter) or set(outputs)
        outputs = {name: value for name, value in outputs.items() if name in wanted}
        _check_outputs(outputs, context)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = signature
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
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

    def _unimplemented(self, method: str, request, context):
        logger.warning("%s request for model %r answered UNIMPLEMENTED", method, request.model_spec.name)
        _abort(context, grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server: the exports "
                                                       f"have predict signatures only; use Predict")

    def Classify(self, request, context):
        self._unimplemented("Classify", request, context)

    def Regress(self, request, context):
        self._unimplemented("Regress", request, context)

    def MultiInference(self, request, context):
        spec = request.tasks[0].model_spec if request.tasks else None
        logger.warning("MultiInference request for model %r answered UNIMPLEMENTED", spec.name if spec else "")
        _abort(context, grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not implemented by this server: the "
                                                       "exports have predict signatures only; use Predict")


def _error_line(error: Exception) -> str:
    """The informative line of an error: for a TF op error, the op's message (not "Graph execution error:",
    the stack or the node names)."""
    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    lines = [line for line in text.splitlines() if line.strip() and not line[0].isspace()
             and not line.startswith(("Graph execution error", "Detected at node"))]
    line = lines[-1] if lines else text.strip()
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", line).strip()


def _failing_example(function, tensors) -> str:
    """``"['examples'][i]"`` for the first serialized example the signature refuses on its own ("" if none)."""
    examples = tensors[EXAMPLES_INPUT].numpy()
    for index, example in enumerate(examples):
        try:
            function(**{EXAMPLES_INPUT: tf.constant([example])})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError):
            return f"[{EXAMPLES_INPUT!r}][{index}]"
    return ""


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


class PortInUseError(OSError, RuntimeError):
    """The server's port cannot be bound (another process, e.g. a second server, holds it)."""


def check_port(flag: str, port) -> None:
    """A port flag is 0 (pick a free port) or in 1..65535: ``ValueError`` naming the flag otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{flag} must be in 1..65535 (or 0: pick a free port), got {port!r}")


def check_server_options(port: int, workers: int, max_batch_size: int, max_request_values=None) -> None:
    check_port("--port", port)
    for flag, value in (("--workers", workers), ("--max-batch-size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if max_request_values is not None and (not isinstance(max_request_values, int) or max_request_values < 1):
        raise ValueError(f"max_request_values must be an integer >= 1 or None, got {max_request_values!r}")


def make_server(models, host: str = "127.0.0.1", port: int = 8500, workers: int = 8, max_batch_size: int = 1024,
                max_request_values: Optional[int] = None):
    """A gRPC server (not started) for one ModelRepository or a ``{name: ModelRepository}`` mapping; returns
    it and the bound port. A port another process holds is refused (``PortInUseError``), not shared."""
    check_server_options(port, workers, max_batch_size, max_request_values)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(models, max_batch_size, max_request_values), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(models), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as error:  # grpc raises RuntimeError("Failed to bind to address ...")
        raise PortInUseError(f"--port {port}: cannot bind {host}:{port} (in use by another process?): {error}") \
            from None
    if bound == 0:
        raise PortInUseError(f"--port {port}: cannot bind {host}:{port} (in use by another process?)")
    return server, bound


def _describe(repository: ModelRepository) -> str:
    labels = ", ".join(f"{label}={version}" for label, version in sorted(repository.labels.items()))
    versions = repository.loaded_versions()
    return (f"model {repository.name!r} version{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"
            + (f" (labels {labels})" if labels else ""))


def _check_serve_arguments(model_dir, model_name, model_config_file, port, poll_seconds, workers,
                           max_batch_size, rest_port) -> None:
    if model_config_file is not None and (model_dir is not None or model_name is not None):
        raise ValueError("serve: model_config_file names the models; do not also give model_dir / model_name")
    if model_config_file is None and (model_dir is None or model_name is None):
        raise ValueError("serve needs model_dir and model_name, or model_config_file")
    check_server_options(port, workers, max_batch_size)
    if isinstance(poll_seconds, bool) or not isinstance(poll_seconds, (int, float)) or not poll_seconds > 0:
        raise ValueError(f"--poll-seconds must be > 0, got {poll_seconds!r}")
    if rest_port is not None:
        check_port("--rest-port", rest_port)
        if rest_port == port != 0:
            raise ValueError(f"--rest-port must differ from --port, both are {port}")


def serve(model_dir=None, model_name: Optional[str] = None, host: str = "127.0.0.1", port: int = 8500,
          poll_seconds: float = 2.0, workers: int = 8, max_batch_size: int = 1024, model_config_file=None,
          rest_port: Optional[int] = None, max_request_values: Optional[int] = None) -> None:
    """Serves ``model_dir`` as ``model_name`` (newest version), or the models of a TF Serving
    ``model_config_file`` (their version policies and labels); polls for new versions every ``poll_seconds``.
    With ``rest_port``, TF Serving's REST API too (``tfrec_recall.serving.rest``), on the same host."""
    from tfrec_recall.serving.rest import make_rest_server, stop_rest_server
    _check_serve_arguments(model_dir, model_name, model_config_file, port, poll_seconds, workers, max_batch_size,
                           rest_port)
    if model_config_file is not None:
        models, source = load_repositories(model_config_file, poll_seconds), str(model_config_file)
    else:
        models, source = _as_models(ModelRepository(model_name, model_dir, poll_seconds)), str(model_dir)
    server, bound = make_server(models, host, port, workers, max_batch_size, max_request_values)
    rest = None if rest_port is None else make_rest_server(models, host, rest_port, max_batch_size,
                                                           max_request_values)
    server.start()
    for repository in models.values():
        repository.watch()
    print(f"serving {'; '.join(_describe(r) for r in models.values())} on {host}:{bound} "
          f"(PredictionService, ModelService{f'; REST on {host}:{rest[1]}' if rest else ''}; "
          f"polling {source} every {poll_seconds:g} s)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        for repository in models.values():
            repository.stop()
        stop_rest_server(rest[0] if rest else None)
        server.stop(grace=2)
