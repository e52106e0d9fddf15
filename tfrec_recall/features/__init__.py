"""Features: declarative specs (one registry of kinds), the encoder layer, and specs / raw arrays from data."""
from tfrec_recall.features.encoder import FeatureEncoder
from tfrec_recall.features.specs import (EXAMPLE_AGE, HISTORY, HISTORY_TIMES, POOLINGS, ExampleAgeFeature, FeatureSpec,
                                         IdFeature, MultiCategoricalFeature, NumericFeature, SequenceFeature,
                                         SequenceTimesFeature, SpecLike, as_spec, feature_kind, feature_kinds,
                                         register_feature_kind, spec_for_table_kind, vocabulary_of)
from tfrec_recall.features.vocabularies import feature_arrays, specs_from_split

__all__ = ["FeatureEncoder", "FeatureSpec", "ExampleAgeFeature", "EXAMPLE_AGE", "IdFeature", "MultiCategoricalFeature",
           "NumericFeature", "SequenceFeature", "SequenceTimesFeature", "SpecLike", "HISTORY", "HISTORY_TIMES",
           "POOLINGS", "as_spec", "feature_kind", "feature_kinds", "register_feature_kind", "spec_for_table_kind",
           "vocabulary_of", "feature_arrays", "specs_from_split"]
