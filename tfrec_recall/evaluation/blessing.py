"""The pipeline's RetrievalEvaluator as library functions: full-corpus metrics of a saved run, the blessing
verdict (thresholds, most-popular ranker, latest blessed model) and the HTML/PNG report (no tfx import)."""
from __future__ import annotations

import base64
import html
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

POPULARITY_METRIC = "HR@50"


def evaluate_model(model_dir: str, split, which: Sequence[str] = ("valid", "test"),
                   ks: Sequence[int] = (10, 50, 100)) -> Dict[str, Dict[str, float]]:
    """Full-corpus metrics (PROTOCOL.md) of a saved run on the split's rows, keyed by ``which``."""
    from tfrec_recall.training import evaluate_towers, load_run
    run = load_run(model_dir)
    return {name: evaluate_towers(run.query_tower, run.candidate_tower, split, name, ks) for name in which}


def judge(metrics: Mapping[str, float], thresholds: Mapping[str, float],
          baseline: Optional[Mapping[str, float]] = None, margin: float = 0.01,
          compare: Sequence[str] = (), *, popularity: Optional[Mapping[str, float]] = None,
          popularity_margin: float = 0.02, popularity_metric: str = POPULARITY_METRIC) -> Dict[str, Any]:
    """The blessing verdict of a candidate's ``metrics`` (one split). Checks, all of which must pass:

    * ``"threshold"``: every ``thresholds`` metric is >= its bound;
    * ``"popularity"`` (given ``popularity``, the most-popular ranker's metrics on the same split, see
      ``tfrec_recall.evaluation.baselines.most_popular_metrics``): ``popularity_metric`` BEATS it by the absolute
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
