"""The ``tfrec-recall`` command line: ``train``, ``evaluate``, ``recommend``, ``export``, ``serve``, ``query``."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import warnings
from typing import List, Optional

from tfrec_recall import storage
from tfrec_recall._atomic import exclusive_lock, remove_stale_temporaries
from tfrec_recall.config import DEFAULT_PRESET, PRESETS, ConfigError, load_config
from tfrec_recall.data.registry import DATASETS, SPLITS, load_dataset, make_split, parse_column_map, split_from_args
from tfrec_recall.data.schema import DataError


VERBOSE = "--verbose"
# Flags of `train` that override a configuration key.
TRAIN_FLAGS = {"--epochs": "epochs", "--learning-rate": "learning_rate", "--patience": "patience"}


class IndexChoices:
    """The registered index names (``tfrec_recall.retrievers.index_names()``) as argparse ``choices``: looked up
    only when an ``--index`` value is checked or help is printed, so building a parser imports no TensorFlow.
    Give the option a ``metavar`` (argparse lists choices in the usage otherwise)."""

    def __init__(self, deep_retrieval: bool = False):
        self.deep_retrieval = deep_retrieval  # also offer a Deep Retrieval run's own beam-search index

    def names(self):
        from tfrec_recall.export.run_index import DEEP_RETRIEVAL
        from tfrec_recall.retrievers import index_names  # imports TensorFlow
        return tuple(index_names()) + ((DEEP_RETRIEVAL,) if self.deep_retrieval else ())

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __iter__(self):
        return iter(self.names())

    def __repr__(self) -> str:
        return f"IndexChoices({list(self.names())})"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, naming the option and the value
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tfrec-recall", description="Train, evaluate and query retrieval models.")
    parser.add_argument(VERBOSE, action="store_true", help="also show TensorFlow's and other libraries' "
                                                           "start-up and runtime messages (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model, evaluate it on the protocol and save it")
    train.add_argument("--dataset", choices=DATASETS, default="synthetic")
    train.add_argument("--data-dir", help="dataset directory (MovieLens) or file (csv / parquet)")
    train.add_argument("--column-map", help="for csv/parquet: FIELD=COLUMN,... (fields user_id, item_id, "
                                            "timestamp, weight)")
    train.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")
    train.add_argument("--split", choices=SPLITS, default="leave_last_out")
    train.add_argument("--history-length", type=int,
                       help="behaviours in each history (default: the configuration's history_length, 50)")
    train.add_argument("--model", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    train.add_argument("--config", help="YAML file overriding the preset's configuration keys")
    train.add_argument("--epochs", type=int, help="override the configuration's epochs (the most trained)")
    train.add_argument("--learning-rate", type=float, help="override the configuration's learning_rate")
    train.add_argument("--patience", type=int, help="epochs without validation improvement before stopping "
                                                    "(the best epoch is kept); 0 trains every epoch")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                       help="override one configuration key (a YAML value), e.g. --set dat=true --set "
                            "category_alignment_weight=100 --set parallel_branches=[cross,fm]; repeatable, "
                            "applied after --config and the flags")
    train.add_argument("--out", required=True, help="output directory (must be new or empty)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--multi-worker", action="store_true",
                       help="one worker of a MultiWorkerMirroredStrategy job described by the TF_CONFIG environment "
                            "variable: run the same command on every worker (--out on storage they share); the "
                            "chief alone takes the run's lock and writes --out")

    evaluate = sub.add_parser("evaluate", help="evaluate a saved model on the protocol")
    evaluate.add_argument("--model-dir", required=True)
    evaluate.add_argument("--data-dir", help="override the dataset location saved with the model")
    evaluate.add_argument("--on", choices=("test", "valid"), default="test", help="which split rows to rank")
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")

    recommend = sub.add_parser("recommend", help="top-k items for users of the training data")
    recommend.add_argument("--model-dir", required=True)
    recommend.add_argument("--user-id", action="append", required=True, help="repeat for several users")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--data-dir", help="override the dataset location saved with the model")

    export = sub.add_parser("export", help="export a trained model with a top-k index for TF Serving")
    export.add_argument("--model-dir", required=True)
    export.add_argument("--index", choices=IndexChoices(deep_retrieval=True), default=None, metavar="INDEX",
                        help="index type: %(choices)s (default: deep_retrieval for a run trained with "
                             "deep_retrieval: true, brute_force otherwise)")
    export.add_argument("--beam-width", type=int, default=None,
                        help="deep_retrieval: paths searched per query (default: the run's dr_beam_width)")
    export.add_argument("--export-dir-base", required=True, help="TF Serving model base path (versions inside)")
    export.add_argument("--k", type=int, default=100)
    export.add_argument("--storage-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="brute force candidate storage")
    export.add_argument("--ivf-lists", type=int, default=None, help="IVF lists (default: 2 sqrt(n))")
    export.add_argument("--ivf-probes", type=int, default=None, help="IVF lists probed (default: 1 %% of lists, >= 12)")
    export.add_argument("--scann-leaves", type=int, default=None)
    export.add_argument("--scann-leaves-to-search", type=int, default=None)
    export.add_argument("--data-dir", help="override the dataset location saved with the model")

    serve = sub.add_parser("serve", help="local gRPC server with TF Serving's API over an export directory or a "
                                          "TF Serving model config file")
    serve.add_argument("--model-dir", help="the export base path (version directories inside); serves the newest")
    serve.add_argument("--model-name", help="the model's name in requests (with --model-dir)")
    serve.add_argument("--model-config-file",
                       help="a TF Serving model config (e.g. serving/models.config): its models, version policies "
                            "and version labels; relative base_path from the file's directory. Instead of "
                            "--model-dir/--model-name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8500, help="0 picks a free port (printed)")
    serve.add_argument("--poll-seconds", type=float, default=2.0)
    serve.add_argument("--max-batch-size", type=int, default=1024)
    serve.add_argument("--workers", type=int, default=8)
    serve.add_argument("--rest-port", type=int, default=None,
                       help="also answer TF Serving's REST API (/v1/models/NAME:predict, status, metadata) on this "
                            "port of --host")
    serve.add_argument("--max-request-values", type=int, default=None,
                       help="the most values one request may declare over its inputs (default: --max-batch-size "
                            "rows of the signature's inputs); larger requests get RESOURCE_EXHAUSTED")

    query = sub.add_parser("query", help="query a served model over gRPC")
    query.add_argument("--server", required=True, help="HOST:PORT")
    query.add_argument("--model", required=True)
    query.add_argument("--features", required=True,
                       help='JSON object of input name -> list (one entry per query), e.g. '
                            '\'{"history": [["i1", "i2"]], "segment": ["s3"]}\'; short lists are padded, '
                            'missing inputs filled with "" / NaN')
    query.add_argument("--timeout", type=float, default=5.0)
    # Commands contributed by other installed packages (e.g. ``pipeline`` from pipelines/): the entry point
    # group "tfrec_recall.commands" names functions that add their subparsers and set ``handler``.
    from importlib.metadata import entry_points
    for entry in sorted(entry_points(group="tfrec_recall.commands"), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def parse_settings(settings) -> dict:
    """``--set KEY=VALUE`` arguments as configuration overrides, each value parsed as YAML (``true``, ``100``,
    ``[cross, fm]``, ``null``)."""
    import yaml
    out = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set must be KEY=VALUE, got {setting!r}")
        if key.strip() == "history_length":  # the split is built with it too
            raise ConfigError("--set history_length: use --history-length (the split's histories use it too)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key.strip()}: {value!r} is not a YAML value") from None
    return out


def _print_metrics(metrics, title: str) -> None:
    print(title)
    keys = [k for k in metrics if k != "users"]
    print("  " + "  ".join(f"{k}={metrics[k]:.4f}" for k in keys) + f"  (users={metrics.get('users')})")


def _multi_worker_strategy():
    """The MultiWorkerMirroredStrategy of TF_CONFIG (created before TensorFlow runs an op in this process)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "null")
    except json.JSONDecodeError as error:
        raise ConfigError(f"--multi-worker: TF_CONFIG is not JSON ({error})") from None
    if not isinstance(cluster, dict) or "cluster" not in cluster or "task" not in cluster:
        raise ConfigError("--multi-worker needs the TF_CONFIG environment variable: {\"cluster\": {\"worker\": "
                          "[HOST:PORT, ...]}, \"task\": {\"type\": \"worker\", \"index\": I}}, got "
                          f"{os.environ.get('TF_CONFIG')!r}")
    from tfrec_recall.training.multi_worker import make_strategy
    return make_strategy()


