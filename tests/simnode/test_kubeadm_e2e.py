"""End to end: `kubeadm init --config` on a node whose kubelet starts once kubelet-start wrote its files (as
systemd would restart it), the kubelet running kubeadm's static pods (the API server among them) from tiny
real Docker images; then the real kubectl with admin.conf, `kubeadm upgrade apply`, and `kubeadm reset -f`."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_kubeadm_support import NODE, config_v1beta4, free_port, run_kubeadm, use_pause_image
from test_kubelet_support import build_scratch_image, kill_group, remove_images, start_tool

from simnode.host import prepare_host
from simnode.kubelet.runtime import stop_pod_processes
from simnode.paths import NodeRoot
from simnode.versions import VERSIONS, component_images


@pytest.fixture(scope="module")
def repo() -> Iterator[str]:
    """A unique repository holding a tiny image under every name both simulated versions use."""
    repo = f"127.0.0.1:5000/kubeadm-e2e-{uuid.uuid4().hex[:10]}"
    refs = sorted({ref for version in VERSIONS for ref in component_images(repo, version).values()})
    build_scratch_image(refs)
    try:
        yield repo
    finally:
        remove_images(refs)


def kubectl(root: Path, *args: str) -> Any:
    out = subprocess.run(["kubectl", "--kubeconfig", str(root / "etc/kubernetes/admin.conf"), *args, "-o", "json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def wait_until(what: str, timeout_s: float, check: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def kubelet_args(root: Path) -> list[str]:
    """What the service runs: kubeadm-flags.env's flags plus the config and kubeconfig kubeadm wrote."""
    line = (root / "var/lib/kubelet/kubeadm-flags.env").read_text().strip()
    flags = shlex.split(line.partition("=")[2])[0].split()
    return ["--config=/var/lib/kubelet/config.yaml", "--kubeconfig=/etc/kubernetes/kubelet.conf", *flags]


