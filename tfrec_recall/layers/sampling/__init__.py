"""Sampling: corpus negatives (uniform / popularity-damped) and the streaming frequency estimator behind logQ."""
from tfrec_recall.layers.sampling.frequency import NonTrainableLayer, StreamingFrequencyEstimator
from tfrec_recall.layers.sampling.negatives import CorpusNegativeSampler

__all__ = ["CorpusNegativeSampler", "StreamingFrequencyEstimator", "NonTrainableLayer"]
