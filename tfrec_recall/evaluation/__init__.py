"""Evaluation: tie-aware metrics of the ranked lists of any retriever (with the full-corpus reference), evaluation
of a model on a split or a dataset, the most-popular baseline, the pipeline's blessing verdict and report, and the
measures of multi-interest models (interest recovery, intra-list diversity), and the adjusted Rand index."""
from tfrec_recall.evaluation.baselines import evaluation_rows, most_popular_metrics
from tfrec_recall.evaluation.clustering import adjusted_rand_index
from tfrec_recall.evaluation.evaluate import corpus_arrays, embed, evaluate, evaluate_towers
from tfrec_recall.evaluation.interests import (cluster_centroids, interest_recovery, intra_list_diversity,
                                               split_interest_recovery)
from tfrec_recall.evaluation.metrics import full_corpus_metrics
from tfrec_recall.evaluation.ranked import ranked_list_metrics
from tfrec_recall.evaluation.retrieval import evaluate_retriever

__all__ = ["full_corpus_metrics", "ranked_list_metrics", "evaluate_retriever", "evaluate", "evaluate_towers", "embed",
           "corpus_arrays", "most_popular_metrics", "evaluation_rows",
           "interest_recovery", "cluster_centroids", "intra_list_diversity", "split_interest_recovery",
           "adjusted_rand_index"]
