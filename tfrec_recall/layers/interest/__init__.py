"""Multi-interest layers: the scorers a RetrievalTask computes its logits with (dot product, max over K
interests, MIND's label-aware attention), the sequence encoders / interest extractors of the sequence and
multi-interest towers (SASRec, MIND's B2I routing, ComiRec-DR and ComiRec-SA) and SDM's session blocks."""
from tfrec_recall.layers.interest.extractors import (B2IRouting, CapsuleRouting, CausalSelfAttentionEncoder,
                                                     SelfAttentiveExtraction, dynamic_routing, squash)
from tfrec_recall.layers.interest.scorers import (DotScorer, LabelAwareAttentionScorer, MaxInterestScorer,
                                                  Scorer)
from tfrec_recall.layers.interest.sessions import GatedFusion, UserAttentionPooling, current_session

__all__ = ["Scorer", "DotScorer", "MaxInterestScorer", "LabelAwareAttentionScorer", "B2IRouting", "CapsuleRouting",
           "CausalSelfAttentionEncoder", "SelfAttentiveExtraction", "dynamic_routing", "squash", "GatedFusion",
           "UserAttentionPooling", "current_session"]
