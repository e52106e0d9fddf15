"""Models from a RunConfig: feature specs from the split, towers, negatives, the task and the optimizer."""
from __future__ import annotations

import random
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall.config import ConfigError, RunConfig
from tfrec_recall.data.schema import ITEM_ID
from tfrec_recall.data.split import Split
from tfrec_recall.evaluation.evaluate import corpus_arrays
from tfrec_recall.features import FeatureSpec, feature_arrays, specs_from_split
from tfrec_recall.layers.interest.scorers import DotScorer, LabelAwareAttentionScorer
from tfrec_recall.layers.sampling import CorpusNegativeSampler, StreamingFrequencyEstimator
from tfrec_recall.layers.towers import tower_class
from tfrec_recall.models.two_tower import TwoTower
from tfrec_recall.training.auxiliary import augment_spec, auxiliary_losses
from tfrec_recall.tasks.retrieval import RetrievalTask


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    tf.keras.utils.set_random_seed(seed)


def _tower(kind: str, specs: Sequence[FeatureSpec], config: RunConfig, name: str, split: Split, augment=None):
    specs, from_data = tower_class(kind).from_split(specs, config, split)
    return tower(kind, specs, config, name, augment, **from_data)


def _specs(config: RunConfig, split: Split):
    try:
        return specs_from_split(split, embedding_dim=config.embedding_dim,
                                side_embedding_dim=config.side_embedding_dim, history_length=config.history_length,
                                pooling=config.pooling, use_side_features=config.use_side_features,
                                use_user_id=config.use_user_id, use_history=config.use_history,
                                use_example_age=config.example_age)
    except ValueError as error:
        if config.example_age and "example age" in str(error):
            raise ConfigError(f"config key 'example_age': {error}") from None
        raise


def _scorer(config: RunConfig, query_tower):
    """The task's scorer: the dot product, or for a multi-interest query tower the label-aware attention with
    ``label_aware_power`` (null: the tower's paper setting)."""
    if not query_tower.multi_interest:
        return DotScorer(name="dot_scorer")
    power = query_tower.label_aware_power if config.label_aware_power is None else config.label_aware_power
    return LabelAwareAttentionScorer(power=power, name="label_aware_attention")


def build_model(config: RunConfig, split: Split) -> TwoTower:
    specs = _specs(config, split)
    query_tower = _tower(config.query_tower, specs["query"], config, "query_tower", split,
                         augment_spec(config, split, "query"))
    candidate_tower = _tower(config.candidate_tower, specs["candidate"], config, "candidate_tower", split,
                             augment_spec(config, split, "candidate"))
    corpus, counts = None, None
    if config.negatives in ("mixed", "global"):
        corpus = corpus_arrays(split, candidate_tower.input_specs)
        counts = split.train[ITEM_ID].value_counts().reindex(split.data.items, fill_value=0).to_numpy()
    return assemble_model(config, query_tower, candidate_tower, corpus=corpus, counts=counts,
                          auxiliary=auxiliary_losses(config, split, query_tower, candidate_tower))


def assemble_model(config: RunConfig, query_tower, candidate_tower, *, corpus=None, counts=None,
                   auxiliary: Sequence = ()) -> TwoTower:
    """The model around two built towers: the frequency estimator (logQ), the corpus negative sampler (for
    ``negatives`` mixed / global: ``corpus``, the candidate tower's raw inputs of the items to sample, and
    ``counts``, their training counts), the retrieval task and the ``auxiliary`` losses."""
    estimator = None
    if config.logq_correction and config.negatives != "global":  # global negatives: the sampler's own u(y)
        estimator = StreamingFrequencyEstimator(num_buckets=config.estimator_buckets,
                                                num_hashes=config.estimator_hashes, alpha=config.estimator_alpha,
                                                name="frequency_estimator")
    sampler = None
    if config.negatives in ("mixed", "global"):
        if corpus is None or counts is None:
            raise ValueError(f"negatives {config.negatives!r} samples from the corpus: corpus and counts are required")
        sampler = CorpusNegativeSampler(corpus, id_feature=ITEM_ID, counts=counts, beta=config.negative_beta,
                                        num_negatives=config.num_negatives, seed=config.seed,
                                        name="negative_sampler")
    task = RetrievalTask(temperature=config.temperature, remove_accidental_hits=config.remove_accidental_hits,
                         num_hard_negatives=config.num_hard_negatives,
                         in_batch_negatives=config.negatives != "global", scorer=_scorer(config, query_tower),
                         name="retrieval")
    return TwoTower(query_tower, candidate_tower, task, frequency_estimator=estimator, negative_sampler=sampler,
                    logq_correction=config.logq_correction, weight_feature=config.weight_column,
                    auxiliary_losses=list(auxiliary))


def tower(kind: str, specs: Sequence[FeatureSpec], config: RunConfig, name: str, augment=None, **from_data):
    """A tower of class ``kind`` from a RunConfig and its input specs (``from_data``: the class's extra
    arguments read from the data, see ``Tower.from_split``)."""
    cls = tower_class(kind)
    return cls.from_hidden_units(specs, config.hidden_units, output_dim=config.output_dim,
                                 l2_normalize=config.l2_normalize, dropout=config.dropout, name=name,
                                 augment=augment, **cls.run_config_options(config), **from_data)


def make_optimizer(config: RunConfig):
    if config.optimizer == "adagrad":
        return tf.keras.optimizers.Adagrad(config.learning_rate)
    return tf.keras.optimizers.Adam(config.learning_rate)


def training_arrays(model: TwoTower, split: Split) -> Dict[str, np.ndarray]:
    """Raw features of the training rows for both towers, plus the model's sample-weight column if it names one."""
    return feature_arrays(split.train, split.data, model.training_feature_specs(),
                          weight_column=model.weight_feature, training=True)
