"""``tfrec-recall pipeline run|compile``: registered into the library's CLI through the ``tfrec_recall.commands``
entry point (setup.cfg), so the library never imports this package. tfx is imported only when a pipeline
command runs."""
from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Dict

from tfrec_recall import storage
from tfrec_recall.cli import IndexChoices
from tfrec_recall.config import DEFAULT_PRESET

BUILTIN_DATA = ("synthetic", "ml-100k")


def _threshold(text: str):
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METRIC=VALUE (e.g. HR@50=0.1), got {text!r}") from None


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _common(parser) -> None:
    parser.add_argument("--data", required=True,
                        help=f"a directory of interaction CSVs (or TFRecords with --data-format tfrecord), or a "
                             f"built-in dataset: {', '.join(BUILTIN_DATA)} (written as CSV under the pipeline root)")
    parser.add_argument("--data-dir", help="for --data ml-100k: the MovieLens directory (default ../shared/data/ml-100k)")
    parser.add_argument("--pipeline-root", required=True, help="where the pipeline writes its artifacts")
    parser.add_argument("--serving-dir", required=True, help="model base path that blessed models are pushed to")
    parser.add_argument("--pipeline-name", default="tfrec-recall")
    parser.add_argument("--data-format", choices=("csv", "tfrecord"), default="csv")
    parser.add_argument("--id-type", choices=("string", "int"), default=None,
                        help="type of user/item ids in the input (default: string; int for ml-100k)")
    parser.add_argument("--schema", help="a TFDV schema .pbtxt replacing the packaged interaction schema")
    parser.add_argument("--side-features", metavar="JSON_FILE",
                        help='the side-feature columns of the tables: {"user": [[NAME, KIND], ...], "item": [...]}, '
                             "KIND categorical, multi_categorical or numeric (built-in data brings its own)")
    parser.add_argument("--user-features", metavar="DIR", help="a directory of the user table's gzipped TFRecords")
    parser.add_argument("--item-features", metavar="DIR", help="a directory of the item table's gzipped TFRecords")
    parser.add_argument("--model", default=DEFAULT_PRESET, help="configuration preset")
    parser.add_argument("--config", help="YAML file overriding the preset's configuration keys")
    parser.add_argument("--epochs", type=int, help="override the configuration's epochs")
    parser.add_argument("--train-steps", type=int, help="train exactly this many batches (TFX num_steps)")
    parser.add_argument("--history-length", type=int, default=50)
    parser.add_argument("--threshold", type=_threshold, action="append", default=None, metavar="METRIC=VALUE",
                        help="also require this absolute lower bound (repeatable; default none)")
    parser.add_argument("--popularity-margin", type=_margin, default=0.02, metavar="HR",
                        help="bless only when validation HR@50 beats the most-popular ranker's by more than "
                             "this ABSOLUTE amount of HR@50 (default 0.02)")
    parser.add_argument("--margin", type=_margin, default=0.01,
                        help="largest drop below the latest blessed model's HR@50 / NDCG@10 still blessed")
    parser.add_argument("--index", choices=IndexChoices(deep_retrieval=True), default=None, metavar="INDEX",
                        help="exported index: %(choices)s (default: deep_retrieval for a model trained with "
                             "deep_retrieval: true, else brute_force)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--beam-arg", action="append", default=[], metavar="ARG",
                        help="Beam pipeline argument, repeatable; write it with '=', e.g. "
                             "--beam-arg=--runner=FlinkRunner --beam-arg=--direct_num_workers=2")


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run the TFX pipeline locally or compile it for Kubeflow V2")
    sub = parser.add_subparsers(dest="pipeline_command", required=True, parser_class=type(parser))
    run = sub.add_parser("run", help="run the pipeline with LocalDagRunner (Beam DirectRunner, SQLite MLMD)")
    _common(run)
    run.add_argument("--no-cache", action="store_true", help="re-execute every component")
    run.set_defaults(handler=_run)
    compile_ = sub.add_parser("compile", help="compile the pipeline to an orchestrator's spec")
    _common(compile_)
    compile_.add_argument("--target", choices=("kubeflow-v2",), required=True)
    compile_.add_argument("--output", required=True, help="the JSON spec file to write")
    compile_.add_argument("--image", default=None, help="container image with tfrec_recall installed")
    compile_.set_defaults(handler=_compile)


def _config_overrides(args) -> Dict:
    import yaml
    from tfrec_recall.config import load_config
    overrides = {}
    if args.config:
        load_config(args.model, args.config)  # validates the file (one-line errors naming the key)
        overrides.update(yaml.safe_load(storage.read_text(args.config)) or {})
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return overrides


def _tables_dir(pipeline_root: str, name: str) -> str:
    return storage.join(pipeline_root, "data", f"{name}-tables")


def _write_tables(data, directory: str) -> None:
    """The data's side tables as table examples under ``directory`` (``users/``, ``items/``), each file only
    when absent, and ``side_features.json`` last."""
    from tfrec_recall._atomic import atomic_new_file
    from tfrec_recall.data.side_tables import SIDE_FEATURES_FILE, SideFeatures, write_feature_table
    side = SideFeatures.of_data(data)
    for entity, table in (("user", data.user_features), ("item", data.item_features)):
        path = storage.join(directory, f"{entity}s", f"{entity}s.tfrecord.gz")
        if getattr(side, entity) and not storage.exists(path):
            write_feature_table(table, entity, getattr(side, entity), path)
    if not storage.exists(storage.join(directory, SIDE_FEATURES_FILE)):  # also for data without tables: once
        with atomic_new_file(storage.join(directory, SIDE_FEATURES_FILE)) as tmp:
            storage.write_text(tmp, side.to_json())


