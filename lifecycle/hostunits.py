"""The host's systemd units the install depends on, set through the machine's own `systemctl`.

- cri-dockerd chooses the pod sandbox (pause) image itself (`--pod-infra-container-image`, default
  registry.k8s.io/pause:3.9 up to v0.3.16), so a drop-in gives it the one the images state pulled:
  `/etc/systemd/system/cri-docker.service.d/10-lifecycle.conf`, then daemon-reload and a restart, only when the
  drop-in changed. Done when the drop-in holds exactly what would be written.
- The service supervises the kubelet itself; kubeadm's kubelet-start restarts `kubelet.service` and a packaged one
  would become a second kubelet. `kubelet.service` is masked (and stopped if it ran).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from lifecycle.atomicfile import write_atomic
from lifecycle.errors import CommandError, PermanentError
from lifecycle.paths import HostPaths
from lifecycle.step import StepContext

CRI_DOCKER_UNIT = "cri-docker.service"
KUBELET_UNIT = "kubelet.service"
DROP_IN = "/etc/systemd/system/cri-docker.service.d/10-lifecycle.conf"
DROP_IN_MODE = 0o644
# systemd.unit(5) search path, highest precedence first (Debian 12: packages install into /lib/systemd/system).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
SYSTEMCTL_PATHS = ("/usr/bin/systemctl", "/bin/systemctl")
PAUSE_FLAG = "--pod-infra-container-image"
_PAUSE_ARG = re.compile(r"\s+" + re.escape(PAUSE_FLAG) + r"(=|\s+)\S+")


def find_systemctl(paths: HostPaths) -> Path | None:
    for real in SYSTEMCTL_PATHS:
        if paths.under(real).is_file():
            return paths.under(real)
    return None


def _assignments(text: str) -> list[tuple[str, str]]:
    """(key, value) of the [Service] section, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    section, pending = "", ""
    for raw in text.splitlines():
        line = (pending + raw.strip()) if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def packaged_exec_start(paths: HostPaths) -> str | None:
    """cri-dockerd's ExecStart as its unit and every drop-in but ours set it; None when there is no such unit."""
    fragment = next((paths.under(f"{d}/{CRI_DOCKER_UNIT}") for d in UNIT_DIRS
                     if paths.under(f"{d}/{CRI_DOCKER_UNIT}").exists()), None)
    if fragment is None:
        return None
    if fragment.is_symlink() and str(fragment.readlink()) == "/dev/null":
        raise PermanentError(f"{CRI_DOCKER_UNIT} is masked: unmask it (systemctl unmask {CRI_DOCKER_UNIT})",
                             code="cri_dockerd_masked")
    drop_ins: dict[str, Path] = {}
    for directory in reversed(UNIT_DIRS):  # a name in a higher directory hides the same name below it
        for conf in sorted(paths.under(f"{directory}/{CRI_DOCKER_UNIT}.d").glob("*.conf")):
            drop_ins[conf.name] = conf
    ours = paths.under(DROP_IN)
    exec_start: list[str] = []
    for file in [fragment, *(drop_ins[name] for name in sorted(drop_ins))]:
        if file == ours:
            continue
        for key, value in _assignments(file.read_text()):
            if key == "ExecStart":
                exec_start = [*exec_start, value] if value else []  # an empty ExecStart= resets the list
    if len(exec_start) != 1:
        raise PermanentError(f"{CRI_DOCKER_UNIT} has {len(exec_start)} ExecStart= commands after its drop-ins; "
                             "expected one (the packaged unit's)", code="cri_dockerd_unit_invalid")
    return exec_start[0]


def render_drop_in(exec_start: str, pause_image: str) -> bytes:
    """The packaged command line with our sandbox image instead of any it had (systemd quoting kept as it was)."""
    command = _PAUSE_ARG.sub("", exec_start)
    return (
        "# Written by lifecycle. cri-dockerd, not the kubelet, chooses the pod sandbox image: this is the one\n"
        "# lifecycle pulled for the configured Kubernetes version, so no sandbox needs registry.k8s.io.\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={command} {PAUSE_FLAG}={pause_image}\n"
    ).encode()


