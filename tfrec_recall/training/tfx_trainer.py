"""The work of the TFX pipeline's steps, as plain library functions (no tfx import here).

``pipelines/`` wires these into components: :func:`run_fn` is the Trainer's ``run_fn`` (pointed at by its
import path, so no module file is copied or pip-installed), :func:`evaluate_model` / :func:`judge` /
:func:`write_report` are the ``RetrievalEvaluator``, :func:`export_for_serving` the index-and-export step and
:func:`smoke_test_export` the infra check (run in a fresh process).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Pipeline examples carry ids and history only (no side-feature tables), so the presets run without them.
PIPELINE_OVERRIDES = {"use_side_features": False}


def trainer_config(custom_config: Optional[Mapping[str, Any]]):
    """The RunConfig a Trainer's ``custom_config`` asks for: ``{"preset": NAME, "config": {KEY: VALUE}}``."""
    from tfrec_recall.config import DEFAULT_PRESET, ConfigError, load_config
    custom = dict(custom_config or {})
    unknown = sorted(set(custom) - {"preset", "config", "evaluate_every"})
    if unknown:
        raise ConfigError(f"custom_config key {unknown[0]!r} is not one of 'preset', 'config', 'evaluate_every'")
    overrides = {**PIPELINE_OVERRIDES, **dict(custom.get("config") or {})}
    return load_config(custom.get("preset", DEFAULT_PRESET), overrides=overrides)


def examples_uri(files: Sequence[str]) -> str:
    """The Examples artifact URI behind a Trainer's ``train_files`` (``<uri>/Split-train/*``)."""
    if not files:
        raise ValueError("train_files is empty: the Trainer got no examples")
    split_dir = os.path.dirname(files[0])
    if not os.path.basename(split_dir).startswith("Split-"):
        raise ValueError(f"train_files {files[0]!r} is not inside a TFX Examples split directory (Split-<name>)")
    return os.path.dirname(split_dir)


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (``Trainer(run_fn="tfrec_recall.pipeline_steps.run_fn")``).

    Reads the protocol splits the pipeline wrote, builds the model from ``custom_config`` (a preset plus
    overrides), fits it (``train_args.num_steps``, when set, caps training at that many batches) and writes the
    run directory (both towers as SavedModels, candidate embeddings, metrics and plots) into
    ``fn_args.serving_model_dir``."""
    from tfrec_recall.data.protocol import read_split_examples
    from tfrec_recall.train import save_run, train
    config = trainer_config(fn_args.custom_config)
    uri = examples_uri(list(fn_args.train_files))
    split = read_split_examples(uri, config.history_length)
    logger.info("training on %s", split.describe())
    evaluate_every = int((fn_args.custom_config or {}).get("evaluate_every", 1))
    result = train(config, split, evaluate_every=evaluate_every, verbose=2, max_steps=fn_args.train_steps)
    save_run(result, split, fn_args.serving_model_dir, config, {"source": "tfx_examples", "examples": uri})
    logger.info("test metrics: %s", result.metrics)


# ----------------------------------------------------------------------------------------------------------
# Evaluation and blessing

def evaluate_model(model_dir: str, split, which: Sequence[str] = ("valid", "test"),
                   ks: Sequence[int] = (10, 50, 100)) -> Dict[str, Dict[str, float]]:
    """Full-corpus metrics (PROTOCOL.md) of a saved run on the split's rows, keyed by ``which``."""
    from tfrec_recall.train import evaluate_towers, load_run
    run = load_run(model_dir)
    return {name: evaluate_towers(run.query_tower, run.candidate_tower, split, name, ks) for name in which}


POPULARITY_METRIC = "HR@50"



