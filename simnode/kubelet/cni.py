"""The pod network as cri-dockerd's default CNI network plugin sees it, read from the node root.

cri-dockerd (Mirantis/cri-dockerd v0.3.16) runs with `--network-plugin=cni` by default (cmd/cri/options/options.go:
NetworkPluginName "cni", CNIConfDir /etc/cni/net.d, CNIBinDir /opt/cni/bin). Its runtime status reports
NetworkReady=false until a valid network is loaded, and the kubelet turns that into the Node's Ready=False. The
simulated kubelet hosts this plugin itself (there is no separate cri-dockerd process): nothing is left on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simnode.paths import NodeRoot

log = logging.getLogger("kubelet.cni")

CONF_DIR = "/etc/cni/net.d"
BIN_DIR = "/opt/cni/bin"
# network/cni/cni.go: defaultSyncConfigPeriod = 5 s; shortened so that tests see a new config within a second.
SYNC_PERIOD_S = 1.0
VERSION_TIMEOUT_S = 5.0
# network/cni/cni.go, getDefaultCNINetwork: libcni.ConfFiles(confDir, []string{".conf", ".conflist", ".json"}).
CONF_EXTENSIONS = (".conf", ".conflist", ".json")


@dataclass(frozen=True)
class CniNetwork:
    name: str
    file: str  # real path of the config it came from
    cni_version: str
    plugin_types: tuple[str, ...]
    ipam_types: tuple[str, ...]


class CniConfigError(Exception):
    """One config file cannot be used (libcni's parse error, or a plugin libcni cannot validate)."""


def runtime_network_error(network: CniNetwork | None) -> str | None:
    """cri-dockerd's NetworkReady condition as the kubelet words it, or None when the network is ready.

    core/docker_service.go, Status: Reason "NetworkPluginNotReady", Message "docker: network plugin is not
    ready: <err>", <err> from network/cni/cni.go checkInitialized: "cni config uninitialized". The kubelet
    (pkg/kubelet/kubelet.go, updateRuntimeUp) records `container runtime network not ready: <condition>`, the
    condition printed as `NetworkReady=false reason:... message:...` (pkg/kubelet/container/runtime.go,
    RuntimeCondition.String), and nodestatus.ReadyCondition (pkg/kubelet/nodestatus/setters.go) makes it the
    message of the Node's Ready=False condition (reason KubeletNotReady).
    """
    if network is not None:
        return None
    return ("container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady "
            "message:docker: network plugin is not ready: cni config uninitialized")


def conf_files(conf_dir: Path) -> list[Path]:
    """libcni ConfFiles: regular entries with a known extension (a missing dir is no files), sorted by name."""
    try:
        entries = list(conf_dir.iterdir())
    except FileNotFoundError:
        return []
    return sorted((p for p in entries if not p.is_dir() and p.suffix in CONF_EXTENSIONS), key=lambda p: p.name)


def parse_conf(path: Path) -> tuple[str, str, list[dict[str, Any]]]:
    """(name, cniVersion, plugin configs) of one file, as libcni.ConfListFromFile / ConfFromFile read it."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CniConfigError(f"error parsing configuration: {exc}") from exc
    if not isinstance(raw, dict):
        raise CniConfigError("error parsing configuration: not a JSON object")
    version = raw.get("cniVersion", "")
    if not isinstance(version, str):
        raise CniConfigError(f"error parsing configuration list: invalid cniVersion type {type(version).__name__}")
    if path.suffix != ".conflist":
        # cni.go: a .conf/.json must have a "type" ("perhaps this is a .conflist?"); ConfListFromConf wraps it.
        if not isinstance(raw.get("type"), str) or not raw["type"]:
            raise CniConfigError("no 'type'; perhaps this is a .conflist?")
        return str(raw.get("name") or ""), version, [raw]
    # libcni/conf.go ConfListFromBytes: name, plugins present and a non-empty list of objects.
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise CniConfigError("error parsing configuration list: no name")
    plugins = raw.get("plugins")
    if not isinstance(plugins, list):
        raise CniConfigError("error parsing configuration list: no 'plugins' key")
    if not plugins:
        raise CniConfigError("error parsing configuration list: no plugins in list")
    if not all(isinstance(p, dict) for p in plugins):
        raise CniConfigError("error parsing configuration list: a plugin config is not an object")
    return name, version, plugins


def find_in_path(plugin: str, bin_dir: Path) -> Path:
    """libcni pkg/invoke/find.go FindInPath: a regular file named like the plugin (no path separators)."""
    if not plugin:
        raise CniConfigError("no plugin name provided")
    if "/" in plugin:
        raise CniConfigError(f"invalid plugin name: {plugin}")
    path = bin_dir / plugin
    if not path.is_file():
        raise CniConfigError(f"failed to find plugin {plugin!r} in path [{BIN_DIR}]")
    return path


class CniPlugin:
    """cri-dockerd's cniNetworkPlugin: the default network, reloaded periodically (network/cni/cni.go)."""

    def __init__(self, root: NodeRoot) -> None:
        self.root = root
        self.network: CniNetwork | None = None
        self._versions: dict[tuple[str, int, int], list[str]] = {}  # (path, mtime, size) -> supported versions
        self._last_error = ""

    @property
    def conf_dir(self) -> Path:
        return self.root.path(CONF_DIR)

    @property
    def bin_dir(self) -> Path:
        return self.root.path(BIN_DIR)

    def error(self) -> str | None:
        return runtime_network_error(self.network)

    async def sync(self) -> None:
        """syncNetworkConfig: load the default network; on failure keep the one already loaded.

        cni.go logs "Unable to update cni config" and returns without clearing defaultNetwork, so a network
        once loaded stays in use (NetworkReady=true) until cri-dockerd restarts, even if its file is removed.
        """
        try:
            network = await self.default_network()
        except CniConfigError as exc:
            if str(exc) != self._last_error:
                log.info("Unable to update cni config: %s", exc)
                self._last_error = str(exc)
            return
        self._last_error = ""
        if network != self.network:
            log.info("using CNI network %s from %s", network.name, network.file)
        self.network = network

    async def default_network(self) -> CniNetwork:
        """getDefaultCNINetwork: the first file (lexical order) that parses and whose plugins all validate."""
        files = conf_files(self.conf_dir)
        if not files:
            raise CniConfigError(f"no networks found in {CONF_DIR}")
        for path in files:
            real = f"{CONF_DIR}/{path.name}"
            try:
                name, version, plugins = parse_conf(path)
                await self.validate(version, plugins)
            except CniConfigError as exc:
                log.debug("Error loading CNI config file %s: %s", real, exc)
                continue
            ipam = tuple(str(p["ipam"].get("type") or "") for p in plugins if isinstance(p.get("ipam"), dict))
            return CniNetwork(name=name, file=real, cni_version=version,
                              plugin_types=tuple(str(p["type"]) for p in plugins), ipam_types=ipam)
        raise CniConfigError(f"no valid networks found in {CONF_DIR}")

    async def validate(self, version: str, plugins: list[dict[str, Any]]) -> None:
        """libcni api.go ValidateNetworkList/validatePlugin: every plugin `type` found in the bin dir, run with
        CNI_COMMAND=VERSION (so it must be executable), and supporting the list's cniVersion ("0.1.0" if unset)."""
        errors: list[str] = []
        expected = version or "0.1.0"
        for plugin in plugins:
            kind = plugin.get("type")
            try:
                supported = await self.supported_versions(find_in_path(kind if isinstance(kind, str) else "",
                                                                       self.bin_dir))
            except CniConfigError as exc:
                errors.append(str(exc))
                continue
            if expected not in supported:
                errors.append(f"plugin {kind} does not support config version {expected!r}")
        if errors:
            raise CniConfigError(f"[{' '.join(errors)}]")

    async def supported_versions(self, plugin: Path) -> list[str]:
        """pkg/invoke GetVersionInfo: exec the plugin with CNI_COMMAND=VERSION and read supportedVersions."""
        st = plugin.stat()  # noqa: ASYNC240 (one stat of a local file; the exec below is the slow part)
        key = (str(plugin), st.st_mtime_ns, st.st_size)
        if key in self._versions:
            return self._versions[key]
        env = {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            proc = await asyncio.create_subprocess_exec(
                str(plugin), env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise CniConfigError(f"fork/exec {BIN_DIR}/{plugin.name}: {exc.strerror}") from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(b'{"cniVersion":"1.0.0"}'), VERSION_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise CniConfigError(f"{BIN_DIR}/{plugin.name}: no answer to VERSION") from None
        try:
            info = json.loads(out)
            versions = [str(v) for v in info["supportedVersions"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CniConfigError(f"{BIN_DIR}/{plugin.name}: bad VERSION answer: {exc}") from exc
        self._versions[key] = versions
        return versions

    def sandbox_error(self) -> str | None:
        """Why a pod sandbox (non-hostNetwork) cannot get its network now, as cri-dockerd's SetUpPod fails.

        SetUpPod first checks the plugin is initialized, then adds the sandbox to the loopback network (cni.go,
        getLoNetwork: plugin type "loopback"), then to the default network, whose IPAM plugin runs too.
        """
        if self.network is None:
            return "cni config uninitialized"
        for kind in ("loopback", *self.network.plugin_types, *self.network.ipam_types):
            try:
                find_in_path(kind, self.bin_dir)
            except CniConfigError as exc:
                return f"plugin type={kind!r} failed (add): {exc}"
        return None
