"""The simulated kubelet's client certificate store and the API server's kubelet client certificate, against a PKI
made by openssl: the store bootstraps kubelet.conf's embedded pair into a dated pem behind a symlink, rotates by
swapping the symlink, and refuses (with client-go's words) to rotate a current pem that is a plain file; the API
server's `pods/log` call fails once the kubelet client certificate it loaded at start has expired."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from openssl_pki import OpensslPki

from simnode.apiserver.kubeletlink import KubeletCallError, KubeletLink, load_kubelet_client
from simnode.kubelet.certstore import ClientCertManager, FileStore
from simnode.paths import NodeRoot

NODE = "node-a"
CURRENT = "/var/lib/kubelet/pki/kubelet-client-current.pem"


@pytest.fixture
def node(tmp_path: Path) -> tuple[NodeRoot, OpensslPki]:
    root = NodeRoot(tmp_path / "root")
    pki = OpensslPki(root.path("/etc/kubernetes/pki"), node=NODE)
    pki.ca("ca")
    pki.leaf("kubelet", "ca", f"/O=system:nodes/CN=system:node:{NODE}")
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": f"system:node:{NODE}"}}],
        "users": [{"name": f"system:node:{NODE}", "user": {
            "client-certificate-data": base64.b64encode((pki.dir / "kubelet.crt").read_bytes()).decode(),
            "client-key-data": base64.b64encode((pki.dir / "kubelet.key").read_bytes()).decode()}}],
    }
    root.path("/etc/kubernetes/kubelet.conf").write_text(yaml.safe_dump(kubeconfig))
    root.manifests.mkdir(parents=True)
    root.path(root.manifests / "kube-controller-manager.yaml").write_text(yaml.safe_dump({
        "kind": "Pod", "spec": {"containers": [{"command": [
            "kube-controller-manager", "--cluster-signing-cert-file=/etc/kubernetes/pki/ca.crt",
            "--cluster-signing-key-file=/etc/kubernetes/pki/ca.key"]}]}}))
    return root, pki


def _manager(root: NodeRoot) -> ClientCertManager:
    return ClientCertManager(root, "/var/lib/kubelet/pki", root.path("/etc/kubernetes/kubelet.conf"))


def _serial(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


def test_the_kubelet_bootstraps_the_embedded_pair_into_a_dated_pem_behind_a_symlink(
    node: tuple[NodeRoot, OpensslPki],
) -> None:
    root, pki = node
    _manager(root).bootstrap()
    current = root.path(CURRENT)
    assert current.is_symlink()
    target = current.readlink()
    assert re.fullmatch(r"kubelet-client-\d{4}(-\d\d){5}\.pem", target.name)
    assert target.stat().st_mode & 0o777 == 0o600
    assert _serial(current) == _serial(pki.dir / "kubelet.crt")


def test_rotation_swaps_the_symlink_to_a_new_dated_pem_signed_by_the_controller_managers_ca(
    node: tuple[NodeRoot, OpensslPki], caplog: pytest.LogCaptureFixture,
) -> None:
    root, pki = node
    manager = _manager(root)
    manager.bootstrap()
    current = root.path(CURRENT)
    first = current.readlink()
    first.rename(first.with_name("kubelet-client-2020-01-01-00-00-00.pem"))  # the same second otherwise
    first = first.with_name("kubelet-client-2020-01-01-00-00-00.pem")
    current.unlink()
    current.symlink_to(first)
    assert manager.rotate()
    second = current.readlink()
    assert second != first and first.exists(), "the previous dated pem is kept"
    rotated = x509.load_pem_x509_certificate(current.read_bytes())
    ca = x509.load_pem_x509_certificate((pki.dir / "ca.crt").read_bytes())
    rotated.verify_directly_issued_by(ca)
    assert rotated.subject.rfc4514_string() == f"CN=system:node:{NODE},O=system:nodes"
    assert manager.rotated.is_set()
    assert "to be a symlink" not in caplog.text


def test_a_plain_file_loads_but_rotation_fails_with_client_gos_message(
    node: tuple[NodeRoot, OpensslPki], caplog: pytest.LogCaptureFixture,
) -> None:
    root, pki = node
    current = root.path(CURRENT)
    current.parent.mkdir(parents=True)
    current.write_bytes((pki.dir / "kubelet.crt").read_bytes() + (pki.dir / "kubelet.key").read_bytes())
    manager = _manager(root)
    manager.bootstrap()
    assert not current.is_symlink() and FileStore(root, "/var/lib/kubelet/pki").current() is not None
    assert not manager.rotate()
    assert (f'kubernetes.io/kube-apiserver-client-kubelet: Unable to store the new cert/key pair: expected '
            f'"{CURRENT}" to be a symlink but it is a file') in caplog.text
    assert not current.is_symlink() and not manager.rotated.is_set()


def _pod(root: NodeRoot) -> dict[str, object]:
    log = root.path("/var/log/pods/kube-system_etcd/etcd.log")
    log.parent.mkdir(parents=True)
    log.write_text("line 1\nline 2\n")
    return {"metadata": {"name": f"etcd-{NODE}", "namespace": "kube-system",
                         "annotations": {"kubernetes.io/config.mirror": "x"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "etcd"}]}}


def test_pods_log_uses_the_kubelet_client_certificate_read_at_start(node: tuple[NodeRoot, OpensslPki]) -> None:
    root, pki = node
    root.kubelet_dir.mkdir(parents=True)
    root.path("/var/lib/kubelet/config.yaml").write_text(yaml.safe_dump(
        {"authentication": {"x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"}}}))
    nodeobj = {"metadata": {"name": NODE}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}}
    pki.leaf("apiserver-kubelet-client", "ca", "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client")
    flags = ("/etc/kubernetes/pki/apiserver-kubelet-client.crt", "/etc/kubernetes/pki/apiserver-kubelet-client.key")
    link = KubeletLink(root, load_kubelet_client(root, *flags))
    assert link.container_log(_pod(root), nodeobj, None, 1) == "line 2\n"

    pki.leaf("apiserver-kubelet-client", "ca", "/CN=kube-apiserver-kubelet-client", days=-1)  # renewed on disk:
    assert link.container_log(_pod_again(root), nodeobj, "etcd", None)  # ... the running server still has its own
    expired = KubeletLink(root, load_kubelet_client(root, *flags))  # a server started with an expired one
    with pytest.raises(KubeletCallError, match=r'Get "https://10.0.0.5:10250/containerLogs/kube-system/etcd-node-a/'
                                               r'etcd": remote error: tls: expired certificate'):
        expired.container_log(_pod_again(root), nodeobj, None, None)
    assert expired.client is not None and expired.client.cert.not_valid_after_utc < datetime.now(UTC)


def _pod_again(root: NodeRoot) -> dict[str, object]:
    return {"metadata": {"name": f"etcd-{NODE}", "namespace": "kube-system",
                         "annotations": {"kubernetes.io/config.mirror": "x"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "etcd"}]}}
