"""The simulated node as a user meets it: executables copied out of the binaries image into `<root>/usr/bin`, a
PKI made by the openssl CLI alone, a hand-written v1beta4 config, `kubeadm init` while the kubelet starts, then
only the real kubectl: readiness, nodes, control-plane and CoreDNS pods, server-side apply, wait, watch, and a
401 for a client from another CA.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SimImages, free_port

from simnode.host import prepare_host
from states.network import CONF_NAME, conflist

sys.path.insert(0, str(Path(__file__).parent))
from test_kubeadm_support import make_ca, make_leaf, openssl_pki, use_pause_image

NODE = "node1"  # the name openssl_pki puts in the etcd and apiserver certificates
DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: 127.0.0.1:5000/pause:3.10
"""


def _config(*, api_port: int, healthz_port: int, metrics_port: int, docker_sock: str) -> str:
    return f"""\
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: 127.0.0.1
  bindPort: {api_port}
nodeRegistration:
  name: {NODE}
  criSocket: unix://{docker_sock}
  taints: []
timeouts:
  controlPlaneComponentHealthCheck: 2m0s
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: v1.31.4
controlPlaneEndpoint: "127.0.0.1:{api_port}"
imageRepository: 127.0.0.1:5000
networking:
  podSubnet: 10.244.0.0/16
etcd:
  local:
    extraArgs:
    - name: listen-metrics-urls
      value: http://127.0.0.1:{metrics_port}
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
healthzPort: {healthz_port}
"""


