"""certs: the kubeadm PKI in `<root>/etc/kubernetes/pki`, the five kubeconfigs and the kubeadm config; valid
files are kept, the rest issued from the existing CAs. Done when every file is valid for the current config and
the kubeadm config is exactly what would be written.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime
from pathlib import Path

from lifecycle.atomicfile import write_atomic
from lifecycle.errors import PermanentError
from lifecycle.kubefiles import render_kubeadm_config
from lifecycle.pki import (
    PkiError,
    PkiParams,
    PlannedFile,
    plan_pki,
    read_existing,
    rooted_reader,
    validate_pki,
    write_files,
)
from lifecycle.ports import EngineError
from lifecycle.step import StepContext, finish_in_thread

KUBEADM_CONFIG_MODE = 0o644


class Certs:
    name = "certs"
    timeout_s = 60.0
    retries = 0  # failures here are bad config or a broken disk: repeating does not help

    async def is_done(self, ctx: StepContext) -> bool:
        params = _params(ctx)
        paths = ctx.paths
        try:
            problems = await asyncio.to_thread(
                validate_pki, paths.pki_dir, params, kubeconfig_dir=paths.kubernetes_dir, root=paths.root
            )
            wanted_config = await kubeadm_config_for(ctx)
        except (ValueError, PermanentError):
            return False  # bad config or an engine that cannot be asked: run() says what is wrong
        if problems:
            ctx.log.info("pki needs work", problems=[str(p) for p in problems[:8]], count=len(problems))
            return False
        return await asyncio.to_thread(_read_or_none, paths.kubeadm_config) == wanted_config

    async def run(self, ctx: StepContext) -> None:
        paths = ctx.paths
        kubeadm_config = await kubeadm_config_for(ctx)
        planned = await asyncio.to_thread(_plan, ctx, _params(ctx))
        config_changed = await asyncio.to_thread(_read_or_none, paths.kubeadm_config) != kubeadm_config
        # Each file is told as the thread has written it: real progress, and no burst of 27 events at the end
        # queueing for the broker (issue 11). None is told once the step was cancelled.
        loop = asyncio.get_running_loop()
        told = {"open": True}

        def report(index: int, item: PlannedFile) -> None:
            if told["open"]:
                ctx.progress(f"wrote {item.name}: {item.reason}", current=index, total=len(planned), unit="files")

        def wrote(index: int, item: PlannedFile) -> None:  # in the writing thread
            loop.call_soon_threadsafe(report, index, item)

        try:
            await finish_in_thread(functools.partial(write_files, planned, pki_dir=paths.pki_dir,
                                                     kubeconfig_dir=paths.kubernetes_dir, wrote=wrote))
        except BaseException:
            told["open"] = False
            raise
        if config_changed:
            await finish_in_thread(write_atomic, paths.kubeadm_config, kubeadm_config, KUBEADM_CONFIG_MODE)
        if not planned:
            ctx.progress("kept every certificate and kubeconfig")
        ctx.log.info("pki ready", written=[item.name for item in planned], kubeadm_config_written=config_changed)

    async def before_retry(self, ctx: StepContext) -> None:
        return None  # every file is replaced atomically: a partial run leaves only valid or stale files


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _params(ctx: StepContext) -> PkiParams:
    return PkiParams.from_config(ctx.config, api_port=ctx.cluster.api_port, node_ip=ctx.node_ip)


async def kubeadm_config_for(ctx: StepContext) -> bytes:
    """The kubeadm config for the current settings, with the kubelet on the container engine's cgroup driver."""
    try:
        cgroup_driver = await ctx.ports.docker.cgroup_driver()
    except EngineError as exc:
        raise PermanentError(
            f"cannot write the kubelet's cgroup driver: the container engine could not tell its own: {exc.message}",
            code="engine_unavailable",
        ) from exc
    # In a thread: PyYAML's emitter takes ~4 ms of CPU for it, which held the loop (and the events queued behind
    # it) three times per install (issue 11: lifecycle.loopwatch at a 2 ms budget).
    return await asyncio.to_thread(render_kubeadm_config, ctx.config, ctx.cluster,
                                   certificates_dir=ctx.paths.pki_dir, cgroup_driver=cgroup_driver)


def _plan(ctx: StepContext, params: PkiParams) -> list[PlannedFile]:
    """All checks and all generation, before anything is written (runs in a worker thread)."""
    paths = ctx.paths
    existing = read_existing(paths.pki_dir, paths.kubernetes_dir)
    try:
        planned, _ = plan_pki(
            existing, params, now=datetime.now(UTC), read_file=rooted_reader(paths.root, paths.kubernetes_dir)
        )
    except ValueError as exc:
        raise PermanentError(str(exc), code="invalid_config") from exc
    except PkiError as exc:
        raise PermanentError(str(exc), code="pki_incomplete", details={"file": exc.file}) from exc
    return planned
