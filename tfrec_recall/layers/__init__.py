"""Layers by role: ``towers/`` (query and item encoders), ``sampling/`` (negatives, frequency estimation),
``interest/`` (scorers: dot product, max over interests, label-aware attention)."""
from tfrec_recall.layers.interest import DotScorer, LabelAwareAttentionScorer, MaxInterestScorer, Scorer
from tfrec_recall.layers.sampling import CorpusNegativeSampler, StreamingFrequencyEstimator
from tfrec_recall.layers.towers import MLPTower, ResidualTower, SENetTower, Tower, YouTubeDNNTower

__all__ = ["StreamingFrequencyEstimator", "CorpusNegativeSampler", "Tower", "MLPTower", "SENetTower",
           "ResidualTower", "YouTubeDNNTower", "Scorer", "DotScorer", "MaxInterestScorer",
           "LabelAwareAttentionScorer"]
