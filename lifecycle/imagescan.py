"""Reads an image as its layers hold it (the Docker Engine's `docker save` tar, streamed through `ChunkPipe` into
a worker thread) to find the hard links among some paths: the archive API hands a hard-linked file over as a
plain regular file with its partner's content, so only the layers can tell. Writes nothing; only headers are read.
"""

from __future__ import annotations

import posixpath
import tarfile

from lifecycle.errors import TemporaryError
from lifecycle.tarstream import ChunkPipe

_NOT_LAYERS = ("manifest.json", "repositories", "oci-layout", "index.json")


def layer_path(name: str) -> str:
    """A layer entry's name (`usr/bin/x`, `./usr/bin/x`) as an absolute normalised path in the image."""
    return posixpath.normpath("/" + name.lstrip("/"))


def hard_links(pipe: ChunkPipe, paths: set[str]) -> dict[str, str]:
    """{path: link target} for each of `paths` (absolute) that some layer of the image holds as a hard link.

    Any layer counts, even one a later layer overrides: refusing such an image is safe, installing from it
    would not be."""
    try:
        return _scan(pipe, paths)
    except tarfile.TarError as exc:
        raise TemporaryError(f"reading the image's layers: {exc}", code="archive_failed") from exc


def _scan(pipe: ChunkPipe, paths: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
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
                        path = layer_path(entry.name)
                        if entry.islnk() and path in paths:
                            found[path] = layer_path(entry.linkname)
            except (tarfile.ReadError, tarfile.CompressionError):
                continue  # a config or other blob, not a layer
    while pipe.read(1 << 16):  # tar padding after the end marker: drain so the producer can finish
        pass
    return found
