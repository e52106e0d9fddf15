"""Configuration: the typed RunConfig (validated, loadable from YAML) and the one registry of presets."""
from tfrec_recall.config.presets import DEFAULT_PRESET, PRESETS
from tfrec_recall.config.run_config import (NEGATIVES, OPTIMIZERS, SELECTION_METRICS, ConfigError, RunConfig,
                                            from_dict, load_config)

__all__ = ["RunConfig", "ConfigError", "load_config", "from_dict", "PRESETS", "DEFAULT_PRESET", "NEGATIVES",
           "OPTIMIZERS", "SELECTION_METRICS"]
