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
    """Full-corpus metrics (PROTOCOL.md) of a saved run on the split's rows, keyed by ``which``: exact search,
    or for a run trained with ``deep_retrieval: true`` its beam search over the whole corpus (as training
    measured it)."""
    from tfrec_recall.export.run_index import deep_retrieval_run_index
    from tfrec_recall.training import evaluate_towers, load_run
    run = load_run(model_dir)
    retriever = None if run.structure is None else deep_retrieval_run_index(run, len(run.candidate_ids))
    return {name: evaluate_towers(run.query_tower, run.candidate_tower, split, name, ks, retriever=retriever)
            for name in which}


EXAMPLE_SPLITS = {"eval": "valid", "test": "test"}  # a split of the pipeline's Examples -> the protocol's name


class ExamplesEvaluator:
    """Metrics of saved runs on the eval and test splits of one ``Examples`` artifact (keyed ``"eval"`` /
    ``"test"``), every run ranked over the corpus of ``model_dir``, the candidate model trained on these examples
    (a baseline trained on older data is re-embedded over it). A run whose configuration streams
    (:func:`~tfrec_recall.training.streaming.require_streamable`) is evaluated from the split files chunk by chunk
    (:mod:`tfrec_recall.evaluation.streamed`: nothing read whole); any other run on the split read into memory,
    once per history length."""

    def __init__(self, examples_uri: str, model_dir: str, ks: Sequence[int] = (10, 50, 100)):
        self.examples_uri, self.model_dir, self.ks = str(examples_uri), str(model_dir), list(ks)
        self._splits: Dict[int, Any] = {}
        self._configs: Dict[str, Any] = {}
        self._corpus: Optional[tuple] = None

    def config(self, model_dir: str):
        from tfrec_recall.training import load_run_config
        if model_dir not in self._configs:
            self._configs[model_dir] = load_run_config(model_dir)
        return self._configs[model_dir]

    def streams(self, model_dir: str) -> bool:
        from tfrec_recall.config import ConfigError
        from tfrec_recall.training.streaming import require_streamable
        try:
            require_streamable(self.config(model_dir))
        except ConfigError:
            return False
        return True

    def split(self, model_dir: str):
        """The Examples read into memory with the run's history length (read once per length)."""
        from tfrec_recall.data.protocol import read_split_examples
        history_length = self.config(model_dir).history_length
        if history_length not in self._splits:
            self._splits[history_length] = read_split_examples(self.examples_uri, history_length)
        return self._splits[history_length]

    def corpus(self):
        """(the candidate model's corpus ids, their training counts or None for a run saved without them)."""
        if self._corpus is None:
            from tfrec_recall import storage
            saved = storage.load_npz(storage.join(self.model_dir, "candidates.npz"))
            self._corpus = (saved["ids"].astype(str), saved["counts"] if "counts" in saved.files else None)
        return self._corpus

    def metrics(self, model_dir: str) -> Dict[str, Dict[str, float]]:
        """The run's metrics on both splits."""
        if not self.streams(model_dir):
            out = evaluate_model(model_dir, self.split(model_dir), list(EXAMPLE_SPLITS.values()), self.ks)
            return {name: out[which] for name, which in EXAMPLE_SPLITS.items()}
        from tfrec_recall.evaluation.streamed import evaluate_examples
        from tfrec_recall.training import load_run
        run = load_run(model_dir)
        ids, embeddings = self._ranked_corpus(run)
        return {name: evaluate_examples(run.query_tower, ids, embeddings, self._files(name), self._schema(),
                                        self.ks) for name in EXAMPLE_SPLITS}

    def _ranked_corpus(self, run):
        """(corpus ids, the run's candidate embeddings of them): saved with the run when its corpus is this one."""
        from tfrec_recall.data.schema import ITEM_ID
        from tfrec_recall.data.side_tables import CORPUS
        from tfrec_recall.evaluation.evaluate import embed
        from tfrec_recall.evaluation.streamed import corpus_inputs
        ids, _ = self.corpus()
        if np.array_equal(np.asarray(run.candidate_ids).astype(str), ids):
            return ids, run.candidate_embeddings
        arrays = corpus_inputs(run.candidate_tower.input_specs, ids, self._files(CORPUS, missing_ok=True),
                               self._side())
        return arrays[ITEM_ID].astype(str), embed(run.candidate_tower, arrays)

    def popularity(self) -> Dict[str, Dict[str, float]]:
        """The most-popular ranker's metrics on both splits, over the candidate model's corpus: its saved
        training counts, or (a run saved without them) the items of the train split counted in batches."""
        from tfrec_recall.evaluation.baselines import most_popular_metrics
        if not self.streams(self.model_dir):
            return {name: most_popular_metrics(self.split(self.model_dir), which, self.ks)
                    for name, which in EXAMPLE_SPLITS.items()}
        from tfrec_recall.evaluation.streamed import count_items, most_popular_examples
        ids, counts = self.corpus()
        if counts is None:
            counts = count_items(self._files("train"), self._schema(), ids)
        return {name: most_popular_examples(ids, counts, self._files(name), self._schema(), self.ks)
                for name in EXAMPLE_SPLITS}

    def _files(self, name: str, missing_ok: bool = False) -> List[str]:
        from tfrec_recall import storage
        from tfrec_recall.data.protocol import split_files
        if missing_ok and not storage.exists(storage.join(self.examples_uri, f"Split-{name}")):
            return []
        return split_files(self.examples_uri, name)

    def _side(self):
        from tfrec_recall.data.side_tables import read_side_features
        return read_side_features(self.examples_uri)

    def _schema(self):
        from tfrec_recall.data.streaming import split_schema
        return split_schema(self._side())


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
