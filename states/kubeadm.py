"""kubeadm: `kubeadm init` phases up to kubelet-start, on our PKI; leaves the static pod manifests, the kubelet
config and flags, and a stamp (`<state_dir>/kubeadm.stamp.json`) with the sha256 of the kubeadm config used.
Done when those files exist and the stamp matches the current kubeadm config. The stamp also records the
settings and the kubeadm config the cluster was made from (lifecycle.drift reads them).

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
Once the stamp says kubeadm made a cluster here, the step never resets: a changed kubeadm config is applied
without kubeadm where a running cluster can take it (`_reconfigure`), else refused with `reset_required`.
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

import yaml

from lifecycle import hostprocs, yamlsafe
from lifecycle.atomicfile import write_atomic
from lifecycle.drift import (
    KUBEADM_STAMP,
    kubeadm_config_changes,
    kubelet_document,
    merge_kubelet_config,
    needs_kubeadm,
    settings_of,
)
from lifecycle.errors import CommandError, PermanentError, TemporaryError
from lifecycle.hostunits import mask_kubelet_unit
from lifecycle.paths import KUBECONFIG_NAMES, HostPaths
from lifecycle.step import StepContext, fail_at

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
STAMP_NAME = KUBEADM_STAMP
_PHASE_LINE = re.compile(r"^\[[a-z][a-z0-9-]*(/[a-z0-9-]+)?\] ")  # "[certs] Using existing ca certificate ..."
# A bootstrap token ("abcdef.0123456789abcdef") is a credential: kubeadm prints it, we never pass it on.
_TOKEN = re.compile(r"\b([a-z0-9]{6})\.[a-z0-9]{16}\b")
_EXTRA_KUBECONFIGS = ("bootstrap-kubelet.conf",)
_ORPHAN_GRACE_S = 5.0  # a kubeadm phase left by a killed service: its work is redone, so it need not finish


class Kubeadm:
    """Runs the kubeadm init phases that need no running kubelet (see the module docstring)."""

    name = "kubeadm"
    timeout_s = 300.0
    retries = 1  # one retry after `before_retry` has reset an unfinished init: a blind re-run would fail

    async def is_done(self, ctx: StepContext) -> bool:
        paths = ctx.paths
        if not all(p.is_file() for p in _outputs(paths)):
            return False
        return _read_stamp(paths) == _sha256(paths.kubeadm_config)

    async def run(self, ctx: StepContext) -> None:
        paths = ctx.paths
        if not paths.kubeadm_config.is_file():
            raise PermanentError(f"{paths.kubeadm_config} is missing (the certs state writes it)",
                                 code="kubeadm_config_missing")
        if read_stamp_doc(paths) is not None:
            await _reconfigure(ctx)  # kubeadm made a cluster here: its data is never reset for a config change
            return
        # The stamp goes first: a crash in the middle must not leave an old stamp vouching for new files.
        (paths.state_dir / STAMP_NAME).unlink(missing_ok=True)
        if await asyncio.to_thread(_has_leftovers, paths):  # stat()s: ms each on a busy disk, off the loop
            ctx.progress("removing what an earlier, unfinished kubeadm run left")
            await ctx.ports.kubelet.stop()  # kubeadm reset stops a systemd kubelet, not the one we supervise
            await reset_keeping_pki(ctx)
        await mask_kubelet_unit(ctx)  # before kubelet-start's `systemctl restart kubelet` (docs/real-vm.md)
        config_text = paths.kubeadm_config.read_text()
        config_sha256 = _sha256(paths.kubeadm_config)
        for index, phase in enumerate(INIT_PHASES, start=1):
            args = ["init", "phase", *phase, f"--config={paths.kubeadm_config}"]
            if phase == ("preflight",) and IGNORED_PREFLIGHT_ERRORS:
                args.append(f"--ignore-preflight-errors={','.join(IGNORED_PREFLIGHT_ERRORS)}")
            ctx.progress(f"kubeadm init phase {' '.join(phase)}", current=index, total=len(INIT_PHASES))
            await run_kubeadm(ctx, args, retryable=True)
        if _sha256(paths.kubeadm_config) != config_sha256:
            raise TemporaryError(f"{paths.kubeadm_config} changed while kubeadm ran", code="config_changed")
        await asyncio.to_thread(write_stamp, ctx, config_sha256=config_sha256, config_text=config_text)

    async def before_retry(self, ctx: StepContext) -> None:
        if read_stamp_doc(ctx.paths) is not None:
            return  # a cluster is there: `_reconfigure` is repeated as it is, nothing is undone
        await ctx.ports.kubelet.stop()
        await reset_keeping_pki(ctx)


async def _reconfigure(ctx: StepContext) -> None:
    """The kubeadm config changed on a node where kubeadm made a cluster: apply what a running cluster takes
    without kubeadm (the kubelet's own config: config.yaml rewritten, the kubelet stopped so that the kubelet step
    starts it on the new one; certificate fields: already applied by the certs state), then stamp the new config.
    Anything else would need `kubeadm init` again, that is a reset: refused, nothing changed."""
    paths = ctx.paths
    missing = [str(p) for p in _outputs(paths) if not p.is_file()]
    if missing:
        raise PermanentError(f"kubeadm made a cluster here, but {', '.join(missing)} is gone: kubeadm writes it "
                             "again only in a new init, after a reset", code="reset_required",
                             details={"missing": missing})
    stamp = read_stamp_doc(paths) or {}
    applied = stamp.get("kubeadm_config")
    data = paths.kubeadm_config.read_bytes()
    current = data.decode()
    if not isinstance(applied, str):
        raise PermanentError(
            f"the kubeadm config changed, and {paths.state_dir / STAMP_NAME} does not record the one the cluster was "
            "made from (an install by an earlier version): what changed cannot be told, so nothing is applied; "
            "put the configuration back, or reset and install again", code="reset_required")
    try:
        changed = kubeadm_config_changes(applied, current)
    except ValueError as exc:
        raise PermanentError(f"{paths.kubeadm_config}: {exc}", code="invalid_config") from exc
    refused = needs_kubeadm(changed)
    if refused:
        raise PermanentError(
            f"the kubeadm config changed in fields a running cluster only takes from a new kubeadm init, that is "
            f"after a reset: {', '.join(refused)}; nothing was changed", code="reset_required",
            details={"fields": refused})
    if any(field.startswith("KubeletConfiguration.") for field in changed):
        await _rewrite_kubelet_config(ctx, current)
    if changed:
        ctx.progress(f"kubeadm config changes taken without kubeadm: {', '.join(changed)}")
    await asyncio.to_thread(write_stamp, ctx, config_sha256=hashlib.sha256(data).hexdigest(), config_text=current)


async def _rewrite_kubelet_config(ctx: StepContext, kubeadm_config: str) -> None:
    """What `kubeadm init phase kubelet-start` does to a running kubelet, without kubeadm's preflight: stop it,
    write config.yaml from the new KubeletConfiguration (kubeadm's defaults in the file kept)."""
    path = ctx.paths.kubelet_config
    try:
        current = await asyncio.to_thread(lambda: yamlsafe.load(path.read_text()))  # off the loop: YAML
    except (OSError, yaml.YAMLError) as exc:
        raise PermanentError(f"{path}: cannot read the kubelet's config: {exc}", code="kubelet_config_invalid") from exc
    if not isinstance(current, dict):
        raise PermanentError(f"{path}: not a KubeletConfiguration", code="kubelet_config_invalid")
    merged = merge_kubelet_config(current, kubelet_document(kubeadm_config))
    ctx.progress("stopping the kubelet to restart it on its new configuration")
    await ctx.ports.kubelet.stop()
    text: str = await asyncio.to_thread(lambda: yaml.safe_dump(merged, sort_keys=True))
    await asyncio.to_thread(write_atomic, path, text.encode(), path.stat().st_mode & 0o777)  # fsyncs
    ctx.progress(f"rewrote {path.name} for the kubelet")


async def run_kubeadm(
    ctx: StepContext, args: Sequence[str], *, retryable: bool, lines: list[str] | None = None,
) -> None:
    """Run `<root>/usr/bin/kubeadm args`: every line to the log, `[phase]` lines as progress.

    Fails with kubeadm's own words (`CommandError`), or shortly before the step deadline with the phase and
    the last lines it printed, rather than being cut off by the engine without a reason. `lines`, when given,
    receives every (redacted) line for a caller that reads kubeadm's answer.
    """
    kubeadm = ctx.paths.binary("kubeadm")
    if not kubeadm.is_file():
        raise PermanentError(f"{kubeadm} is missing (the binaries state copies it)", code="kubeadm_missing")
    argv = [str(kubeadm), *args]
    # A kubeadm started by a service that was killed runs on in its own session: never two at once.
    orphans = await asyncio.to_thread(hostprocs.running_program, kubeadm)  # a /proc scan: off the loop
    if orphans:
        ctx.progress(f"ending a kubeadm left running by an earlier run: {hostprocs.describe_all(orphans)}")
        await hostprocs.end_processes(orphans, grace_s=_ORPHAN_GRACE_S)
    tail: deque[str] = deque(maxlen=40)

    def on_line(raw: str) -> None:
        line = redact(raw)
        tail.append(line)
        if lines is not None:
            lines.append(line)
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


def _outputs(paths: HostPaths) -> list[Path]:
    outputs = [paths.manifests_dir / m for m in STATIC_POD_MANIFESTS]
    return [*outputs, paths.kubelet_config, paths.kubeadm_flags_env, paths.kubeadm_config]


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


def read_stamp_doc(paths: HostPaths) -> dict[str, object] | None:
    """The stamp of a finished kubeadm run (kubeadm made a cluster here), or None."""
    try:
        doc = json.loads((paths.state_dir / STAMP_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _read_stamp(paths: HostPaths) -> str | None:
    value = (read_stamp_doc(paths) or {}).get("kubeadm_config_sha256")
    return value if isinstance(value, str) else None


def write_stamp(ctx: StepContext, *, config_sha256: str | None, config_text: str) -> None:
    """The stamp, with what the cluster now runs on: the settings (lifecycle.drift compares them with the
    configuration) and the kubeadm config itself (`_reconfigure` compares it with a new one). No secrets in it."""
    paths = ctx.paths
    stamp = paths.state_dir / STAMP_NAME
    tmp = stamp.with_name(f".{STAMP_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump({"kubeadm_config_sha256": config_sha256, "phases": [" ".join(p) for p in INIT_PHASES],
                   "settings": settings_of(ctx.config, ctx.cluster), "kubeadm_config": config_text}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(stamp)
