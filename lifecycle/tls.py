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
    # Two files, as the kubeconfig has two fields: a certificate field holding the key is refused, as kubectl does.
    with memory_file(cert_pem, name="lifecycle-client-cert") as cert_path, \
            memory_file(key_pem, name="lifecycle-client-key") as key_path:
        # A password callback, so that an encrypted key fails here instead of OpenSSL asking on a terminal.
        context.load_cert_chain(cert_path, key_path, password=_no_password)


def client_context(*, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """What a kubeconfig's cluster and user say: verify the server with `ca_pem` only (not the system store) and
    present `cert_pem` with `key_pem`. ValueError naming the part OpenSSL cannot use."""
    try:
        context = ssl.create_default_context(cadata=ca_pem.decode())
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"certificate-authority-data is not a usable CA: {exc}") from exc
    try:
        load_client_certificate(context, cert_pem=cert_pem, key_pem=key_pem)
    except ssl.SSLError as exc:
        raise ValueError(f"client certificate or key unusable: {exc.reason or exc}") from exc
    return context


def _no_password() -> bytes:
    return b""
