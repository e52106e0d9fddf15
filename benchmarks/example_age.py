"""Example Age (Covington et al. 2016, sec. 3.3) on data with a time trend: does retrieving recent items improve?

    .venv/bin/python benchmarks/example_age.py [--max-epochs 30]

The drifting-popularity synthetic log (tfrec_recall.data.make_drifting: items released over 100 days, popularity
decaying with a 10-day lifetime) split leave-last-out; the default preset (youtube_dnn_mixed, chosen on ML-100K
validation) with and without ``example_age``, early stopping on validation HR@50 (patience 3), seeds 0, 1, 2.
Test HR@50 overall and on recent items (first seen in the last 20 % of the training time span), mean +- sd.
The ML-100K rows are in options_ml100k.md (benchmarks/quality.py). Writes benchmarks/results/example_age.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
from quality import BEST, SEEDS, segment_items, segment_metrics  # noqa: E402

ROWS = [("without Example Age", {}), ("with Example Age", {"example_age": True})]


def measure(split, overrides, seed, max_epochs, segments) -> dict:
    from tfrec_recall import training
    from tfrec_recall.config import load_config
    config = load_config(BEST, overrides={**overrides, "seed": seed, "epochs": max_epochs, "patience": 3})
    result = training.train(config, split, verbose=0)
    out = {"HR@50": result.metrics["HR@50"], "valid HR@50": result.valid_metrics["HR@50"],
           **segment_metrics(result.model, split, segments)}
    print(f"  {overrides} seed {seed}: {json.dumps({k: round(v, 4) for k, v in out.items()})}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "results" / "example_age"))
    args = parser.parse_args(argv)
    from tfrec_recall.data import leave_last_out, make_drifting
    split = leave_last_out(make_drifting(seed=0), history_length=50)
    segments = {k: v for k, v in segment_items(split).items() if k == "recent"}
    print(split.describe(), f"; {len(segments['recent'])} recent items", flush=True)
    results = {name: [measure(split, o, s, args.max_epochs, segments) for s in SEEDS] for name, o in ROWS}
    lines = ["| configuration | valid HR@50 | test HR@50 | test HR@50, recent items |", "|---|---|---|---|"]
    for name, runs in results.items():
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs], ddof=1):.3f}"
                 for k in ("valid HR@50", "HR@50", "recent")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    users = int(split.test["item_id"].isin(set(segments["recent"])).sum())
    text = ("# Example Age on drifting popularity\n\n" + __doc__.split("\n\n")[2].replace("\n", " ") + "\n\n"
            f"{split.describe()}; {len(segments['recent'])} recent items, held out by {users} test users.\n\n"
            "Command: `.venv/bin/python benchmarks/example_age.py`\n\n" + "\n".join(lines) + "\n")
    Path(args.out).with_suffix(".md").write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
