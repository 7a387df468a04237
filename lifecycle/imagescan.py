"""Reads an image as its layers hold it (the Docker Engine's `docker save` tar, streamed through `ChunkPipe` into
a worker thread) to find what the archive API hides among some paths: hard links (handed over as a plain regular
file with its partner's content), extended attributes other than security.capability (dropped), and member names
with a `..` component (written by the engine somewhere other than they say). Writes nothing; only headers are read.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass, field

from lifecycle.errors import TemporaryError
from lifecycle.tarstream import XATTR_PAX_PREFIXES, ChunkPipe

_NOT_LAYERS = ("manifest.json", "repositories", "oci-layout", "index.json")
MAX_DIR_LINK_HOPS = 40  # symlinked directories followed on one path (Linux's MAXSYMLINKS)


def layer_path(name: str) -> str:
    """A layer entry's name (`usr/bin/x`, `./usr/bin/x`) as an absolute normalised path in the image."""
    return posixpath.normpath("/" + name.lstrip("/"))


@dataclass(frozen=True)
class LayerLinks:
    """Every symlink (path: its text), hard link (path: linked path) and entry with extended attributes (path: their
    names) in an image's layers, later layers winning; and every entry name with a `..` component, as written."""

    symlinks: dict[str, str]
    links: dict[str, str]
    xattrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dotdot_names: tuple[str, ...] = ()

    def hard_links(self, paths: set[str]) -> dict[str, str]:
        """{path: link target} for each of `paths` (absolute) that some layer holds as a hard link, its directories
        resolved through the image's symlinks as dockerd resolves them (`/bin/x` with `bin -> usr/bin` is the entry
        `usr/bin/x`). Any layer counts, even one a later layer overrides: refusing such an image is safe,
        installing from it would not be."""
        found: dict[str, str] = {}
        for path in paths:
            entry = resolve_dirs(path, self.symlinks)
            if entry in self.links:
                found[path] = self.links[entry]
        return found

    def extended_attributes(self, paths: set[str]) -> dict[str, tuple[str, ...]]:
        """{path: xattr names} for each of `paths` some layer holds with extended attributes (any layer counts)."""
        found: dict[str, tuple[str, ...]] = {}
        for path in paths:
            entry = resolve_dirs(path, self.symlinks)
            if entry in self.xattrs:
                found[path] = self.xattrs[entry]
        return found


def layer_links(pipe: ChunkPipe) -> LayerLinks:
    try:
        return _scan(pipe)
    except tarfile.TarError as exc:
        raise TemporaryError(f"reading the image's layers: {exc}", code="archive_failed") from exc


def hard_links(pipe: ChunkPipe, paths: set[str]) -> dict[str, str]:
    return layer_links(pipe).hard_links(paths)


def resolve_dirs(path: str, symlinks: dict[str, str]) -> str:
    """`path` with each directory component that is a symlink replaced by its target (within the image: `..`
    stops at its root, as dockerd's scoped resolution does); the last component is kept as it is."""
    resolved = "/"
    parts = [p for p in path.split("/") if p]
    hops = 0
    while len(parts) > 1:
        part = parts.pop(0)
        candidate = posixpath.join(resolved, part)
        target = symlinks.get(candidate)
        if target is None or hops >= MAX_DIR_LINK_HOPS:
            resolved = candidate
            continue
        hops += 1
        base = "/" if target.startswith("/") else resolved
        parts = [p for p in posixpath.normpath(posixpath.join(base, target)).split("/") if p] + parts
        resolved = "/"
    return posixpath.join(resolved, *parts)


def _scan(pipe: ChunkPipe) -> LayerLinks:
    symlinks: dict[str, str] = {}
    links: dict[str, str] = {}
    xattrs: dict[str, tuple[str, ...]] = {}
    dotdot: list[str] = []
    with tarfile.open(fileobj=pipe, mode="r|") as saved:  # type: ignore[call-overload]
        for member in saved:
            if not member.isreg() or member.name.endswith(".json") or member.name.endswith(_NOT_LAYERS):
                continue
            data = saved.extractfile(member)
            if data is None:
                continue
            try:
                with tarfile.open(fileobj=data, mode="r|*") as layer:
                    for entry in layer:
                        if ".." in entry.name.split("/"):
                            dotdot.append(entry.name)
                        names = tuple(sorted(k.split(".xattr.", 1)[1] for k in entry.pax_headers
                                             if k.startswith(XATTR_PAX_PREFIXES)))
                        if names:
                            xattrs[layer_path(entry.name)] = names
                        if entry.issym():
                            symlinks[layer_path(entry.name)] = entry.linkname
                        elif entry.islnk():
                            links[layer_path(entry.name)] = layer_path(entry.linkname)
            except (tarfile.ReadError, tarfile.CompressionError):
                continue  # a config or other blob, not a layer
    while pipe.read(1 << 16):  # tar padding after the end marker: drain so the producer can finish
        pass
    return LayerLinks(symlinks=symlinks, links=links, xattrs=xattrs, dotdot_names=tuple(dotdot))
