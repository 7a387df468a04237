"""kubeadm: `kubeadm init` phases up to kubelet-start, on our PKI; leaves the static pod manifests, the kubelet
config and flags, and a stamp (`<state_dir>/kubeadm.stamp.json`) with the sha256 of the kubeadm config used.
Done when those files exist and the stamp matches the current kubeadm config.

Why phases and not `kubeadm init`: init blocks in `wait-control-plane` until a kubelet runs the static pods,
and in our plan the kubelet is started by the next state. So the sequence is split in three
(docs/kubeadm-sequence.md):
  kubeadm   preflight, certs all (keeps our PKI), kubeconfig all (keeps ours), etcd local, control-plane all,
            kubelet-start (writes /var/lib/kubelet/config.yaml and kubeadm-flags.env, does not start it)
  kubelet   the kubelet, started with those files, supervised, /healthz ok
  readiness the service's own wait for kubelet /healthz and API /readyz (kubeadm v1.31-v1.33 hide the
            wait-control-plane phase: no `init phase wait-control-plane`), then upload-config all,
            mark-control-plane, bootstrap-token, kubelet-finalize all, addon all; then the pods Ready
`kubeadm init` is not idempotent: a failed attempt is undone with `kubeadm reset -f` on a scratch cert dir
(real reset empties the cert dir; ours must survive) and the kubeconfigs the certs state made are put back.
Every kubeadm call without --config (reset) passes --cri-socket: kubeadm's own detection fails on a host with
Docker Engine's containerd next to cri-dockerd.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from lifecycle.errors import CommandError, PermanentError, TemporaryError
from lifecycle.hostunits import mask_kubelet_unit
from lifecycle.paths import KUBECONFIG_NAMES, HostPaths
from lifecycle.step import StepContext

INIT_PHASES: tuple[tuple[str, ...], ...] = (
    ("preflight",),
    ("certs", "all"),
    ("kubeconfig", "all"),
    ("etcd", "local"),
    ("control-plane", "all"),
    ("kubelet-start",),
)
# kubeadm's systemd checks (Service-Kubelet, Service-Docker) are warnings, not errors, so a VM without systemd
# passes preflight as is. Add check names here only for errors that cannot hold on such a VM.
IGNORED_PREFLIGHT_ERRORS: tuple[str, ...] = ()
STATIC_POD_MANIFESTS = ("etcd.yaml", "kube-apiserver.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")
STAMP_NAME = "kubeadm.stamp.json"
_PHASE_LINE = re.compile(r"^\[[a-z][a-z0-9-]*(/[a-z0-9-]+)?\] ")  # "[certs] Using existing ca certificate ..."
# A bootstrap token ("abcdef.0123456789abcdef") is a credential: kubeadm prints it, we never pass it on.
_TOKEN = re.compile(r"\b([a-z0-9]{6})\.[a-z0-9]{16}\b")
_EXTRA_KUBECONFIGS = ("bootstrap-kubelet.conf",)


class Kubeadm:
    """Runs the kubeadm init phases that need no running kubelet (see the module docstring)."""

    name = "kubeadm"
    timeout_s = 300.0
    retries = 1  # one retry after `before_retry` has reset the node: a blind re-run of init would fail

    async def is_done(self, ctx: StepContext) -> bool:
        paths = ctx.paths
        outputs = [paths.manifests_dir / m for m in STATIC_POD_MANIFESTS]
        outputs += [paths.kubelet_config, paths.kubeadm_flags_env, paths.kubeadm_config]
        if not all(p.is_file() for p in outputs):
            return False
        return _read_stamp(paths) == _sha256(paths.kubeadm_config)

    async def run(self, ctx: StepContext) -> None:
        paths = ctx.paths
        if not paths.kubeadm_config.is_file():
            raise PermanentError(f"{paths.kubeadm_config} is missing (the certs state writes it)",
                                 code="kubeadm_config_missing")
        # The stamp goes first: a crash in the middle must not leave an old stamp vouching for new files.
        (paths.state_dir / STAMP_NAME).unlink(missing_ok=True)
        if _has_leftovers(paths):
            ctx.progress("removing what an earlier, unfinished kubeadm run left")
            await reset_keeping_pki(ctx)
        await mask_kubelet_unit(ctx)  # before kubelet-start's `systemctl restart kubelet` (docs/real-vm.md)
        config_sha256 = _sha256(paths.kubeadm_config)
        for index, phase in enumerate(INIT_PHASES, start=1):
            args = ["init", "phase", *phase, f"--config={paths.kubeadm_config}"]
            if phase == ("preflight",) and IGNORED_PREFLIGHT_ERRORS:
                args.append(f"--ignore-preflight-errors={','.join(IGNORED_PREFLIGHT_ERRORS)}")
            ctx.progress(f"kubeadm init phase {' '.join(phase)}", current=index, total=len(INIT_PHASES))
            await run_kubeadm(ctx, args, retryable=True)
        if _sha256(paths.kubeadm_config) != config_sha256:
            raise TemporaryError(f"{paths.kubeadm_config} changed while kubeadm ran", code="config_changed")
        _write_stamp(paths, config_sha256=config_sha256)

    async def before_retry(self, ctx: StepContext) -> None:
        await reset_keeping_pki(ctx)


async def run_kubeadm(ctx: StepContext, args: Sequence[str], *, retryable: bool) -> None:
    """Run `<root>/usr/bin/kubeadm args`: every line to the log, `[phase]` lines as progress.

    Fails with kubeadm's own words (`CommandError`), or shortly before the step deadline with the phase and
    the last lines it printed, rather than being cut off by the engine without a reason.
    """
    kubeadm = ctx.paths.binary("kubeadm")
    if not kubeadm.is_file():
        raise PermanentError(f"{kubeadm} is missing (the binaries state copies it)", code="kubeadm_missing")
    argv = [str(kubeadm), *args]
    tail: deque[str] = deque(maxlen=40)

    def on_line(raw: str) -> None:
        line = redact(raw)
        tail.append(line)
        ctx.log.info("kubeadm output", line=line)
        if _PHASE_LINE.match(line):
            ctx.progress(line)

    give_up_at = fail_at(ctx)
    try:
        async with asyncio.timeout_at(give_up_at):
            result = await ctx.ports.commands.run(argv, on_line=on_line, tail_lines=40)
    except TimeoutError:
        waited = " ".join(args[:4])
        raise TemporaryError(
            f"kubeadm {waited} did not finish before the step deadline; last output:\n" + "\n".join(list(tail)[-10:]),
            code="kubeadm_timeout",
            details={"argv": argv, "output_tail": list(tail)},
        ) from None
    if result.exit_code != 0:
        # Our redacted copy of the tail, not the runner's raw one.
        raise CommandError(argv, result.exit_code, list(tail), retryable=retryable, code="kubeadm_failed")


def redact(line: str) -> str:
    """The line with any bootstrap token's secret half replaced (it goes to logs, events and errors)."""
    return _TOKEN.sub(r"\1.<redacted>", line)


