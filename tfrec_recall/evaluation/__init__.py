"""Evaluation: tie-aware full-corpus metrics, evaluation of a model on a split, the most-popular baseline and
the pipeline's blessing verdict and report."""
from tfrec_recall.evaluation.baselines import evaluation_rows, most_popular_metrics
from tfrec_recall.evaluation.evaluate import corpus_arrays, embed, evaluate, evaluate_towers
from tfrec_recall.evaluation.metrics import full_corpus_metrics

__all__ = ["full_corpus_metrics", "evaluate", "evaluate_towers", "embed", "corpus_arrays", "most_popular_metrics",
           "evaluation_rows"]
