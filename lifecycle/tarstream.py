"""Checked extraction of a tar stream as it arrives (worker thread fed through `ChunkPipe`): only expected
regular files, each under a size limit. Leaves each as a fsynced 0755 temp file next to its destination, for
the caller to rename once every entry is checked; on any error removes what it wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from lifecycle.errors import PermanentError, TemporaryError

PIPE_DEPTH_CHUNKS = 8  # at most this many chunks wait between the socket and the disk
_EOF = b""


@dataclass(frozen=True)
class ArchiveSource:
    """One archive request: `path` in the image, and the entry names it must hold -> installed names."""

    path: str
    entries: dict[str, str]
    top_dir: str | None  # the archive's own directory entry (`bin` for /usr/bin), allowed once


@dataclass(frozen=True)
class Extracted:
    name: str
    temp_path: Path
    sha256: str
    size_bytes: int


def plan_sources(binaries: tuple[str, ...] | list[str]) -> list[ArchiveSource]:
    """Bare names come from one archive of /usr/bin; absolute paths are fetched one archive each."""
    bare: dict[str, str] = {}
    sources: list[ArchiveSource] = []
    seen: set[str] = set()
    for item in binaries:
        path = PurePosixPath(item)
        name = path.name
        if not name or name in (".", "..") or ".." in path.parts or (len(path.parts) > 1 and not path.is_absolute()):
            raise ValueError(f"{item!r} is neither a file name nor an absolute path")
        if name in seen:
            raise ValueError(f"{name!r} is listed twice")
        seen.add(name)
        if path.is_absolute():
            sources.append(ArchiveSource(path=str(path), entries={name: name}, top_dir=None))
        else:
            bare[f"bin/{name}"] = name
    if bare:
        sources.insert(0, ArchiveSource(path="/usr/bin", entries=bare, top_dir="bin"))
    return sources


class ChunkPipe:
    """Bytes from the event loop to one reader thread, with backpressure; `abort` makes the reader fail."""

    class Aborted(Exception):
        """The producing side gave up; the reader stops and cleans up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(PIPE_DEPTH_CHUNKS)
        self._buffer = memoryview(b"")
        self._eof = False
        self.consumed_bytes = 0

    # -- event loop side
    async def put(self, chunk: bytes) -> None:
        if chunk:
            await self._queue.put(chunk)

    async def close(self) -> None:
        await self._queue.put(_EOF)

    def abort(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    # -- reader thread side: a file object for tarfile's stream mode
    def read(self, size: int = -1) -> bytes:
        while not self._buffer and not self._eof:
            item = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if item is None:
                raise ChunkPipe.Aborted("the archive stream was aborted")
            if item == _EOF:
                self._eof = True
            self._buffer = memoryview(item)
        n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
        self.consumed_bytes += n
        return out


def extract_source(pipe: ChunkPipe, source: ArchiveSource, dest_dir: Path, max_bytes: int) -> list[Extracted]:
    """Read the whole tar from `pipe`, checking every entry before its data is written anywhere."""
    done: list[Extracted] = []
    try:
        _extract_all(pipe, source, dest_dir, max_bytes, done)
    except tarfile.TarError as exc:
        _discard(done)
        raise TemporaryError(f"reading the archive of {source.path}: {exc}", code="archive_failed") from exc
    except BaseException:
        _discard(done)
        raise
    missing = sorted(set(source.entries.values()) - {e.name for e in done})
    if missing:
        _discard(done)
        raise PermanentError(
            f"{source.path} in the binaries image lacks {', '.join(missing)}", code="bad_image",
            details={"missing": missing},
        )
    return done


def _extract_all(pipe: ChunkPipe, source: ArchiveSource, dest_dir: Path, max_bytes: int, done: list[Extracted]) -> None:
    seen_top = False
    with tarfile.open(fileobj=pipe, mode="r|") as archive:  # type: ignore[call-overload]
        for member in archive:
            name = member.name.rstrip("/")
            if source.top_dir is not None and name == source.top_dir and member.isdir() and not seen_top:
                seen_top = True
                continue
            _check_member(member, name, source, max_bytes, {e.name for e in done})
            done.append(_write_member(archive, member, dest_dir, source.entries[name], max_bytes))
    while pipe.read(1 << 16):  # tar padding after the end marker: drain so the producer can finish
        pass


def _check_member(
    member: tarfile.TarInfo, name: str, source: ArchiveSource, max_bytes: int, done_names: set[str]
) -> None:
    def reject(why: str) -> PermanentError:
        return PermanentError(
            f"archive of {source.path}: entry {member.name!r} rejected: {why}", code="bad_image",
            details={"entry": member.name, "reason": why},
        )

    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise reject("absolute path or '..' component")
    if member.issym() or member.islnk():
        raise reject(f"link to {member.linkname!r}; only regular files are accepted")
    if not member.isreg():
        raise reject("not a regular file (device, fifo or directory)")
    if name not in source.entries:
        raise reject(f"unexpected name (expected {', '.join(sorted(source.entries))})")
    if source.entries[name] in done_names:
        raise reject("appears twice")
    if member.size > max_bytes:
        raise reject(f"{member.size} bytes is over the limit of {max_bytes} (kubernetes.binary_max_bytes)")


def _write_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, dest_dir: Path, name: str, max_bytes: int
) -> Extracted:
    data = archive.extractfile(member)
    assert data is not None  # a regular file always has a data reader
    fd, temp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.lifecycle-")
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            sha256, size_bytes = _copy_data(data, out, member.name, max_bytes)
            out.flush()
            os.fchmod(out.fileno(), 0o755)
            os.fsync(out.fileno())
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return Extracted(name=name, temp_path=temp_path, sha256=sha256, size_bytes=size_bytes)


def _copy_data(data: IO[bytes], out: IO[bytes], entry: str, max_bytes: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size_bytes = 0
    while block := data.read(1 << 16):
        size_bytes += len(block)
        if size_bytes > max_bytes:  # the header lied about the size
            raise PermanentError(f"entry {entry!r} is larger than {max_bytes} bytes", code="bad_image")
        digest.update(block)
        out.write(block)
    return digest.hexdigest(), size_bytes


def _discard(done: list[Extracted]) -> None:
    for entry in done:
        entry.temp_path.unlink(missing_ok=True)

