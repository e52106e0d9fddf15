"""The auxiliary losses and augmented vectors a RunConfig switches on (DAT, category alignment, contrastive
learning, distillation), built from the split: one function per option, each reading only its config keys."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall.config import ConfigError, RunConfig
from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.evaluation.evaluate import corpus_arrays
from tfrec_recall.features import FeatureSpec, IdFeature, spec_for_table_kind, vocabulary_of
from tfrec_recall.tasks.auxiliary import AuxiliaryLoss


def _side_table(split: Split, side: str) -> Optional[pd.DataFrame]:
    return split.data.user_features if side == "query" else split.data.item_features


def augment_spec(config: RunConfig, split: Split, side: str) -> Optional[IdFeature]:
    """DAT's augmented-vector id of ``side`` ("query" / "candidate"), of the towers' output width; ``None``
    without ``dat``. The id is the user / item id or a categorical side feature of that side."""
    if not config.dat:
        return None
    key = "dat_query_feature" if side == "query" else "dat_candidate_feature"
    name, entity = getattr(config, key), (USER_ID if side == "query" else ITEM_ID)
    if name == entity:
        values = split.train[entity]
    else:
        table = _side_table(split, side)
        if table is None or name not in table.columns or split.data.feature_kinds.get(name) != "categorical":
            known = [entity] + [c for c in (table.columns if table is not None else [])
                                if split.data.feature_kinds.get(c) == "categorical"]
            raise ConfigError(f"config key {key!r}: must be one of {known} (the {side} side's ids), got {name!r}")
        values = table[name].reindex(pd.Index(split.train[entity].unique())).dropna()
    return IdFeature(name, config.output_dim, vocabulary=vocabulary_of(values.astype(str)))


def category_spec(config: RunConfig, split: Split, candidate_specs: Sequence[FeatureSpec]) -> FeatureSpec:
    """The spec of the item feature naming each item's category (the candidate tower's own spec if it reads
    it); ``ConfigError`` naming the item features otherwise."""
    name = config.category_feature
    for spec in candidate_specs:
        if spec.name == name:
            return spec
    table = split.data.item_features
    if table is None or name not in table.columns or split.data.feature_kinds[name] == "numeric":
        known = [] if table is None else [c for c in table.columns if split.data.feature_kinds[c] != "numeric"]
        raise ConfigError(f"config key 'category_feature': must be a categorical item feature of "
                          f"{split.data.name!r} ({known}), got {name!r}")
    rows = table.reindex(pd.Index(split.train[ITEM_ID].unique()))
    return spec_for_table_kind(split.data.feature_kinds[name]).from_column(name, rows[name], config.side_embedding_dim)


def auxiliary_losses(config: RunConfig, split: Split, query_tower, candidate_tower) -> List[AuxiliaryLoss]:
    """The auxiliary losses ``config`` switches on for these towers, in a fixed order, each named as it is
    logged."""
    specs = {"query": query_tower.input_specs, "candidate": candidate_tower.input_specs}
    from tfrec_recall.tasks.contrastive import ContrastiveLoss, correlated_mask_sets
    from tfrec_recall.tasks.dat import AdaptiveMimicLoss, CategoryAlignmentLoss
    losses: List[AuxiliaryLoss] = []
    if config.dat:
        losses += [AdaptiveMimicLoss("query", weight=config.dat_query_weight, name="mimic_query"),
                   AdaptiveMimicLoss("candidate", weight=config.dat_candidate_weight, name="mimic_candidate")]
    if config.category_alignment_weight > 0:
        category = category_spec(config, split, specs["candidate"])
        try:
            losses.append(CategoryAlignmentLoss(category, weight=config.category_alignment_weight,
                                                name="category_alignment"))
        except ValueError as error:
            raise ConfigError(f"config key 'category_feature': {error}") from None
    if config.contrastive_weight > 0:
        corpus = corpus_arrays(split, specs["candidate"])
        names = candidate_tower.encoder.feature_names  # the masked fields
        masks = correlated_mask_sets(corpus, names) if config.contrastive_masking == "correlated" else None
        losses.append(ContrastiveLoss(corpus, weight=config.contrastive_weight,
                                      temperature=config.contrastive_temperature,
                                      batch_size=min(config.contrastive_batch_size, len(split.data.items)),
                                      dropout=config.contrastive_dropout, mask_sets=masks, seed=config.seed,
                                      name="contrastive"))
    if config.distillation_weight > 0:
        losses.append(_distillation(config, split, specs))
    if config.deep_retrieval:
        losses.append(_path_structure(config, split))
    return losses


def _path_structure(config: RunConfig, split: Split):
    """Deep Retrieval's structure loss over the corpus; refuses a structure too small to spread the corpus."""
    from tfrec_recall.layers.structure import PathStructure
    from tfrec_recall.tasks.path_likelihood import PathStructureLoss
    items = np.asarray(split.data.items).astype(str)
    paths = config.dr_codes ** config.dr_layers
    per_path = len(items) * config.dr_paths / paths
    if per_path > config.dr_max_items_per_path:
        raise ConfigError(f"config keys 'dr_codes', 'dr_layers': K^D = {config.dr_codes}^{config.dr_layers} = "
                          f"{paths} paths cannot spread {len(items)} items x {config.dr_paths} paths each: "
                          f"{per_path:.0f} items per path > dr_max_items_per_path ({config.dr_max_items_per_path})")
    structure = PathStructure(num_layers=config.dr_layers, num_codes=config.dr_codes, name="path_structure_model")
    return PathStructureLoss(structure, items, num_paths=config.dr_paths, seed=config.seed,
                             weight=config.dr_structure_weight, name="path_structure")


def _distillation(config: RunConfig, split: Split, specs) -> AuxiliaryLoss:
    from tfrec_recall.models.teacher import train_teacher
    from tfrec_recall.tasks.distillation import DistillationLoss
    teacher = train_teacher(split, specs["query"], specs["candidate"], epochs=config.teacher_epochs,
                            seed=config.seed)
    # Seeded again: the student's initialisation is then the same as without distillation.
    tf.keras.utils.set_random_seed(config.seed)
    return DistillationLoss(teacher, weight=config.distillation_weight,
                            temperature=config.distillation_temperature,
                            num_candidates=config.distillation_candidates, name="distillation")


