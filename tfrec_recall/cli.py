"""The ``tfrec-recall`` command line: ``train``, ``evaluate`` and ``recommend``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from tfrec_recall.config import PRESETS, ConfigError, load_config
from tfrec_recall.data.registry import DATASETS, SPLITS, load_dataset, make_split, parse_column_map, split_from_args
from tfrec_recall.data.schema import DataError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, naming the option and the value
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tfrec-recall", description="Train, evaluate and query retrieval models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model, evaluate it on the protocol and save it")
    train.add_argument("--dataset", choices=DATASETS, default="synthetic")
    train.add_argument("--data-dir", help="dataset directory (MovieLens) or file (csv / parquet)")
    train.add_argument("--column-map", help="for csv/parquet: FIELD=COLUMN,... (fields user_id, item_id, "
                                            "timestamp, weight)")
    train.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")
    train.add_argument("--split", choices=SPLITS, default="leave_last_out")
    train.add_argument("--history-length", type=int, default=50)
    train.add_argument("--model", choices=sorted(PRESETS), default="two_tower")
    train.add_argument("--config", help="YAML file overriding the preset's configuration keys")
    train.add_argument("--epochs", type=int, help="override the configuration's epochs")
    train.add_argument("--out", required=True, help="output directory (must be new or empty)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

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
    return parser


def _print_metrics(metrics, title: str) -> None:
    print(title)
    keys = [k for k in metrics if k != "users"]
    print("  " + "  ".join(f"{k}={metrics[k]:.4f}" for k in keys) + f"  (users={metrics.get('users')})")


def _train(args) -> int:
    if args.history_length < 1:
        raise ConfigError(f"--history-length must be >= 1, got {args.history_length}")
    overrides = {"history_length": args.history_length}
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
        overrides["epochs"] = args.epochs
    config = load_config(args.model, args.config, overrides)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {args.out!r} exists and is not an empty directory")
    dataset_args = {"name": args.dataset, "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
                    "on_bad_rows": args.on_bad_rows, "column_map": parse_column_map(args.column_map),
                    "split": args.split, "history_length": args.history_length, "seed": config.seed}
    data = load_dataset(args.dataset, dataset_args["data_dir"], on_bad_rows=args.on_bad_rows,
                        column_map=dataset_args["column_map"])
    print(data.summary())
    if data.skipped_rows:
        print(f"skipped {data.skipped_rows} malformed rows (--on-bad-rows skip)")
    split = make_split(data, args.split, args.history_length, config.seed)
    print(split.describe())
    from tfrec_recall import train as training  # imports TensorFlow: after the cheap checks
    result = training.train(config, split, verbose=0 if args.quiet else 1)
    training.save_run(result, split, out, config, dataset_args)
    _print_metrics(result.metrics, f"test metrics ({args.split}, full corpus, training items excluded):")
    print(f"trained in {result.train_seconds:.1f} s; model, metrics.json, history.json and training.png in {out}")
    return 0


def _dataset_args(run_dataset, data_dir: Optional[str]):
    args = dict(run_dataset)
    if data_dir:
        args["data_dir"] = str(Path(data_dir).resolve())
    return args


def _evaluate(args) -> int:
    from tfrec_recall import train as training
    run = training.load_run(args.model_dir)
    split = split_from_args(_dataset_args(run.dataset, args.data_dir))
    metrics = training.evaluate_towers(run.query_tower, run.candidate_tower, split, args.on, run.config.ks,
                                       progress=True)
    _print_metrics(metrics, f"{args.on} metrics of {args.model_dir}:")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0


def _recommend(args) -> int:
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    from tfrec_recall import train as training
    run = training.load_run(args.model_dir)
    split = split_from_args(_dataset_args(run.dataset, args.data_dir))
    for user, items in training.recommend(run, split, args.user_id, k=args.k).items():
        recent = split.train_items[user][::-1][:5]
        print(f"user {user} (recent items: {', '.join(recent)}):")
        for rank, (item, score) in enumerate(items, 1):
            print(f"  {rank:>3}. {item:<12} score {score:.4f}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "evaluate": _evaluate, "recommend": _recommend}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"tfrec-recall {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
