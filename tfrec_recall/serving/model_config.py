"""TF Serving's ``--model_config_file`` (a ``ModelServerConfig`` text proto) for ``tfrec-recall serve``.

Supported per model: ``name``, ``base_path``, ``model_platform`` ("tensorflow" or unset),
``model_version_policy`` (``latest { num_versions }``, ``specific { versions }``, ``all {}``; unset means
``latest`` with one version, as in TF Serving) and ``version_labels``. A relative ``base_path`` is resolved
against the config file's directory (TF Serving takes it relative to its working directory). Anything else
(``custom_model_config``, ``logging_config``, another platform) is refused with the field named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tfrec_recall import storage


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions under a base path are served: the newest ``num_versions`` ("latest"), the listed
    ``versions`` ("specific") or every version ("all")."""
    kind: str = "latest"
    num_versions: int = 1
    versions: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ("latest", "specific", "all"):
            raise ValueError(f"model_version_policy: unknown policy {self.kind!r}; use latest, specific or all")
        if self.kind == "latest" and self.num_versions < 1:
            raise ValueError(f"model_version_policy.latest.num_versions must be >= 1, got {self.num_versions}")
        if self.kind == "specific" and not self.versions:
            raise ValueError("model_version_policy.specific.versions is empty; list at least one version")

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        return f"specific {list(self.versions)}" if self.kind == "specific" else "all"


@dataclass(frozen=True)
class ServedModel:
    """One ``config`` entry of ``model_config_list``."""
    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: Dict[str, int] = field(default_factory=dict)


def _policy(config, where: str) -> VersionPolicy:
    choice = config.model_version_policy.WhichOneof("policy_choice")
    if choice is None:
        return VersionPolicy()
    if choice == "latest":
        return VersionPolicy("latest", num_versions=config.model_version_policy.latest.num_versions or 1)
    if choice == "specific":
        try:
            return VersionPolicy("specific", versions=tuple(sorted(set(config.model_version_policy.specific.versions))))
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None
    return VersionPolicy("all")


def _labels(config, policy: VersionPolicy, where: str) -> Dict[str, int]:
    labels = dict(config.version_labels)
    for label, version in sorted(labels.items()):
        if not label:
            raise ValueError(f"{where}.version_labels: empty label for version {version}")
        if policy.kind == "specific" and version not in policy.versions:
            raise ValueError(f"{where}.version_labels[{label!r}]: version {version} is not one of "
                             f"model_version_policy.specific.versions {list(policy.versions)}")
    return labels


def _served_model(config, directory: str, index: int) -> ServedModel:
    where = f"model_config_list.config[{index}]"
    if not config.name:
        raise ValueError(f"{where}.name is empty")
    where = f"{where} ({config.name!r})"
    if not config.base_path:
        raise ValueError(f"{where}.base_path is empty")
    if config.model_platform not in ("", "tensorflow"):
        raise ValueError(f"{where}.model_platform: {config.model_platform!r} is not served here; use 'tensorflow'")
    if config.HasField("logging_config"):
        raise ValueError(f"{where}.logging_config: request logging is not supported by tfrec-recall serve")
    base_path = config.base_path
    relative = storage.is_local(base_path) and not os.path.isabs(base_path)
    policy = _policy(config, where)
    return ServedModel(config.name, storage.join(directory, base_path) if relative else base_path, policy,
                       _labels(config, policy, where))


def parse_model_config(text: str, directory: str, source: str = "model config") -> List[ServedModel]:
    """The models of a ``ModelServerConfig`` text proto; relative base paths are taken from ``directory``."""
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"{source}: not a TF Serving ModelServerConfig text proto: {error}") from None
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{source}: needs a model_config_list (got {config.WhichOneof('config') or 'nothing'})")
    models = [_served_model(c, directory, i) for i, c in enumerate(config.model_config_list.config)]
    if not models:
        raise ValueError(f"{source}: model_config_list has no config entry")
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{source}: model_config_list names model {duplicates[0]!r} more than once")
    return models


def load_model_config(path) -> List[ServedModel]:
    """The models of the ``--model-config-file`` at ``path``."""
    path = storage.path_str(path)
    if not storage.isfile(path):
        raise FileNotFoundError(f"--model-config-file {path!r} is not a file")
    return parse_model_config(storage.read_text(path), storage.parent(os.path.realpath(path) if storage.is_local(path)
                                                                      else path), source=path)