def _is_chief(strategy) -> bool:
    from tfrec_recall.training.multi_worker import is_chief
    return is_chief(strategy)


def _train(args) -> int:
    if args.history_length is not None and args.history_length < 1:
        raise ConfigError(f"--history-length must be >= 1, got {args.history_length}")
    overrides = {} if args.history_length is None else {"history_length": args.history_length}
    overrides.update({key: getattr(args, key) for key in TRAIN_FLAGS.values() if getattr(args, key) is not None})
    settings = parse_settings(args.settings)
    overrides.update(settings)
    try:
        config = load_config(args.model, args.config, overrides)
    except ConfigError as error:  # name the flag the user typed, not only the configuration key
        flags = [flag for flag, key in TRAIN_FLAGS.items()
                 if getattr(args, key) is not None and key not in settings and f"'{key}'" in str(error)]
        raise ConfigError(f"{flags[0]}: {error}" if flags else str(error)) from None
    out = storage.path_str(args.out).rstrip("/")
    if storage.exists(out) and not storage.is_empty_dir(out):
        raise ConfigError(f"--out {args.out!r} exists and is not an empty directory")
    strategy = _multi_worker_strategy() if args.multi_worker else None
    chief = strategy is None or _is_chief(strategy)
    if chief:  # A killed run to the same --out left temporary siblings (the model being saved, the logs)
        remove_stale_temporaries(storage.parent(out), rf"\.{re.escape(storage.name(out))}\.(tmp|logs)-(?P<pid>\d+)")
    dataset_args = {"name": args.dataset, "data_dir": _absolute(args.data_dir) if args.data_dir else None,
                    "on_bad_rows": args.on_bad_rows, "column_map": parse_column_map(args.column_map),
                    "split": args.split, "history_length": config.history_length, "seed": config.seed}
    data = load_dataset(args.dataset, dataset_args["data_dir"], on_bad_rows=args.on_bad_rows,
                        column_map=dataset_args["column_map"])
    print(data.summary())
    if data.skipped_rows:
        print(f"skipped {data.skipped_rows} malformed rows (--on-bad-rows skip)")
    split = make_split(data, args.split, config.history_length, config.seed)
    print(split.describe())
    from tfrec_recall import training  # imports TensorFlow: after the cheap checks
    # The state at every epoch's end, so that a killed run resumes: the same command goes on from there. The
    # TensorBoard logs are kept with it; save_run moves them into the run as <out>/logs.
    resume_dir = storage.makedirs(storage.join(storage.parent(out), f".{storage.name(out)}.resume"))
    log_dir = storage.join(resume_dir, "logs")
    # Only the chief locks: the other workers of a multi-worker job read the same resume state, and write nothing
    # there (their copies go to temporaries; tfrec_recall.training.multi_worker).
    with exclusive_lock(resume_dir, "training run") if chief else contextlib.nullcontext():
        done = training.latest_state(resume_dir)
        if done is not None:
            print(f"resuming the interrupted run from {done} (delete {resume_dir} to start over)")
        result = training.train(config, split, verbose=0 if args.quiet else 1, log_dir=log_dir,
                                resume_dir=resume_dir, strategy=strategy)
        training.save_run(result, split, out, config, dataset_args, log_dir=log_dir, strategy=strategy)
        if chief:
            storage.rmtree(resume_dir)  # the run is saved: nothing to resume
    _print_metrics(result.metrics, f"test metrics ({args.split}, full corpus, training items excluded):")
    print(f"trained in {result.train_seconds:.1f} s; model, metrics.json, history.json, training.png and "
          f"TensorBoard logs/ in {out}")
    return 0


