"""Offline evaluation of retrieval models on a split (PROTOCOL.md): full-corpus metrics of every held-out user."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np
import pandas as pd

from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.evaluation.metrics import full_corpus_metrics
from tfrec_recall.features import feature_arrays


def corpus_arrays(split: Split, specs) -> Dict[str, np.ndarray]:
    """Raw candidate features of every item in the corpus (sorted ids)."""
    return feature_arrays(pd.DataFrame({ITEM_ID: split.data.items}), split.data, specs)


def evaluate(model, split: Split, which: str = "test", ks: Sequence[int] = (10, 50, 100),
             progress: bool = False) -> Dict[str, float]:
    """PROTOCOL.md metrics of ``model`` on the split's ``valid`` or ``test`` rows over the full corpus."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    return evaluate_towers(model.query_tower, model.candidate_tower, split, which, ks, progress)


def evaluate_towers(query_tower, candidate_tower, split: Split, which: str = "test",
                    ks: Sequence[int] = (10, 50, 100), progress: bool = False) -> Dict[str, float]:
    rows = getattr(split, which)
    # One query per user; a user with several held-out items (random split) has them all as positives.
    grouped = rows.groupby(USER_ID, sort=False)
    positives_by_user = grouped[ITEM_ID].agg(list)
    users = rows.drop_duplicates(USER_ID).reset_index(drop=True)
    items = split.data.items
    index = {item: i for i, item in enumerate(items)}
    candidates = embed(candidate_tower, corpus_arrays(split, candidate_tower.encoder.specs))
    queries = embed(query_tower, feature_arrays(users, split.data, query_tower.encoder.specs))
    positives = [[index[i] for i in positives_by_user[u]] for u in users[USER_ID]]
    exclude = [[index[i] for i in split.train_items.get(u, [])] for u in users[USER_ID]]
    return full_corpus_metrics(queries, candidates, positives, exclude, ks=ks, progress=progress)


def embed(tower, arrays: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
    outputs = [tower(batch, training=False).numpy() for batch in make_dataset(arrays, batch_size)]
    return np.concatenate(outputs, axis=0)
