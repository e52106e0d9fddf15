"""TFX's filesystem Pusher, made idempotent: pushing a model the serving directory already holds (a rerun
whose Evaluator re-blessed the same export) records the existing version instead of copying it again under a
new one. Everything else, including "not blessed: not pushed", is TFX's Pusher."""
import os
from typing import Any, Dict, List, Optional

from absl import logging
from tfx import types
from tfx.components.pusher import component as pusher_component
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.components.base import executor_spec
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

MANIFEST = os.path.join("assets", "manifest.json")


def _read(path: str) -> Optional[bytes]:
    if not fileio.exists(path):
        return None
    with fileio.open(path, "rb") as f:
        return f.read()


def existing_version(base_directory: str, model_path: str) -> Optional[str]:
    """The version under ``base_directory`` holding the same export as ``model_path`` (same manifest, which
    records the candidate checksum and the export's creation time), or None."""
    manifest = _read(os.path.join(model_path, MANIFEST))
    if manifest is None or not fileio.exists(base_directory):
        return None
    for name in sorted(fileio.listdir(base_directory), reverse=True):
        name = name.rstrip("/")
        version_dir = os.path.join(base_directory, name)
        if name.isdigit() and fileio.exists(os.path.join(version_dir, "saved_model.pb")) \
                and _read(os.path.join(version_dir, MANIFEST)) == manifest:
            return name
    return None


class Executor(pusher_executor.Executor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") == "filesystem" and self.CheckBlessing(input_dict):
            base = destination.filesystem.base_directory
            version = existing_version(base, self.GetModelPath(input_dict))
            if version is not None:
                logging.info("serving directory %s already holds this model as version %s; not copying again",
                             base, version)
                model_push = artifact_utils.get_single_instance(
                    output_dict[standard_component_specs.PUSHED_MODEL_KEY])
                self._MarkPushed(model_push, pushed_destination=os.path.join(base, version),
                                 pushed_version=version)
                return
        super().Do(input_dict, output_dict, exec_properties)


class Pusher(pusher_component.Pusher):
    """TFX's Pusher with the executor above."""
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
