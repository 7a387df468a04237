"""Shared helpers for the node-runtime tests: a throwaway PKI, kubeconfigs, tiny Docker images, processes.

Not a test module itself (no tests); imported by test_kubeclient, test_kubelet* and test_controllers*.
Everything it makes lives in the test's tmp dir or under a unique image name removed afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import os
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
DOCKER_SOCK = "/tmp/lifecycle-services/docker/docker.sock"
REGISTRY = "127.0.0.1:5000"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@dataclass
class Pki:
    """A CA plus helpers to issue server and client certificates (EC P-256, one day)."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    @classmethod
    def create(cls) -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, *, orgs: tuple[str, ...] = (), server: bool = False) -> tuple[bytes, bytes]:
        """(cert_pem, key_pem) signed by the CA; server certs get SANs for 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_kubeconfig(
    path: Path, server: str, pki: Pki, cert_pem: bytes, key_pem: bytes, *, inline: bool = True
) -> Path:
    """A kubeadm-style kubeconfig; `inline=False` writes the PEMs next to it and references them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cluster: dict[str, Any] = {"server": server}
    user: dict[str, Any] = {}
    if inline:
        cluster["certificate-authority-data"] = base64.b64encode(pki.ca_pem).decode()
        user["client-certificate-data"] = base64.b64encode(cert_pem).decode()
        user["client-key-data"] = base64.b64encode(key_pem).decode()
    else:
        files = {"ca.crt": pki.ca_pem, f"{path.stem}.crt": cert_pem, f"{path.stem}.key": key_pem}
        for name, data in files.items():
            (path.parent / name).write_bytes(data)
        cluster["certificate-authority"] = str(path.parent / "ca.crt")
        user["client-certificate"] = str(path.parent / f"{path.stem}.crt")
        user["client-key"] = str(path.parent / f"{path.stem}.key")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubernetes", "cluster": cluster}],
        "users": [{"name": "admin", "user": user}],
        "contexts": [{"name": "admin@kubernetes", "context": {"cluster": "kubernetes", "user": "admin"}}],
        "current-context": "admin@kubernetes",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `check` until it returns a truthy value; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the thing we wait for may not exist yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still "exists"; look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=10)


def start_tool(tool: str, args: list[str], root: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start `python -m simnode <tool> args` for node root `root`, output to `log`."""
    env = dict(os.environ, SIMNODE_ROOT=str(root), PYTHONPATH=str(REPO))
    env.pop("SIMNODE_TOOL", None)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "simnode", tool, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(REPO),
        )


# --- Docker images -----------------------------------------------------------------------------------


def _docker(
    args: list[str], *, stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, DOCKER_HOST=f"unix://{DOCKER_SOCK}", DOCKER_BUILDKIT="0")
    return subprocess.run(
        ["docker", *args], input=stdin, env=env, capture_output=True, check=check, timeout=120
    )


def build_scratch_image(tags: list[str]) -> None:
    """Build one tiny FROM scratch image and give it every tag in `tags`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dockerfile = b"FROM scratch\nCOPY marker /marker\n"
        for name, data in (("Dockerfile", dockerfile), ("marker", uuid.uuid4().hex.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    args = ["build", "-q"]
    for tag in tags:
        args += ["-t", tag]
    _docker([*args, "-"], stdin=buf.getvalue())


def remove_images(tags: list[str]) -> None:
    _docker(["rmi", "-f", *tags], check=False)


@contextlib.contextmanager
def scratch_images(components: list[str], *, tag: str = "v1.31.4") -> Iterator[dict[str, str]]:
    """Unique `127.0.0.1:5000/test-<uuid>/<component>:<tag>` images for the duration of a test."""
    repo = f"{REGISTRY}/test-{uuid.uuid4().hex[:12]}"
    refs = {c: f"{repo}/{c}:{tag}" for c in components}
    build_scratch_image(list(refs.values()))
    try:
        yield refs
    finally:
        remove_images(list(refs.values()))
