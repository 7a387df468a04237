"""Checked extraction of one file's tar stream (the Docker archive API's answer for one path) as it arrives, in a
worker thread fed through `ChunkPipe`. The archive must hold exactly that file: a regular file under a size limit
(left as a fsynced 0755 temp file next to its destination, for the caller to rename once every file is checked),
or a symlink, which is returned for the caller to follow inside the image. On any error it removes what it wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from lifecycle.errors import PermanentError, TemporaryError

PIPE_DEPTH_CHUNKS = 8  # at most this many chunks wait between the socket and the disk
SPECIAL_MODE_BITS = 0o7000  # setuid, setgid, sticky
XATTR_PAX_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")  # how tar writers record extended attributes
_EOF = b""


@dataclass(frozen=True)
class ArchiveSource:
    """One archive request: the file at `path` in the image (perhaps reached through links from `name`), to be
    installed at `dest`. `name` is the path the config lists; it names the file in errors and in the record."""

    name: str
    path: str
    dest: Path

    @property
    def entry(self) -> str:
        return PurePosixPath(self.path).name  # the archive of a file holds one entry: its base name


@dataclass(frozen=True)
class Extracted:
    name: str  # the configured path in the image, e.g. /usr/bin/kubeadm
    dest: Path
    temp_path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Link:
    """The archive held a symlink: `target` is the absolute path in the image it resolves to."""

    target: str


def link_target(path: str, linkname: str) -> str | None:
    """Where a symlink at `path` points, as an absolute normalised path in the image; None when a relative
    target climbs above the image's root (a link that escapes: refused, though the engine would clamp it)."""
    if linkname.startswith("/"):
        return posixpath.normpath(linkname)
    depth = 0
    for part in [*PurePosixPath(path).parent.parts[1:], *PurePosixPath(linkname).parts]:
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
        elif part != ".":
            depth += 1
    return posixpath.normpath(posixpath.join(posixpath.dirname(path), linkname))


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


def extract_source(pipe: ChunkPipe, source: ArchiveSource, max_bytes: int) -> Extracted | Link:
    """Read the whole tar from `pipe`, checking the entry before its data is written anywhere."""
    found: list[Extracted | Link] = []
    try:
        _extract_all(pipe, source, max_bytes, found)
    except tarfile.TarError as exc:
        _discard(found)
        raise TemporaryError(f"reading the archive of {source.path}: {exc}", code="archive_failed") from exc
    except BaseException:
        _discard(found)
        raise
    if not found:
        raise PermanentError(f"{_named(source)} in the binaries image: the archive is empty", code="bad_image",
                             details={"missing": [source.name]})
    return found[0]


def _named(source: ArchiveSource) -> str:
    return source.name if source.path == source.name else f"{source.name} (-> {source.path})"


def _extract_all(pipe: ChunkPipe, source: ArchiveSource, max_bytes: int, found: list[Extracted | Link]) -> None:
    with tarfile.open(fileobj=pipe, mode="r|") as archive:  # type: ignore[call-overload]
        for member in archive:
            outcome = _check_member(member, source, max_bytes, already=bool(found))
            if isinstance(outcome, Link):
                found.append(outcome)
            else:
                found.append(_write_member(archive, member, source, max_bytes))
    while pipe.read(1 << 16):  # tar padding after the end marker: drain so the producer can finish
        pass


def _check_member(member: tarfile.TarInfo, source: ArchiveSource, max_bytes: int, *, already: bool) -> Link | None:
    def reject(why: str) -> PermanentError:
        return PermanentError(
            f"{_named(source)} in the binaries image: entry {member.name!r} rejected: {why}", code="bad_image",
            details={"file": source.name, "entry": member.name, "reason": why},
        )

    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise reject("absolute path or '..' component")
    if member.name.rstrip("/") != source.entry:
        raise reject(f"unexpected name (the archive of {source.path} holds only {source.entry!r})")
    if already:
        raise reject("appears twice")
    if member.islnk():
        raise reject(f"hard link to {member.linkname!r}; only regular files and symlinks are accepted")
    if member.issym():
        target = link_target(source.path, member.linkname)
        if target is None:
            raise reject(f"symlink to {member.linkname!r} points outside the image")
        return Link(target)
    if not member.isreg():
        raise reject("not a regular file (device, fifo or directory)")
    if member.size > max_bytes:
        raise reject(f"{member.size} bytes is over the limit of {max_bytes} (kubernetes.binary_max_bytes)")
    special = member.mode & SPECIAL_MODE_BITS
    if special:
        # Installed as 0755 these bits would be dropped silently: an image that sets them means something else.
        mode = member.mode & 0o7777
        raise reject(f"mode {mode:04o} has {_special_names(special)}; a binary is installed as 0755 only")
    xattrs = sorted(key.split(".xattr.", 1)[1] for key in member.pax_headers if key.startswith(XATTR_PAX_PREFIXES))
    if xattrs:
        # dockerd's archive carries security.capability as a PAX record (moby pkg/archive/archive.go,
        # ReadSecurityXattrToTarHeader): file capabilities would be dropped silently, like setuid.
        raise reject(f"extended attributes {', '.join(xattrs)} (file capabilities are not installed)")
    return None


def _special_names(bits: int) -> str:
    return " and ".join(name for bit, name in ((0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky"))
                        if bits & bit)


def _write_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, source: ArchiveSource, max_bytes: int
) -> Extracted:
    data = archive.extractfile(member)
    assert data is not None  # a regular file always has a data reader
    fd, temp_name = tempfile.mkstemp(dir=source.dest.parent, prefix=f".{source.dest.name}.lifecycle-")
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            sha256, size_bytes = _copy_data(data, out, source.name, max_bytes)
            out.flush()
            os.fchmod(out.fileno(), 0o755)  # never the image's setuid or group-writable bits
            os.fsync(out.fileno())
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return Extracted(name=source.name, dest=source.dest, temp_path=temp_path, sha256=sha256, size_bytes=size_bytes)


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


def _discard(found: list[Extracted | Link]) -> None:
    for entry in found:
        if isinstance(entry, Extracted):
            entry.temp_path.unlink(missing_ok=True)

