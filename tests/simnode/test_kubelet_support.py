"""Shared helpers for the node-runtime tests: a throwaway PKI, kubeconfigs, tiny Docker images, processes,
and `running_cluster`: a control plane as kubeadm leaves it, run by the kubelet, driven with real kubectl.

Not a test module itself (no tests); imported by test_kubeclient, test_kubelet*, test_controllers* (and the
kubeadm tests). Everything it makes lives in the test's tmp dir or under a unique image name removed after.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import json
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


# --- a whole simulated control plane, started the way kubeadm + the service would ----------------------

CONTROL_PLANE_IMAGES = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"]
FAST_FAULTS = {"delays_s": {"apiserver_ready": 0.2, "pod_running": 0.2, "pod_ready": 0.2}}


def _pod_manifest(name: str, image: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "kube-system",
                     "labels": {"component": name, "tier": "control-plane"}},
        "spec": {"hostNetwork": True, "priorityClassName": "system-node-critical",
                 "containers": [{"name": name, "image": image, "command": command, **container}]},
    }


@dataclass
class Cluster:
    """One simulated node under `root`: PKI, kubeconfigs, static pod manifests and a kubelet process."""

    root: Path
    node: str
    api_port: int
    images: dict[str, str]
    kubelet: subprocess.Popen[bytes] | None = None

    @property
    def admin_conf(self) -> Path:
        return self.root / "etc/kubernetes/admin.conf"

    @property
    def kubelet_log(self) -> Path:
        return self.root.parent / f"{self.root.name}-kubelet.log"

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.admin_conf}", *args], capture_output=True, text=True, input=stdin,
            timeout=30, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(obj))

    def write_manifest(self, pod: dict[str, Any]) -> Path:
        path = self.root / f"etc/kubernetes/manifests/{pod['metadata']['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(pod))
        return path

    def set_faults(self, faults: dict[str, Any]) -> None:
        path = self.root / "etc/simnode/faults.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(faults))

    def start_kubelet(self) -> subprocess.Popen[bytes]:
        # As the service starts it: systemd-style flags plus the contents of kubeadm-flags.env.
        args = [
            "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
            "--kubeconfig=/etc/kubernetes/kubelet.conf",
            "--config=/var/lib/kubelet/config.yaml",
            f"--container-runtime-endpoint=unix://{DOCKER_SOCK}",
            f"--pod-infra-container-image={REGISTRY}/pause:3.10",
            "--node-ip=127.0.0.1",
        ]
        self.kubelet = start_tool("kubelet", args, self.root, self.kubelet_log)
        return self.kubelet

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> int:
        assert self.kubelet is not None
        self.kubelet.send_signal(sig)
        code = self.kubelet.wait(timeout=10)
        self.kubelet = None
        return code

    def pod(self, name: str, namespace: str = "kube-system") -> dict[str, Any]:
        result: dict[str, Any] = self.get("pod", "-n", namespace, name)
        return result

    def wait_pod(self, name: str, check: Callable[[dict[str, Any]], Any], *, namespace: str = "kube-system",
                 timeout_s: float = 20, what: str = "") -> dict[str, Any]:
        def probe() -> Any:
            pod = self.pod(name, namespace)
            return pod if check(pod) else None

        result: dict[str, Any] = wait_for(probe, timeout_s=timeout_s, what=what or f"pod {namespace}/{name}")
        return result


def pod_is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def waiting_reason(pod: dict[str, Any]) -> str | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            return str(reason)
    return None


def write_pod_network(root: Path) -> None:
    """The pod network as the service's network state leaves it: the CNI plugins (stand-ins answering VERSION)
    in opt/cni/bin and 10-lifecycle.conflist in etc/cni/net.d. Without it the kubelet's node stays NotReady."""
    from simnode.images import cni_plugin_stand_in
    from states.network import CONF_NAME, PLUGINS, conflist

    bin_dir = root / "opt/cni/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for plugin in PLUGINS:
        (bin_dir / plugin).write_bytes(cni_plugin_stand_in(plugin, "v1.6.0"))
        (bin_dir / plugin).chmod(0o755)
    (root / "etc/cni/net.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/cni/net.d" / CONF_NAME).write_bytes(conflist("10.244.0.0/16"))