def wanted_drop_in(ctx: StepContext) -> bytes | None:
    """What the drop-in must say, or None when this machine runs no cri-dockerd unit and the kubelet does not
    talk to cri-dockerd either (another runtime chooses its sandbox image its own way)."""
    exec_start = packaged_exec_start(ctx.paths)
    if exec_start is None:
        if "cri-dockerd" in ctx.config.kubernetes.cri_socket:
            raise PermanentError(
                f"the kubelet is to use cri-dockerd ({ctx.config.kubernetes.cri_socket}) but no {CRI_DOCKER_UNIT} "
                f"is installed in {', '.join(UNIT_DIRS)}: install cri-dockerd's package (docs/real-vm.md)",
                code="cri_dockerd_missing",
            )
        return None
    pause = ctx.config.kubernetes.images_for(ctx.cluster.kubernetes_version)["pause"]
    return render_drop_in(exec_start, pause)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


async def cri_dockerd_configured(ctx: StepContext) -> bool:
    try:
        wanted = await asyncio.to_thread(wanted_drop_in, ctx)
    except PermanentError:
        return False  # configure_cri_dockerd says why
    return wanted is None or await asyncio.to_thread(_read_or_none, ctx.paths.under(DROP_IN)) == wanted


async def configure_cri_dockerd(ctx: StepContext) -> None:
    """Write the drop-in and restart cri-dockerd when it changed; a failed restart puts the old drop-in back, so
    that a retry restarts again instead of finding the file already right."""
    wanted = await asyncio.to_thread(wanted_drop_in, ctx)
    if wanted is None:
        ctx.log.info("no cri-dockerd unit: the runtime chooses its own sandbox image", unit=CRI_DOCKER_UNIT)
        return
    path = ctx.paths.under(DROP_IN)
    before = await asyncio.to_thread(_read_or_none, path)
    if before == wanted:
        return
    systemctl = _require_systemctl(ctx.paths)
    await asyncio.to_thread(write_atomic, path, wanted, DROP_IN_MODE)
    try:
        await _systemctl(ctx, systemctl, "daemon-reload")
        await _systemctl(ctx, systemctl, "restart", CRI_DOCKER_UNIT)
    except BaseException:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            await asyncio.to_thread(write_atomic, path, before, DROP_IN_MODE)
        raise
    pause = ctx.config.kubernetes.images_for(ctx.cluster.kubernetes_version)["pause"]
    ctx.progress(f"cri-dockerd restarted with sandbox image {pause} ({DROP_IN})")


async def mask_kubelet_unit(ctx: StepContext) -> None:
    """`systemctl mask kubelet.service` (then `stop` if it ran): kubeadm's `systemctl restart kubelet` then fails
    (a warning in kubeadm) instead of starting a second kubelet next to ours. No systemctl: nothing can start one."""
    systemctl = find_systemctl(ctx.paths)
    if systemctl is None:
        return
    link = ctx.paths.under(f"/etc/systemd/system/{KUBELET_UNIT}")
    if link.is_symlink() and str(link.readlink()) == "/dev/null":
        return
    if link.exists():
        raise PermanentError(
            f"{link} is a unit file of its own, so {KUBELET_UNIT} cannot be masked: the service runs the kubelet "
            f"itself; remove the file (or move it away) and retry", code="kubelet_unit_conflict")
    state = await ctx.ports.commands.run([str(systemctl), "is-active", KUBELET_UNIT])
    was = state.output_tail[-1].strip() if state.output_tail else "unknown"
    await _systemctl(ctx, systemctl, "mask", KUBELET_UNIT)
    if was in ("active", "activating", "reloading"):
        # A packaged kubelet (enabled by its .deb) runs or crash-loops; stopped only then, so that a machine
        # that never had the unit sees no `stop` of a unit it does not know.
        await _systemctl(ctx, systemctl, "stop", KUBELET_UNIT)
        ctx.progress(f"stopped {KUBELET_UNIT} (it was {was}): the service runs the kubelet itself")
    ctx.progress(f"masked {KUBELET_UNIT}: the service supervises the kubelet (kubeadm cannot start another)")


def _require_systemctl(paths: HostPaths) -> Path:
    systemctl = find_systemctl(paths)
    if systemctl is None:
        raise PermanentError(
            f"{CRI_DOCKER_UNIT} is installed but there is no systemctl in {' or '.join(SYSTEMCTL_PATHS)} "
            f"to restart it with the sandbox image", code="systemctl_missing")
    return systemctl


async def _systemctl(ctx: StepContext, systemctl: Path, *args: str) -> None:
    argv = [str(systemctl), *args]
    result = await ctx.ports.commands.run(argv, on_line=lambda line: ctx.log.info("systemctl output", line=line))
    if result.exit_code != 0:
        raise CommandError(argv, result.exit_code, list(result.output_tail), retryable=True, code="systemctl_failed")
