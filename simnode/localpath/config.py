"""local-path-provisioner's command line and config.json, as rancher/local-path-provisioner v0.0.37 reads them
(main.go flags and their env fallbacks; provisioner.go canonicalizeConfig). Pure parsing, no I/O but reading
the config file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

DEFAULT_NODE = "DEFAULT_PATH_FOR_NON_LISTED_NODES"  # provisioner.go NodeDefaultNonListedNodes


class UsageError(Exception):
    """A flag or the config file is unusable; the program exits 1 with this message (as urfave/cli does)."""


@dataclass(frozen=True)
class Flags:
    debug: bool
    config_file: str
    provisioner_name: str
    namespace: str
    configmap_name: str
    service_account_name: str
    helper_image: str
    health_port: int


# main.go: flag name -> (env fallback, default)
_START_FLAGS: dict[str, tuple[str, str]] = {
    "config": ("", ""),
    "provisioner-name": ("PROVISIONER_NAME", "rancher.io/local-path"),
    "namespace": ("POD_NAMESPACE", "local-path-storage"),
    "configmap-name": ("CONFIGMAP_NAME", "local-path-config"),
    "service-account-name": ("SERVICE_ACCOUNT_NAME", "local-path-provisioner-service-account"),
    "helper-image": ("HELPER_IMAGE", "rancher/library-busybox:1.32.1"),
    "health-port": ("HEALTH_PORT", "8080"),
    "helper-pod-file": ("", ""),
}


def parse_flags(argv: list[str], env: dict[str, str] | None = None) -> Flags:
    """`local-path-provisioner [--debug] start [--config F] [--provisioner-name N] ...`."""
    env = dict(os.environ) if env is None else env
    debug = False
    args = list(argv)
    while args and args[0] in ("--debug", "-d"):
        debug = True
        args.pop(0)
    if not args or args[0] != "start":
        raise UsageError("no command given: the only command is `start`")
    values: dict[str, str] = {}
    rest = args[1:]
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if name not in _START_FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not eq:
            if not rest:
                raise UsageError(f"flag needs an argument: -{name}")
            value = rest.pop(0)
        values[name] = value
    got = {name: values.get(name) or (env.get(var, "") if var else "") or default
           for name, (var, default) in _START_FLAGS.items()}
    for name in ("provisioner-name", "namespace", "configmap-name", "helper-image", "service-account-name"):
        if not got[name]:
            raise UsageError(f"invalid empty flag {name}")
    try:
        port = int(got["health-port"])
    except ValueError as exc:
        raise UsageError(f"invalid value {got['health-port']!r} for flag -health-port") from exc
    return Flags(debug=debug, config_file=got["config"], provisioner_name=got["provisioner-name"],
                 namespace=got["namespace"], configmap_name=got["configmap-name"],
                 service_account_name=got["service-account-name"], helper_image=got["helper-image"],
                 health_port=port)


@dataclass(frozen=True)
class ClassConfig:
    node_paths: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> paths
    shared_path: str = ""


@dataclass(frozen=True)
class Config:
    default: ClassConfig
    by_class: dict[str, ClassConfig] = field(default_factory=dict)

    def for_class(self, name: str) -> ClassConfig:
        """provisioner.go pickConfig: per-class configs when given, else the top-level one."""
        if not self.by_class:
            return self.default
        if name not in self.by_class:
            raise UsageError(f"BUG: Got request for unexpected storage class {name}")
        return self.by_class[name]


def _class_config(data: dict[str, object]) -> ClassConfig:
    """provisioner.go canonicalizeStorageClassConfig (its error messages)."""
    node_paths: dict[str, tuple[str, ...]] = {}
    for entry in data.get("nodePathMap") or []:  # type: ignore[attr-defined]
        node = str(entry.get("node", ""))
        if node in node_paths:
            raise UsageError(f"StorageClass config canonicalization failed: duplicate node {node}")
        paths: list[str] = []
        for p in entry.get("paths") or []:
            if not str(p).startswith("/"):
                raise UsageError(f"StorageClass config canonicalization failed: path must start with / for path "
                                 f"{p} on node {node}")
            clean = str(PurePosixPath(os.path.normpath(str(p))))
            if clean == "/":
                raise UsageError(f"StorageClass config canonicalization failed: cannot use root ('/') as path on "
                                 f"node {node}")
            if clean in paths:
                raise UsageError(f"StorageClass config canonicalization failed: duplicate path {p} on node {node}")
            paths.append(clean)
        node_paths[node] = tuple(paths)
    return ClassConfig(node_paths=node_paths, shared_path=str(data.get("sharedFileSystemPath") or ""))


def load_config(path: Path, shown_as: str) -> Config:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"fail to load config file {shown_as}: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"fail to load config file {shown_as}: not a JSON object")
    classes = data.get("storageClassConfigs") or {}
    return Config(default=_class_config(data),
                  by_class={str(k): _class_config(v) for k, v in classes.items() if isinstance(v, dict)})