def _wait(what: str, timeout_s: float, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def node_root(tmp_path: Path, sim_images: SimImages) -> Iterator[Path]:
    """A root whose usr/bin and opt/cni/bin hold those of the v1.31.4 binaries image (copied out with docker),
    with the service's pod network config."""
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    prepare_host(root)
    name = f"acceptance-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "create", "--name", name, sim_images.binaries["v1.31.4"]], check=True,
                   capture_output=True)
    try:
        subprocess.run(["docker", "cp", f"{name}:/usr/bin", str(root / "usr")], check=True, capture_output=True)
        (root / "opt/cni").mkdir(parents=True)
        subprocess.run(["docker", "cp", f"{name}:/opt/cni/bin", str(root / "opt/cni")], check=True,
                       capture_output=True)
    finally:
        subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)
    # The pod network as the service's network state writes it: without it the node stays NotReady.
    (root / "etc/cni/net.d").mkdir(parents=True)
    (root / "etc/cni/net.d" / CONF_NAME).write_bytes(conflist("10.244.0.0/16"))
    yield root
    # Whatever still runs from this root (kubelet, static pods) goes.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"{root}/" in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def test_kubeadm_init_and_kubelet_give_a_cluster_that_kubectl_cannot_tell_from_a_real_one(
    node_root: Path, tmp_path: Path
) -> None:
    root = node_root
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMNODE_")}  # root comes from usr/bin
    assert subprocess.run([str(root / "usr/bin/kubeadm"), "version", "-o", "short"], capture_output=True,
                          text=True, env=env, check=True).stdout.strip() == "v1.31.4"

    openssl_pki(root / "etc/kubernetes/pki")
    use_pause_image(root, "127.0.0.1:5000/pause:3.10")
    docker_sock = os.environ.get("DOCKER_HOST", "unix:///tmp/lifecycle-services/docker/docker.sock")
    api_port = free_port()
    config = tmp_path / "kubeadm.yaml"
    config.write_text(_config(api_port=api_port, healthz_port=free_port(), metrics_port=free_port(),
                              docker_sock=docker_sock.removeprefix("unix://")))

    init_log = tmp_path / "init.log"
    with open(init_log, "wb") as log:
        init = subprocess.Popen([str(root / "usr/bin/kubeadm"), "init", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    kubelet: subprocess.Popen[bytes] | None = None
    try:
        flags_env = root / "var/lib/kubelet/kubeadm-flags.env"
        _wait("kubelet-start", 60, lambda: flags_env.exists() or init.poll() is not None)
        assert init.poll() is None, init_log.read_text()
        kubeadm_args = shlex.split(flags_env.read_text().split("=", 1)[1].strip().strip('"'))
        with open(tmp_path / "kubelet.log", "wb") as log:
            kubelet = subprocess.Popen(
                [str(root / "usr/bin/kubelet"), "--kubeconfig=/etc/kubernetes/kubelet.conf",
                 "--config=/var/lib/kubelet/config.yaml", *kubeadm_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        assert init.wait(timeout=180) == 0, init_log.read_text()
        assert "Your Kubernetes control-plane has initialized successfully!" in init_log.read_text()
        # The leaves made by openssl were used as they were.
        assert "[certs] Using existing apiserver certificate and key on disk" in init_log.read_text()

        admin = str(root / "etc/kubernetes/admin.conf")

        def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["kubectl", "--kubeconfig", admin, *args], capture_output=True, text=True,
                                  timeout=90, check=check)

        assert kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
        assert " Ready " in kubectl("get", "nodes").stdout

        wanted = {"kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "coredns"}

        def running_components() -> set[str]:
            pods = yaml.safe_load(kubectl("get", "pods", "-n", "kube-system", "-o", "yaml").stdout)["items"]
            names = set()
            for pod in pods:
                if pod["status"].get("phase") == "Running":
                    labels = pod["metadata"].get("labels", {})
                    names.add(labels.get("component") or labels.get("k8s-app", "").replace("kube-dns", "coredns"))
            return names

        _wait("control-plane and CoreDNS pods Running", 90, lambda: wanted <= running_components())
        table = kubectl("get", "pods", "-n", "kube-system").stdout
        assert table.splitlines()[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]

        manifest = tmp_path / "web.yaml"
        manifest.write_text(DEPLOYMENT)
        assert "serverside-applied" in kubectl("apply", "--server-side", "-f", str(manifest)).stdout
        kubectl("wait", "--for=condition=Available", "deployment/web", "--timeout=90s")

        watch = subprocess.Popen(["kubectl", "--kubeconfig", admin, "get", "pods", "-l", "app=web", "-w"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(2)  # the watch is established before the change
            kubectl("scale", "deployment/web", "--replicas=2")
            kubectl("wait", "--for=jsonpath={.status.availableReplicas}=2", "deployment/web", "--timeout=90s")
            time.sleep(1)
        finally:
            watch.terminate()
            out, _ = watch.communicate(timeout=10)
        pods_seen = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
        assert len(pods_seen) >= 2, f"kubectl get -w saw only {out!r}"

        # A client whose certificate comes from another CA is Unauthorized (401), not a TLS failure.
        other = tmp_path / "other"
        other.mkdir()
        make_ca(other, "ca", "someone-else")
        make_leaf(other, "client", "ca", "/O=system:masters/CN=intruder")
        stranger = tmp_path / "stranger.conf"
        stranger.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{api_port}",
                                                   "certificate-authority": str(root / "etc/kubernetes/pki/ca.crt")}}],
            "users": [{"name": "u", "user": {"client-certificate": str(other / "client.crt"),
                                             "client-key": str(other / "client.key")}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        }))
        denied = subprocess.run(["kubectl", "--kubeconfig", str(stranger), "get", "pods"], capture_output=True,
                                text=True, timeout=60)
        assert denied.returncode != 0
        assert "Unauthorized" in denied.stderr, denied.stderr
    finally:
        if init.poll() is None:
            init.kill()
        if kubelet is not None and kubelet.poll() is None:
            kubelet.terminate()
            kubelet.wait(timeout=20)
        subprocess.run([str(root / "usr/bin/kubeadm"), "reset", "-f"], capture_output=True, env=env, timeout=120,
                       check=False)
