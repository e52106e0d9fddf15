"""Towers: raw features -> one embedding per example (K per user for the multi-interest towers). Each tower is
a class registered once by name (:func:`register_tower`); a RunConfig's ``query_tower`` / ``candidate_tower``
name one."""
from tfrec_recall.layers.towers.base import (Tower, model_base_config, register_tower, tower_class,
                                             tower_names)
from tfrec_recall.layers.towers.mlp import MLPTower
from tfrec_recall.layers.towers.multi_interest import (ComiRecDRTower, ComiRecSATower, MINDTower,
                                                       MultiInterestTower)
from tfrec_recall.layers.towers.parallel import ParallelTower
from tfrec_recall.layers.towers.residual import ResidualTower
from tfrec_recall.layers.towers.sdm import SDMTower
from tfrec_recall.layers.towers.self_attentive import SelfAttentiveTower
from tfrec_recall.layers.towers.senet import SENetTower
from tfrec_recall.layers.towers.youtube_dnn import YouTubeDNNTower

__all__ = ["Tower", "MLPTower", "ParallelTower", "SENetTower", "ResidualTower", "YouTubeDNNTower",
           "SelfAttentiveTower", "MultiInterestTower", "MINDTower", "ComiRecDRTower", "ComiRecSATower",
           "SDMTower", "model_base_config", "register_tower", "tower_class", "tower_names"]
