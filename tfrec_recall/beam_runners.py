"""Which engine runs a Beam job: pipeline options for the runners this package tests, and running a pipeline.

``RUNNERS`` is the one list of runner names; :func:`pipeline_options` builds the options of each:

* ``"direct"``: Beam's DirectRunner in memory, one process (the default of every job).
* ``"multi_process"``: the DirectRunner with ``direct_running_mode=multi_processing``: ``num_workers`` (default 2)
  SDK worker processes on this machine, each importing the job's modules (and TensorFlow) afresh per pipeline.
* ``"dask"``: ``apache_beam.runners.dask.dask_runner.DaskRunner`` (its short name is not registered in
  apache-beam 2.74) on the Dask scheduler at ``dask_address`` (a ``dask.distributed`` cluster started by the
  caller, e.g. ``LocalCluster(...).scheduler_address``). ``num_workers`` becomes ``--dask_npartitions``: the number
  of Dask partitions each ``Create`` is split into, the only place the DaskRunner spreads work over workers.

:func:`run_pipeline` runs a pipeline, waits for it and raises when it did not finish; with the DaskRunner it also
closes the ``Client`` the runner opens for each run (apache-beam 2.74 leaves it open, and a cluster shut down
under an open client logs reconnect errors). What the DaskRunner of apache-beam 2.74 does not support is listed
in :mod:`tfrec_recall.data.beam_jobs`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from tfrec_recall._validation import require_positive_int

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
DEFAULT_PROCESSES = 2


def _direct(num_workers: Optional[int], dask_address: Optional[str]) -> List[str]:
    if num_workers is not None:
        raise ValueError(f"num_workers applies to the multi_process and dask runners, got num_workers={num_workers!r}"
                         " with runner 'direct'")
    return ["--runner=DirectRunner", "--direct_running_mode=in_memory"]


def _multi_process(num_workers: Optional[int], dask_address: Optional[str]) -> List[str]:
    workers = DEFAULT_PROCESSES if num_workers is None else require_positive_int("num_workers", num_workers)
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def _dask(num_workers: Optional[int], dask_address: Optional[str]) -> List[str]:
    if not isinstance(dask_address, str) or not dask_address:
        raise ValueError(f"runner 'dask' needs dask_address, the Dask scheduler's address (e.g. "
                         f"'tcp://127.0.0.1:8786'), got {dask_address!r}")
    flags = [f"--runner={DASK_RUNNER}", f"--dask_client_address={dask_address}"]
    if num_workers is not None:
        flags.append(f"--dask_npartitions={require_positive_int('num_workers', num_workers)}")
    return flags


_BUILDERS: Dict[str, Callable[[Optional[int], Optional[str]], List[str]]] = {
    "direct": _direct, "multi_process": _multi_process, "dask": _dask}
RUNNERS = tuple(_BUILDERS)


def _check_flags(flags: Sequence[str]) -> List[str]:
    if isinstance(flags, str) or not all(isinstance(f, str) and f.startswith("--") for f in flags):
        raise ValueError(f"flags must be a sequence of '--name=value' strings, got {flags!r}")
    return list(flags)


def pipeline_options(runner: str, *, num_workers: Optional[int] = None, dask_address: Optional[str] = None,
                     flags: Sequence[str] = ()) -> PipelineOptions:
    """The ``PipelineOptions`` of ``runner`` (one of ``RUNNERS``, see the module docstring), plus ``flags`` (more
    Beam flags, e.g. ``["--temp_location=gs://bucket/tmp"]``). ``ValueError`` names a bad argument and its value."""
    if runner not in _BUILDERS:
        raise ValueError(f"runner must be one of {list(RUNNERS)}, got {runner!r}")
    if dask_address is not None and runner != "dask":
        raise ValueError(f"dask_address applies to runner 'dask' only, got dask_address={dask_address!r} with "
                         f"runner {runner!r}")
    return PipelineOptions(_BUILDERS[runner](num_workers, dask_address) + _check_flags(flags))


def as_options(runner) -> PipelineOptions:
    """``runner`` as pipeline options: a runner name (built with :func:`pipeline_options`'s defaults) or
    ``PipelineOptions`` (returned as they are)."""
    if isinstance(runner, PipelineOptions):
        return runner
    if isinstance(runner, str):
        return pipeline_options(runner)
    raise ValueError(f"runner must be one of {list(RUNNERS)} or PipelineOptions, got {runner!r}")


def run_pipeline(pipeline: beam.Pipeline) -> None:
    """Runs ``pipeline`` and waits for it; ``RuntimeError`` naming the final state when it did not finish.
    The DaskRunner's per-run ``Client`` is closed afterwards, whether the run succeeded or not."""
    if not isinstance(pipeline, beam.Pipeline):
        raise ValueError(f"pipeline must be an apache_beam.Pipeline, got {pipeline!r}")
    result = pipeline.run()
    try:
        state = result.wait_until_finish()
    finally:
        if type(result).__module__.startswith("apache_beam.runners.dask"):
            result.client.close()
    if state != PipelineState.DONE:
        raise RuntimeError(f"the Beam pipeline ended in state {state!r}, not DONE")


__all__ = ["RUNNERS", "DASK_RUNNER", "pipeline_options", "as_options", "run_pipeline"]
