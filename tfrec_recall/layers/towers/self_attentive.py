"""The self-attentive sequence user tower (SASRec; Kang & McAuley 2018, "Self-Attentive Sequential
Recommendation"): the history through a causal transformer with learned positions
(:class:`~tfrec_recall.layers.interest.extractors.CausalSelfAttentionEncoder`); the state of the most recent
behaviour, which has attended to the whole history, replaces the pooled history among the tower's fields, then
the MLP and projection of :class:`MLPTower` (with no hidden units: the projection alone). A user with an empty
history gets a learned default state."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from tfrec_recall.features import SpecLike
from tfrec_recall.layers.interest.extractors import CausalSelfAttentionEncoder
from tfrec_recall.layers.towers.base import register_tower
from tfrec_recall.layers.towers.mlp import MLPTower
from tfrec_recall._validation import require_dropout


@register_tower("self_attentive")
@tf.keras.utils.register_keras_serializable(package="tfrec_recall")
class SelfAttentiveTower(MLPTower):
    """SASRec user tower (module docstring). ``num_blocks`` / ``num_heads`` / ``attention_dropout``: the
    encoder's (SASRec's defaults: 2 blocks, 1 head, dropout 0.2)."""

    query_only = True

    def __init__(self, features: Sequence[SpecLike], hidden_units: Sequence[int] = (), num_blocks: int = 2,
                 num_heads: int = 1, attention_dropout: float = 0.2, activation: str = "relu", output_dim: int = 64,
                 l2_normalize: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(features, hidden_units=hidden_units, activation=activation, output_dim=output_dim,
                         l2_normalize=l2_normalize, dropout=dropout, **kwargs)
        history = self.history_spec("SelfAttentiveTower")
        self.history_name = history.name
        self.history_index = self.encoder.feature_names.index(history.name)
        require_dropout("attention_dropout", attention_dropout)  # errors name the tower's argument
        self.sequence_encoder = CausalSelfAttentionEncoder(history.width, num_blocks, num_heads, attention_dropout,
                                                           name="self_attention")
        self.empty_history = self.add_weight(name="empty_history", shape=(history.embedding_dim,),
                                             initializer=tf.keras.initializers.RandomNormal(stddev=0.05))

    def history_state(self, inputs, training=None) -> tf.Tensor:
        """``[batch, d]``: the encoder's state at the most recent behaviour; the learned default when empty."""
        sequence, mask = self.encode_sequence(inputs, self.history_name)
        state = self.sequence_encoder.last_state(self.sequence_encoder(sequence, mask, training=training))
        return tf.where(mask[:, :1], state, self.empty_history[None, :])

    def call(self, inputs, training=None, field_mask=None):
        fields = self.fields(inputs, field_mask)
        state = self.history_state(inputs, training=training)
        if field_mask is not None:
            state = state * tf.cast(field_mask, state.dtype)[:, self.history_index:self.history_index + 1]
        fields[self.history_index] = state
        return self.head(fields, training=training)

    def get_config(self):
        encoder = self.sequence_encoder
        return {**super().get_config(), "num_blocks": encoder.num_blocks, "num_heads": encoder.num_heads,
                "attention_dropout": encoder.dropout_rate}

    @classmethod
    def run_config_options(cls, config) -> dict:
        return {"num_blocks": config.attention_blocks, "num_heads": config.attention_heads,
                "attention_dropout": config.attention_dropout}
