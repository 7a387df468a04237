"""Helpers for the kubeadm stand-in tests: run the real CLI as a process, make a PKI with the openssl CLI
alone, write kubeadm configs, hash directories. No tests here; everything lives in the test's tmp dir.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
DOCKER_SOCK = "/tmp/lifecycle-services/docker/docker.sock"
NODE = "node1"
ENDPOINT_IP = "10.0.0.5"  # controlPlaneEndpoint host: only written into files, never dialled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_kubeadm(root: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, SIMNODE_ROOT=str(root), PYTHONPATH=str(REPO), **(env or {}))
    full_env.pop("SIMNODE_TOOL", None)
    return subprocess.run([PYTHON, "-m", "simnode", "kubeadm", *args], input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=timeout_s, check=False, cwd=str(REPO))


def tree_hash(directory: Path) -> dict[str, str]:
    """relative path -> sha256 (and mode) of every file under `directory` ({} when it does not exist)."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{oct(p.stat().st_mode)}"
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def ec_key(path: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)


def make_ca(pki: Path, name: str, cn: str) -> None:
    (pki / name).parent.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3650", "-subj", f"/CN={cn}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyCertSign", cwd=pki)


def make_leaf(pki: Path, name: str, ca: str, subject: str, *, server: bool = False, sans: list[str] | None = None,
              days: int = 365) -> None:
    """`<name>.crt/.key` signed by `<ca>.crt/.key` (days < 0 makes an already expired certificate)."""
    (pki / name).parent.mkdir(parents=True, exist_ok=True)
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    ext = pki / f"{name}.ext"
    lines = [f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-set_serial", "0x" + secrets.token_hex(8), "-days", str(days), "-out", f"{name}.crt",
            "-extfile", f"{name}.ext", cwd=pki)
    (pki / f"{name}.csr").unlink()
    ext.unlink()


def apiserver_sans(*, extra_ips: tuple[str, ...] = (ENDPOINT_IP,)) -> list[str]:
    dns = [NODE, "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
    ips = ["10.96.0.1", "127.0.0.1", *extra_ips]
    return [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]


def openssl_pki(pki: Path, *, ca_only: bool = False) -> None:
    """kubeadm's whole PKI made by the openssl CLI (or only the three CAs and the SA key pair)."""
    pki.mkdir(parents=True, exist_ok=True)
    make_ca(pki, "ca", "kubernetes")
    make_ca(pki, "front-proxy-ca", "front-proxy-ca")
    make_ca(pki, "etcd/ca", "etcd-ca")
    ec_key(pki / "sa.key")
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    if ca_only:
        return
    etcd_sans = ["DNS:localhost", f"DNS:{NODE}", "IP:127.0.0.1", "IP:0:0:0:0:0:0:0:1"]
    make_leaf(pki, "apiserver", "ca", "/CN=kube-apiserver", server=True, sans=apiserver_sans())
    make_leaf(pki, "apiserver-kubelet-client", "ca", "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client")
    make_leaf(pki, "front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client")
    make_leaf(pki, "etcd/server", "etcd/ca", f"/CN={NODE}", server=True, sans=etcd_sans)
    make_leaf(pki, "etcd/peer", "etcd/ca", f"/CN={NODE}", server=True, sans=etcd_sans)
    make_leaf(pki, "etcd/healthcheck-client", "etcd/ca", "/CN=kube-etcd-healthcheck-client")
    make_leaf(pki, "apiserver-etcd-client", "etcd/ca", "/CN=kube-apiserver-etcd-client")


def config_v1beta4(*, port: int, healthz_port: int, cri_socket: str = f"unix://{DOCKER_SOCK}",
                   repo: str = "127.0.0.1:5000/k8s", extra_init: str = "", extra_cluster: str = "",
                   extra_kubelet: str = "", endpoint: str = f"{ENDPOINT_IP}") -> str:
    return f"""\
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: 127.0.0.1
  bindPort: {port}
nodeRegistration:
  name: {NODE}
  criSocket: {cri_socket}
  kubeletExtraArgs:
  - name: v
    value: "2"
{extra_init}---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: v1.31.4
controlPlaneEndpoint: "{endpoint}:{port}"
imageRepository: {repo}
encryptionAlgorithm: ECDSA-P256
networking:
  podSubnet: 10.244.0.0/16
apiServer:
  extraArgs:
  - name: audit-log-maxage
    value: "7"
controllerManager:
  extraArgs:
  - name: node-monitor-period
    value: 3s
{extra_cluster}---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
healthzPort: {healthz_port}
{extra_kubelet}"""


def config_v1beta3(*, port: int, healthz_port: int, cert_dir: str = "/etc/kubernetes/pki") -> str:
    return f"""\
apiVersion: kubeadm.k8s.io/v1beta3
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: 127.0.0.1
  bindPort: {port}
nodeRegistration:
  name: {NODE}
  criSocket: unix://{DOCKER_SOCK}
  kubeletExtraArgs:
    max-pods: "50"
  taints: []
---
apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
kubernetesVersion: v1.31.4
certificatesDir: {cert_dir}
imageRepository: 127.0.0.1:5000/k8s
networking:
  serviceSubnet: 10.112.0.0/16
  dnsDomain: sim.local
apiServer:
  timeoutForControlPlane: 1s
  extraArgs:
    audit-log-maxage: "9"
etcd:
  local:
    dataDir: /var/lib/etcd-data
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
healthzPort: {healthz_port}
"""


def use_pause_image(root: Path, image: str) -> None:
    """What a VM user does (docs/real-vm.md): tell cri-dockerd, which makes every pod's sandbox, the pause image
    kubeadm's version uses, then restart it; its packaged default (registry.k8s.io/pause:3.9) is not in the engine
    of an offline node, so without this no pod, static ones included, gets a sandbox."""
    drop_in = root / "etc/systemd/system/cri-docker.service.d/10-pause.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/cri-dockerd --container-runtime-endpoint fd:// "
                       f"--pod-infra-container-image={image}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMNODE_")}  # the root comes from usr/bin
    for args in (["daemon-reload"], ["restart", "cri-docker.service"]):
        subprocess.run([str(root / "usr/bin/systemctl"), *args], check=True, capture_output=True, env=env, timeout=30)
