"""Run configuration: one typed, validated dataclass, loadable from YAML over a named preset (``--model``).

Every field has a default; a YAML file overrides fields of the chosen preset. Unknown keys and bad values fail
with one line naming the key and the value.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from tfrec_recall import storage

NEGATIVES = ("in_batch", "mixed", "global")
OPTIMIZERS = ("adam", "adagrad")
SELECTION_METRICS = ("HR", "NDCG", "Recall")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the value."""


@dataclasses.dataclass
class RunConfig:
    # Features
    use_user_id: bool = True
    use_history: bool = False
    use_side_features: bool = False
    history_length: int = 50
    pooling: str = "mean"
    embedding_dim: int = 64
    side_embedding_dim: int = 16
    # Towers
    query_tower: str = "mlp"
    candidate_tower: str = "mlp"
    hidden_units: Tuple[int, ...] = ()
    output_dim: int = 64
    l2_normalize: bool = True
    dropout: float = 0.0
    # Loss and negatives
    temperature: float = 0.05
    logq_correction: bool = False
    estimator_buckets: int = 1 << 16
    estimator_hashes: int = 2
    estimator_alpha: float = 0.01
    negatives: str = "in_batch"
    num_negatives: int = 1024
    negative_beta: float = 0.0
    num_hard_negatives: Optional[int] = None
    remove_accidental_hits: bool = True
    # Optimisation
    optimizer: str = "adam"
    learning_rate: float = 0.001
    batch_size: int = 512
    epochs: int = 10
    seed: int = 0
    ks: Tuple[int, ...] = (10, 50, 100)
    # The column of the interactions holding each training example's sample weight (None: unweighted)
    weight_column: Optional[str] = None
    # Example Age (Covington et al. 2016): the training example's age as a query feature, 0 at serving time
    example_age: bool = False
    # Parallel towers (query_tower / candidate_tower "parallel"): interaction branches beside the DNN, and how
    # the branches' outputs are combined (concat or a SENet gate)
    parallel_branches: Tuple[str, ...] = ("cross",)
    parallel_combine: str = "concat"
    # DAT (Yu et al. 2021): augmented vectors of these ids in each tower, adaptive-mimic weights lambda_u, lambda_v
    dat: bool = False
    dat_query_feature: str = "user_id"
    dat_candidate_feature: str = "item_id"
    dat_query_weight: float = 1.0
    dat_candidate_weight: float = 1.0
    # DAT's category alignment loss (lambda_c > 0 switches it on) over the item feature category_feature
    category_alignment_weight: float = 0.0
    category_feature: Optional[str] = None
    # Self-supervised contrastive loss of the item tower (Yao et al. 2021; alpha > 0 switches it on)
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_batch_size: int = 256
    contrastive_dropout: float = 0.1
    contrastive_masking: str = "correlated"
    # Distillation from a cross-feature ranking teacher trained on the same data (weight > 0 switches it on)
    distillation_weight: float = 0.0
    distillation_temperature: float = 1.0
    distillation_candidates: int = 64
    teacher_epochs: int = 3
    # Sequence and multi-interest query towers (query_tower self_attentive, mind, comirec_dr, comirec_sa): K
    # interests per user, routing rounds (MIND, ComiRec-DR), the label-aware attention power p of training (null:
    # the tower's paper setting, 2 for MIND, inf = hard max for ComiRec), ComiRec-DR's maps (per_position as in the
    # paper, or per_interest: shared over the positions) and the self-attention encoder's shape
    num_interests: int = 4
    routing_iterations: int = 3
    routing_maps: str = "per_position"
    label_aware_power: Optional[float] = None
    attention_blocks: int = 2
    attention_heads: int = 1
    attention_dropout: float = 0.2
    # SDM (query_tower sdm): a new session starts after a gap above session_gap between adjacent behaviours (in the
    # timestamps' unit: seconds for MovieLens); the current session holds at most session_length behaviours
    session_gap: float = 600.0
    session_length: int = 10
    # Deep Retrieval (Gao et al. 2020): a structure of dr_layers (D) layers of dr_codes (K) codes over the query
    # vector, dr_paths (J) paths per item learned by EM (an M-step after every dr_epochs_per_round epochs, beam
    # width dr_mstep_beam_width, path-size penalty dr_alpha), served by beam search of width dr_beam_width and the
    # two-tower reranker (dr_rerank); a corpus spreading more than dr_max_items_per_path items per path is refused
    deep_retrieval: bool = False
    dr_layers: int = 2
    dr_codes: int = 32
    dr_paths: int = 3
    dr_beam_width: int = 20
    dr_rerank: bool = True
    dr_structure_weight: float = 1.0
    dr_epochs_per_round: int = 1
    dr_mstep_beam_width: int = 10
    dr_alpha: float = 0.0
    dr_max_items_per_path: int = 1000
    # Model selection on the validation split: early stopping with best-epoch restore
    selection_metric: str = "HR@50"
    patience: int = 3  # epochs without improvement before stopping; 0 trains all epochs and keeps the last

    def __post_init__(self):
        def need(condition, key, value, what):
            if not condition:
                raise ConfigError(f"config key {key!r}: {what}, got {value!r}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                need(isinstance(value, bool), f.name, value, "must be true or false")
            elif f.type == "int":
                need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f.name, value,
                     "must be a non-negative integer")
            elif f.type == "float":
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f.name, value, "must be a finite number")
                setattr(self, f.name, float(value))
            elif f.type == "Tuple[str, ...]":
                need(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), f.name, value,
                     "must be a list of names")
                setattr(self, f.name, tuple(value))
            elif f.type == "Tuple[int, ...]":
                need(isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                             and v > 0 for v in value), f.name, value,
                     "must be a list of positive integers")
                setattr(self, f.name, tuple(value))
        from tfrec_recall.layers.towers import tower_class, tower_names  # the registry (imports TensorFlow)
        need(self.query_tower in tower_names(), "query_tower", self.query_tower, f"must be one of {tower_names()}")
        need(self.candidate_tower in tower_names(candidate=True), "candidate_tower", self.candidate_tower,
             f"must be one of {tower_names(candidate=True)}")
        need(not tower_class(self.query_tower).query_only or self.use_history, "query_tower", self.query_tower,
             f"{self.query_tower} reads the history: it needs use_history: true")
        need(self.use_user_id or self.use_history or self.use_side_features, "use_user_id", self.use_user_id,
             "the query tower needs at least one of use_user_id, use_history, use_side_features")
        need(self.negatives in NEGATIVES, "negatives", self.negatives, f"must be one of {NEGATIVES}")
        need(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        need(self.pooling in ("mean", "recency"), "pooling", self.pooling, "must be 'mean' or 'recency'")
        need(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        need(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        need(0 < self.estimator_alpha <= 1, "estimator_alpha", self.estimator_alpha, "must be in (0, 1]")
        need(self.negative_beta >= 0, "negative_beta", self.negative_beta, "must be >= 0")
        need(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        for key in ("batch_size", "epochs", "embedding_dim", "output_dim", "history_length", "num_negatives",
                    "estimator_buckets", "estimator_hashes"):
            need(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        need(self.num_hard_negatives is None or (isinstance(self.num_hard_negatives, int)
                                                  and self.num_hard_negatives >= 1),
             "num_hard_negatives", self.num_hard_negatives, "must be null or a positive integer")
        need(self.weight_column is None or (isinstance(self.weight_column, str) and self.weight_column),
             "weight_column", self.weight_column, "must be null or a column name")
        need(len(self.ks) > 0, "ks", self.ks, "must list at least one cut-off")
        self._check_options(need)
        name, _, k = str(self.selection_metric).partition("@")
        need(name in SELECTION_METRICS and k.isdigit() and int(k) in self.ks, "selection_metric",
             self.selection_metric, f"must be one of {SELECTION_METRICS} at a cut-off in ks {list(self.ks)}, "
             "e.g. 'HR@50'")

    def _check_options(self, need) -> None:
        """The two-tower options of issue 11: weights >= 0, and each option's prerequisites."""
        from tfrec_recall.layers.towers.parallel import BRANCH_COMBINES, PARALLEL_BRANCHES
        for key in ("dat_query_weight", "dat_candidate_weight", "category_alignment_weight", "contrastive_weight",
                    "distillation_weight"):
            need(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        for key in ("contrastive_temperature", "distillation_temperature"):
            need(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        need(len(self.parallel_branches) > 0 and set(self.parallel_branches) <= set(PARALLEL_BRANCHES)
             and len(set(self.parallel_branches)) == len(self.parallel_branches), "parallel_branches",
             list(self.parallel_branches), f"must be distinct names from {list(PARALLEL_BRANCHES)}")
        need(self.parallel_combine in BRANCH_COMBINES, "parallel_combine", self.parallel_combine,
             f"must be one of {list(BRANCH_COMBINES)}")
        need(self.category_alignment_weight == 0 or self.category_feature, "category_feature",
             self.category_feature, "category_alignment_weight > 0 needs an item feature naming each item's "
             "category (e.g. genres)")
        need(self.contrastive_weight == 0 or self.use_side_features, "contrastive_weight", self.contrastive_weight,
             "the contrastive loss masks item features to make two views: it needs use_side_features: true")
        need(self.contrastive_masking in ("correlated", "random"), "contrastive_masking", self.contrastive_masking,
             "must be 'correlated' or 'random'")
        need(0 <= self.contrastive_dropout < 1, "contrastive_dropout", self.contrastive_dropout, "must be in [0, 1)")
        for key in ("contrastive_batch_size", "distillation_candidates", "teacher_epochs"):
            need(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        for key in ("dat_query_feature", "dat_candidate_feature"):
            need(isinstance(getattr(self, key), str) and getattr(self, key), key, getattr(self, key),
                 "must be a feature name")
        need(self.category_feature is None or (isinstance(self.category_feature, str) and self.category_feature),
             "category_feature", self.category_feature, "must be null or an item feature name")
        self._check_sequence_options(need)
        self._check_deep_retrieval(need)

    def _check_deep_retrieval(self, need) -> None:
        """Deep Retrieval's keys (issue 13): J <= B <= K^D, and a single-vector query tower."""
        from tfrec_recall.layers.towers import tower_class
        for key in ("dr_layers", "dr_paths", "dr_beam_width", "dr_epochs_per_round", "dr_mstep_beam_width",
                    "dr_max_items_per_path"):
            need(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        need(self.dr_codes >= 2, "dr_codes", self.dr_codes, "must be >= 2")
        need(self.dr_alpha >= 0, "dr_alpha", self.dr_alpha, "must be >= 0")
        need(self.dr_structure_weight > 0, "dr_structure_weight", self.dr_structure_weight, "must be > 0")
        if not self.deep_retrieval:
            return
        paths = self.dr_codes ** self.dr_layers
        for key in ("dr_beam_width", "dr_mstep_beam_width"):
            need(getattr(self, key) <= paths, key, getattr(self, key),
                 f"must be <= K^D = dr_codes^dr_layers = {self.dr_codes}^{self.dr_layers} = {paths}, the number "
                 "of paths")
        need(self.dr_paths <= self.dr_beam_width, "dr_paths", self.dr_paths,
             f"J paths per item must be <= the beam width dr_beam_width ({self.dr_beam_width})")
        need(not tower_class(self.query_tower).multi_interest, "deep_retrieval", self.deep_retrieval,
             f"the structure model reads one query vector per user; the query tower {self.query_tower} gives "
             f"{self.num_interests}")

    def _check_sequence_options(self, need) -> None:
        """The sequence and multi-interest towers' keys (issue 12)."""
        from tfrec_recall.layers.towers import tower_class
        for key in ("num_interests", "routing_iterations", "attention_blocks", "attention_heads"):
            need(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        need(0 <= self.attention_dropout < 1, "attention_dropout", self.attention_dropout, "must be in [0, 1)")
        need(self.routing_maps in ("per_position", "per_interest"), "routing_maps", self.routing_maps,
             "must be per_position or per_interest")
        need(isinstance(self.session_gap, (int, float)) and not isinstance(self.session_gap, bool)
             and math.isfinite(self.session_gap) and self.session_gap >= 0, "session_gap", self.session_gap,
             "must be a finite number >= 0 (in the timestamps' unit)")
        need(self.session_length >= 1, "session_length", self.session_length, "must be >= 1")
        power = self.label_aware_power
        need(power is None or (isinstance(power, (int, float)) and not isinstance(power, bool)
                               and not math.isnan(power) and power >= 0), "label_aware_power", power,
             "must be null (the tower's paper setting), a number >= 0 or .inf (the hard max)")
        need(self.embedding_dim % self.attention_heads == 0, "attention_heads", self.attention_heads,
             f"must divide embedding_dim ({self.embedding_dim}), the self-attention width")
        if tower_class(self.query_tower).multi_interest:
            for key in ("dat", "distillation_weight"):
                need(not getattr(self, key), key, getattr(self, key), f"{key} reads one query vector per user; "
                     f"the multi-interest query tower {self.query_tower} gives {self.num_interests}")

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def replace(self, **changes) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})


def from_dict(values: Mapping[str, Any]) -> RunConfig:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r} (known keys: {', '.join(sorted(known))})")
    return RunConfig(**values)


from tfrec_recall.config.presets import DEFAULT_PRESET, PRESETS  # noqa: E402  (presets are RunConfig overrides)


def load_config(model: str = DEFAULT_PRESET, path: Optional[str] = None,
                overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    if model not in PRESETS:
        raise ConfigError(f"--model must be one of {sorted(PRESETS)}, got {model!r}")
    values = dict(PRESETS[model])
    if path is not None:
        if not storage.isfile(path):
            raise ConfigError(f"--config file not found: {path!r}")
        try:
            loaded = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path!r} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path!r} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return from_dict(values)