def _absolute(path: str) -> str:
    """A local path made absolute (the run records where its data was); a URI as it is."""
    return os.path.realpath(path) if storage.is_local(path) else storage.path_str(path)


def _dataset_args(run_dataset, data_dir: Optional[str]):
    args = dict(run_dataset)
    if data_dir:
        args["data_dir"] = _absolute(data_dir)
    return args


def _evaluate(args) -> int:
    from tfrec_recall import training
    run = training.load_run(args.model_dir)
    split = split_from_args(_dataset_args(run.dataset, args.data_dir))
    metrics = training.evaluate_towers(run.query_tower, run.candidate_tower, split, args.on, run.config.ks,
                                       progress=True)
    _print_metrics(metrics, f"{args.on} metrics of {args.model_dir}:")
    if args.output:
        storage.write_json(args.output, metrics)
    return 0


def _recommend(args) -> int:
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    from tfrec_recall import training
    run = training.load_run(args.model_dir)
    split = split_from_args(_dataset_args(run.dataset, args.data_dir))
    for user, items in training.recommend(run, split, args.user_id, k=args.k).items():
        recent = split.train_items[user][::-1][:5]
        print(f"user {user} (recent items: {', '.join(recent)}):")
        for rank, (item, score) in enumerate(items, 1):
            print(f"  {rank:>3}. {item:<12} score {score:.4f}")
    return 0


