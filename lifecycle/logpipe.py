"""The kubelet's log writer: reads the kubelet's stdout/stderr from a pipe and appends it to `<path>`, rotating by
size to `<path>.1` .. `<path>.<files-1>` (the oldest is deleted). Leaves at most `files` files of at most `max_bytes`
each (a single line longer than that is split). Done when the pipe reaches EOF (the kubelet exited).

Why a process of its own rather than logrotate's copytruncate or a reader in the service: copytruncate loses the
lines written between its copy and its truncate; a reader inside the service would die with the service, and the
kubelet (which outlives a restart of the service on purpose, KillMode=process) would then get EPIPE on its next
write. This writer lives next to the kubelet instead, like Apache's rotatelogs: it outlives the service too, it
rotates by renaming (no line lost, no copy), and the service's event loop never touches the log.

Run as `python -I lifecycle/logpipe.py --path P --max-bytes N --files K` (stdlib only: no import of `lifecycle`,
so it runs whatever the service's PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

READ_CHUNK_BYTES = 64 * 1024


class RotatingFile:
    def __init__(self, path: str, *, max_bytes: int, files: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._files = files
        self._fd: int | None = self._open()

    def _open(self) -> int:
        return os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def _current(self) -> int:
        if self._fd is None:  # a rotation or an open failed before (disk full, ...): try again now
            self._fd = self._open()
        return self._fd

    def _size(self) -> int:
        return os.fstat(self._current()).st_size

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._files == 1:
            Path(self._path).unlink()
        else:
            for index in range(self._files - 1, 0, -1):  # path.(n-1) is replaced, so the oldest goes
                older = Path(self._path if index == 1 else f"{self._path}.{index - 1}")
                if older.exists():
                    older.replace(f"{self._path}.{index}")
        self._fd = self._open()

    def write_lines(self, data: bytes) -> None:
        """Write whole lines (the caller keeps a partial last line back); rotate before a file would pass max."""
        while data:
            room = self._max_bytes - self._size()
            if len(data) <= room:
                _write_all(self._current(), data)
                return
            cut = data.rfind(b"\n", 0, room) + 1  # the lines that fit; 0 when not even one does
            if cut == 0 and self._size() == 0:
                cut = room  # one line longer than a whole file: split it
            if cut:
                _write_all(self._current(), data[:cut])
                data = data[cut:]
            self._rotate()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy(source_fd: int, out: RotatingFile) -> None:
    pending = b""
    while True:
        chunk = os.read(source_fd, READ_CHUNK_BYTES)
        if not chunk:
            break
        pending += chunk
        end = pending.rfind(b"\n") + 1
        if end:
            _write(out, pending[:end])
            pending = pending[end:]
        if len(pending) >= READ_CHUNK_BYTES:  # a line with no end in sight: write what we have
            _write(out, pending)
            pending = b""
    if pending:
        _write(out, pending)


def _write(out: RotatingFile, data: bytes) -> None:
    # A full disk drops these lines, said on stderr (the service's journal), and the writer reads on: dying would
    # close the pipe, and the kubelet would die of SIGPIPE at its next line.
    try:
        out.write_lines(data)
    except OSError as exc:
        print(f"lifecycle logpipe: dropped {len(data)} bytes of kubelet output: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--files", type=int, required=True)
    args = parser.parse_args(argv)
    if args.max_bytes <= 0 or args.files <= 0:
        parser.error("--max-bytes and --files must be > 0")
    out = RotatingFile(args.path, max_bytes=args.max_bytes, files=args.files)
    try:
        copy(sys.stdin.fileno(), out)
    finally:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
