"""kubeadm's pre-flight checks that matter on the simulated node: manifest files, ports, CRI socket.

Reads only (a port check binds and closes at once). Failures are `[ERROR Name]: reason` unless ignored
with --ignore-preflight-errors (or nodeRegistration.ignorePreflightErrors), then `[WARNING Name]`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from simnode.kubeadm.config import Config
from simnode.kubeadm.errors import PhaseError
from simnode.kubeadm.manifests import CONTROL_PLANE, ETCD, MANIFESTS_DIR, is_ours, manifest_path
from simnode.paths import NodeRoot


@dataclass(frozen=True)
class Finding:
    name: str
    message: str
    fatal: bool = True  # False: a warning even when not ignored


def _slug(path: str) -> str:
    return path.replace("/", "-")


def check_manifests(root: NodeRoot) -> list[Finding]:
    found: list[Finding] = []
    directory = root.path(MANIFESTS_DIR)
    ours = {f"{c}.yaml": c for c in (*CONTROL_PLANE, ETCD)}
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        component = ours.get(entry.name)
        if component is None:
            found.append(Finding(f"DirAvailable-{_slug(MANIFESTS_DIR)}", f"{MANIFESTS_DIR} is not empty "
                                 f"(it holds {entry.name}, which kubeadm did not write)"))
            continue
        try:
            text = entry.read_text()
        except (OSError, UnicodeDecodeError):
            text = ""
        if not is_ours(text, component):
            path = manifest_path(component)
            found.append(Finding(f"FileAvailable-{_slug(path)}", f"{path} already exists"))
    return found


def port_in_use(host: str, port: int) -> str | None:
    """None when `host:port` can be bound (like Go's net.Listen, with SO_REUSEADDR), else the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"Port {port} is in use"
            return f"cannot bind {host}:{port}: {exc.strerror}"
    return None


def check_ports(cfg: Config) -> list[Finding]:
    found: list[Finding] = []
    for host, port in ((cfg.init.advertise_address, cfg.init.bind_port), (cfg.healthz_host, cfg.healthz_port)):
        problem = port_in_use(host, port)
        if problem:
            found.append(Finding(f"Port-{port}", problem))
    return found


def check_cri(cfg: Config, root: NodeRoot) -> list[Finding]:
    path = cfg.init.cri_socket.removeprefix("unix://")
    # Like the kubelet stand-in: the runtime (the Docker Engine) lives outside the node root, so a socket
    # that is not under the root is looked up as the host path.
    if root.path(path).exists() or Path(path).exists():
        return []
    return [Finding("CRI", f'container runtime is not running: validate CRI v1 runtime API for endpoint '
                           f'"{cfg.init.cri_socket}": {path}: no such file or directory')]


def run_preflight(cfg: Config, root: NodeRoot, ignored: set[str], out: Callable[[str], None]) -> None:
    """Run the checks; raise PhaseError("preflight") listing fatal ones, print the ignored ones."""
    out("[preflight] Running pre-flight checks")
    findings = check_manifests(root) + check_ports(cfg) + check_cri(cfg, root)
    ignore_all = "all" in ignored
    errors: list[str] = []
    for f in findings:
        if f.fatal and not ignore_all and f.name.lower() not in ignored:
            errors.append(f"\t[ERROR {f.name}]: {f.message}")
        else:
            out(f"\t[WARNING {f.name}]: {f.message}")
    if errors:
        raise PhaseError(
            "preflight",
            "[preflight] Some fatal errors occurred:\n" + "\n".join(errors) + "\n[preflight] If you know what "
            "you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`",
        )
