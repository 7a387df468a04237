"""reset: takes the node back to before the install (run by the engine in state `resetting`).

Stops the kubelet, runs `kubeadm reset -f` (static pods, manifests, kubeconfigs, /var/lib/kubelet, /var/lib/etcd,
the PKI), then removes what the service generated (PKI, kubeconfigs, kubeadm config, `*.stamp.json` stamps).
Keeps the images, the extracted binaries and the engine's own state files. Idempotent.
Done only when no process of the node runs any more (lifecycle.hostprocs): what kubeadm reset missed is ended
(SIGTERM, then SIGKILL after a grace) and named in a progress event; and when no binaries copy container of the
node (labels in states/binaries.py) is left in the engine.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable

from lifecycle import hostprocs, upgrade
from lifecycle.errors import PermanentError, StepError, TemporaryError
from lifecycle.paths import KUBECONFIG_NAMES
from lifecycle.ports import EngineError
from lifecycle.step import StepContext
from states.binaries import LEFTOVER_CHECK_TIMEOUT_S, copy_labels
from states.kubeadm import cri_socket_flag, run_kubeadm

# Stamps that record finished steps are named `<what>.stamp.json`; the engine's state and sequence files are not.
STAMP_GLOB = "*.stamp.json"
# An interrupted kubeadm retry's temp dirs; the readiness wait's credentials scratch dir of older versions
# (states/controlplane.py now loads the key from memory).
_LEFTOVER_GLOBS = ("kubeadm-kubeconfigs-*", "kubeadm-scratch-certs-*", "readyz-credentials-*")
_EXTRA_KUBECONFIGS = ("bootstrap-kubelet.conf",)
_STRAY_GRACE_S = 5.0  # kubeadm reset's own grace for a pod process (the stop's too)
_ENGINE_RETRY_S = 0.5


async def reset(ctx: StepContext) -> None:
    paths = ctx.paths
    ctx.progress("stopping the kubelet", current=1, total=4)
    await ctx.ports.kubelet.stop()

    kubeadm_failure: StepError | None = None
    if paths.binary("kubeadm").is_file():
        ctx.progress("kubeadm reset -f", current=2, total=4)
        try:
            await run_kubeadm(ctx, ["reset", "-f", f"--cert-dir={paths.pki_dir}", cri_socket_flag(ctx)],
                              retryable=True)
        except StepError as exc:
            # Still remove our own files below, then report: a half-reset node is worse than a reported one.
            kubeadm_failure = exc
    else:
        ctx.progress("kubeadm is not installed: nothing for kubeadm reset to do", current=2, total=4)

    ctx.progress("removing generated files", current=3, total=4)
    removed: list[str] = []
    if paths.pki_dir.exists():
        shutil.rmtree(paths.pki_dir, onerror=_gone_is_fine)
        removed.append(str(paths.pki_dir))
    for name in (*KUBECONFIG_NAMES, *_EXTRA_KUBECONFIGS):
        if paths.kubeconfig(name).exists():
            paths.kubeconfig(name).unlink()
            removed.append(str(paths.kubeconfig(name)))
    if paths.kubeadm_config.exists():
        paths.kubeadm_config.unlink()
        removed.append(str(paths.kubeadm_config))
    if paths.state_dir.is_dir():
        for stamp in sorted(paths.state_dir.glob(STAMP_GLOB)):
            stamp.unlink()
            removed.append(str(stamp))
        for pattern in _LEFTOVER_GLOBS:
            for leftover in paths.state_dir.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        # An upgrade the reset interrupted: its record and the binaries it staged.
        upgrade_files = [paths.state_dir / upgrade.RECORD_NAME, paths.state_dir / upgrade.STAGING_DIR]
        if any(p.exists() for p in upgrade_files):
            upgrade.clear(paths)
            removed += [str(p) for p in upgrade_files]
    for path in removed:
        ctx.progress(f"removed {path}")
    if kubeadm_failure is not None:
        raise kubeadm_failure
    # kubeadm reset stops only the containers the runtime knows of; a process it missed (or a kubelet or kubeadm a
    # killed service left without a record) would run on under an `idle` node.
    ctx.progress("checking that nothing of the node still runs", current=4, total=4)
    await end_what_still_runs(ctx, code="reset_incomplete", saying="ending processes still running from the node")
    await _remove_copy_containers(ctx)


async def end_what_still_runs(ctx: StepContext, *, code: str, saying: str) -> None:
    """End every process of the node still running (SIGTERM, SIGKILL after the grace), `saying` what it ends; one
    that survives SIGKILL fails the step with `code`. Used by the reset and the stop."""
    strays = await asyncio.to_thread(hostprocs.processes_under, ctx.paths.root)  # a /proc scan: off the loop
    if not strays:
        return
    ctx.progress(f"{saying}: {hostprocs.describe_all(strays)}")
    killed = await hostprocs.end_processes(strays, grace_s=_STRAY_GRACE_S)
    if killed:
        ctx.progress(f"killed (ignored SIGTERM): {hostprocs.describe_all(killed)}")
    survivors = [p for p in strays if hostprocs.is_alive(p)]
    if survivors:
        raise PermanentError(f"processes of the node survived SIGKILL: {hostprocs.describe_all(survivors)}",
                             code=code)


async def _remove_copy_containers(ctx: StepContext) -> None:
    """The binaries step's copy containers a killed service (or an engine that failed mid-copy) left: the start
    and each binaries attempt remove them too, but a node reset to `idle` may never run either again. A removal
    the interrupted step left running makes dockerd answer 409 ("already in progress") for a moment: tried again."""
    removed: list[str] = []
    error: Exception | None = None
    try:
        async with asyncio.timeout(LEFTOVER_CHECK_TIMEOUT_S):
            while True:
                try:
                    removed += await ctx.ports.docker.remove_containers(copy_labels(ctx.config.node_name))
                    error = None
                    break
                except EngineError as exc:
                    error = exc
                    await asyncio.sleep(_ENGINE_RETRY_S)
    except TimeoutError as exc:
        error = error or exc
    if error is not None:
        # `idle` would claim a clean engine it could not check; a later reset tries again.
        raise TemporaryError(f"could not remove the binaries copy containers of the node: {error}",
                             code="reset_incomplete") from error
    if removed:
        ctx.progress(f"removed {len(removed)} binaries copy container(s) left in the engine: "
                     f"{', '.join(dict.fromkeys(c[:12] for c in removed))}")


def _gone_is_fine(
    function: Callable[..., object], path: str, exc_info: tuple[type[BaseException], BaseException, object],
) -> None:
    """rmtree's error hook: a file that vanished meanwhile is what removing wanted; anything else is raised."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
