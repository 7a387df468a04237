"""lifecycle/logpipe.py, the kubelet's log writer, fed through a real pipe: whole lines per file, a line longer than
a file split, one file only, and a write error (the log directory gone) that drops lines without ending the writer."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from lifecycle.logpipe import RotatingFile, copy


def _feed(out: RotatingFile, data: bytes) -> None:
    read_fd, write_fd = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_fd, data), os.close(write_fd)))
    writer.start()
    try:
        copy(read_fd, out)
    finally:
        writer.join()
        os.close(read_fd)
        out.close()


def test_each_file_holds_whole_lines_and_a_line_longer_than_a_file_is_split(tmp_path: Path) -> None:
    path = tmp_path / "k.log"
    _feed(RotatingFile(str(path), max_bytes=100, files=3), b"a" * 60 + b"\n" + b"b" * 60 + b"\n" + b"c" * 250 + b"\n")
    assert path.with_suffix(".log.2").read_bytes() == b"c" * 100  # .2 held the b line, then was replaced
    assert path.with_suffix(".log.1").read_bytes() == b"c" * 100
    assert path.read_bytes() == b"c" * 50 + b"\n"
    assert not path.with_suffix(".log.3").exists()


def test_one_file_starts_over_when_full(tmp_path: Path) -> None:
    path = tmp_path / "k.log"
    _feed(RotatingFile(str(path), max_bytes=10, files=1), b"12345678\nabcdefgh\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.log"]
    assert path.read_bytes() == b"abcdefgh\n"


def test_a_write_error_drops_the_lines_says_so_and_the_writer_reads_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    out = RotatingFile(str(logs / "k.log"), max_bytes=10, files=2)
    (logs / "k.log").unlink()
    logs.rmdir()  # the next rotation cannot open a new file
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"1234567\n" + b"abcdefg\n")
    os.close(write_fd)
    copy(read_fd, out)  # no exception
    os.close(read_fd)
    assert "dropped" in capsys.readouterr().err
    logs.mkdir()
    _feed(out, b"again\n")  # the next lines find a file again
    assert (logs / "k.log").read_bytes() == b"again\n"
