"""Splits and causal history features.

``leave_last_out`` implements ../shared/PROTOCOL.md: per user, interactions sorted by timestamp (ties by file
order); the last is the test item, the one before it the validation item, the rest training; users with fewer
than 3 interactions stay in training only. ``random_split`` is the alternative: each interaction of a user
with at least 3 goes to validation / test with the given probabilities (at least one stays in training).

History features are causal. A training row's ``history`` holds the same user's previous ``history_length``
training items, most recent first: never the row's own item, never anything later. A validation or test row's
``history`` holds the user's last training items (no validation or test item), and ``exclude`` all the user's
training items, which ranking removes from the candidates. ``history_times`` holds the timestamps of the
``history`` items, in the same order (session-based towers such as SDM split sessions by them).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, DataError, InteractionData
from tfrec_recall._validation import require_int

ORDER = "_order"
MIN_USERS = 2
MIN_INTERACTIONS = 3  # per user, for leave_last_out to hold one out for validation and one for test


@dataclasses.dataclass
class Split:
    data: InteractionData
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    history_length: int
    train_items: Dict[str, List[str]]  # user -> training items in time order
    train_times: Optional[Dict[str, List[int]]] = None  # user -> their timestamps (None: not recorded)

    def describe(self) -> str:
        return (f"train {len(self.train):,} rows, valid {len(self.valid):,} users, test {len(self.test):,} users, "
                f"history length {self.history_length}")


def _sorted(data: InteractionData) -> pd.DataFrame:
    df = data.interactions.copy()
    df[ORDER] = np.arange(len(df))
    return df.sort_values([USER_ID, TIMESTAMP, ORDER], kind="mergesort").reset_index(drop=True)


def _build(data: InteractionData, df: pd.DataFrame, role: np.ndarray, history_length: int) -> Split:
    """role: 0 train, 1 valid, 2 test, per row of the user/time-sorted frame ``df``."""
    _check_roles(data, df, role)
    train_items: Dict[str, List[str]] = {}
    train_times: Dict[str, List[int]] = {}
    histories, times = np.empty(len(df), dtype=object), np.empty(len(df), dtype=object)
    users, items = df[USER_ID].to_numpy(), df[ITEM_ID].to_numpy()
    stamps = df[TIMESTAMP].to_numpy()
    boundaries = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        sequence: List[str] = []
        when: List[int] = []
        for row in range(start, end):
            if role[row] == 0:
                histories[row], times[row] = _recent(sequence, when, history_length)
                sequence.append(items[row])
                when.append(int(stamps[row]))
        train_items[users[start]], train_times[users[start]] = sequence, when
        recent = _recent(sequence, when, history_length)
        for row in range(start, end):
            if role[row] != 0:
                histories[row], times[row] = recent
    df = df.assign(history=histories, history_times=times)
    keep = [USER_ID, ITEM_ID, TIMESTAMP] + ([WEIGHT] if WEIGHT in df.columns else []) + ["history", "history_times"]
    train = df.loc[role == 0, keep].reset_index(drop=True)
    valid = df.loc[role == 1, keep].reset_index(drop=True)
    test = df.loc[role == 2, keep].reset_index(drop=True)
    return Split(data, train, valid, test, history_length, train_items, train_times)


def _check_roles(data: InteractionData, df: pd.DataFrame, role: np.ndarray) -> None:
    """A split must leave something to learn from and to measure: 2 users or more, and validation and test
    rows (leave-last-out: a user with 3 interactions or more)."""
    users = df[USER_ID].nunique()
    if users < MIN_USERS:
        raise DataError(f"the data has {users} user(s); a retrieval split needs at least {MIN_USERS} (in-batch "
                        "negatives and a held-out user to rank for)", path=data.name)
    if not (role == 1).any() or not (role == 2).any():
        most = int(df.groupby(USER_ID).size().max())
        raise DataError(f"no user is left for validation and test: a user needs at least {MIN_INTERACTIONS} "
                        f"interactions (training, validation, test), the most any user has is {most}",
                        path=data.name)


def _recent(sequence: List[str], when: List[int], history_length: int):
    """(history, its timestamps): the last ``history_length`` items, most recent first."""
    return tuple(sequence[::-1][:history_length]), tuple(when[::-1][:history_length])


def leave_last_out(data: InteractionData, history_length: int = 50) -> Split:
    require_int("history_length", history_length)
    df = _sorted(data)
    counts = df.groupby(USER_ID, sort=False)[ITEM_ID].transform("size").to_numpy()
    position_from_end = counts - 1 - df.groupby(USER_ID, sort=False).cumcount().to_numpy()
    eligible = counts >= 3
    role = np.zeros(len(df), dtype=np.int8)
    role[eligible & (position_from_end == 0)] = 2
    role[eligible & (position_from_end == 1)] = 1
    return _build(data, df, role, history_length)


def random_split(data: InteractionData, valid_fraction: float = 0.1, test_fraction: float = 0.1,
                 history_length: int = 50, seed: int = 0) -> Split:
    require_int("history_length", history_length)
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(f"valid_fraction + test_fraction must be < 1, got {valid_fraction + test_fraction}")
    df = _sorted(data)
    rng = np.random.default_rng(seed)
    draw = rng.random(len(df))
    role = np.where(draw < test_fraction, 2, np.where(draw < test_fraction + valid_fraction, 1, 0)).astype(np.int8)
    counts = df.groupby(USER_ID, sort=False)[ITEM_ID].transform("size").to_numpy()
    role[counts < 3] = 0
    # Keep at least one training interaction per user: the user's first row.
    first = df.groupby(USER_ID, sort=False).cumcount().to_numpy() == 0
    role[first] = 0
    return _build(data, df, role, history_length)
