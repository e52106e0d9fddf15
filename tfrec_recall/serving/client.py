"""Clients for exported retrieval models served by TF Serving (or ``tfrec-recall serve``).

:class:`GrpcClient` speaks ``tensorflow.serving.PredictionService`` with a deadline per call, retries on
UNAVAILABLE with exponential backoff, and splits large query batches into requests of ``max_batch_size``.
:class:`RestClient` speaks TF Serving's REST API (``POST /v1/models/NAME[/versions/V]:predict``). A server
that cannot be reached after the retries gives a one-line ``ServerUnreachableError`` (a ``ConnectionError``)
naming the address.
Both return Python results: for each query a list of ``(item_id, score)`` pairs, best first.

``GrpcClient.predict`` / ``query`` take ``exclude``: per query, item ids to leave out of its results (e.g. the
user's full history). They are sent, padded with ``""``, as the ``exclude_item_ids`` input of the export's
``serve_with_exclusions`` signature (chosen unless a signature is named).
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Results = List[List[Tuple[str, float]]]

EXCLUDE_INPUT = "exclude_item_ids"  # tfrec_recall.export.EXCLUDE_INPUT (kept here: the client needs no TF import)
SIGNATURE_EXCLUSIONS = "serve_with_exclusions"


class ServerUnreachableError(ConnectionError, RuntimeError):
    """The model server did not answer (UNAVAILABLE after the retries). A ``RuntimeError`` too, so the CLI
    prints its one line instead of a traceback."""


def _as_arrays(features: Mapping[str, Sequence]) -> Dict[str, np.ndarray]:
    if not features:
        raise ValueError("features must name at least one input")
    arrays = {}
    for name, value in features.items():
        array = np.asarray(value)
        if array.dtype.kind in "US" or array.dtype == object:
            array = array.astype(object)
        elif array.dtype.kind in "iu":  # sent as the signature's dtype (GrpcClient._numeric_dtypes)
            array = array.astype(np.int64)
        elif array.dtype.kind == "f":
            array = array.astype(np.float64)
        else:
            raise ValueError(f"features[{name!r}]: unsupported dtype {array.dtype}")
        if array.ndim == 0:
            raise ValueError(f"features[{name!r}] must have a batch dimension, got a scalar")
        arrays[name] = array
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"features must have the same batch size, got {sizes}")
    return arrays


def exclusion_array(exclude: Sequence[Sequence[str]], batch: int) -> np.ndarray:
    """``exclude`` (one sequence of item ids per query) as a ``[batch, width]`` object array padded with ``""``;
    ``ValueError`` naming the row and value that is not a sequence of strings."""
    if isinstance(exclude, (str, bytes)) or not hasattr(exclude, "__len__"):
        raise ValueError(f"exclude must be one sequence of item ids per query, got {exclude!r}")
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} rows but the features have {batch} queries")
    rows = []
    for row, ids in enumerate(exclude):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"exclude[{row}] must be a sequence of item ids, got {ids!r}")
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, (str, bytes, np.str_, np.bytes_))]
        if bad:
            raise ValueError(f"exclude[{row}] holds {bad[0]!r} ({type(bad[0]).__name__}); item ids are strings")
        rows.append(ids)
    out = np.full((batch, max((len(r) for r in rows), default=0)), "", dtype=object)
    for row, ids in enumerate(rows):
        out[row, :len(ids)] = ids
    return out


def _results(ids: np.ndarray, scores: np.ndarray) -> Results:
    """Rows of (item_id, score), dropping the "" padding ids."""
    out = []
    for row_ids, row_scores in zip(ids, scores):
        names = [i.decode() if isinstance(i, bytes) else str(i) for i in row_ids]
        out.append([(name, float(score)) for name, score in zip(names, row_scores) if name])
    return out


class GrpcClient:
    def __init__(self, target: str, model_name: str, *, signature_name: str = "serving_default",
                 version: Optional[int] = None, timeout: float = 5.0, retries: int = 3, backoff: float = 0.1,
                 max_batch_size: int = 256, version_label: Optional[str] = None):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
        if version is not None and version_label is not None:
            raise ValueError(f"give version ({version!r}) or version_label ({version_label!r}), not both")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        self.model_name, self.signature_name, self.version = model_name, signature_name, version
        self.version_label = version_label
        self.timeout, self.retries, self.backoff, self.max_batch_size = timeout, retries, backoff, max_batch_size
        self._grpc, self.target = grpc, target
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._input_dtypes: Dict[str, Dict[str, np.dtype]] = {}  # signature -> input -> numpy dtype

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except self._grpc.RpcError as error:
                if error.code() != self._grpc.StatusCode.UNAVAILABLE:
                    raise
                if attempt == self.retries:
                    raise ServerUnreachableError(
                        f"cannot reach the model server at {self.target} (UNAVAILABLE after {self.retries} "
                        f"retries): is `tfrec-recall serve` running there?") from None
                time.sleep(delay)
                delay *= 2

    def _spec(self, spec):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label is not None:
            spec.version_label = self.version_label

    def predict(self, features: Mapping[str, Sequence], signature_name: Optional[str] = None,
                exclude: Optional[Sequence[Sequence[str]]] = None) -> Dict[str, np.ndarray]:
        """Raw outputs of one signature for a batch of inputs, sent in chunks of ``max_batch_size``. With
        ``exclude`` (item ids per query), the ``serve_with_exclusions`` signature unless one is named."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        arrays = _as_arrays(features)
        n = len(next(iter(arrays.values())))
        if exclude is not None:
            if EXCLUDE_INPUT in arrays:
                raise ValueError(f"give the exclusions as exclude or as features[{EXCLUDE_INPUT!r}], not both")
            arrays[EXCLUDE_INPUT] = exclusion_array(exclude, n)
            signature_name = signature_name or SIGNATURE_EXCLUSIONS
        arrays = self._numeric_dtypes(arrays, signature_name or self.signature_name)
        chunks = []
        for start in range(0, n, self.max_batch_size):
            request = predict_pb2.PredictRequest()
            self._spec(request.model_spec)
            request.model_spec.signature_name = signature_name or self.signature_name
            for name, array in arrays.items():
                part = array[start:start + self.max_batch_size]
                request.inputs[name].CopyFrom(tf.make_tensor_proto(part, shape=part.shape))
            response = self._call(self.prediction.Predict, request)
            chunks.append({name: tf.make_ndarray(proto) for name, proto in response.outputs.items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _numeric_dtypes(self, arrays: Dict[str, np.ndarray], signature: str) -> Dict[str, np.ndarray]:
        """Numeric inputs as the signature takes them (float32, or int64 such as history timestamps, whose
        values must then be whole numbers); float32 for inputs the signature does not list."""
        numeric = [name for name, a in arrays.items() if a.dtype != object]
        dtypes = self.input_dtypes(signature) if numeric else {}
        out = dict(arrays)
        for name in numeric:
            dtype = dtypes.get(name, np.dtype(np.float32))
            if dtype.kind in "iu" and not np.all(np.isfinite(out[name]) & (np.floor(out[name]) == out[name])):
                raise ValueError(f"features[{name!r}]: the signature takes {dtype.name}, got non-integer values")
            out[name] = out[name].astype(dtype if dtype.kind in "fiu" else np.float32)
        return out

    def input_dtypes(self, signature: str) -> Dict[str, np.dtype]:
        """``{input: numpy dtype}`` of one signature, read once from the server's model metadata."""
        if signature not in self._input_dtypes:
            import tensorflow as tf
            from tensorflow_serving.apis import get_model_metadata_pb2
            definitions = get_model_metadata_pb2.SignatureDefMap()
            self.metadata().metadata["signature_def"].Unpack(definitions)
            inputs = definitions.signature_def[signature].inputs if signature in definitions.signature_def else {}
            self._input_dtypes[signature] = {name: np.dtype(tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
                                             for name, info in inputs.items()}
        return self._input_dtypes[signature]

    def query(self, features: Mapping[str, Sequence], exclude: Optional[Sequence[Sequence[str]]] = None) -> Results:
        """(item id, score) pairs per query, best first; ``exclude``: item ids per query to leave out."""
        out = self.predict(features, exclude=exclude)
        return _results(out["item_ids"], out["scores"])

    def status(self):
        from tensorflow_serving.apis import get_model_status_pb2
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        return self._call(self.models.GetModelStatus, request)

    def metadata(self):
        from tensorflow_serving.apis import get_model_metadata_pb2
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec)
        request.metadata_field.append("signature_def")
        return self._call(self.prediction.GetModelMetadata, request)


class RestClient:
    def __init__(self, base_url: str, model_name: str, *, signature_name: str = "serving_default",
                 version: Optional[int] = None, timeout: float = 5.0, retries: int = 3, backoff: float = 0.1):
        self.url = f"{base_url.rstrip('/')}/v1/models/{model_name}"
        if version is not None:
            self.url += f"/versions/{version}"
        self.url += ":predict"
        self.signature_name, self.timeout, self.retries, self.backoff = signature_name, timeout, retries, backoff

    def predict(self, features: Mapping[str, Sequence]) -> Dict[str, np.ndarray]:
        arrays = _as_arrays(features)
        body = json.dumps({"signature_name": self.signature_name,
                           "inputs": {k: v.tolist() for k, v in arrays.items()}}).encode()
        delay = self.backoff
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                break
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == self.retries:
                    detail = error.read().decode(errors="replace")[:500]
                    raise RuntimeError(f"{self.url}: HTTP {error.code}: {detail}") from None
            except urllib.error.URLError as error:
                if attempt == self.retries:
                    raise ServerUnreachableError(
                        f"cannot reach the model server at {self.url} ({error.reason} after {self.retries} "
                        f"retries): is its REST endpoint (`serve(..., rest_port=...)`) running there?") from None
            time.sleep(delay)
            delay *= 2
        outputs = payload["outputs"]
        return {k: np.asarray(v) for k, v in outputs.items()}

    def query(self, features: Mapping[str, Sequence]) -> Results:
        out = self.predict(features)
        return _results(out["item_ids"], out["scores"])