def write_control_plane(root: Path, node: str, images: dict[str, str]) -> Cluster:
    """What kubeadm init leaves behind (PKI, kubeconfigs, kubelet config, manifests), for a node `node`, on a
    machine with a pod network."""
    write_pod_network(root)
    pki = Pki.create()
    pki_dir = root / "etc/kubernetes/pki"
    pki_dir.mkdir(parents=True)
    (pki_dir / "ca.crt").write_bytes(pki.ca_pem)
    (pki_dir / "ca.key").write_bytes(_pem_key(pki.ca_key))
    cert, key = pki.issue("kube-apiserver", server=True)
    (pki_dir / "apiserver.crt").write_bytes(cert)
    (pki_dir / "apiserver.key").write_bytes(key)
    port = free_port()
    server = f"https://127.0.0.1:{port}"
    identities = {
        "admin.conf": ("kubernetes-admin", ("system:masters",)),
        "kubelet.conf": (f"system:node:{node}", ("system:nodes",)),
        "controller-manager.conf": ("system:kube-controller-manager", ()),
        "scheduler.conf": ("system:kube-scheduler", ()),
    }
    for name, (cn, orgs) in identities.items():
        c, k = pki.issue(cn, orgs=orgs)
        write_kubeconfig(root / "etc/kubernetes" / name, server, pki, c, k)
    config = {"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
              "staticPodPath": "/etc/kubernetes/manifests", "healthzPort": free_port(),
              "healthzBindAddress": "127.0.0.1", "clusterDNS": ["10.96.0.10"], "clusterDomain": "cluster.local"}
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "var/lib/kubelet/config.yaml").write_text(yaml.safe_dump(config))
    cluster = Cluster(root=root, node=node, api_port=port, images=images)
    probe = {"httpGet": {"host": "127.0.0.1", "path": "/readyz", "port": port, "scheme": "HTTPS"},
             "periodSeconds": 1, "timeoutSeconds": 15, "failureThreshold": 3}
    cluster.write_manifest(_pod_manifest("kube-apiserver", images["kube-apiserver"], [
        "kube-apiserver", "--advertise-address=127.0.0.1", "--bind-address=127.0.0.1", f"--secure-port={port}",
        "--client-ca-file=/etc/kubernetes/pki/ca.crt", "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
        "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key", "--service-cluster-ip-range=10.96.0.0/12",
        "--authorization-mode=Node,RBAC", "--etcd-servers=https://127.0.0.1:2379",
    ], readinessProbe=probe))
    metrics = free_port()
    etcd_probe = {"httpGet": {"host": "127.0.0.1", "path": "/readyz", "port": metrics, "scheme": "HTTP"},
                  "periodSeconds": 1}
    cluster.write_manifest(_pod_manifest("etcd", images["etcd"], [
        "etcd", "--data-dir=/var/lib/etcd", f"--name={node}", f"--listen-metrics-urls=http://127.0.0.1:{metrics}",
        "--listen-client-urls=https://127.0.0.1:2379",
    ], readinessProbe=etcd_probe))
    cluster.write_manifest(_pod_manifest("kube-controller-manager", images["kube-controller-manager"], [
        "kube-controller-manager", "--kubeconfig=/etc/kubernetes/controller-manager.conf",
        "--authentication-kubeconfig=/etc/kubernetes/controller-manager.conf", "--leader-elect=true",
        "--allocate-node-cidrs=true", "--cluster-cidr=10.244.0.0/16", "--bind-address=127.0.0.1",
        "--use-service-account-credentials=true",
    ]))
    cluster.write_manifest(_pod_manifest("kube-scheduler", images["kube-scheduler"], [
        "kube-scheduler", "--kubeconfig=/etc/kubernetes/scheduler.conf", "--leader-elect=true",
        "--authentication-kubeconfig=/etc/kubernetes/scheduler.conf", "--bind-address=127.0.0.1",
    ]))
    cluster.set_faults(FAST_FAULTS)
    return cluster


@contextlib.contextmanager
def running_cluster(root: Path, images: dict[str, str], *, node: str = "node1") -> Iterator[Cluster]:
    """Start the kubelet on a fresh control plane and wait until the API answers and the node is Ready."""
    cluster = write_control_plane(root, node, images)
    cluster.start_kubelet()
    try:
        wait_for(lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
                 timeout_s=30, what="API server ready")
        wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                             for c in cluster.get("node", node)["status"]["conditions"]),
                 timeout_s=20, what="node Ready")
        yield cluster
    finally:
        if cluster.kubelet is not None:
            kill_group(cluster.kubelet)
        from simnode.kubelet.runtime import stop_pod_processes
        from simnode.paths import NodeRoot

        stop_pod_processes(NodeRoot(root), grace_s=3)
