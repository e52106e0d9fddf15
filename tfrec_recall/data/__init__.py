"""Data: the interaction schema, readers, the synthetic default (and the drifting and multi-interest logs), splits
and input pipelines."""
from tfrec_recall.data.readers import (read_csv, read_movielens_100k, read_movielens_1m, read_movielens_latest,
                                       read_parquet)
from tfrec_recall.data.schema import DataError, InteractionData
from tfrec_recall.data.split import Split, leave_last_out, random_split
from tfrec_recall.data.drifting import make_drifting
from tfrec_recall.data.interests import InterestTruth, make_multi_interest
from tfrec_recall.data.synthetic import make_synthetic

__all__ = ["DataError", "InteractionData", "Split", "leave_last_out", "random_split", "make_synthetic", "make_drifting",
           "make_multi_interest", "InterestTruth", "read_csv", "read_parquet", "read_movielens_100k",
           "read_movielens_1m", "read_movielens_latest"]
