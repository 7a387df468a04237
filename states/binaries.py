"""binaries: copy the files `kubernetes.binaries` names (absolute paths: kubeadm, kubelet, kubectl, crictl in
/usr/bin, the CNI plugins in /opt/cni/bin) out of the binaries image, each to the same path under the node root
(0755), ignoring everything else in the image; recorded in `<state_dir>/binaries.json` (image id, sha256 per
file). Done when the record's image id is the local id of the binaries image and every file still has its sha256.
Boot evidence (`<state_dir>/binaries-boot.json`, each file's size and mtime when the full check last held): at
boot a stat per file and an engine lookup stand in for the hashes, which the engine then checks in the background.
A file the image holds as a hard link (seen in its layers: the archive API would hand over its partner's content),
with setuid/setgid/sticky bits or extended attributes (file capabilities; others from the layers) is refused as
`bad_image`, naming it; so is an image with a `../` entry name anywhere in its layers.
The container copied from carries `lifecycle.node=<node>` and `lifecycle.role=binaries-copy`: one a crash left
behind is found by these labels and removed before each attempt and when the service starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from lifecycle.config import Config
from lifecycle.errors import PermanentError, StepError, TemporaryError
from lifecycle.imagescan import LayerLinks, layer_links
from lifecycle.logging import get_logger
from lifecycle.paths import HostPaths
from lifecycle.ports import EngineError, Ports
from lifecycle.step import BootCheck, StepContext, finish_in_thread
from lifecycle.tarstream import ArchiveSource, ChunkPipe, Extracted, Link, extract_source

RECORD_NAME = "binaries.json"
EVIDENCE_NAME = "binaries-boot.json"
MAX_LINK_HOPS = 8  # symlinks followed inside the image before giving up (a loop, or a maze)
PROGRESS_INTERVAL_S = 0.25
COPY_ROLE = "binaries-copy"
LEFTOVER_CHECK_TIMEOUT_S = 10.0  # at start: an engine that does not answer delays the service no longer than this
T = TypeVar("T")
# How `docker save` fails on a layer entry named outside the layer (tar-split tar/asm/assemble.go): no such file
# there, or a file there whose bytes are not the entry's.
SAVE_REFUSED = ("no such file or directory", "file integrity checksum failed")


class Binaries:
    name = "binaries"
    timeout_s = 300.0
    retries = 2  # a copy is idempotent: safe to repeat

    async def is_done(self, ctx: StepContext) -> bool:
        record = _read_record(ctx.paths.state_dir / RECORD_NAME)
        if record is None or set(record["files"]) != set(ctx.config.kubernetes.binaries):
            return False
        try:
            image_id = await ctx.ports.docker.image_id(self._image(ctx))
        except EngineError:
            return False
        if image_id is None or image_id != record["image_id"]:
            return False
        actual = await asyncio.to_thread(_hash_files, ctx.paths, list(record["files"]))
        return actual == {name: entry["sha256"] for name, entry in record["files"].items()}

    async def run(self, ctx: StepContext) -> None:
        image = self._image(ctx)
        sources = _sources(ctx)
        image_id = await _local_image_id(ctx, image)
        await asyncio.to_thread(_prepare_dirs, sources)
        labels = copy_labels(ctx.config.node_name)
        leftovers = await _engine_call(ctx, ctx.ports.docker.remove_containers(labels),
                                       "removing copy containers an earlier attempt left")
        if leftovers:
            ctx.progress(f"removed {len(leftovers)} copy container(s) an earlier attempt left")
        container = await _create_container(ctx, image, labels)
        extracted: list[Extracted] = []
        held_at: dict[str, str] = {}  # configured path -> the path in the image whose archive held the file
        # The layers are read while the files are copied: dockerd writes the two streams at the same time.
        scan = asyncio.create_task(_scan_layers(ctx, image), name="binaries-scan-layers")
        try:
            for source in sources:
                entry, held_at[source.name] = await _copy_following_links(ctx, container, source)
                extracted.append(entry)
            _refuse_layer_entries(held_at, await scan)
            await finish_in_thread(_install, extracted)
        finally:
            scan.cancel()
            await asyncio.gather(scan, return_exceptions=True)
            await _remove_container(ctx, container)
            await asyncio.to_thread(_discard, extracted)  # temp files left only if something failed
        record = {
            "image": image,
            "image_id": image_id,
            "files": {e.name: {"sha256": e.sha256, "size_bytes": e.size_bytes} for e in extracted},
        }
        await finish_in_thread(_write_record, ctx.paths.state_dir / RECORD_NAME, record)
        total = sum(e.size_bytes for e in extracted)
        ctx.progress(f"installed {', '.join(e.name for e in extracted)}", current=total, total=total, unit="bytes")

    async def before_retry(self, ctx: StepContext) -> None:
        return None  # run() cleans its own temp files and container; installed files are replaced atomically

    def _image(self, ctx: StepContext) -> str:
        return ctx.config.kubernetes.binaries_image_for(ctx.cluster.kubernetes_version)

    async def boot_check(self, ctx: StepContext) -> BootCheck:
        """Every file has the size and mtime it had when its sha256 was last found right, and the binaries image
        is still the one copied from: the hashes (seconds for real binaries) wait for the background check."""
        evidence = _read_record(ctx.paths.state_dir / EVIDENCE_NAME, key="mtime_ns", kind=int)
        if evidence is None or set(evidence["files"]) != set(ctx.config.kubernetes.binaries):
            return BootCheck.UNKNOWN
        try:
            image_id = await ctx.ports.docker.image_id(self._image(ctx))
        except EngineError:
            return BootCheck.UNKNOWN
        if image_id is None or image_id != evidence["image_id"]:
            return BootCheck.UNKNOWN
        stats = await asyncio.to_thread(_stat_files, ctx.paths, list(evidence["files"]))
        return BootCheck.VERIFY_LATER if stats == evidence["files"] else BootCheck.UNKNOWN

    async def record_boot_evidence(self, ctx: StepContext) -> None:
        record = _read_record(ctx.paths.state_dir / RECORD_NAME)
        if record is None:
            return
        files = await asyncio.to_thread(_stat_files, ctx.paths, list(record["files"]))
        evidence = {"image_id": record["image_id"], "files": files}
        await finish_in_thread(_write_record, ctx.paths.state_dir / EVIDENCE_NAME, evidence)


def unchanged_since_checked(paths: HostPaths, name: str) -> bool:
    """`name` (e.g. /usr/bin/kubelet) has the size and mtime it had when its sha256 was last found right (the boot
    evidence): a stat and a small file read, for the kubelet started before anything else at boot."""
    evidence = _read_record(paths.state_dir / EVIDENCE_NAME, key="mtime_ns", kind=int)
    return evidence is not None and evidence["files"].get(name) == _stat_files(paths, [name])[name]


def copy_labels(node_name: str) -> dict[str, str]:
    return {"lifecycle.node": node_name, "lifecycle.role": COPY_ROLE}


async def remove_leftover_copies(config: Config, ports: Ports) -> None:
    """At start: remove the copy containers a killed service left (a step that is already done never runs again
    to do it). Best effort: an engine that is down or slow is only logged; the next attempt removes them."""
    log = get_logger("lifecycle.binaries", node=config.node_name)
    try:
        async with asyncio.timeout(LEFTOVER_CHECK_TIMEOUT_S):
            removed = await ports.docker.remove_containers(copy_labels(config.node_name))
    except (EngineError, TimeoutError) as exc:
        log.warning("could not look for leftover copy containers", error=str(exc))
        return
    if removed:
        log.info("removed leftover copy containers", containers=[c[:12] for c in removed])


def _sources(ctx: StepContext) -> list[ArchiveSource]:
    """One source per configured path. The config loader checks the paths; a config built in code is checked
    again here, because each path is also a destination on the node."""
    sources: list[ArchiveSource] = []
    for path in ctx.config.kubernetes.binaries:
        if not path.startswith("/") or ".." in path.split("/") or posixpath.normpath(path) != path or path == "/":
            raise PermanentError(f"kubernetes.binaries: {path!r} is not an absolute normalised path to a file",
                                 code="invalid_config")
        sources.append(ArchiveSource(name=path, path=path, dest=_dest(ctx.paths, path)))
    if len({s.name for s in sources}) != len(sources):
        raise PermanentError("kubernetes.binaries: a path is listed twice", code="invalid_config")
    return sources


def _dest(paths: HostPaths, path: str) -> Path:
    return paths.under(path)


async def _engine_call(ctx: StepContext, call: Awaitable[T], doing: str) -> T:
    try:
        return await call
    except EngineError as exc:
        if exc.not_found:
            raise PermanentError(f"{doing}: {exc.message}", code="image_missing") from exc
        raise _engine_failure(ctx, exc, doing) from exc


def _engine_failure(ctx: StepContext, exc: EngineError, doing: str) -> TemporaryError:
    """An engine that does not answer (stopped, socket gone) is `engine_unavailable` as in images, naming the
    socket; an error the engine itself reported is `engine_failed`. Both may pass: retryable."""
    if exc.unreachable:
        return TemporaryError(f"{doing}: {exc.message}", code="engine_unavailable",
                              details={"docker_host": ctx.config.docker.host})
    return TemporaryError(f"{doing}: {exc.message}", code="engine_failed")


async def _local_image_id(ctx: StepContext, image: str) -> str:
    image_id = await _engine_call(ctx, ctx.ports.docker.image_id(image), f"inspecting {image}")
    if image_id is None:
        raise PermanentError(
            f"the binaries image {image} is not in the container engine (the images step pulls it)",
            code="image_missing",
        )
    return image_id


async def _create_container(ctx: StepContext, image: str, labels: dict[str, str]) -> str:
    """Shielded: dockerd goes on creating a container whose request was cancelled (on vfs it first copies the
    image's files, which takes seconds), so a step cancelled meanwhile (a reset, a cancel) waits for the id and
    removes the container; else it appears in the engine after the step ended, and after a reset's clean-up."""
    creation = asyncio.create_task(
        _engine_call(ctx, ctx.ports.docker.create_container(image, labels=labels),
                     f"creating a container from {image}"),
        name="binaries-create-container",
    )
    try:
        return await asyncio.shield(creation)
    except asyncio.CancelledError:
        try:
            container = await creation
        except StepError:
            raise asyncio.CancelledError from None  # nothing was created
        await _remove_container(ctx, container)
        raise


async def _remove_container(ctx: StepContext, container: str) -> None:
    # Shielded: a cancelled step still removes its container; a second cancel leaves the removal running.
    removal = asyncio.create_task(ctx.ports.docker.remove_container(container), name=f"binaries-rm-{container[:12]}")
    try:
        await asyncio.shield(removal)
    except EngineError as exc:
        ctx.log.warning("could not remove the copy container", container=container, error=exc.message)


async def _copy_following_links(ctx: StepContext, container: str, source: ArchiveSource) -> tuple[Extracted, str]:
    """Copy one file; a symlink in the image is followed (inside the image) to the regular file it names.
    Returns it with the path in the image that held it."""
    current = source
    for _ in range(MAX_LINK_HOPS + 1):
        outcome = await _copy_source(ctx, container, current)
        if isinstance(outcome, Extracted):
            return outcome, current.path
        current = ArchiveSource(name=source.name, path=outcome.target, dest=source.dest)
    raise PermanentError(f"{source.name} in the binaries image: more than {MAX_LINK_HOPS} symlinks to follow",
                         code="bad_image", details={"file": source.name})


async def _scan_layers(ctx: StepContext, image: str) -> LayerLinks:
    pipe = ChunkPipe(asyncio.get_running_loop())
    scan = asyncio.create_task(asyncio.to_thread(layer_links, pipe), name="binaries-scan-layers-read")
    feed = asyncio.create_task(_feed_layers(ctx, image, pipe), name="binaries-feed-layers")
    return await _pump(scan, feed, pipe)


def _refuse_layer_entries(held_at: dict[str, str], layers: LayerLinks) -> None:
    """Refuse what only the layers show (lifecycle/imagescan.py): a member name with `..` anywhere in the image (the
    engine writes it inside the layer at pull but reads it outside at save: which file is it?); a file that is a
    hard link in any layer (dockerd's archive of it is a plain file with its partner's content: an image could ship
    /etc/secret as the kubelet); a file with extended attributes the archive drops (user.*, trusted.*)."""
    if layers.dotdot_names:
        name = layers.dotdot_names[0]
        raise PermanentError(
            f"the binaries image has a layer entry {name!r} with a '..' component; entry names must stay inside "
            "the image", code="bad_image", details={"entry": name, "reason": "'..' in an entry name"},
        )
    links = layers.hard_links(set(held_at.values()))
    linked = {name: (path, links[path]) for name, path in held_at.items() if path in links}
    if linked:
        name, (path, target) = sorted(linked.items())[0]
        shown = name if name == path else f"{name} (-> {path})"
        raise PermanentError(
            f"{shown} in the binaries image: a hard link to {target} in the image's layers; only regular files and "
            "symlinks are accepted", code="bad_image",
            details={"file": name, "entry": path, "reason": f"hard link to {target}", "files": sorted(linked)},
        )
    xattrs = layers.extended_attributes(set(held_at.values()))
    marked = {name: (path, xattrs[path]) for name, path in held_at.items() if path in xattrs}
    if marked:
        name, (path, names) = sorted(marked.items())[0]
        shown = name if name == path else f"{name} (-> {path})"
        why = f"extended attributes {', '.join(names)} in the image's layers"
        raise PermanentError(
            f"{shown} in the binaries image: {why} (a binary is installed without them)", code="bad_image",
            details={"file": name, "entry": path, "reason": why, "files": sorted(marked)},
        )


async def _feed_layers(ctx: StepContext, image: str, pipe: ChunkPipe) -> None:
    chunks = ctx.ports.docker.save(image)
    try:
        async for chunk in chunks:
            await pipe.put(chunk)
    except EngineError as exc:
        if not exc.not_found and any(reason in exc.message for reason in SAVE_REFUSED):
            # dockerd's save rebuilds each layer from its files by the names the layer tar holds (tar-split's file
            # getter, moby layer/layer_store.go); a `../` name it wrote inside the layer at pull is read outside
            # it, where the file is missing or another one: the image is at fault, and saving again fails the same.
            raise PermanentError(
                f"the binaries image is refused: {exc.message} (the engine cannot read back a file it wrote at "
                "pull: a layer entry whose name leads outside the layer, as a '../' name does)",
                code="bad_image", details={"reason": "layer unreadable", "engine_error": exc.message},
            ) from exc
        raise _engine_failure(ctx, exc, f"reading the layers of {image}") from exc
    finally:
        close = getattr(chunks, "aclose", None)  # an async generator: end its HTTP response now, not at GC
        if close is not None:
            await close()
    await pipe.close()


async def _copy_source(ctx: StepContext, container: str, source: ArchiveSource) -> Extracted | Link:
    """Stream one archive into a worker thread that checks and writes its entry as it arrives."""
    pipe = ChunkPipe(asyncio.get_running_loop())
    limit = ctx.config.kubernetes.binary_max_bytes
    extract = asyncio.create_task(
        asyncio.to_thread(extract_source, pipe, source, limit),
        name=f"binaries-extract-{source.path}",
    )
    feed = asyncio.create_task(_feed(ctx, container, source, pipe), name=f"binaries-feed-{source.path}")
    return await _pump(extract, feed, pipe)


async def _pump(extract: asyncio.Task[T], feed: asyncio.Task[None], pipe: ChunkPipe) -> T:
    """Wait for a worker thread reading `pipe` and the task feeding it; the first real failure wins."""
    try:
        await asyncio.wait({extract, feed}, return_when=asyncio.FIRST_EXCEPTION)
        failures = [exc for t in (extract, feed) if t.done() and not t.cancelled() and (exc := t.exception())]
        # The extractor fails with ChunkPipe.Aborted only because the feed failed: report the feed's error.
        failures.sort(key=lambda exc: isinstance(exc, ChunkPipe.Aborted))
        if failures:
            raise failures[0]
        return extract.result()
    finally:
        feed.cancel()
        pipe.abort()  # wakes the thread if it still waits for data
        await asyncio.gather(feed, extract, return_exceptions=True)  # the thread removes its temp files


async def _feed(ctx: StepContext, container: str, source: ArchiveSource, pipe: ChunkPipe) -> None:
    path = source.path
    last_s = 0.0
    loop = asyncio.get_running_loop()
    chunks = ctx.ports.docker.archive(container, path)
    try:
        async for chunk in chunks:
            await pipe.put(chunk)
            if loop.time() - last_s >= PROGRESS_INTERVAL_S:
                last_s = loop.time()
                ctx.progress(f"extracting {path}", current=pipe.consumed_bytes, unit="bytes")
    except EngineError as exc:
        if exc.not_found:
            missing = path if path == source.name else f"{source.name} (-> {path})"
            raise PermanentError(f"{missing} is not in the binaries image: {exc.message}", code="bad_image",
                                 details={"missing": [source.name]}) from exc
        if "too many links" in exc.message:  # dockerd resolves the path itself and refuses a symlink loop
            raise PermanentError(f"{source.name} in the binaries image: symlink loop at {path}: {exc.message}",
                                 code="bad_image", details={"file": source.name}) from exc
        raise _engine_failure(ctx, exc, f"streaming {path} from the binaries image") from exc
    finally:
        close = getattr(chunks, "aclose", None)  # an async generator: end its HTTP response now, not at GC
        if close is not None:
            await close()
    await pipe.close()


def _prepare_dirs(sources: list[ArchiveSource]) -> None:
    for directory in {s.dest.parent for s in sources}:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.lifecycle-*"):  # temp files of an attempt that crashed
            stale.unlink(missing_ok=True)


def _install(extracted: list[Extracted]) -> None:
    for entry in extracted:
        entry.temp_path.replace(entry.dest)
    for directory in {e.dest.parent for e in extracted}:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames survive a crash
        finally:
            os.close(dir_fd)


def _discard(extracted: list[Extracted]) -> None:
    for entry in extracted:
        entry.temp_path.unlink(missing_ok=True)


def _hash_files(paths: HostPaths, names: list[str]) -> dict[str, str | None]:
    hashes: dict[str, str | None] = {}
    for name in names:
        digest = hashlib.sha256()
        try:
            with open(_dest(paths, name), "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            hashes[name] = digest.hexdigest()
        except OSError:
            hashes[name] = None
    return hashes


def _stat_files(paths: HostPaths, names: list[str]) -> dict[str, dict[str, int] | None]:
    stats: dict[str, dict[str, int] | None] = {}
    for name in names:
        try:
            st = _dest(paths, name).stat()
        except OSError:
            stats[name] = None
        else:
            stats[name] = {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return stats


def _read_record(path: Path, *, key: str = "sha256", kind: type = str) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return None
    files = record["files"]
    if not all(isinstance(e, dict) and isinstance(e.get(key), kind) for e in files.values()):
        return None
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    temp.replace(path)