def materialise(name: str, pipeline_root: str, data_dir=None) -> str:
    """Writes a built-in dataset as the pipeline's input CSV under ``<pipeline_root>/data/<name>/``, and its side
    tables under ``<pipeline_root>/data/<name>-tables/``, once (later runs reuse the files, so ExampleGen's cache
    holds) and returns the CSV's directory."""
    from tfrec_recall.data.protocol import write_interactions_csv
    from tfrec_recall.data.registry import load_dataset
    target = storage.join(pipeline_root, "data", name)
    from tfrec_recall.data.side_tables import SIDE_FEATURES_FILE
    csv, tables = storage.join(target, "interactions.csv"), _tables_dir(pipeline_root, name)
    if not storage.exists(csv) or not storage.exists(storage.join(tables, SIDE_FEATURES_FILE)):
        data = load_dataset(name, data_dir)
        _write_tables(data, tables)
        if not storage.exists(csv):
            write_interactions_csv(data, csv)
    return target


def builtin_side_inputs(name: str, pipeline_root: str) -> dict:
    """create_pipeline's side_features / user_features_root / item_features_root for a built-in dataset
    :func:`materialise` wrote under ``pipeline_root`` (``{}`` when it has no side tables)."""
    from tfrec_recall.data.side_tables import SIDE_FEATURES_FILE, SideFeatures
    directory = _tables_dir(pipeline_root, name)
    declared = storage.join(directory, SIDE_FEATURES_FILE)
    side = SideFeatures.from_json(storage.read_text(declared), declared) if storage.exists(declared) else None
    if not side:
        return {}
    return {"side_features": side,
            "user_features_root": storage.join(directory, "users") if side.user else None,
            "item_features_root": storage.join(directory, "items") if side.item else None}


def _side_inputs(args) -> dict:
    """create_pipeline's side-feature arguments: a built-in dataset's tables, or the --side-features,
    --user-features and --item-features flags."""
    from tfrec_recall.data.side_tables import SideFeatures
    flags = (("--side-features", args.side_features), ("--user-features", args.user_features),
             ("--item-features", args.item_features))
    if args.data in BUILTIN_DATA:
        given = [flag for flag, value in flags if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: --data {args.data} brings its own side tables; these flags are "
                             "for your own data")
        return builtin_side_inputs(args.data, args.pipeline_root)
    if args.side_features is None:
        for flag, value in flags[1:]:
            if value is not None:
                raise ValueError(f"{flag} {value!r} needs --side-features, the columns and kinds of the tables")
        return {}
    return {"side_features": SideFeatures.from_json(storage.read_text(args.side_features), args.side_features),
            "user_features_root": args.user_features, "item_features_root": args.item_features}


def _build(args, metadata: bool):
    warnings.filterwarnings("ignore", category=FutureWarning)
    from pipelines.pipeline import create_pipeline
    from pipelines.runners import metadata_path
    for flag, value in (("--k", args.k), ("--history-length", args.history_length)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    data, id_type = args.data, args.id_type
    if data in BUILTIN_DATA:
        data = materialise(data, args.pipeline_root, args.data_dir)
        id_type = id_type or ("int" if args.data == "ml-100k" else "string")
    elif not storage.isdir(data):
        raise FileNotFoundError(f"--data {data!r} is neither a directory nor one of {BUILTIN_DATA}")
    return create_pipeline(
        pipeline_name=args.pipeline_name, pipeline_root=args.pipeline_root, data_root=data,
        serving_dir=args.serving_dir, data_format=args.data_format, id_type=id_type or "string",
        schema_file=args.schema, history_length=args.history_length, preset=args.model,
        config=_config_overrides(args), train_steps=args.train_steps, **_side_inputs(args),
        thresholds=dict(args.threshold) if args.threshold else None, margin=args.margin,
        popularity_margin=args.popularity_margin, index=args.index,
        k=args.k, enable_cache=not getattr(args, "no_cache", False),
        metadata_path=metadata_path(args.pipeline_root) if metadata else None, beam_pipeline_args=args.beam_arg)


def _run(args) -> int:
    from pipelines.runners import executions, metadata_path, run_local
    pipeline = _build(args, metadata=True)
    start = time.time()
    run_local(pipeline)
    seconds = time.time() - start
    records = executions(metadata_path(args.pipeline_root), args.pipeline_name)
    last = [e for e in records if e.run_id == records[-1].run_id]
    print(f"pipeline {args.pipeline_name}: run {last[-1].run_id} finished in {seconds:.0f} s")
    for e in last:
        print(f"  {e.component:<32} {e.state:<9} {e.seconds:7.1f} s")
    verdict = {e.component: e for e in last}
    blessing = verdict.get("RetrievalEvaluator")
    if blessing is not None:
        b = blessing.outputs.get("blessing", {})
        print(f"evaluation report: {blessing.outputs.get('evaluation', {}).get('uri')}/report.html; "
              f"blessed: {bool(b.get('blessed'))}")
    pushed = verdict.get("Pusher")
    if pushed is not None:
        p = pushed.outputs.get("pushed_model", {})
        print(f"pushed: {bool(p.get('pushed'))}" + (f" to {p.get('pushed_destination')}" if p.get("pushed") else
                                                   f"; {args.serving_dir} keeps its previous versions"))
    return 0


def _compile(args) -> int:
    from pipelines.runners import DEFAULT_IMAGE, compile_kubeflow_v2
    pipeline = _build(args, metadata=False)
    out = compile_kubeflow_v2(pipeline, args.output, image=args.image or DEFAULT_IMAGE)
    print(f"wrote the Kubeflow V2 pipeline spec to {out}")
    return 0
