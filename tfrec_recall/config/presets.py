"""The one registry of named presets (``--model``): each is a set of overrides of RunConfig's defaults."""
from typing import Any, Dict

_YOUTUBE_DNN_MIXED = {"use_history": True, "use_user_id": False, "use_side_features": True,
                      "query_tower": "youtube_dnn", "hidden_units": [256], "pooling": "recency",
                      "negatives": "mixed", "num_negatives": 2048, "logq_correction": True,
                      "temperature": 0.1, "learning_rate": 0.001}

PRESETS: Dict[str, Dict[str, Any]] = {
    # The TFRS-style two-tower on ids only.
    "two_tower": {},
    # Ids plus user and item side features, SENet-gated query tower.
    "two_tower_features": {"use_side_features": True, "query_tower": "senet", "hidden_units": [128]},
    # YouTubeDNN: user tower over the watch history plus user features.
    "youtube_dnn": {"use_history": True, "use_user_id": False, "use_side_features": True,
                    "query_tower": "youtube_dnn", "hidden_units": [256]},
    # The configuration with the best validation HR@50 in benchmarks/results/quality_ml100k.md (selected on
    # validation, never on test): YouTubeDNN with a recency-weighted history, mixed negatives (in-batch plus 2048
    # uniform corpus samples) and the logQ correction log(B q + M u), temperature 0.1, Adam 1e-3.
    "youtube_dnn_mixed": _YOUTUBE_DNN_MIXED,
    # youtube_dnn_mixed with DAT's augmented vectors and adaptive mimic (Yu et al. 2021): of the two-tower options
    # measured on top of youtube_dnn_mixed (benchmarks/results/options_ml100k.md), the best on validation HR@50
    # that needs no extra feature (0.550 against 0.535; category alignment, 0.552, needs an item category feature).
    "youtube_dnn_mixed_dat": {**_YOUTUBE_DNN_MIXED, "dat": True},
}


# The preset `tfrec-recall train` and the TFX Trainer use when none is named: the best on validation of the
# configurations the pipeline trains (SDM + DAT is higher on validation, benchmarks/results/quality_ml100k.md,
# but reads the histories' timestamps, which the pipeline's examples lack).
DEFAULT_PRESET = "youtube_dnn_mixed_dat"
