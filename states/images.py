"""images: pull the binaries, control-plane and addon images through the container engine, several at once, and
give cri-dockerd the pause image pulled here (lifecycle/hostunits.py). Leaves them in the engine and the drop-in.
Done when each is present and, if the registry can be asked, has its current digest among its RepoDigests
(offline, a local copy counts), and cri-dockerd's drop-in names the pause image. Shortly before the step's
deadline it gives up naming the images still pulling (a stalled registry), which an install resumes.
Boot evidence (`<state_dir>/images.json`, each reference's local image id when the step last held): at boot every
image is looked up by that id in the engine, and the registry is not asked (lifecycle.step.BootEvidence).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from lifecycle.atomicfile import write_atomic
from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.hostunits import configure_cri_dockerd, cri_dockerd_configured
from lifecycle.ports import ContainerEngine, EngineError, PullProgress
from lifecycle.step import BootCheck, StepContext, fail_at

PROGRESS_INTERVAL_S = 0.25  # per image: a few lines a second, whatever the engine's rate
PULL_RETRY_DELAY_S = 2.0
EVIDENCE_NAME = "images.json"
T = TypeVar("T")


def wanted_images(ctx: StepContext) -> list[str]:
    """Every reference the install needs, in a stable order, each once."""
    k8s = ctx.config.kubernetes
    version = ctx.cluster.kubernetes_version
    addons = ctx.config.addons.images(k8s.image_repository).values()
    refs = [k8s.binaries_image_for(version), *k8s.images_for(version).values(), *addons, *k8s.addon_images]
    return list(dict.fromkeys(refs))


def _repository(ref: str) -> str:
    if "@" in ref:
        return ref.split("@", 1)[0]
    name_start = ref.rfind("/") + 1
    colon = ref.rfind(":")
    return ref[:colon] if colon > name_start else ref


async def up_to_date(engine: ContainerEngine, ref: str) -> tuple[bool, str]:
    """(is the local copy good, why) for one reference."""
    if await engine.image_id(ref) is None:
        return False, "not present"
    if "@" in ref:
        return True, "present (pinned by digest)"
    digest = await engine.registry_digest(ref)
    if digest is None:
        return True, "present (registry not reachable: keeping the local copy)"
    if f"{_repository(ref)}@{digest}" in await engine.repo_digests(ref):
        return True, "present with the registry's digest"
    return False, f"registry has a newer digest {digest[:19]}"


class Images:
    name = "images"
    timeout_s = 1800.0
    retries = 3  # a pull resumes from the layers it already has: safe to repeat

    async def is_done(self, ctx: StepContext) -> bool:
        limit = asyncio.Semaphore(ctx.config.docker.pull_concurrency)

        async def check(ref: str) -> bool:
            async with limit:
                good, _ = await up_to_date(ctx.ports.docker, ref)
                return good

        try:
            results = await _all(ctx, "images-check", [(ref, check(ref)) for ref in wanted_images(ctx)])
        except EngineError:
            return False  # cannot tell: run() asks again and reports the engine's error
        return all(results) and await cri_dockerd_configured(ctx)

    async def run(self, ctx: StepContext) -> None:
        refs = wanted_images(ctx)
        limit = asyncio.Semaphore(ctx.config.docker.pull_concurrency)
        ctx.log.info("images wanted", count=len(refs), concurrency=ctx.config.docker.pull_concurrency)
        pulls = _Pulls(refs)
        timer = asyncio.timeout_at(fail_at(ctx))
        try:
            async with timer:
                await _all(ctx, "images-pull", [(ref, self._one(ctx, ref, limit, pulls)) for ref in refs])
        except TimeoutError:
            if not timer.expired():
                raise
            raise pulls.deadline_error() from None
        await configure_cri_dockerd(ctx)  # the sandbox image must be present before cri-dockerd is told to use it

    async def _one(self, ctx: StepContext, ref: str, limit: asyncio.Semaphore, pulls: _Pulls) -> None:
        async with limit:
            pulls.started(ref)
            try:
                good, why = await up_to_date(ctx.ports.docker, ref)
                if good:
                    ctx.progress(f"skipped {ref}: {why}")
                    pulls.finished(ref)
                    return
                ctx.log.info("pulling image", image=ref, reason=why)
                throttle = _ProgressThrottle(ctx, ref, pulls)
                image_id = await ctx.ports.docker.pull(ref, on_progress=throttle)
                throttle.finish()
            except EngineError as exc:
                raise _classify(ctx, ref, exc) from exc
            pulls.finished(ref)
            ctx.log.info("pulled image", image=ref, image_id=image_id)

    async def before_retry(self, ctx: StepContext) -> None:
        return None  # the engine keeps complete layers; nothing to undo

    async def boot_check(self, ctx: StepContext) -> BootCheck:
        """Each wanted image is in the engine under the id recorded when the step last held: the local copies are
        those the node ran on, which is all a boot needs (whether a tag moved on in the registry is a question
        for an install, not for a boot, which must work offline). An engine lookup per image, no registry."""
        recorded = await asyncio.to_thread(_read_evidence, ctx.paths.state_dir / EVIDENCE_NAME)
        refs = wanted_images(ctx)
        if recorded is None or any(ref not in recorded for ref in refs):
            return BootCheck.UNKNOWN
        try:
            ids = await asyncio.gather(*(ctx.ports.docker.image_id(ref) for ref in refs))
        except EngineError:
            return BootCheck.UNKNOWN  # the full check says what is wrong
        if any(image_id != recorded[ref] for ref, image_id in zip(refs, ids, strict=True)):
            return BootCheck.UNKNOWN
        return BootCheck.HOLDS if await cri_dockerd_configured(ctx) else BootCheck.UNKNOWN

    async def record_boot_evidence(self, ctx: StepContext) -> None:
        refs = wanted_images(ctx)
        ids = await asyncio.gather(*(ctx.ports.docker.image_id(ref) for ref in refs))
        evidence = {ref: image_id for ref, image_id in zip(refs, ids, strict=True) if image_id is not None}
        text = json.dumps({"images": evidence}, indent=2, sort_keys=True).encode()
        await asyncio.to_thread(write_atomic, ctx.paths.state_dir / EVIDENCE_NAME, text, 0o644)


def _read_evidence(path: Path) -> dict[str, str] | None:
    try:
        images = json.loads(path.read_text()).get("images")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(images, dict) or not all(isinstance(v, str) for v in images.values()):
        return None
    return {str(ref): image_id for ref, image_id in images.items()}


async def _all(ctx: StepContext, prefix: str, jobs: list[tuple[str, Coroutine[Any, Any, T]]]) -> list[T]:
    """Run the jobs concurrently; the first failure cancels the others and propagates as itself (no group)."""
    tasks = [asyncio.create_task(job, name=f"{prefix}-{ref}") for ref, job in jobs]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Pulls:
    """Where each image stands (waiting for a slot, under way with its last progress, finished): what the error
    says when the deadline comes first."""

    def __init__(self, refs: list[str]) -> None:
        self._waiting = list(refs)
        self._under_way: dict[str, PullProgress | None] = {}

    def started(self, ref: str) -> None:
        self._waiting.remove(ref)
        self._under_way[ref] = None

    def progressed(self, progress: PullProgress) -> None:
        self._under_way[progress.image] = progress

    def finished(self, ref: str) -> None:
        self._under_way.pop(ref, None)

    def deadline_error(self) -> TemporaryError:
        under_way = [(ref, p.current_bytes if p else 0, p.total_bytes if p else None)
                     for ref, p in self._under_way.items()]
        pulling = [{"image": ref, "current_bytes": done, "total_bytes": total} for ref, done, total in under_way]
        parts = [f"{ref} ({_bytes_done(done, total)})" for ref, done, total in under_way]
        message = "images not pulled before the step deadline; still pulling: " + (", ".join(parts) or "none")
        if self._waiting:
            message += f"; waiting for a slot: {', '.join(self._waiting)}"
        message += ". An install resumes the pulls (layers already downloaded are kept)."
        # The engine's code for a passed deadline, here with what was unfinished; the engine adds `timeout_s`.
        return TemporaryError(message, code="deadline_exceeded", delay_s=PULL_RETRY_DELAY_S, details={
            "step": "images", "pulling": pulling, "waiting": list(self._waiting)})


def _bytes_done(current_bytes: int | None, total_bytes: int | None) -> str:
    if not current_bytes:
        return "no bytes received yet"
    if total_bytes:
        return f"{current_bytes / 2**20:.1f} of {total_bytes / 2**20:.1f} MiB"
    return f"{current_bytes / 2**20:.1f} MiB, size not yet known"


class _ProgressThrottle:
    """Forwards pull progress at most every PROGRESS_INTERVAL_S; `finish` always sends the last one."""

    def __init__(self, ctx: StepContext, ref: str, pulls: _Pulls) -> None:
        self._ctx = ctx
        self._ref = ref
        self._pulls = pulls
        self._last_s = 0.0
        self._latest: PullProgress | None = None
        self._sent_latest = False

    def __call__(self, progress: PullProgress) -> None:
        self._latest, self._sent_latest = progress, False
        self._pulls.progressed(progress)
        now_s = time.monotonic()
        if now_s - self._last_s >= PROGRESS_INTERVAL_S:
            self._last_s = now_s
            self._send()

    def finish(self) -> None:
        if self._latest is not None and not self._sent_latest:
            self._send()

    def _send(self) -> None:
        assert self._latest is not None
        self._sent_latest = True
        self._ctx.progress(
            f"pulling {self._ref}", current=self._latest.current_bytes, total=self._latest.total_bytes, unit="bytes"
        )


# What the engine says when a downloaded layer's tar itself is at fault (pulling it again gets the same bytes):
# a name twice in one layer (tar-split, tar/storage/packer.go ErrDuplicatePath, which moby's layer store uses to
# record each layer: layer/layer_store.go registerWithDescriptor).
LAYER_REFUSED = ("duplicates of file paths not supported",)


def _classify(ctx: StepContext, ref: str, exc: EngineError) -> PermanentError | TemporaryError:
    if exc.unreachable:  # not the registry's fault: the engine did not answer (a restarted engine answers again)
        return TemporaryError(exc.message, code="engine_unavailable", delay_s=PULL_RETRY_DELAY_S,
                              details={"image": ref, "docker_host": ctx.config.docker.host})
    if exc.not_found:
        return PermanentError(f"image {ref} not found: {exc.message}", code="image_not_found", details={"image": ref})
    if any(reason in exc.message for reason in LAYER_REFUSED):
        return PermanentError(f"pull of {ref} failed: the engine refuses a layer of the image: {exc.message}",
                              code="bad_image", details={"image": ref, "reason": exc.message})
    return TemporaryError(
        f"pull of {ref} failed: {exc.message}", code="pull_failed", delay_s=PULL_RETRY_DELAY_S, details={"image": ref}
    )
