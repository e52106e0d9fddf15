"""Reliability suite (issue 15): bad requests, bad CLI and file inputs, load with hot reloads, kill -9.

    .venv/bin/python benchmarks/reliability.py [--quick] [--work-dir DIR]

Trains a small YouTubeDNN on the synthetic default (`tfrec-recall train`), exports it, serves it with
`tfrec-recall serve` (gRPC and REST, a separate process) and then, per category:

* grpc: a catalogue of bad PredictionService / ModelService requests (unknown names, wrong dtypes and shapes,
  non-finite and oversized inputs, declared sizes far beyond the bytes sent, unimplemented methods, ...);
* rest: bad requests to TF Serving's REST API;
* cli: bad command lines and input files, each run as its own `tfrec-recall` process;
* load: client threads send good requests for a fixed time while versions are published (copied file by file,
  so the watcher sees them mid-copy), corrupt versions appear and the served version is deleted;
* export-kill: `tfrec-recall export` SIGKILLed at random moments, then exported once more;
* train-kill: `tfrec-recall train` SIGKILLed at random moments, then the same command resumes it.

A case is "clear" when it gets the expected status (a gRPC code, an HTTP code, exit code 2) with a message
naming the input, field, flag or file at fault (CLI: one stderr line, no traceback), or for the kill and load
categories when nothing is lost or half-written; anything else is "mishandled". Results go to
benchmarks/results/reliability.md and .json (--quick: a smaller load and fewer kills, for the test suite).
"""
import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SMALL = "embedding_dim: 16\noutput_dim: 16\nhidden_units: [16]\nbatch_size: 512\npatience: 0\n"
HISTORY = 10
# The CLI as a user runs it: its own TF_CPP_MIN_LOG_LEVEL default, not one a Makefile or test runner exported.
ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@dataclasses.dataclass
class Outcome:
    category: str
    case: str
    clear: bool
    detail: str


# ----------------------------------------------------------------------------------------------------------
# Processes

