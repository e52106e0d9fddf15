"""Layers by role: ``towers/`` (query and item encoders), ``sampling/`` (negatives, frequency estimation)."""
from tfrec_recall.layers.sampling import CorpusNegativeSampler, StreamingFrequencyEstimator
from tfrec_recall.layers.towers import MLPTower, ResidualTower, SENetTower, Tower, YouTubeDNNTower

__all__ = ["StreamingFrequencyEstimator", "CorpusNegativeSampler", "Tower", "MLPTower", "SENetTower",
           "ResidualTower", "YouTubeDNNTower"]
