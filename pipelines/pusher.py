"""TFX's filesystem Pusher with sequential integer versions, made idempotent.

Version naming: a push to ``PushDestination.filesystem.base_directory`` writes ``BASE/<N>/`` where N is the
largest integer version already there + 1 (1 for an empty directory), the naming ``export_retrieval_model``
uses and serving/models.config's ``specific`` versions and ``version_labels`` refer to (the first push is
version 1 = ``stable``, the second version 2 = ``canary``); see ``tfrec_recall.serving.versions``. TFX's own
executor names versions by the unix time of the push (its ``Versioning.AUTO`` means ``UNIX_TIMESTAMP``),
which a models.config listing fixed versions never matches. Here ``AUTO`` (the default) means sequential;
``versioning=UNIX_TIMESTAMP``, set explicitly, still gets TFX's unix-time naming. A serving directory that
already holds unix-time versions continues after the largest of them.

Idempotence: pushing a model the serving directory already holds (a rerun whose Evaluator re-blessed the same
export, recognised by an identical manifest) records the existing version instead of copying it again.

As in TFX: a model not blessed (model or infra blessing) is not pushed; ``saved_model.pb`` is copied last, so
a server never sees a half-copied version as complete; the model is also archived under the PushedModel
artifact's URI; destinations other than the filesystem are TFX's (which rejects them).
"""
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
from tfx.utils import io_utils, proto_utils

from tfrec_recall.serving.versions import next_version, version_of

MANIFEST = os.path.join("assets", "manifest.json")
SAVED_MODEL = "saved_model.pb"


def _read(path: str) -> Optional[bytes]:
    if not fileio.exists(path):
        return None
    with fileio.open(path, "rb") as f:
        return f.read()


def _listdir(directory: str) -> List[str]:
    return fileio.listdir(directory) if fileio.exists(directory) else []


def existing_version(base_directory: str, model_path: str) -> Optional[str]:
    """The version under ``base_directory`` holding the same export as ``model_path`` (same manifest, which
    records the candidate checksum and the export's creation time), or None."""
    manifest = _read(os.path.join(model_path, MANIFEST))
    if manifest is None:
        return None
    for name in sorted(_listdir(base_directory), key=lambda n: version_of(n) or 0, reverse=True):
        name = name.rstrip("/")
        version_dir = os.path.join(base_directory, name)
        if version_of(name) is not None and fileio.exists(os.path.join(version_dir, SAVED_MODEL)) \
                and _read(os.path.join(version_dir, MANIFEST)) == manifest:
            return name
    return None


def push_version(base_directory: str, model_path: str) -> str:
    """Copies the SavedModel at ``model_path`` to ``base_directory/<next version>/`` (``saved_model.pb``
    last) and returns the version's name."""
    version = str(next_version(_listdir(base_directory)))
    serving_path = os.path.join(base_directory, version)
    if fileio.exists(serving_path):  # another push took this number between listing and copying
        raise FileExistsError(f"push_destination.filesystem.base_directory: version {version} appeared at "
                              f"{serving_path} while pushing; not overwriting it")
    io_utils.copy_dir(model_path, serving_path, deny_regex_patterns=[r"saved_model\.pb"])
    io_utils.copy_file(os.path.join(model_path, SAVED_MODEL), os.path.join(serving_path, SAVED_MODEL))
    logging.info("Model written to serving path %s.", serving_path)
    return version


class Executor(pusher_executor.Executor):

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") != "filesystem" \
                or destination.filesystem.versioning == pusher_pb2.Versioning.UNIX_TIMESTAMP:
            super().Do(input_dict, output_dict, exec_properties)
            return
        self._log_startup(input_dict, output_dict, exec_properties)
        model_push = artifact_utils.get_single_instance(output_dict[standard_component_specs.PUSHED_MODEL_KEY])
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(model_push)
            return
        base = destination.filesystem.base_directory
        model_path = self.GetModelPath(input_dict)
        version = existing_version(base, model_path)
        if version is None:
            version = push_version(base, model_path)
        else:
            logging.info("serving directory %s already holds this model as version %s; not copying again",
                         base, version)
        io_utils.copy_dir(model_path, model_push.uri)  # TFX's archive of the pushed model
        self._MarkPushed(model_push, pushed_destination=os.path.join(base, version), pushed_version=version)
        logging.info("Model pushed to %s as version %s.", model_push.uri, version)


class Pusher(pusher_component.Pusher):
    """TFX's Pusher with the executor above: sequential integer versions, no second copy of the same model."""
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