def cli(*args, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfrec_recall.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, **kwargs)


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tfrec_recall.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Server:
    """`tfrec-recall serve` over ``base`` with gRPC and REST on free ports; its output is kept."""

    def __init__(self, base: Path, poll_seconds: float = 0.2):
        self.process = start_cli("serve", "--model-dir", base, "--model-name", "recall", "--port", 0,
                                 "--rest-port", 0, "--poll-seconds", poll_seconds, "--max-batch-size", 64)
        self.lines: List[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            match = re.search(r"on 127\.0\.0\.1:(\d+) .*REST on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.port, self.rest_port = int(match.group(1)), int(match.group(2))
                threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()
                return
        raise TimeoutError("the server did not start:\n" + "".join(self.lines))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


# ----------------------------------------------------------------------------------------------------------
# Set-up: a trained run and its export

def prepare(work: Path) -> Dict:
    conf = work / "small.yaml"
    conf.write_text(SMALL)
    run = work / "run"
    started = time.monotonic()
    done = cli("train", "--dataset", "synthetic", "--model", "youtube_dnn", "--config", conf, "--epochs", 1,
               "--history-length", HISTORY, "--out", run, "--quiet")
    if done.returncode != 0:
        raise RuntimeError(f"training the benchmark's model failed:\n{done.stdout}\n{done.stderr}")
    train_seconds = time.monotonic() - started
    base = work / "exports" / "recall"
    started = time.monotonic()
    done = cli("export", "--model-dir", run, "--export-dir-base", base, "--k", 10)
    if done.returncode != 0:
        raise RuntimeError(f"exporting the benchmark's model failed:\n{done.stdout}\n{done.stderr}")
    export_seconds = time.monotonic() - started
    from tfrec_recall import training
    from tfrec_recall.data.registry import split_from_args
    from tfrec_recall.features import feature_arrays
    loaded = training.load_run(str(run))
    split = split_from_args(loaded.dataset)
    features = feature_arrays(split.test.head(20), split.data, loaded.query_tower.serving_specs)
    numeric = sorted(k for k, v in features.items() if v.dtype.kind == "f")
    return {"conf": conf, "run": run, "base": base, "export_seconds": export_seconds, "train_seconds": train_seconds,
            "features": features,
            "numeric": numeric[0] if numeric else None, "version": base / "1"}


# ----------------------------------------------------------------------------------------------------------
# Judging answers

@dataclasses.dataclass
class Expect:
    """The clear answers to a request: an error with one of ``codes`` whose message matches ``pattern``, or,
    with ``answer``, a normal answer whose scores are finite."""
    codes: Sequence = ()
    pattern: str = ""
    answer: bool = False


def _finite_answer(response) -> bool:
    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    if "scores" not in outputs:
        return False
    ids, scores = outputs.get("item_ids"), outputs["scores"]
    real = scores if ids is None else scores[ids != b""]
    return bool(np.isfinite(real).all())


def judge_rpc(category: str, case: str, call: Callable, expect: Expect) -> Outcome:
    try:
        response = call()
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        clear = code in expect.codes and re.search(expect.pattern, details) is not None
        return Outcome(category, case, clear, f"{code.name}: {details[:160]}")
    except Exception as error:  # a client-side failure is a mishandled case, recorded with its type
        return Outcome(category, case, False, f"{type(error).__name__}: {str(error)[:160]}")
    if expect.answer and hasattr(response, "outputs"):
        finite = _finite_answer(response)
        return Outcome(category, case, finite, "OK, finite scores" if finite else "OK with non-finite scores")
    return Outcome(category, case, False, f"OK (an error was expected): {str(response)[:120]!r}")


# ----------------------------------------------------------------------------------------------------------
# gRPC: the bad-request catalogue

NOT_LOADABLE = "versions found not loadable (mid-copy or corrupt), from the server log"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
EXHAUSTED, UNIMPLEMENTED = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED


def predict_request(features: Dict, signature: str = "serving_default", name: str = "recall", **spec):
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    for key, value in features.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _with(request, edit: Callable):
    edit(request)
    return request


def _example(**features) -> bytes:
    example = tf.train.Example()
    for key, value in features.items():
        example.features.feature[key].bytes_list.value.append(value)
    return example.SerializeToString()


def _bad_predicts(f: Dict, num: str) -> List:
    """(case, request, expected) for Predict. ``f``: 20 good rows; ``num``: a numeric input."""
    two = {k: v[:2] for k, v in f.items()}
    width = f["history"].shape[1]
    swap = lambda key, value: {**two, key: value}  # noqa: E731
    nums = lambda value: swap(num, np.full(2, value, np.float32))  # noqa: E731
    declare = lambda key, dims: lambda r: [setattr(r.inputs[key].tensor_shape.dim[i], "size", d)  # noqa: E731
                                           for i, d in enumerate(dims)]
    one_string = lambda key, dims: lambda r: (r.inputs[key].ClearField("string_val"),  # noqa: E731
                                              r.inputs[key].string_val.append(b"x"), declare(key, dims)(r))
    excl = lambda value: predict_request({**two, "exclude_item_ids": value}, "serve_with_exclusions")  # noqa: E731
    named = lambda key: Expect((INVALID,), re.escape(repr(key)))  # noqa: E731
    return [
        ("unknown model name", predict_request(two, name="nope"), Expect((NOT_FOUND,), "'nope'")),
        ("empty model name", predict_request(two, name=""), Expect((INVALID, NOT_FOUND), "model")),
        ("unknown version", predict_request(two, version=99), Expect((NOT_FOUND,), "99")),
        ("unknown version label", predict_request(two, label="canary"), Expect((NOT_FOUND, INVALID), "canary")),
        ("unknown signature", predict_request(two, "no_such"), Expect((INVALID, NOT_FOUND), "no_such")),
        ("missing input", predict_request({k: v for k, v in two.items() if k != "history"}), named("history")),
        ("unknown input", predict_request(swap("shoe", np.array([1, 2]))), named("shoe")),
        ("history as floats", predict_request(swap("history", np.zeros((2, width), np.float32))), named("history")),
        ("numeric input as strings", predict_request(swap(num, np.array([b"a", b"b"], dtype=object))), named(num)),
        ("numeric input as float64", predict_request(swap(num, two[num].astype(np.float64))),
         Expect((INVALID,), re.escape(repr(num)), answer=True)),
        ("+inf numeric input", predict_request(nums(np.inf)), Expect((INVALID,), rf"'{num}'.*non-finite")),
        ("-inf numeric input", predict_request(nums(-np.inf)), Expect((INVALID,), rf"'{num}'.*non-finite")),
        ("3e38 numeric input (finite, overflows the model)", predict_request(nums(3e38)),
         Expect((INVALID,), r"non-finite values .* outside the range", answer=True)),
        ("1e38 numeric input", predict_request(nums(1e38)), Expect((INVALID,), r"non-finite", answer=True)),
        ("NaN numeric input (missing)", predict_request(nums(np.nan)), Expect(answer=True)),
        ("10^8 strings declared in 1 KB", _with(predict_request(two), one_string("history", [10 ** 8 // width, width])),
         Expect((INVALID,), rf"batch size {10 ** 8 // width} exceeds the server's max batch size 64")),
        ("2x10^7 exclusions declared", _with(excl(np.array([[b"x"]], dtype=object)),
                                             one_string("exclude_item_ids", [2, 10 ** 7])),
         Expect((EXHAUSTED,), r"exclude_item_ids.*over this server's limit")),
        ("negative dimension", _with(predict_request(two), declare("history", [-1])),
         Expect((INVALID,), r"'history'.*negative dimension")),
        ("unknown rank", _with(predict_request(two), lambda r: setattr(r.inputs["history"].tensor_shape,
                                                                        "unknown_rank", True)),
         Expect((INVALID,), r"'history'.*unknown rank")),
        ("fewer values than declared", _with(predict_request(two), lambda r: r.inputs["history"].string_val.pop()),
         Expect((INVALID,), rf"'history'.*declares {2 * width} values but the tensor holds {2 * width - 1}")),
        ("history of rank 1", predict_request(swap("history", two["history"][:, 0])), named("history")),
        ("history of rank 3", predict_request(swap("history", two["history"][:, :, None])), named("history")),
        ("history wider than the signature",
         predict_request(swap("history", np.concatenate([two["history"]] * 2, axis=1))), named("history")),
        ("inputs of different batch sizes", predict_request(swap("history", f["history"][:3])),
         Expect((INVALID,), r"batch|rows|size")),
        ("zero-row request", predict_request({k: v[:0] for k, v in two.items()}),
         Expect((INVALID,), r"rows|empty|batch", answer=True)),
        ("unknown output_filter", _with(predict_request(two), lambda r: r.output_filter.append("score")),
         Expect((INVALID,), r"output_filter: unknown output 'score'")),
        ("tensor_content of the wrong length",
         _with(predict_request(two), lambda r: setattr(r.inputs[num], "tensor_content", b"\0" * 7)), named(num)),
        ("DT_INVALID dtype", _with(predict_request(two), lambda r: setattr(r.inputs["history"], "dtype", 0)),
         named("history")),
        ("serve_examples: bytes that are no Example",
         predict_request({"examples": np.array([_example(), b"\xff junk"], dtype=object)}, "serve_examples"),
         Expect((INVALID,), r"inputs\['examples'\]\[1\]")),
        ("serve_examples: a string where a number is parsed",
         predict_request({"examples": np.array([_example(**{num: b"old"})], dtype=object)}, "serve_examples"),
         Expect((INVALID,), rf"inputs\['examples'\]\[0\].*{num}")),
        ("serve_examples: examples of rank 2",
         predict_request({"examples": np.array([[_example()]], dtype=object)}, "serve_examples"), named("examples")),
        ("exclusions of rank 1", excl(np.array([b"x", b"y"], dtype=object)), named("exclude_item_ids")),
        ("a 65 MB request (over the server's 64 MB message limit)", _with(predict_request(two), lambda r: r.inputs[
            "history"].string_val.__setitem__(0, b"x" * (65 << 20))), Expect((EXHAUSTED,), r"[Mm]essage|larger than")),
        ("a 100 KB id (unknown item)", _with(predict_request(two), lambda r: r.inputs["history"].string_val.__setitem__(
            0, b"y" * 100_000)), Expect(answer=True)),
    ]


def _bad_other_methods(stub, models) -> List:
    """(case, call, expected) for the methods beside Predict."""
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         inference_pb2, regression_pb2)

    def status(name, version=None):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return lambda: models.GetModelStatus(request, timeout=60)

    def metadata(name, field="signature_def"):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[field])
        request.model_spec.name = name
        return lambda: stub.GetModelMetadata(request, timeout=60)

    unimplemented = [(m, r) for m, r in (("Classify", classification_pb2.ClassificationRequest()),
                                         ("Regress", regression_pb2.RegressionRequest()),
                                         ("MultiInference", inference_pb2.MultiInferenceRequest()))]
    return [
        *[(f"{m}", (lambda m=m, r=r: getattr(stub, m)(r, timeout=60)), Expect((UNIMPLEMENTED,), f"{m} is not "
                                                                              "implemented.*use Predict"))
          for m, r in unimplemented],
        ("GetModelStatus of an unknown model", status("nope"), Expect((NOT_FOUND,), "'nope'")),
        ("GetModelStatus of an unknown version", status("recall", 99), Expect((NOT_FOUND,), "99")),
        ("GetModelMetadata of an unknown model", metadata("nope"), Expect((NOT_FOUND,), "'nope'")),
        ("GetModelMetadata of an unknown field", metadata("recall", "weights"),
         Expect((INVALID,), "weights")),
    ]


def grpc_category(server: Server, setup: Dict) -> List[Outcome]:
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    outcomes = [judge_rpc("grpc", case, lambda r=request: stub.Predict(r, timeout=60), expect)
                for case, request, expect in _bad_predicts(setup["features"], setup["numeric"])]
    outcomes += [judge_rpc("grpc", case, call, expect) for case, call, expect in _bad_other_methods(stub, models)]
    good = predict_request({k: v[:2] for k, v in setup["features"].items()})
    outcomes.append(judge_rpc("grpc", "a good request after the catalogue", lambda: stub.Predict(good, timeout=60),
                              Expect(answer=True)))
    channel.close()
    return outcomes


# ----------------------------------------------------------------------------------------------------------
# REST

def http(port: int, path: str, body=None, method: Optional[str] = None, raw: Optional[bytes] = None):
    """(status, parsed JSON body or the raw text) of one HTTP request."""
    import urllib.error
    import urllib.request
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@dataclasses.dataclass
class RawHttp:
    """A request sent as these bytes on a socket (what urllib would not send)."""
    data: bytes

    def send(self, port: int):
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(self.data)
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body or b"null")


def _length(answer: bytes) -> int:
    match = re.search(rb"Content-Length: (\d+)", answer, re.IGNORECASE)
    return int(match.group(1)) if match else 0


def _columns(features: Dict, rows: int = 2) -> Dict:
    return {k: (v[:rows].astype(str) if v.dtype == object else v[:rows]).tolist() for k, v in features.items()}


def _bad_rest(f: Dict, num: str) -> List:
    """(case, path, body or raw bytes, expected HTTP status, pattern the error must match)."""
    cols = _columns(f)
    predict = "/v1/models/recall:predict"
    rows = [{k: v[i] for k, v in cols.items()} for i in range(2)]
    return [
        ("unknown model", "/v1/models/nope:predict", {"inputs": cols}, 404, "'nope'"),
        ("unknown version", "/v1/models/recall/versions/99:predict", {"inputs": cols}, 404, "99"),
        ("unknown label (400, as TF Serving)", "/v1/models/recall/labels/canary:predict", {"inputs": cols}, 400,
         "canary"),
        ("GET on :predict", "/v1/models/recall:predict", RawHttp(b"GET /v1/models/recall:predict HTTP/1.1\r\n"
                                                             b"Host: x\r\n\r\n"), 404, "GET"),
        ("Content-Length of 10 GB declared, 2 bytes sent", predict, RawHttp(
            b"POST /v1/models/recall:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n{}"),
         413, "10000000000 bytes"),
        ("Content-Length that is no number", predict, RawHttp(
            b"POST /v1/models/recall:predict HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n{}"),
         411, "Content-Length"),
        ("unknown URL", "/v2/whatever", {"inputs": cols}, 404, "/v2/whatever"),
        ("body that is not JSON", predict, b"{not json", 400, "JSON"),
        ("JSON body that is not an object", predict, b"[1, 2]", 400, "object"),
        ("both instances and inputs", predict, {"instances": rows, "inputs": cols}, 400, '"instances".*"inputs"'),
        ("neither instances nor inputs", predict, {"signature_name": "serving_default"}, 400, '"instances"'),
        ("ragged rows", predict, {"inputs": {**cols, "history": [["a", "b"], ["c"]]}}, 400, r"'history'.*ragged"),
        ("1e39 (inf in float32)", predict, {"inputs": {**cols, num: [1e39, 1.0]}}, 400, rf"'{num}'.*non-finite"),
        ("unknown input", predict, {"inputs": {**cols, "shoe": [1, 2]}}, 400, "'shoe'"),
        ("missing input", predict, {"inputs": {k: v for k, v in cols.items() if k != "history"}}, 400, "'history'"),
        ("string in a numeric input", predict, {"inputs": {**cols, num: ["a", "b"]}}, 400, f"'{num}'"),
        ("unknown signature", predict, {"signature_name": "no_such", "inputs": cols}, 400, "no_such"),
        ("a row missing an input", predict, {"instances": [rows[0], {"history": rows[1]["history"]}]}, 400,
         r"instances\[1\]|'" + num + "'|missing"),
        ("more rows than the max batch size", predict,
         {"inputs": {k: v * 40 for k, v in cols.items()}}, 400, "max batch size 64"),
    ]


def rest_category(server: Server, setup: Dict) -> List[Outcome]:
    outcomes = []
    for case, path, body, expected, pattern in _bad_rest(setup["features"], setup["numeric"]):
        raw = body if isinstance(body, bytes) else None
        try:
            status, answer = (body.send(server.rest_port) if isinstance(body, RawHttp)
                              else http(server.rest_port, path, None if raw else body, raw=raw))
        except Exception as error:  # no HTTP answer at all
            outcomes.append(Outcome("rest", case, False, f"{type(error).__name__}: {error}"))
            continue
        message = answer.get("error", "") if isinstance(answer, dict) else ""
        clear = status == expected and re.search(pattern, message) is not None
        outcomes.append(Outcome("rest", case, clear, f"HTTP {status}: {str(answer)[:160]}"))
    status, answer = http(server.rest_port, "/v1/models/recall:predict", {"inputs": _columns(setup["features"])})
    outcomes.append(Outcome("rest", "a good request after the catalogue", status == 200 and "outputs" in answer,
                            f"HTTP {status}"))
    return outcomes


# ----------------------------------------------------------------------------------------------------------
# CLI and input files

def _files(d: Path) -> Dict[str, Path]:
    """Bad input files, written once into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    texts = {
        "empty.csv": "",
        "no_item.csv": "user_id,timestamp\nu1,5\n",
        "nul.csv": "user_id,item_id,timestamp\nu1,i1,5\nu1,i\x002,6\n",
        "huge_ts.csv": "user_id,item_id,timestamp\nu1,i1,5\nu1,i2,1e30\n",
        "bad_ts.csv": "user_id,item_id,timestamp\nu1,i1,5\nu1,i2,yesterday\n",
        "one_user.csv": "user_id,item_id,timestamp\n" + "".join(f"u1,i{j},{j}\n" for j in range(10)),
        "short.csv": "user_id,item_id,timestamp\n" + "".join(f"u{u},i{j},{j}\n" for u in range(5) for j in range(2)),
        "renamed.csv": "uid,iid,ts\n" + "".join(f"u{u},i{j},{j}\n" for u in range(5) for j in range(5)),
        "unknown_key.yaml": "embeding_dim: 16\n",
        "negative.yaml": "dat: true\ndat_query_weight: -1.0\n",
        "broken.yaml": "embedding_dim: [16\n",
        "features.json": '{"history": [["i1"]]',
    }
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "broken.parquet").write_bytes(b"not a parquet file at all")
    (d / "not_empty").mkdir(exist_ok=True)
    (d / "not_empty" / "file").write_text("x")
    return {name.replace(".", "_"): d / name for name in [*texts, "broken.parquet", "not_empty"]}


def _bad_commands(files: Dict[str, Path], run: Path, work: Path, dead_port: int) -> List:
    """(case, argv, pattern the one stderr line must match)."""
    out = work / "cli-out"
    csv = lambda name, *extra: ["train", "--dataset", "csv", "--data-dir", files[name], *extra,  # noqa: E731
                                "--out", out]
    return [
        ("data file not found", ["train", "--dataset", "csv", "--data-dir", work / "absent.csv", "--out", out],
         r"absent\.csv.*not found"),
        ("empty CSV", csv("empty_csv"), r"empty\.csv.*empty"),
        ("CSV without an item_id column", csv("no_item_csv"), r"no_item\.csv.*item_id"),
        ("NUL byte in an id", csv("nul_csv"), r"nul\.csv, line 3.*NUL"),
        ("timestamp 1e30", csv("huge_ts_csv"), r"huge_ts\.csv, line 3.*'timestamp'.*int64"),
        ("timestamp that is no number", csv("bad_ts_csv"), r"bad_ts\.csv, line 3.*'timestamp'"),
        ("one user", csv("one_user_csv"), r"1 user.*at least 2"),
        ("only short histories", csv("short_csv"), r"at least 3 interactions"),
        ("broken Parquet", ["train", "--dataset", "csv", "--data-dir", files["broken_parquet"], "--out", out],
         r"broken\.parquet.*Parquet"),
        ("--column-map field that is no schema field",
         csv("renamed_csv", "--column-map", "usr_id=uid,item_id=iid,timestamp=ts"), r"'usr_id'"),
        ("--column-map column that is not in the file",
         csv("renamed_csv", "--column-map", "user_id=user,item_id=iid,timestamp=ts"), r"'user'"),
        ("unknown configuration key (YAML)", ["train", "--config", files["unknown_key_yaml"], "--out", out],
         r"embeding_dim"),
        ("negative loss weight (YAML)", ["train", "--config", files["negative_yaml"], "--out", out],
         r"dat_query_weight.*-1"),
        ("malformed YAML", ["train", "--config", files["broken_yaml"], "--out", out], r"broken\.yaml"),
        ("configuration file not found", ["train", "--config", work / "absent.yaml", "--out", out], r"absent\.yaml"),
        ("--set of an unknown key", ["train", "--set", "embedding_dims=8", "--out", out], r"embedding_dims"),
        ("--set without =", ["train", "--set", "epochs", "--out", out], r"--set.*epochs"),
        ("category alignment without a category feature", csv("renamed_csv", "--column-map",
                                                               "user_id=uid,item_id=iid,timestamp=ts", "--set",
                                                               "dat=true", "--set", "category_alignment_weight=1"),
         r"category"),
        ("--history-length 0", ["train", "--history-length", 0, "--out", out], r"--history-length.*0"),
        ("--epochs 0", ["train", "--epochs", 0, "--out", out], r"--epochs.*0"),
        ("--out is a non-empty directory", ["train", "--out", files["not_empty"]], r"--out.*not_empty"),
        ("unknown --model preset", ["train", "--model", "dssm2", "--out", out], r"--model.*dssm2"),
        ("evaluate: --model-dir that is no run", ["evaluate", "--model-dir", work], r"--model-dir.*config\.yaml"),
        ("recommend: unknown user", ["recommend", "--model-dir", run, "--user-id", "nobody"], r"'nobody'"),
        ("recommend: --k 0", ["recommend", "--model-dir", run, "--user-id", "u0", "--k", 0], r"--k.*0"),
        ("export: --k beyond the corpus", ["export", "--model-dir", run, "--export-dir-base", work / "x",
                                           "--k", 10 ** 6], r"--k \(1000000\)"),
        ("export: unknown index", ["export", "--model-dir", run, "--export-dir-base", work / "x", "--index",
                                   "hnsw"], r"hnsw"),
        ("serve: --port 70000", ["serve", "--model-dir", work, "--model-name", "m", "--port", 70000],
         r"--port.*70000"),
        ("serve: --poll-seconds 0", ["serve", "--model-dir", work, "--model-name", "m", "--poll-seconds", 0],
         r"--poll-seconds.*0"),
        ("serve: --max-batch-size 0", ["serve", "--model-dir", work, "--model-name", "m", "--max-batch-size", 0],
         r"--max-batch-size.*0"),
        ("query: unreachable server", ["query", "--server", f"127.0.0.1:{dead_port}", "--model", "recall",
                                       "--features", '{"history": [["i1"]]}', "--timeout", 2],
         rf"cannot reach .*127\.0\.0\.1:{dead_port}"),
        ("query: --features that is not JSON", ["query", "--server", f"127.0.0.1:{dead_port}", "--model", "recall",
                                                "--features", files["features_json"].read_text()],
         r"--features.*JSON"),
    ]


def judge_command(case: str, argv: Sequence, pattern: str) -> Outcome:
    try:
        done = cli(*argv, timeout=600)
    except subprocess.TimeoutExpired:
        return Outcome("cli", case, False, "no answer within 600 s")
    lines = done.stderr.strip().splitlines()
    one_line = len(lines) == 1 and "Traceback" not in done.stderr
    clear = done.returncode == 2 and one_line and re.search(pattern, lines[0]) is not None
    detail = f"exit {done.returncode}: " + (lines[0][:200] if one_line else f"{len(lines)} stderr lines: "
                                             f"{' | '.join(lines[-3:])[:200]}")
    return Outcome("cli", case, clear, detail)


def cli_category(setup: Dict, work: Path) -> List[Outcome]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens there once the socket is closed
    commands = _bad_commands(_files(work / "inputs"), setup["run"], work, dead_port)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda c: judge_command(*c), commands))


# ----------------------------------------------------------------------------------------------------------
# Load with hot reloads, corrupt and deleted versions

class Load:
    """``threads`` clients sending good 5-row requests (no version: the newest) until stopped; every answer's
    version and every failure recorded with its time."""

    def __init__(self, port: int, features: Dict, threads: int):
        from tensorflow_serving.apis import prediction_service_pb2_grpc
        self.stop_event, self.lock = threading.Event(), threading.Lock()
        self.answers: List[tuple] = []  # (time, version)
        self.failures: List[tuple] = []  # (time, code, details)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.requests = [predict_request({k: v[i:i + 5] for k, v in features.items()}) for i in range(0, 20, 5)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        while not self.stop_event.is_set():
            request = self.requests[i % len(self.requests)]
            i += 1
            try:
                response = self.stub.Predict(request, timeout=60)
                entry, target = (time.monotonic(), response.model_spec.version.value), self.answers
            except grpc.RpcError as error:
                entry, target = (time.monotonic(), error.code().name, error.details()), self.failures
            with self.lock:
                target.append(entry)

    def versions_since(self, start: float) -> List[int]:
        with self.lock:
            return [v for t, v in self.answers if t >= start]

    def failures_since(self, start: float) -> List[tuple]:
        with self.lock:
            return [f for f in self.failures if f[0] >= start]

    def finish(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=120)


def _copy_slowly(source: Path, target: Path, pause: float) -> None:
    """A version published the way `cp -r` or gsutil would: file by file, visible to the watcher mid-copy. The
    graph (saved_model.pb, what marks a version directory) comes first and the weights ``8 * pause`` later, so
    that the watcher tries the version while it is incomplete."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name != "saved_model.pb"):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        time.sleep(pause * (8 if path.name == "saved_model.pb" else 1))


def _corrupt(source: Path, target: Path, how: str) -> None:
    shutil.copytree(source, target)
    if how == "saved_model.pb":
        (target / "saved_model.pb").write_bytes(os.urandom(512))
    else:  # the weights cut short
        data = next((target / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])


def _wait_for(load: Load, start: float, wanted: int, timeout: float) -> bool:
    """Whether answers from version ``wanted`` (and only it, for 1 s) arrive within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        recent = load.versions_since(time.monotonic() - 1.0)
        if recent and set(recent) == {wanted}:
            return True
    return False


def _events(source: Path, base: Path, pause: float) -> List:
    """(case, action, the version then served). Version 1 is served at the start."""
    return [
        ("publish version 2 file by file", lambda: _copy_slowly(source, base / "2", pause), 2),
        ("corrupt version 3 (saved_model.pb garbage)", lambda: _corrupt(source, base / "3", "saved_model.pb"), 2),
        ("corrupt version 4 (weights cut short)", lambda: _corrupt(source, base / "4", "weights"), 2),
        ("publish version 5 file by file", lambda: _copy_slowly(source, base / "5", pause), 5),
        ("delete the served version 5", lambda: shutil.rmtree(base / "5"), 2),
        ("delete corrupt versions 3 and 4", lambda: [shutil.rmtree(base / v) for v in ("3", "4")], 2),
        ("publish version 6 file by file", lambda: _copy_slowly(source, base / "6", pause), 6),
        ("delete the old versions 1 and 2", lambda: [shutil.rmtree(base / v) for v in ("1", "2")], 6),
        ("publish version 7 while 6 is served", lambda: _copy_slowly(source, base / "7", pause), 7),
    ]


def load_category(setup: Dict, work: Path, seconds: float, threads: int) -> (List[Outcome], Dict):
    base = work / "load" / "recall"
    shutil.copytree(setup["version"], base / "1")
    server = Server(base, poll_seconds=0.2)
    load = Load(server.port, setup["features"], threads)
    started, outcomes = time.monotonic(), []
    events = _events(setup["version"], base, pause=0.3)
    dwell = max(2.0, seconds / len(events))  # each event's window: the server settles, the load goes on
    for case, action, served in events:
        start = time.monotonic()
        action()
        reached = _wait_for(load, start, served, timeout=120)
        time.sleep(max(0.0, dwell - (time.monotonic() - start)))
        lost = load.failures_since(start)
        detail = (f"version {served} served" if reached else f"version {served} never served alone") + (
            f"; {len(lost)} failed requests, first: {lost[0][1]} {lost[0][2][:120]}" if lost else "; 0 failed")
        outcomes.append(Outcome("load", case, reached and not lost, detail))
    load.finish()
    alive = server.alive
    server.stop()
    versions = sorted(set(v for _, v in load.answers))
    stats = {"seconds": round(time.monotonic() - started, 1), "threads": threads, "answered": len(load.answers),
             "lost": len(load.failures), "versions answered": versions, "server alive": alive,
             "answered by a corrupt version": sum(1 for _, v in load.answers if v in (3, 4)),
             NOT_LOADABLE: sorted({int(m) for line in server.lines
                                   for m in re.findall(r"version (\d+) is not loadable", line)})}
    outcomes.append(Outcome("load", f"{len(load.answers) + len(load.failures)} requests from {threads} threads",
                            not load.failures and alive and not stats["answered by a corrupt version"],
                            f"{len(load.failures)} lost; versions answered {versions}; server alive: {alive}"))
    return outcomes, stats


# ----------------------------------------------------------------------------------------------------------
# kill -9 during export and training

def _kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``process`` after ``seconds``; whether it was still running then."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _loadable(version: Path) -> Optional[str]:
    """None when the version loads and answers its manifest; else why not."""
    try:
        json.loads((version / "assets" / "manifest.json").read_text())
        tf.saved_model.load(str(version)).signatures["serving_default"]
        return None
    except Exception as error:  # any failure to load is what this check reports
        return f"{type(error).__name__}: {str(error)[:120]}"


def _writing(base: Path, pid: int) -> bool:
    """Whether export process ``pid``'s temporary version directory (``.tmp-VERSION-PID``) is in ``base``."""
    return base.exists() and any(re.fullmatch(rf"\.tmp-\d+-{pid}", p.name) for p in base.iterdir())


def export_kill_category(setup: Dict, work: Path, kills: int, rng: random.Random) -> (List[Outcome], Dict):
    base = work / "export-kills" / "recall"
    args = ["export", "--model-dir", setup["run"], "--export-dir-base", base, "--k", 10]
    outcomes, mid_export, mid_write = [], 0, 0
    for i in range(kills):  # every other kill at a random moment; the others while the version is being written
        process = start_cli(*args)
        if i % 2:
            while process.poll() is None and not _writing(base, process.pid):
                time.sleep(0.01)
            delay = rng.uniform(0.0, 1.5)
        else:
            delay = rng.uniform(0.1, 1.0) * setup["export_seconds"]
        killed = _kill_after(process, delay)
        mid_export += killed
        mid_write += killed and _writing(base, process.pid)
    versions = sorted(p for p in base.iterdir() if p.name.isdigit()) if base.exists() else []
    killed_temporaries = sorted(p.name for p in base.iterdir() if p.name.startswith(".")) if base.exists() else []
    for version in versions:
        why = _loadable(version)
        outcomes.append(Outcome("export-kill", f"version {version.name} left by the killed exports", why is None,
                                why or "complete: loads and answers"))
    done = cli(*args)
    left = sorted(p.name for p in base.iterdir() if p.name.startswith("."))
    newest = max((p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), default=None)
    why = _loadable(newest) if done.returncode == 0 and newest else f"exit {done.returncode}: {done.stderr[-200:]}"
    outcomes.append(Outcome("export-kill", "the next export after the kills", why is None and not left,
                            (why or f"version {newest.name} complete") + f"; temporaries left: {left or 'none'}"))
    stats = {"kills": kills, "killed mid-export": mid_export, "killed while writing a version": mid_write,
             "versions left": len(versions),
             "partial versions": sum(1 for o in outcomes[:-1] if not o.clear),
             "temporaries left by the kills": killed_temporaries, "temporaries after the next export": left}
    return outcomes, stats


def _train_args(setup: Dict, out: Path, epochs: int) -> List:
    return ["train", "--dataset", "synthetic", "--model", "youtube_dnn", "--config", setup["conf"], "--epochs",
            epochs, "--history-length", HISTORY, "--out", out, "--quiet"]


def _kill_at_epoch(process: subprocess.Popen, resume_dir: Path, epochs_done: int, extra: float) -> Optional[int]:
    """SIGKILL ``process`` ``extra`` seconds after its ``epochs_done``-th epoch state is written (0: after its
    training starts); the epochs saved at the kill, or None when the run ended first."""
    from tfrec_recall.training import latest_state

    def done() -> int:
        state = latest_state(str(resume_dir)) if resume_dir.exists() else None
        return json.loads((Path(state) / "state.json").read_text())["epochs_done"] if state else 0
    while process.poll() is None and not (resume_dir.exists() and done() >= epochs_done):
        time.sleep(0.05)
    if not _kill_after(process, extra):
        return None
    return done()


def train_kill_category(setup: Dict, work: Path, targets: Sequence[int], rng: random.Random) -> (List[Outcome], Dict):
    """Each trial: a 3-epoch run SIGKILLed a random 0-3 s after its target epoch's state is written (0: after
    training starts; 3: while the run is saved), then the same command, which must resume from the last finished
    epoch (or start over when none finished) and save the whole run, leaving nothing behind."""
    outcomes, resumed = [], 0
    for trial, target in enumerate(targets):
        out = work / "train-kills" / f"run{trial}"
        out.parent.mkdir(parents=True, exist_ok=True)
        extra = rng.uniform(0.0, 3.0)
        saved = _kill_at_epoch(start_cli(*_train_args(setup, out, 3)), out.with_name(f".{out.name}.resume"),
                               target, extra)
        done = cli(*_train_args(setup, out, 3))
        said_resume = "resuming the interrupted run" in done.stdout
        resumed += said_resume
        history = json.loads((out / "history.json").read_text())["loss"] if done.returncode == 0 else []
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
        clear = (saved is not None and done.returncode == 0 and len(history) == 3
                 and said_resume == (saved > 0) and not leftovers)
        case = (f"killed {extra:.1f} s after " + ("training started" if target == 0 else f"epoch {target}'s state")
                + ("" if saved is not None else " (the run ended first)"))
        outcomes.append(Outcome("train-kill", case, clear, f"epochs saved at the kill: {saved}; then exit "
                                f"{done.returncode}, resumed: {said_resume}, epochs in history: {len(history)}, "
                                f"left behind: {leftovers or 'nothing'}" + (f"; {done.stderr.strip()[-200:]}"
                                                                            if done.returncode else "")))
    return outcomes, {"trials": len(targets), "resumed from a saved epoch": resumed}


# ----------------------------------------------------------------------------------------------------------
# Report

CATEGORIES = {"grpc": "bad gRPC requests (PredictionService, ModelService)",
              "rest": "bad REST requests (TF Serving's /v1/models API)",
              "cli": "bad command lines and input files (one `tfrec-recall` process each)",
              "load": "load with hot reloads, mid-copy, corrupt and deleted versions",
              "export-kill": "kill -9 during `tfrec-recall export`",
              "train-kill": "kill -9 during `tfrec-recall train`, then the same command"}


def summary(outcomes: List[Outcome]) -> Dict[str, Dict[str, int]]:
    table = {}
    for category in CATEGORIES:
        mine = [o for o in outcomes if o.category == category]
        table[category] = {"tried": len(mine), "clear": sum(o.clear for o in mine),
                           "mishandled": sum(not o.clear for o in mine)}
    return table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(path: Path, outcomes: List[Outcome], stats: Dict, command: str) -> None:
    table = summary(outcomes)
    lines = ["# Reliability", "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, "
             f"{stats['seconds']:.0f} s on this 2-core machine).", "",
             "A case is clear when it is answered with the expected status (gRPC code, HTTP code, exit code 2) and "
             "a message naming the input, field, flag or file at fault (CLI: one stderr line, no traceback), or, "
             "for load and kills, when no request is lost and nothing is half-written. Everything else is "
             "mishandled.", "", "| category | tried | clear | mishandled |", "|---|---|---|---|"]
    lines += [f"| {CATEGORIES[c]} | {t['tried']} | {t['clear']} | {t['mishandled']} |" for c, t in table.items()]
    total = {k: sum(t[k] for t in table.values()) for k in ("tried", "clear", "mishandled")}
    lines += [f"| **all** | {total['tried']} | {total['clear']} | {total['mishandled']} |", ""]
    load, kills = stats["load"], stats["export-kill"]
    lines += [f"Load: {load['answered']:,} requests answered and {load['lost']} lost in {load['seconds']} s from "
              f"{load['threads']} threads while versions were published, corrupted and deleted (versions answered: "
              f"{load['versions answered']}; answers from a corrupt version: {load['answered by a corrupt version']}; "
              f"versions the server found not loadable, mid-copy or corrupt, and retried: "
              f"{load[NOT_LOADABLE]})."
              f" Exports: {kills['kills']} SIGKILLs ({kills['killed mid-export']} mid-export, "
              f"{kills['killed while writing a version']} while a version was being written), "
              f"{kills['partial versions']} partial versions of {kills['versions left']} left. Training: "
              f"{stats['train-kill']['trials']} SIGKILLed runs, {stats['train-kill']['resumed from a saved epoch']} "
              f"resumed from a saved epoch, the others started over.", ""]
    for category in CATEGORIES:
        lines += [f"## {CATEGORIES[category]}", "", "| case | clear | answer |", "|---|---|---|"]
        lines += [f"| {_cell(o.case)} | {'yes' if o.clear else '**no**'} | {_cell(o.detail)} |"
                  for o in outcomes if o.category == category]
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"command": command, "summary": table, "stats": stats,
                                                     "cases": [dataclasses.asdict(o) for o in outcomes]}, indent=2))


