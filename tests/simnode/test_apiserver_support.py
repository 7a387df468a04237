"""Helpers for the kube-apiserver stand-in tests: a PKI made with the openssl CLI, the server as a real
subprocess on a free port, and the real kubectl / kubernetes_asyncio pointed at it. No tests live here."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port

KUBECTL = "/usr/bin/kubectl"
KUBECTL_VERSIONS = sorted(Path("/usr/lib/google-cloud-sdk/bin").glob("kubectl.1.*"))
FAST_FAULTS = {"delays_s": {"apiserver_ready": 0}}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Pki:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def issue(self, name: str, subject: str, *, ca: str = "ca", ext: str = "extendedKeyUsage=clientAuth") -> None:
        """`<name>.crt`/`<name>.key` signed by `<ca>.crt` (EC P-256, one day)."""
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=self.dir)
        (self.dir / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=self.dir)

    def new_ca(self, name: str, cn: str) -> None:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={cn}", cwd=self.dir)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    pki.new_ca("ca", "kubernetes")
    pki.issue("apiserver", "/CN=kube-apiserver",
              ext="subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    pki.issue("admin", "/O=system:masters/CN=kubernetes-admin")
    pki.new_ca("other-ca", "someone-else")
    pki.issue("intruder", "/O=system:masters/CN=intruder", ca="other-ca")
    return pki


def install_serving_pair(pki: Pki, root: Path, name: str = "apiserver") -> None:
    """Copy the CA and serving pair where kubeadm puts them (<root>/etc/kubernetes/pki)."""
    dest = root / "etc/kubernetes/pki"
    dest.mkdir(parents=True, exist_ok=True)
    for src, dst in ((f"{name}.crt", "apiserver.crt"), (f"{name}.key", "apiserver.key"), ("ca.crt", "ca.crt")):
        tmp = dest / (dst + ".tmp")
        tmp.write_bytes(pki.path(src).read_bytes())
        tmp.replace(dest / dst)


def write_kubeconfig(path: Path, port: int, pki: Pki, user: str = "admin") -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sim", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                 "certificate-authority": str(pki.path("ca.crt"))}}],
        "users": [{"name": user, "user": {"client-certificate": str(pki.path(f"{user}.crt")),
                                          "client-key": str(pki.path(f"{user}.key"))}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": user}}],
        "current-context": "sim",
    }
    path.write_text(json.dumps(cfg))
    return path


@dataclass
class ApiServer:
    root: Path
    port: int
    pki: Pki
    proc: subprocess.Popen[bytes]
    kubeconfig: Path
    log: Path
    home: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self, user: str | None = "admin") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.path("ca.crt")))
        if user is not None:
            ctx.load_cert_chain(self.pki.path(f"{user}.crt"), self.pki.path(f"{user}.key"))
        return ctx

    def request(self, path: str, *, user: str | None = "admin", method: str = "GET",
                body: Any = None, content_type: str = "application/json") -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(user), timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def kubectl(self, *args: str, binary: str = KUBECTL, check: bool = True, timeout_s: float = 30,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [binary, f"--kubeconfig={kubeconfig or self.kubeconfig}", f"--cache-dir={self.home}/cache", *args]
        env = {**os.environ, "HOME": str(self.home)}
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stderr}\n{res.stdout}")
        return res

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(root: Path, pki: Pki, *, port: int | None = None, faults: dict[str, Any] | None = None,
           extra: tuple[str, ...] = (), wait: bool = True) -> ApiServer:
    """Start the stand-in the way the kubelet does (static pod flags, $SIMNODE_ROOT) and wait for /livez."""
    install_serving_pair(pki, root)
    if faults is not None:
        (root / "etc/simnode").mkdir(parents=True, exist_ok=True)
        (root / "etc/simnode/faults.json").write_text(json.dumps(faults))
    port = port or free_port()
    log = root / f"apiserver-{port}.log"
    argv = [
        sys.executable, "-m", "simnode", "kube-apiserver",
        "--advertise-address=127.0.0.1", f"--secure-port={port}", "--bind-address=127.0.0.1",
        "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
        "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key",
        "--client-ca-file=/etc/kubernetes/pki/ca.crt", "--service-cluster-ip-range=10.96.0.0/12",
        "--etcd-servers=https://127.0.0.1:2379", "--authorization-mode=Node,RBAC",
        "--service-account-key-file=/etc/kubernetes/pki/sa.pub", "--enable-admission-plugins=NodeRestriction",
        *extra,
    ]
    env = {**os.environ, "SIMNODE_ROOT": str(root), "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    home = root / "home"
    home.mkdir(exist_ok=True)
    server = ApiServer(root, port, pki, proc, write_kubeconfig(root / "kubeconfig", port, pki), log, home)
    if wait:
        wait_for(server, "/livez")
    return server


def wait_for(server: ApiServer, path: str, status: int = 200, timeout_s: float = 20) -> bytes:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"kube-apiserver exited {server.proc.returncode}:\n{server.log.read_text()}")
        try:
            code, body = server.request(path)
            if code == status:
                return body
            last = (code, body)
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{path} never answered {status}: {last}\n{server.log.read_text()}")


def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Body of a module-scoped fixture: one server (fresh PKI and node root), stopped with SIGTERM -> exit 0."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = launch(tmp_path_factory.mktemp("node"), pki, faults=FAST_FAULTS)
    yield server
    code = server.stop()
    assert code == 0, server.log.read_text()
