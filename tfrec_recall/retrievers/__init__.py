"""Top-k indexes: BruteForce and IVF (stock TF ops), ScaNN (scann's custom ops), registered by name in
:mod:`tfrec_recall.retrievers.registry` (``index_names()``: brute_force, ivf, scann); ``MultiQueryRetriever`` searches K query vectors per user in any
of them and merges the results; ``DeepRetrievalIndex`` retrieves by beam search over Deep Retrieval's learned
paths."""
from tfrec_recall.retrievers.base import (INDEX_FORMAT_VERSION, TopKIndex, check_format_version,
                                     check_saved_format_version)
from tfrec_recall.retrievers.brute_force import BruteForce
from tfrec_recall.retrievers.deep_retrieval import DeepRetrievalIndex
from tfrec_recall.retrievers.ivf import IVF, kmeans
from tfrec_recall.retrievers.multi_query import MultiQueryRetriever
from tfrec_recall.retrievers.protocol import Retriever
from tfrec_recall.retrievers.registry import index_class, index_names, register_index
from tfrec_recall.retrievers.scann import ScaNN, ScaNNConfig

__all__ = ["Retriever", "TopKIndex", "BruteForce", "DeepRetrievalIndex", "IVF", "ScaNN", "ScaNNConfig", "MultiQueryRetriever", "kmeans", "INDEX_FORMAT_VERSION",
           "check_format_version", "check_saved_format_version", "index_class", "index_names", "register_index"]