def run_all(work: Path, quick: bool, seed: int = 0) -> (List[Outcome], Dict):
    rng = random.Random(seed)
    started = time.monotonic()
    setup = prepare(work)
    server = Server(setup["base"])
    try:
        outcomes = grpc_category(server, setup) + rest_category(server, setup)
        alive = server.alive
    finally:
        server.stop()
    outcomes.append(Outcome("grpc", "the server is still running after both catalogues", alive, str(alive)))
    outcomes += cli_category(setup, work)
    load, load_stats = load_category(setup, work, seconds=20 if quick else 90, threads=4 if quick else 16)
    kills, kill_stats = export_kill_category(setup, work, kills=3 if quick else 12, rng=rng)
    trains, train_stats = train_kill_category(setup, work, targets=(1,) if quick else (0, 1, 2, 3), rng=rng)
    stats = {"seconds": time.monotonic() - started, "load": load_stats, "export-kill": kill_stats,
             "train-kill": train_stats}
    return outcomes + load + kills + trains, stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 20 s load with 4 threads, 3 export kills, 1 "
                                                            "training kill (for the test suite)")
    parser.add_argument("--work-dir", help="where the runs, exports and inputs go (default: a temporary "
                                           "directory, removed afterwards)")
    parser.add_argument("--out", default=str(HERE / "results" / "reliability"), help="report path, no suffix")
    args = parser.parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="tfrec-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        outcomes, stats = run_all(work, args.quick)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    command = "benchmarks/reliability.py" + (" --quick" if args.quick else "")
    write_report(Path(args.out), outcomes, stats, command)
    for category, row in summary(outcomes).items():
        print(f"{category:12s} tried {row['tried']:3d}  clear {row['clear']:3d}  mishandled {row['mishandled']:3d}")
    for outcome in outcomes:
        if not outcome.clear:
            print(f"MISHANDLED {outcome.category}: {outcome.case}: {outcome.detail}")
    return 0 if all(o.clear for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