def _export(args) -> int:
    import numpy as np
    import tensorflow as tf
    from tfrec_recall import training
    from tfrec_recall.export import export_retrieval_model, make_index
    from tfrec_recall.export.run_index import DEEP_RETRIEVAL
    from tfrec_recall.features import feature_arrays
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    run = training.load_run(args.model_dir)
    if args.k > len(run.candidate_ids):
        raise ConfigError(f"--k ({args.k}) must be <= the number of candidates ({len(run.candidate_ids)})")
    args.index = args.index or (DEEP_RETRIEVAL if run.structure is not None else "brute_force")
    if args.beam_width is not None and args.index != DEEP_RETRIEVAL:
        raise ConfigError(f"--beam-width applies to --index {DEEP_RETRIEVAL}, got --index {args.index}")
    if args.index == DEEP_RETRIEVAL:
        index = _deep_retrieval_index(run, args)
    else:
        index = make_index(args.index, args.k, len(run.candidate_ids), storage_dtype=args.storage_dtype,
                           ivf_lists=args.ivf_lists, ivf_probes=args.ivf_probes, scann_leaves=args.scann_leaves,
                           scann_leaves_to_search=args.scann_leaves_to_search)
    path = export_retrieval_model(run.query_tower, (run.candidate_ids, run.candidate_embeddings), index=index,
                                  export_dir_base=args.export_dir_base, k=args.k)
    print(f"exported {args.index} index ({type(index).__name__}) over {len(run.candidate_ids):,} candidates to {path}")
    # Query the export the way a server would, for a few test users, and compare with the in-memory model.
    split = split_from_args(_dataset_args(run.dataset, args.data_dir))
    rows = split.test.head(3)
    if len(rows):
        features = feature_arrays(rows, split.data, run.query_tower.serving_specs)
        tensors = {name: tf.constant(value) for name, value in features.items()}
        if args.index == "scann":
            import scann  # noqa: F401  (registers the ScaNN ops for loading)
        loaded = tf.saved_model.load(str(path))
        out = loaded.signatures["serving_default"](**tensors)
        history = _history_feature(path)
        expected = _in_memory_answer(run.query_tower, index, tensors, args.k, history)
        same = bool(np.array_equal(out["item_ids"].numpy(), expected))
        for user, ids, scores in zip(rows["user_id"], out["item_ids"].numpy(), out["scores"].numpy()):
            top = ", ".join(f"{i.decode()} ({s:.3f})" for i, s in list(zip(ids, scores))[:5])
            print(f"  user {user}: {top}")
        print(f"exported model answers like the in-memory model: {same}")
        if not same:
            return 1
    return 0


def _deep_retrieval_index(run, args):
    """The run's beam-search index over its candidates (a run trained with ``deep_retrieval: true``)."""
    from tfrec_recall.export.run_index import DEEP_RETRIEVAL, deep_retrieval_run_index
    if run.structure is None:
        raise ConfigError(f"--index {DEEP_RETRIEVAL} needs a run trained with deep_retrieval: true; "
                          f"{args.model_dir!r} has no path structure")
    try:
        return deep_retrieval_run_index(run, args.k, args.beam_width)
    except ValueError as error:  # a beam width beyond K^D or below J
        width = run.config.dr_beam_width if args.beam_width is None else args.beam_width
        raise ConfigError(f"--beam-width {width}: {error}") from None