def cri_socket_flag(ctx: StepContext) -> str:
    """For every kubeadm command run without --config: with no socket given, kubeadm detects one
    (cmd/kubeadm/app/util/runtime/runtime.go, DetectCRISocket) and fails on a host where Docker Engine's
    containerd.sock sits next to cri-dockerd.sock ("found multiple CRI endpoints on the host")."""
    return f"--cri-socket={ctx.config.kubernetes.cri_socket}"


def fail_at(ctx: StepContext) -> float:
    """Loop time at which a waiting step gives up: a little before the engine's deadline, so the step can say
    what it was waiting for instead of being cancelled without a reason."""
    left_s = ctx.deadline - asyncio.get_running_loop().time()
    return ctx.deadline - min(2.0, max(0.1, left_s * 0.1))


async def reset_keeping_pki(ctx: StepContext) -> None:
    """`kubeadm reset -f` that leaves our PKI and kubeconfigs as the certs state made them.

    Real reset empties the cert dir it is given, so it gets an empty scratch dir; it also deletes the
    kubeconfigs, so they are copied aside (0700 dir, modes kept: they hold client keys) and put back.
    """
    paths = ctx.paths
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    backup = Path(tempfile.mkdtemp(prefix="kubeadm-kubeconfigs-", dir=paths.state_dir))
    scratch = Path(tempfile.mkdtemp(prefix="kubeadm-scratch-certs-", dir=paths.state_dir))
    try:
        kept = [n for n in (*KUBECONFIG_NAMES, *_EXTRA_KUBECONFIGS) if paths.kubeconfig(n).is_file()]
        for name in kept:
            shutil.copy2(paths.kubeconfig(name), backup / name)
        ctx.progress("kubeadm reset -f (keeping the PKI and kubeconfigs)")
        await run_kubeadm(ctx, ["reset", "-f", f"--cert-dir={scratch}", cri_socket_flag(ctx)], retryable=True)
        for name in kept:
            shutil.copy2(backup / name, paths.kubeconfig(name))
    finally:
        shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _has_leftovers(paths: HostPaths) -> bool:
    if any((paths.manifests_dir / m).exists() for m in STATIC_POD_MANIFESTS):
        return True
    if paths.kubelet_config.exists() or paths.kubeadm_flags_env.exists():
        return True
    return paths.etcd_dir.is_dir() and any(paths.etcd_dir.iterdir())


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _read_stamp(paths: HostPaths) -> str | None:
    try:
        value = json.loads((paths.state_dir / STAMP_NAME).read_text()).get("kubeadm_config_sha256")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _write_stamp(paths: HostPaths, *, config_sha256: str | None) -> None:
    stamp = paths.state_dir / STAMP_NAME
    tmp = stamp.with_name(f".{STAMP_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump({"kubeadm_config_sha256": config_sha256, "phases": [" ".join(p) for p in INIT_PHASES]}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(stamp)
