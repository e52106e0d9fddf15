"""Top-k indexes: BruteForce and IVF (stock TF ops), ScaNN (scann's custom ops)."""
from tfrec_recall.index.base import TopKIndex
from tfrec_recall.index.brute_force import BruteForce
from tfrec_recall.index.ivf import IVF, kmeans
from tfrec_recall.index.scann import ScaNN, ScaNNConfig

__all__ = ["TopKIndex", "BruteForce", "IVF", "ScaNN", "ScaNNConfig", "kmeans"]
