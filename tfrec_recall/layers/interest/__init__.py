"""Multi-interest layers: the scorers a RetrievalTask computes its logits with (dot product, max over K
interests, MIND's label-aware attention) and the sequence encoders / interest extractors of the sequence and
multi-interest towers (SASRec, MIND's B2I routing, ComiRec-DR and ComiRec-SA)."""
from tfrec_recall.layers.interest.extractors import (B2IRouting, CapsuleRouting, CausalSelfAttentionEncoder,
                                                     SelfAttentiveExtraction, dynamic_routing, squash)
from tfrec_recall.layers.interest.scorers import (DotScorer, LabelAwareAttentionScorer, MaxInterestScorer,
                                                  Scorer)

__all__ = ["Scorer", "DotScorer", "MaxInterestScorer", "LabelAwareAttentionScorer", "B2IRouting", "CapsuleRouting",
           "CausalSelfAttentionEncoder", "SelfAttentiveExtraction", "dynamic_routing", "squash"]
