from tfrec_recall.models.two_tower import TwoTower

__all__ = ["TwoTower"]
