"""Multi-interest benchmark on synthetic users with known interests.

    .venv/bin/python benchmarks/multi_interest.py [--users 1000] [--items 500] [--clusters 50] [--dim 16]

`tfrec_recall.data.make_multi_interest`: each user has 1-4 interests (item clusters) and a history drawn from
them; leave-last-out split. For each query tower (the single-vector baselines: mean-pooled history MLP and the
self-attentive SASRec tower and SDM; the multi-interest ones: MIND, ComiRec-SA, ComiRec-DR) the learning rate is chosen
on validation HR@50 (seed 0), then 3 seeds report test HR@10/HR@50, interest recovery (for each true interest,
the best cosine between any valid learned interest and the cluster's centroid of item embeddings; mean over
users) and the intra-list category diversity of the top 50 (ComiRec's Diversity@50). Writes
benchmarks/results/multi_interest.md and .json and a bar chart multi_interest.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
from tfrec_recall import training  # noqa: E402
from tfrec_recall.config import RunConfig  # noqa: E402
from tfrec_recall.data import leave_last_out, make_multi_interest  # noqa: E402
from tfrec_recall.evaluation.evaluate import embed, evaluate  # noqa: E402
from tfrec_recall.evaluation.interests import intra_list_diversity, split_interest_recovery  # noqa: E402
from tfrec_recall.retrievers import BruteForce  # noqa: E402

TOWERS = {"mlp": "single vector (mean-pooled history, MLP)", "self_attentive": "single vector (SASRec)",
          "sdm": "single vector (SDM)", "mind": "MIND (K=4)", "comirec_sa": "ComiRec-SA (K=4)",
          "comirec_dr": "ComiRec-DR (K=4)"}
LEARNING_RATES = (0.003, 0.01)
SEEDS = (0, 1, 2)


def config(tower: str, dim: int, learning_rate: float, seed: int) -> RunConfig:
    return RunConfig(use_history=True, use_user_id=False, query_tower=tower, history_length=30, embedding_dim=dim,
                     output_dim=dim, epochs=20, batch_size=128, learning_rate=learning_rate, temperature=0.1,
                     patience=3, seed=seed, attention_blocks=1)


def measure(model, split, truth) -> dict:
    test = evaluate(model, split, "test", ks=(10, 50))
    recovery = split_interest_recovery(model, split, truth)
    users = split.test.reset_index(drop=True)
    items = np.asarray(split.data.items).astype(str)
    embeddings = embed(model.candidate_tower, training.corpus_arrays(split, model.candidate_tower.input_specs))
    model.index_candidates(items, embeddings, index=BruteForce(max_k=50))
    seen = [list(split.train_items.get(u, [])) for u in users["user_id"]]
    features = training.feature_arrays(users, split.data, model.query_tower.input_specs)
    _, top = model.recommend(features, k=50, exclude=seen)
    categories = {i: f"c{truth.item_cluster[i]}" for i in items}
    diversity = intra_list_diversity(top.numpy(), categories)
    return {"HR@10": test["HR@10"], "HR@50": test["HR@50"], "recovery": recovery, "diversity@50": diversity}


def run(args) -> dict:
    data, truth = make_multi_interest(num_users=args.users, num_items=args.items, num_clusters=args.clusters,
                                      seed=0)
    split = leave_last_out(data, history_length=30)
    out = {}
    for tower, label in TOWERS.items():
        valid = {}
        for lr in LEARNING_RATES:
            result = training.train(config(tower, args.dim, lr, 0), split, verbose=0)
            valid[lr] = result.valid_metrics["HR@50"]
        best = max(valid, key=valid.get)
        runs = []
        for seed in SEEDS:
            start = time.perf_counter()
            result = training.train(config(tower, args.dim, best, seed), split, verbose=0)
            runs.append({**measure(result.model, split, truth), "seconds": time.perf_counter() - start})
            print(f"{label} lr={best} seed {seed}: {runs[-1]}", flush=True)
        out[tower] = {"label": label, "valid_HR@50": valid, "learning_rate": best, "runs": runs}
    return out


def table(results: dict, command: str) -> str:
    keys = ("HR@10", "HR@50", "recovery", "diversity@50")
    lines = ["# Multi-interest models on synthetic users with known interests", "", f"Command: `{command}`", "",
             "Learning rate chosen on validation HR@50 (seed 0) from " + str(list(LEARNING_RATES)) +
             "; test metrics mean +- sd over seeds " + str(list(SEEDS)) + ".", "",
             "| query tower | lr | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for entry in results.values():
        cells = []
        for key in keys:
            values = np.array([r[key] for r in entry["runs"]])
            cells.append(f"{values.mean():.3f} +- {values.std(ddof=1):.3f}")
        lines.append(f"| {entry['label']} | {entry['learning_rate']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [e["label"] for e in results.values()]
    for ax, key in zip(axes, ("HR@50", "recovery")):
        values = [np.mean([r[key] for r in e["runs"]]) for e in results.values()]
        errors = [np.std([r[key] for r in e["runs"]], ddof=1) for e in results.values()]
        ax.barh(labels, values, xerr=errors, color="#4c72b0")
        ax.set_xlabel(f"test {key}" if key == "HR@50" else "interest recovery (mean best cosine)")
        ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args(argv)
    results = run(args)
    out = HERE / "results" / "multi_interest"
    command = ".venv/bin/python benchmarks/multi_interest.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    out.with_suffix(".md").write_text(table(results, command.strip()))
    plot(results, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
