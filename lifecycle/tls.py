"""Client TLS material loaded without touching a disk: `ssl` loads certificates and keys only by path, so the PEM
goes to an anonymous memory file (memfd_create) named by its /proc/self/fd path, closed as soon as it is loaded.
Leaves nothing anywhere: the memory is freed at the close, or with the process if it is killed in between.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator


@contextlib.contextmanager
def memory_file(data: bytes, *, name: str) -> Iterator[str]:
    """A path to `data` that exists only while the block runs, in memory only, readable by this process only."""
    # MFD_CLOEXEC: a child started meanwhile (kubeadm, the kubelet) must not inherit the key.
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_client_certificate(context: ssl.SSLContext, *, cert_pem: bytes, key_pem: bytes) -> None:
    """Presents `cert_pem` with `key_pem` from `context`; ssl.SSLError when OpenSSL cannot use them."""
    with memory_file(cert_pem.rstrip(b"\n") + b"\n" + key_pem, name="lifecycle-client-credentials") as path:
        # A password callback, so that an encrypted key fails here instead of OpenSSL asking on a terminal.
        context.load_cert_chain(path, password=_no_password)


def _no_password() -> bytes:
    return b""