def judge(metrics: Mapping[str, float], thresholds: Mapping[str, float],
          baseline: Optional[Mapping[str, float]] = None, margin: float = 0.01,
          compare: Sequence[str] = (), *, popularity: Optional[Mapping[str, float]] = None,
          popularity_margin: float = 0.02, popularity_metric: str = POPULARITY_METRIC) -> Dict[str, Any]:
    """The blessing verdict of a candidate's ``metrics`` (one split). Checks, all of which must pass:

    * ``"threshold"``: every ``thresholds`` metric is >= its bound;
    * ``"popularity"`` (given ``popularity``, the most-popular ranker's metrics on the same split, see
      ``tfrec_recall.baselines.most_popular_metrics``): ``popularity_metric`` BEATS it by the absolute
      ``popularity_margin``: value > popularity + margin (strictly; the check's ``bound`` is that sum);
    * ``"baseline"`` (given ``baseline``, the latest blessed model's metrics on the same data): every
      ``compare`` metric is >= baseline - ``margin``.

    Returns ``{"blessed": bool, "checks": [...]}``; unknown metric names and negative margins raise ValueError
    naming them."""
    from tfrec_recall._validation import require_finite_nonnegative
    margin = require_finite_nonnegative("margin", margin)
    popularity_margin = require_finite_nonnegative("popularity_margin", popularity_margin)
    names = list(thresholds) + list(compare) + ([popularity_metric] if popularity is not None else [])
    for name in names:
        if name not in metrics:
            raise ValueError(f"metric {name!r} is not computed; available: {sorted(k for k in metrics if k != 'users')}")
    if popularity is not None and popularity_metric not in popularity:
        raise ValueError(f"popularity has no {popularity_metric!r}; it has {sorted(popularity)}")
    checks: List[Dict[str, Any]] = []
    for name, bound in thresholds.items():
        checks.append({"metric": name, "kind": "threshold", "value": float(metrics[name]), "bound": float(bound),
                       "op": ">=", "passed": bool(metrics[name] >= bound)})
    if popularity is not None:
        value, reference = float(metrics[popularity_metric]), float(popularity[popularity_metric])
        bound = reference + popularity_margin
        checks.append({"metric": popularity_metric, "kind": "popularity", "value": value, "bound": bound,
                       "op": ">", "popularity": reference, "margin": popularity_margin, "passed": value > bound})
    if baseline is not None:
        for name in compare:
            bound = float(baseline[name]) - margin
            checks.append({"metric": name, "kind": "baseline", "value": float(metrics[name]), "bound": bound,
                           "op": ">=", "baseline": float(baseline[name]), "passed": bool(metrics[name] >= bound)})
    return {"blessed": all(c["passed"] for c in checks), "checks": checks}


def _series(result: Mapping[str, Any], split: str) -> List[tuple]:
    """(label, metrics) of the blessing split: the candidate, then the references that were computed."""
    out = [("candidate", result["metrics"][split])]
    for key, label in (("popularity_metrics", "most popular"), ("baseline_metrics", "latest blessed")):
        if (result.get(key) or {}).get(split):
            out.append((label, result[key][split]))
    return out


def _plot(series: Sequence[tuple]) -> bytes:
    """A PNG bar chart of HR@K, NDCG@K and Coverage@K of each (label, metrics) in ``series``."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    candidate = series[0][1]
    names = [k for k in candidate if k.startswith(("HR@", "NDCG@"))] + [k for k in candidate if k.startswith("Coverage@")]
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.4))
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [values.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks(x, names, rotation=30)
    ax.set(title="full-corpus retrieval metrics", ylabel="value")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _table(header: Sequence[str], rows: Sequence[tuple]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                                    for v in row) + "</tr>" for row in rows)
    return f'<table border="1" cellpadding="4"><tr>{head}</tr>{body}</table>'


def _html(result: Mapping[str, Any], image: bytes) -> str:
    split = result["blessing_split"]
    keys = list(next(iter(result["metrics"].values())))
    rows = [(f"{label}, {name}", *(values.get(k, "") for k in keys))
            for key, label in (("metrics", "candidate"), ("popularity_metrics", "most popular"),
                               ("baseline_metrics", "latest blessed"))
            for name, values in (result.get(key) or {}).items()]
    ops = {">": "&gt;", ">=": "&ge;"}
    checks = "".join(
        f"<tr><td>{html.escape(c['metric'])}</td><td>{c['kind']}</td><td>{c['value']:.4f}</td>"
        f"<td>{ops[c.get('op', '>=')]} {c['bound']:.4f}</td><td>{'pass' if c['passed'] else '<b>FAIL</b>'}</td></tr>"
        for c in result["checks"])
    verdict = "BLESSED" if result["blessed"] else "NOT BLESSED"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Retrieval evaluation: {verdict}</title></head><body style="font-family: sans-serif">
<h1>{verdict}</h1><p>model {html.escape(str(result.get('model')))}; baseline
{html.escape(str(result.get('baseline_model') or 'none (first blessed model)'))}; blessing on split
<b>{html.escape(split)}</b>, {result.get('candidates', '?')} candidates (full corpus). The most-popular ranker
(score = training count, same ranking for every user) is evaluated on the same rows.</p>
<h2>Metrics</h2>{_table(["rows", *keys], rows)}
<h2>Checks</h2><table border="1" cellpadding="4"><tr><th>metric</th><th>kind</th><th>value</th><th>bound</th>
<th>result</th></tr>{checks}</table>
<p><img alt="metrics" src="data:image/png;base64,{base64.b64encode(image).decode('ascii')}"></p></body></html>
"""


