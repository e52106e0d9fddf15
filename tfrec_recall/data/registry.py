"""Named datasets for the CLI and benchmarks: ``load_dataset(name, ...)`` and ``make_split(...)``."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from tfrec_recall.data import readers
from tfrec_recall.data.schema import InteractionData
from tfrec_recall.data.split import Split, leave_last_out, random_split
from tfrec_recall.data.synthetic import make_synthetic

DATASETS = ("synthetic", "ml-100k", "ml-1m", "ml-latest", "csv")
SPLITS = ("leave_last_out", "random")


def parse_column_map(text: Optional[str]) -> Dict[str, str]:
    """``"user_id=uid,item_id=iid"`` -> mapping; an error names the bad part."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--column-map part {part!r} is not FIELD=COLUMN")
        out[key.strip()] = value.strip()
    return out


def load_dataset(name: str, data_dir: Optional[str] = None, *, on_bad_rows: str = "error",
                 column_map: Optional[Mapping[str, str]] = None,
                 synthetic: Optional[Mapping[str, Any]] = None) -> InteractionData:
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {name!r}")
    if name == "synthetic":
        return make_synthetic(**dict(synthetic or {}))
    if data_dir is None:
        raise ValueError(f"--data-dir is required for --dataset {name}")
    if name == "ml-100k":
        return readers.read_movielens_100k(data_dir, on_bad_rows=on_bad_rows)
    if name == "ml-1m":
        return readers.read_movielens_1m(data_dir, on_bad_rows=on_bad_rows)
    if name == "ml-latest":
        return readers.read_movielens_latest(data_dir, on_bad_rows=on_bad_rows)
    reader = readers.read_parquet if str(data_dir).endswith(".parquet") else readers.read_csv
    return reader(data_dir, column_map=column_map or {}, on_bad_rows=on_bad_rows)


def make_split(data: InteractionData, split: str = "leave_last_out", history_length: int = 50,
               seed: int = 0) -> Split:
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if split == "random":
        return random_split(data, history_length=history_length, seed=seed)
    return leave_last_out(data, history_length=history_length)


def split_from_args(args: Mapping[str, Any]) -> Split:
    """Rebuilds the split a model was trained on from the dataset arguments saved with it."""
    data = load_dataset(args["name"], args.get("data_dir"), on_bad_rows=args.get("on_bad_rows", "error"),
                        column_map=args.get("column_map"), synthetic=args.get("synthetic"))
    return make_split(data, args.get("split", "leave_last_out"), args.get("history_length", 50),
                      args.get("seed", 0))
