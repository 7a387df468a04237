"""One way to replace a file whole: a temp file beside it (mkstemp: mode 0600 from the start), its mode set before
any data, fsync, rename. A reader sees the old bytes or the new ones, never a part; a failure leaves no temp file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # a key's mode before its bytes
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """`replace_file` into a directory made first if need be (the node's files: PKI, configs, state)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, mode=mode)