def write_report(out_dir: str, result: Mapping[str, Any]) -> None:
    """``metrics.json`` (everything), ``report.png`` (candidate vs the most-popular ranker and the latest
    blessed model) and ``report.html`` (tables and the plot inlined) into ``out_dir`` (a local path or a URI
    tf.io.gfile can write)."""
    import tensorflow as tf
    out = str(out_dir)
    tf.io.gfile.makedirs(out)
    image = _plot(_series(result, result["blessing_split"]))
    for name, mode, content in (("metrics.json", "w", json.dumps(result, indent=2)), ("report.png", "wb", image),
                                ("report.html", "w", _html(result, image))):
        with tf.io.gfile.GFile(os.path.join(out, name), mode) as f:
            f.write(content)


# ----------------------------------------------------------------------------------------------------------
# Export and the infra check

def export_for_serving(model_dir: str, out_dir, *, index: str = "brute_force", k: int = 100) -> Path:
    """Exports the run in ``model_dir`` with an index over its candidate corpus into ``out_dir`` (a
    SavedModel directory, written atomically) plus ``out_dir/assets/request.json``, the run's sample request,
    for the infra check."""
    from tfrec_recall.export import export_retrieval_model
    from tfrec_recall.train import REQUEST_FILE, load_run
    run = load_run(model_dir)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite an export")
    staging = out.parent / f".staging-{out.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        version = export_retrieval_model(run.query_tower, (run.candidate_ids, run.candidate_embeddings),
                                         index=index, export_dir_base=staging, k=k, version=1)
        shutil.copyfile(Path(model_dir) / REQUEST_FILE, version / "assets" / REQUEST_FILE)
        version.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


_SMOKE_TEST = r"""
import json, sys
import numpy as np
import tfrec_recall
import tensorflow as tf
path = sys.argv[1]
manifest = json.load(open(path + "/assets/manifest.json"))
if manifest.get("requires_custom_ops"):
    import scann  # noqa: F401  (registers the ScaNN ops)
request = json.load(open(path + "/assets/request.json"))
loaded = tf.saved_model.load(path)
fn = loaded.signatures["serving_default"]
inputs = {name: tf.constant(np.asarray(value, dtype=np.float32 if spec.dtype == tf.float32 else object),
                            dtype=spec.dtype)
          for (name, value), spec in ((item, fn.structured_input_signature[1][item[0]]) for item in request.items())}
out = fn(**inputs)
ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
if ids.shape[0] != len(next(iter(request.values()))) or ids.shape[1] != manifest["k"]:
    raise SystemExit(f"unexpected output shape {ids.shape}")
if not np.all(np.isfinite(scores[:, 0])):
    raise SystemExit("non-finite top score")
print(json.dumps({"item_ids": [[i.decode() for i in row[:5]] for row in ids], "k": int(ids.shape[1])}))
"""


def smoke_test_export(export_dir, timeout: float = 600.0) -> Dict[str, Any]:
    """Loads the export in a fresh Python process and answers its ``assets/request.json`` through
    ``serving_default``. Returns ``{"ok": bool, "output" or "error": ...}``; never raises for a broken model."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        done = subprocess.run([sys.executable, "-c", _SMOKE_TEST, str(export_dir)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return {"ok": False, "error": lines[-1] if lines else f"exit code {done.returncode}"}
    return {"ok": True, "output": json.loads(done.stdout.strip().splitlines()[-1])}