def test_init_with_a_running_kubelet_then_kubectl_upgrade_and_reset(tmp_path: Path, repo: str) -> None:
    root = tmp_path / "root"
    prepare_host(root)  # a machine kubeadm's preflight accepts
    use_pause_image(root, f"{repo}/pause:3.10")
    port, healthz, metrics = free_port(), free_port(), free_port()
    text = config_v1beta4(
        port=port, healthz_port=healthz, repo=repo, endpoint="127.0.0.1",
        extra_init="timeouts:\n  controlPlaneComponentHealthCheck: 90s\n  kubeletHealthCheck: 60s\n",
        extra_cluster=f"etcd:\n  local:\n    extraArgs:\n    - name: listen-metrics-urls\n"
                      f"      value: http://127.0.0.1:{metrics}\n",
    )
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(text)
    env = dict(os.environ, SIMNODE_ROOT=str(root), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("SIMNODE_TOOL", None)
    init_log = tmp_path / "init.log"
    kubelet: subprocess.Popen[bytes] | None = None
    with open(init_log, "wb") as log:
        init = subprocess.Popen([sys.executable, "-m", "simnode", "kubeadm", "init", f"--config={cfg}"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until("kubelet-start to write the kubelet's files", 60,
                   lambda: (root / "var/lib/kubelet/config.yaml").exists() or init.poll() is not None)
        assert init.poll() is None, init_log.read_text()
        kubelet = start_tool("kubelet", kubelet_args(root), root, tmp_path / "kubelet.log")
        code = init.wait(timeout=120)
        output = init_log.read_text()
        assert code == 0, output + (tmp_path / "kubelet.log").read_text()[-3000:]
        for line in ("[kubelet-check] The kubelet is healthy after", "[api-check] The API server is healthy after",
                     '[upload-config] Storing the configuration used in ConfigMap "kubeadm-config"',
                     f"[mark-control-plane] Marking the node {NODE} as control-plane",
                     "[bootstrap-token] Using token:", "[addons] Applied essential addon: CoreDNS",
                     "[addons] Applied essential addon: kube-proxy",
                     "Your Kubernetes control-plane has initialized successfully!"):
            assert line in output, line

        # The real kubectl, with admin.conf's group kubeadm:cluster-admins, sees what kubeadm made.
        pods = wait_until("the mirror pods of the control plane", 30, lambda: {
            p["metadata"]["name"] for p in kubectl(root, "get", "pods", "-n", "kube-system")["items"]
        } >= {f"{c}-{NODE}" for c in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")})
        assert pods
        node = kubectl(root, "get", "node", NODE)
        assert node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] == ""
        assert "node.kubernetes.io/exclude-from-external-load-balancers" in node["metadata"]["labels"]
        assert {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"} in node["spec"]["taints"]
        stored = yaml.safe_load(kubectl(root, "get", "cm", "kubeadm-config", "-n", "kube-system")["data"][
            "ClusterConfiguration"])
        assert (stored["apiVersion"], stored["kubernetesVersion"], stored["imageRepository"]) == (
            "kubeadm.k8s.io/v1beta4", "v1.31.4", repo)
        assert "kubelet" in kubectl(root, "get", "cm", "kubelet-config", "-n", "kube-system")["data"]
        coredns = kubectl(root, "get", "deployment", "coredns", "-n", "kube-system")
        assert coredns["spec"]["replicas"] == 2
        assert coredns["spec"]["template"]["spec"]["containers"][0]["image"] == f"{repo}/coredns:v1.11.3"
        assert kubectl(root, "get", "service", "kube-dns", "-n", "kube-system")["spec"]["clusterIP"] == "10.96.0.10"
        assert kubectl(root, "get", "daemonset", "kube-proxy", "-n", "kube-system")["spec"]["template"]["spec"][
            "containers"][0]["image"] == f"{repo}/kube-proxy:v1.31.4"
        secrets = kubectl(root, "get", "secrets", "-n", "kube-system")["items"]
        assert any(s["metadata"]["name"].startswith("bootstrap-token-") for s in secrets)
        assert "kubeconfig" in kubectl(root, "get", "cm", "cluster-info", "-n", "kube-public")["data"]
        kubelet_conf = yaml.safe_load((root / "etc/kubernetes/kubelet.conf").read_text())
        assert kubelet_conf["users"][0]["user"]["client-certificate"] == \
            "/var/lib/kubelet/pki/kubelet-client-current.pem"

        again = run_kubeadm(root, "init", "phase", "addon", "all", f"--config={cfg}")
        assert again.returncode == 0, again.stderr  # re-applying converges
        certs = run_kubeadm(root, "init", "phase", "upload-certs", "--upload-certs", f"--config={cfg}")
        assert certs.returncode == 0, certs.stderr
        uploaded = kubectl(root, "get", "secret", "kubeadm-certs", "-n", "kube-system")["data"]
        assert {"ca.crt", "ca.key", "sa.key", "etcd-ca.key"} <= set(uploaded)
        assert b"PRIVATE KEY" not in base64.b64decode(uploaded["ca.key"])  # stored encrypted

        too_new = run_kubeadm(root, "upgrade", "apply", "v1.32.1", "-y")
        assert too_new.returncode == 1
        assert "at least one minor release higher than the kubeadm minor release (32 > 31)" in too_new.stderr
        upgraded = run_kubeadm(root, "upgrade", "apply", "v1.32.1", "-y", env={"SIMNODE_VERSION": "v1.32.1"},
                               timeout_s=240)
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        assert '[upgrade/successful] SUCCESS! Your cluster was upgraded to "v1.32.1". Enjoy!' in upgraded.stdout
        manifest = yaml.safe_load((root / "etc/kubernetes/manifests/kube-apiserver.yaml").read_text())
        assert manifest["spec"]["containers"][0]["image"] == f"{repo}/kube-apiserver:v1.32.1"
        assert f"--secure-port={port}" in manifest["spec"]["containers"][0]["command"]  # the rest is kept
        assert f"{repo}/etcd:3.5.16-0" in (root / "etc/kubernetes/manifests/etcd.yaml").read_text()
        mirror = kubectl(root, "get", "pod", f"kube-apiserver-{NODE}", "-n", "kube-system")
        assert mirror["spec"]["containers"][0]["image"] == f"{repo}/kube-apiserver:v1.32.1"
        stored = yaml.safe_load(kubectl(root, "get", "cm", "kubeadm-config", "-n", "kube-system")["data"][
            "ClusterConfiguration"])
        assert stored["kubernetesVersion"] == "v1.32.1"
        assert kubectl(root, "get", "daemonset", "kube-proxy", "-n", "kube-system")["spec"]["template"]["spec"][
            "containers"][0]["image"] == f"{repo}/kube-proxy:v1.32.1"

        kubelet.send_signal(signal.SIGTERM)  # the service stops the kubelet before reset (no systemd here)
        kubelet.wait(timeout=20)
        reset = run_kubeadm(root, "reset", "-f", "--cri-socket=unix:///var/run/cri-dockerd.sock")
        assert reset.returncode == 0, reset.stderr
        stopped = re.search(r"\[reset\] Stopped (\d+) pod container process", reset.stdout)
        assert stopped and int(stopped.group(1)) >= 4, reset.stdout  # etcd and the control plane at least
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the API server is gone
        assert not list((root / "etc/kubernetes/manifests").iterdir())
        assert not (root / "etc/kubernetes/admin.conf").exists()
        assert stop_pod_processes(NodeRoot(root), grace_s=1) == 0  # nothing left running
    finally:
        if init.poll() is None:
            kill_group(init)
        if kubelet is not None:
            kill_group(kubelet)
        stop_pod_processes(NodeRoot(root), grace_s=2)