def _in_memory_answer(query_tower, index, tensors, k: int, history: Optional[str]):
    """The top-k ids the in-memory tower and index give (a multi-interest tower's K queries merged)."""
    from tfrec_recall.retrievers import MultiQueryRetriever
    queries = query_tower(tensors)
    exclude = tensors[history] if history else None
    if getattr(query_tower, "multi_interest", False):
        return MultiQueryRetriever(index)(queries, k=k, exclude=exclude,
                                          query_mask=query_tower.interest_mask(tensors))[1].numpy()
    return index(queries, k=k, exclude=exclude)[1].numpy()


def _history_feature(path) -> Optional[str]:
    manifest = storage.read_json(storage.join(path, "assets", "manifest.json"))
    return manifest.get("exclude_history_feature")


def _serve(args) -> int:
    from tfrec_recall.serving.server import serve
    if args.model_config_file is not None:
        given = [flag for flag, value in (("--model-dir", args.model_dir), ("--model-name", args.model_name))
                 if value is not None]
        if given:
            raise ConfigError(f"--model-config-file names the models; drop {' and '.join(given)}")
    elif args.model_dir is None or args.model_name is None:
        raise ConfigError("serve needs --model-dir and --model-name, or --model-config-file")
    if args.max_request_values is not None and args.max_request_values < 1:
        raise ConfigError(f"--max-request-values must be >= 1, got {args.max_request_values}")
    serve(args.model_dir, args.model_name, host=args.host, port=args.port, poll_seconds=args.poll_seconds,
          workers=args.workers, max_batch_size=args.max_batch_size, model_config_file=args.model_config_file,
          rest_port=args.rest_port, max_request_values=args.max_request_values)
    return 0


def _query(args) -> int:
    import grpc
    try:
        return _query_server(args)
    except grpc.RpcError as error:  # the server's answer to a bad request: one line, its status and message
        raise RuntimeError(f"the server at {args.server} answered {error.code().name}: {error.details()}") from None


def _query_server(args) -> int:
    import numpy as np
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2
    from tfrec_recall.serving.client import GrpcClient
    try:
        features = json.loads(args.features)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--features is not valid JSON: {error}") from None
    if not isinstance(features, dict) or not features:
        raise ConfigError(f"--features must be a non-empty JSON object, got {args.features!r}")
    with GrpcClient(args.server, args.model, timeout=args.timeout) as client:
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        client.metadata().metadata["signature_def"].Unpack(signature_map)
        inputs = signature_map.signature_def["serving_default"].inputs
        n = len(next(iter(features.values())))
        prepared = {}
        for name, info in inputs.items():
            dims = [d.size for d in info.tensor_shape.dim]
            is_string = info.dtype == types_pb2.DT_STRING
            missing = "" if is_string else (0 if info.dtype == types_pb2.DT_INT64 else float("nan"))
            value = features.get(name)
            if value is None:
                value = [[missing] * dims[1] if len(dims) == 2 else missing] * n
            if len(dims) == 2:
                value = [list(v)[:dims[1]] + [missing] * (dims[1] - len(list(v)[:dims[1]])) for v in value]
            # numbers as float64: the client sends them in the signature's dtype (float32, or int64 timestamps)
            prepared[name] = np.asarray(value, dtype=object if is_string else np.float64)
        unknown = sorted(set(features) - set(inputs))
        if unknown:
            raise ConfigError(f"--features: unknown input {unknown[0]!r}; the model takes {sorted(inputs)}")
        for row, results in enumerate(client.query(prepared)):
            print(f"query {row}: " + ", ".join(f"{item} ({score:.3f})" for item, score in results))
    return 0


def _quiet_libraries(argv: List[str]) -> List[str]:
    """``argv`` without ``--verbose`` (accepted anywhere on the line). Without it, TensorFlow's C++ start-up and
    runtime lines (CUDA stubs, cuDNN / cuFFT factories, TensorRT, tf.data's end-of-sequence notes) and
    google.api_core's Python-version FutureWarning are hidden: set before TensorFlow is imported (a
    TF_CPP_MIN_LOG_LEVEL already in the environment is kept)."""
    if VERBOSE in argv:
        return [a for a in argv if a != VERBOSE]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core")
    return list(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = _quiet_libraries(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "evaluate": _evaluate, "recommend": _recommend, "export": _export,
                "serve": _serve, "query": _query}
    handler = handlers.get(args.command) or args.handler
    try:
        return handler(args)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"tfrec-recall {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
