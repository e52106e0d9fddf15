from tfrec_recall.layers.frequency import StreamingFrequencyEstimator
from tfrec_recall.layers.sampling import CorpusNegativeSampler
from tfrec_recall.layers.towers import TOWERS, MLPTower, ResidualTower, SENetTower, Tower, YouTubeDNNTower

__all__ = ["StreamingFrequencyEstimator", "CorpusNegativeSampler", "Tower", "MLPTower", "SENetTower",
           "ResidualTower", "YouTubeDNNTower", "TOWERS"]
