"""Export for TF Serving: the query tower and a top-k index in one versioned SavedModel, candidate tables for
external ANN systems, and the pipeline's export step and infra check."""
from tfrec_recall.export.saved_model import (EXACT_SEARCH_BELOW, EXAMPLES_INPUT, EXCLUDE_INPUT, MANIFEST,
                                             OUTPUT_EMBEDDING, OUTPUT_IDS, OUTPUT_SCORES, SIGNATURE_DEFAULT,
                                             SIGNATURE_EMBEDDING, SIGNATURE_EXAMPLES, SIGNATURE_EXCLUSIONS,
                                             RetrievalModule, candidate_checksum, example_parse_spec,
                                             export_candidates, export_retrieval_model, input_signature, make_index,
                                             saved_model_ops, signature_manifest)

__all__ = ["export_retrieval_model", "export_candidates", "make_index", "RetrievalModule", "input_signature",
           "example_parse_spec", "candidate_checksum", "saved_model_ops", "OUTPUT_IDS", "OUTPUT_SCORES",
           "OUTPUT_EMBEDDING", "EXAMPLES_INPUT", "MANIFEST", "EXCLUDE_INPUT", "EXACT_SEARCH_BELOW", "SIGNATURE_DEFAULT",
           "SIGNATURE_EXCLUSIONS", "SIGNATURE_EXAMPLES", "SIGNATURE_EMBEDDING", "signature_manifest"]
