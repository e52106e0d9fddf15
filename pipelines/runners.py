"""Runners: a local run (LocalDagRunner, Beam DirectRunner, SQLite ML Metadata), compilation to a Kubeflow
Pipelines V2 / Vertex AI JSON spec, and a read of a local run's executions from ML Metadata."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import posixpath
import tempfile
from typing import List, Optional

import tfrec_recall  # noqa: F401  (first: it selects tf-keras before TensorFlow is imported)
from tfrec_recall import storage
from tfx import v1 as tfx

METADATA_FILE = "metadata.sqlite"
# The pipeline image pipelines/Dockerfile builds (the TFX 1.16 image + requirements.lock + this package),
# tagged with the installed package's version. Push it to a registry and pass --image REGISTRY/NAME:TAG
# (pipelines/README.md).
DEFAULT_IMAGE = f"tfrec-recall-pipeline:{importlib.metadata.version('tfrec_recall')}"


def metadata_path(pipeline_root: str) -> str:
    return os.path.join(pipeline_root, METADATA_FILE)


def run_local(pipeline) -> None:
    """Runs ``pipeline`` in this process. A failing component raises; the components that finished keep their
    artifacts and cache entries, so a rerun resumes from them."""
    if pipeline.metadata_connection_config is None:
        raise ValueError("a local run needs an ML Metadata store: create the pipeline with metadata_path=...")
    tfx.orchestration.LocalDagRunner().run(pipeline)


def compile_kubeflow_v2(pipeline, output: str, image: str = DEFAULT_IMAGE) -> str:
    """Writes the pipeline's Kubeflow Pipelines V2 (Vertex AI Pipelines) JSON spec to ``output``, a local path
    or a URI (``gs://...``; written through tf.io.gfile). ``image`` must hold tfrec_recall and this package
    (pipelines/Dockerfile builds ``DEFAULT_IMAGE``). Returns ``output``."""
    # Imported from its module so that a missing kfp raises an ImportError naming it; the
    # tfx.v1.orchestration.experimental alias silently leaves the runner out (STACK.md).
    from tfx.orchestration.kubeflow.v2.kubeflow_v2_dag_runner import KubeflowV2DagRunner, KubeflowV2DagRunnerConfig
    output = os.fspath(output)
    name = posixpath.basename(output)
    if not name:
        raise ValueError(f"output must name a file, got {output!r}")
    if not image:
        raise ValueError(f"image must name a container image, got {image!r}")
    # The runner writes to a local directory only: compile there, then copy to ``output`` (any filesystem).
    with tempfile.TemporaryDirectory(prefix="tfrec-recall-spec-") as local:
        runner = KubeflowV2DagRunner(config=KubeflowV2DagRunnerConfig(default_image=image), output_dir=local,
                                     output_filename=name)
        runner.run(pipeline, write_out=True)
        storage.makedirs(storage.parent(output))
        storage.gfile().copy(os.path.join(local, name), output, overwrite=True)
    return output


@dataclasses.dataclass
class Execution:
    component: str
    state: str  # COMPLETE, CACHED, FAILED, RUNNING, ...
    seconds: float
    run_id: str
    outputs: dict  # output key -> custom properties of its (first) artifact, plus "uri" and "id"


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("int_value", "double_value", "string_value") else str(v)


def executions(metadata_file: str, pipeline_name: Optional[str] = None) -> List[Execution]:
    """Every execution recorded in a local ML Metadata store, oldest first."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2
    if not storage.isfile(metadata_file):  # SQLite: local files only
        raise FileNotFoundError(f"metadata_file: no ML Metadata store at {metadata_file!r}")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_file
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    store = metadata_store.MetadataStore(config)
    contexts = {c.id: c for c in store.get_contexts()}
    out = []
    for execution in sorted(store.get_executions(), key=lambda e: e.id):
        component = execution.properties["component_id"].string_value if "component_id" in execution.properties else ""
        names = {contexts[c.id].type: contexts[c.id].name for c in store.get_contexts_by_execution(execution.id)}
        if pipeline_name and names.get("pipeline") != pipeline_name:
            continue
        component = component or names.get("node", "").split(".")[-1]
        state = metadata_store_pb2.Execution.State.Name(execution.last_known_state)
        seconds = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0
        outputs = {}
        for event in store.get_events_by_execution_ids([execution.id]):
            if event.type != metadata_store_pb2.Event.OUTPUT or not event.path.steps:
                continue
            key = event.path.steps[0].key
            if key in outputs:
                continue
            artifact = store.get_artifacts_by_id([event.artifact_id])[0]
            outputs[key] = {"uri": artifact.uri, "id": artifact.id, **{k: _value(v) for k, v in artifact.custom_properties.items()}}
        out.append(Execution(component, state, seconds, names.get("pipeline_run", ""), outputs))
    return out
