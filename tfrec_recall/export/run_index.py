"""The index of a saved run trained with ``deep_retrieval: true``: its own beam search over its path structure and
its candidates' paths, which the command-line export, the pipeline's exporter and its evaluator share (a run's
embeddings alone go to any registered index through :func:`~tfrec_recall.export.make_index`)."""
from __future__ import annotations

from typing import Optional

DEEP_RETRIEVAL = "deep_retrieval"  # an export index name, not registered: it needs a run's path structure


def deep_retrieval_run_index(run, max_k: int, beam_width: Optional[int] = None):
    """The run's :class:`~tfrec_recall.retrievers.deep_retrieval.DeepRetrievalIndex`, built over its candidates
    with their trained paths: the run's configured beam width (or ``beam_width``) and reranker. ``ValueError``
    for a run without a path structure, or a beam width the structure cannot take (naming the values)."""
    from tfrec_recall.retrievers.deep_retrieval import DeepRetrievalIndex
    if run.structure is None:
        raise ValueError(f"index {DEEP_RETRIEVAL!r} needs a run trained with deep_retrieval: true; this run has no "
                         "path structure")
    width = run.config.dr_beam_width if beam_width is None else beam_width
    index = DeepRetrievalIndex(run.structure, beam_width=width, rerank=run.config.dr_rerank, max_k=max_k)
    return index.index(run.candidate_ids, run.candidate_embeddings, paths=run.candidate_paths)
