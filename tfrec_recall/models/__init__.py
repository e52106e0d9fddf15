"""Retrieval models: :class:`RetrievalModel` (train / test steps, the auxiliary-loss hook, ``index_candidates``
/ ``recommend``) and :class:`TwoTower`, a query tower and a candidate tower trained with a RetrievalTask."""
from tfrec_recall.models.base import AlignmentLoss, AuxiliaryLoss, RetrievalModel, index_split_corpus
from tfrec_recall.models.two_tower import TwoTower

__all__ = ["RetrievalModel", "AuxiliaryLoss", "AlignmentLoss", "TwoTower", "index_split_corpus"]
