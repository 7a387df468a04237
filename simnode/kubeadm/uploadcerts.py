"""upload-certs (only with --upload-certs): the shared CA/SA material, AES-GCM encrypted with the
certificate key, in Secret kube-system/kubeadm-certs, as kubeadm stores it for joining control planes.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from simnode.kubeadm.apiclient import apply, core
from simnode.kubeadm.config import Config
from simnode.kubeadm.errors import PhaseError
from simnode.kubeclient import KubeClient
from simnode.paths import NodeRoot

SHARED = ("ca.crt", "ca.key", "sa.key", "sa.pub", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt",
          "etcd/ca.key")


def _encrypt(key: bytes, data: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, data, None)  # Go's gcm.Seal(nonce, nonce, data, nil)


def certificate_key(cfg: Config) -> tuple[bytes, bool]:
    """(key, generated): InitConfiguration.certificateKey (64 hex chars) or a fresh random one."""
    text = cfg.init.certificate_key
    if not text:
        return os.urandom(32), True
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise PhaseError("upload-certs", "certificateKey must be 64 hex characters (a 32-byte AES key)")
    return key, False


async def upload_certs(cfg: Config, root: NodeRoot, client: KubeClient, out: Callable[[str], None], *,
                       print_key: bool = True) -> None:
    key, generated = certificate_key(cfg)
    data: dict[str, str] = {}
    for name in SHARED:
        path = root.path(f"{cfg.cert_dir.rstrip('/')}/{name}")
        if path.exists():
            data[name.replace("/", "-")] = base64.b64encode(_encrypt(key, path.read_bytes())).decode()
    out('[upload-certs] Storing the certificates in Secret "kubeadm-certs" in the "kube-system" Namespace')
    await apply(client, core("kube-system", "secrets"), {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "kubeadm-certs", "namespace": "kube-system"}, "data": data,
    })
    if generated and print_key:
        # Like kubeadm: the key is needed to join more control-plane nodes and exists nowhere else.
        out(f"[upload-certs] Using certificate key:\n{key.hex()}")

