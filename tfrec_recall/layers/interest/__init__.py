"""Multi-interest layers: the scorers a RetrievalTask computes its logits with (dot product, max over K
interests, MIND's label-aware attention)."""
from tfrec_recall.layers.interest.scorers import (DotScorer, LabelAwareAttentionScorer, MaxInterestScorer,
                                                  Scorer)

__all__ = ["Scorer", "DotScorer", "MaxInterestScorer", "LabelAwareAttentionScorer"]
