"""The kubeadm stand-in on a PKI made by the openssl CLI: existing certs are validated and reused, missing
ones are issued by the CA, and every broken input exits 1 naming the file and reason with the PKI and the
manifests dir exactly as before."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_kubeadm_support import (
    ENDPOINT_IP,
    apiserver_sans,
    config_v1beta4,
    ec_key,
    free_port,
    make_ca,
    make_leaf,
    openssl_pki,
    run_kubeadm,
    tree_hash,
)

KUBECONFIGS = ("admin.conf", "super-admin.conf", "kubelet.conf", "controller-manager.conf", "scheduler.conf")


def openssl_out(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True, timeout=30).stdout.decode()


@pytest.fixture(scope="module")
def made_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The openssl-made PKIs, made once per module; tests copy them (openssl runs ~30 processes each)."""
    base = tmp_path_factory.mktemp("openssl-pki")
    openssl_pki(base / "full")
    openssl_pki(base / "ca-only", ca_only=True)
    return {"full": base / "full", "ca-only": base / "ca-only"}


@pytest.fixture
def copy_pki(made_pki: dict[str, Path]) -> Callable[[Path, str], None]:
    def copy(pki: Path, kind: str = "full") -> None:
        shutil.copytree(made_pki[kind], pki)

    return copy


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path]:
    """(root, config path) with free ports; the PKI is left to each test."""
    root = tmp_path / "root"
    (root / "etc/kubernetes/manifests").mkdir(parents=True)
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(config_v1beta4(port=free_port(), healthz_port=free_port()))
    return root, cfg


def pki_dir(root: Path) -> Path:
    return root / "etc/kubernetes/pki"


def test_existing_openssl_pki_is_reused_untouched(node: tuple[Path, Path], copy_pki: Callable[[Path, str], None]
                                                  ) -> None:
    root, cfg = node
    copy_pki(pki_dir(root), "full")
    before = tree_hash(pki_dir(root))
    result = run_kubeadm(root, "init", "phase", "certs", "all", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    assert "[certs] Using existing ca certificate authority" in result.stdout
    assert "[certs] Using existing apiserver certificate and key on disk" in result.stdout
    assert '[certs] Using the existing "sa" key' in result.stdout
    assert "Generating" not in result.stdout
    assert tree_hash(pki_dir(root)) == before


def test_ca_only_pki_gets_every_leaf_issued_by_that_ca(node: tuple[Path, Path],
                                                       copy_pki: Callable[[Path, str], None]) -> None:
    root, cfg = node
    pki = pki_dir(root)
    copy_pki(pki, "ca-only")
    cas = {name: (pki / f"{name}.crt").read_bytes() for name in ("ca", "front-proxy-ca", "etcd/ca")}
    result = run_kubeadm(root, "init", "phase", "certs", "all", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    assert '[certs] Generating "apiserver" certificate and key' in result.stdout
    for leaf, ca in (("apiserver", "ca"), ("apiserver-kubelet-client", "ca"), ("front-proxy-client", "front-proxy-ca"),
                     ("etcd/server", "etcd/ca"), ("etcd/peer", "etcd/ca"), ("etcd/healthcheck-client", "etcd/ca"),
                     ("apiserver-etcd-client", "etcd/ca")):
        assert openssl_out("verify", "-CAfile", str(pki / f"{ca}.crt"), str(pki / f"{leaf}.crt")).strip().endswith(
            "OK"), leaf
        assert (pki / f"{leaf}.key").stat().st_mode & 0o777 == 0o600
    assert {name: (pki / f"{name}.crt").read_bytes() for name in cas} == cas  # the CAs were kept
    sans = openssl_out("x509", "-in", str(pki / "apiserver.crt"), "-noout", "-ext", "subjectAltName")
    for want in ("DNS:node1", "DNS:kubernetes.default.svc.cluster.local", "IP Address:10.96.0.1",
                 "IP Address:127.0.0.1", f"IP Address:{ENDPOINT_IP}"):
        assert want in sans
    subject = openssl_out("x509", "-in", str(pki / "apiserver-kubelet-client.crt"), "-noout", "-subject")
    assert "O = kubeadm:cluster-admins" in subject


def test_kubeconfigs_are_issued_from_the_openssl_ca(node: tuple[Path, Path], tmp_path: Path,
                                                    copy_pki: Callable[[Path, str], None]) -> None:
    root, cfg = node
    pki = pki_dir(root)
    copy_pki(pki, "full")
    result = run_kubeadm(root, "init", "phase", "kubeconfig", "all", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    expected = {
        "admin.conf": ("CN = kubernetes-admin", "O = kubeadm:cluster-admins", f"https://{ENDPOINT_IP}:"),
        "super-admin.conf": ("CN = kubernetes-super-admin", "O = system:masters", f"https://{ENDPOINT_IP}:"),
        "kubelet.conf": ("CN = system:node:node1", "O = system:nodes", f"https://{ENDPOINT_IP}:"),
        "controller-manager.conf": ("CN = system:kube-controller-manager", "", "https://127.0.0.1:"),
        "scheduler.conf": ("CN = system:kube-scheduler", "", "https://127.0.0.1:"),
    }
    for name, (cn, org, server) in expected.items():
        path = root / "etc/kubernetes" / name
        assert path.stat().st_mode & 0o777 == 0o600
        doc = yaml.safe_load(path.read_text())
        assert doc["clusters"][0]["cluster"]["server"].startswith(server), name
        cert_file = tmp_path / f"{name}.crt"
        cert_file.write_bytes(base64.b64decode(doc["users"][0]["user"]["client-certificate-data"]))
        subject = openssl_out("x509", "-in", str(cert_file), "-noout", "-subject")
        assert cn in subject and org in subject, (name, subject)
        assert openssl_out("verify", "-CAfile", str(pki / "ca.crt"), str(cert_file)).strip().endswith("OK")
    # The real client reads what kubeadm wrote.
    view = subprocess.run(["kubectl", "--kubeconfig", str(root / "etc/kubernetes/admin.conf"), "config", "view",
                           "-o", "jsonpath={.contexts[0].name} {.clusters[0].cluster.server}"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    port = next(yaml.safe_load_all(cfg.read_text()))["localAPIEndpoint"]["bindPort"]
    assert view == f"kubernetes-admin@kubernetes https://{ENDPOINT_IP}:{port}"
    rerun = run_kubeadm(root, "init", "phase", "kubeconfig", "all", f"--config={cfg}")
    assert rerun.returncode == 0, rerun.stderr
    assert '[kubeconfig] Using existing kubeconfig file: "/etc/kubernetes/admin.conf"' in rerun.stdout


def _external_ca(pki: Path) -> None:
    (pki / "ca.key").unlink()
    (pki / "apiserver.crt").unlink()
    (pki / "apiserver.key").unlink()


def _expired(pki: Path) -> None:
    make_leaf(pki, "apiserver", "ca", "/CN=kube-apiserver", server=True, sans=apiserver_sans(), days=-1)


def _sans_miss_endpoint(pki: Path) -> None:
    make_leaf(pki, "apiserver", "ca", "/CN=kube-apiserver", server=True, sans=apiserver_sans(extra_ips=()))


def _key_mismatch(pki: Path) -> None:
    ec_key(pki / "apiserver.key")


def _other_ca(pki: Path) -> None:
    make_ca(pki, "other-ca", "someone-else")
    make_leaf(pki, "apiserver", "other-ca", "/CN=kube-apiserver", server=True, sans=apiserver_sans())
    for ext in ("crt", "key"):
        (pki / f"other-ca.{ext}").unlink()


def _not_a_cert(pki: Path) -> None:
    (pki / "front-proxy-client.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")


def _wrong_server(pki: Path) -> None:
    root = pki.parent.parent.parent
    # A kubeconfig made for another endpoint (the current one with another port).
    cfg = pki.parent / "other.yaml"
    cfg.write_text(config_v1beta4(port=1, healthz_port=2))
    result = run_kubeadm(root, "init", "phase", "kubeconfig", "admin", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    cfg.unlink()


def _sa_mismatch(pki: Path) -> None:
    ec_key(pki / "other-sa.key")
    openssl_out("pkey", "-in", str(pki / "other-sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    (pki / "other-sa.key").unlink()


BROKEN: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("external-ca-leaf-missing", _external_ca, ["external CA mode", "apiserver.crt: file does not exist"]),
    ("expired", _expired, ["/etc/kubernetes/pki/apiserver.crt: certificate has expired (not after"]),
    ("sans", _sans_miss_endpoint, [f'/etc/kubernetes/pki/apiserver.crt: SANs do not cover "{ENDPOINT_IP}"']),
    ("key-mismatch", _key_mismatch, ["/etc/kubernetes/pki/apiserver.key: private key does not match certificate"]),
    ("other-ca", _other_ca, ["apiserver.crt: certificate is not signed by the CA in /etc/kubernetes/pki/ca.crt"]),
    ("sa-mismatch", _sa_mismatch, ["/etc/kubernetes/pki/sa.pub: public key does not match /etc/kubernetes/pki/sa.key"]),
    ("not-pem", _not_a_cert, ["front-proxy-client.crt: not a readable PEM certificate"]),
    ("kubeconfig-server", _wrong_server,
     ['a kubeconfig file "/etc/kubernetes/admin.conf" exists already but has got the wrong API Server URL']),
]


@pytest.mark.parametrize(("breaker", "messages"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_pki_fails_init_and_changes_nothing(node: tuple[Path, Path], breaker: Callable[[Path], None],
                                                    messages: list[str], copy_pki: Callable[[Path, str], None]) -> None:
    root, cfg = node
    copy_pki(pki_dir(root), "full")
    breaker(pki_dir(root))
    pki_before, manifests_before = tree_hash(pki_dir(root)), tree_hash(root / "etc/kubernetes/manifests")
    kubernetes_before = tree_hash(root / "etc/kubernetes")
    result = run_kubeadm(root, "init", f"--config={cfg}", "--ignore-preflight-errors=all")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error execution phase" in result.stderr
    for message in messages:
        assert message in result.stderr
    assert tree_hash(pki_dir(root)) == pki_before
    assert tree_hash(root / "etc/kubernetes/manifests") == manifests_before
    assert tree_hash(root / "etc/kubernetes") == kubernetes_before
    assert not (root / "var/lib/kubelet").exists()


def test_external_ca_with_every_file_present_is_used_keyless(node: tuple[Path, Path],
                                                             copy_pki: Callable[[Path, str], None]) -> None:
    root, cfg = node
    pki = pki_dir(root)
    copy_pki(pki, "full")
    assert run_kubeadm(root, "init", "phase", "kubeconfig", "all", f"--config={cfg}").returncode == 0
    (pki / "ca.key").unlink()
    before = tree_hash(root / "etc/kubernetes")
    result = run_kubeadm(root, "init", "phase", "certs", "all", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    assert "[certs] Using existing ca keyless certificate authority" in result.stdout
    assert run_kubeadm(root, "init", "phase", "kubeconfig", "all", f"--config={cfg}").returncode == 0
    assert tree_hash(root / "etc/kubernetes") == before
    (root / "etc/kubernetes/scheduler.conf").unlink()
    result = run_kubeadm(root, "init", "phase", "kubeconfig", "scheduler", f"--config={cfg}")
    assert result.returncode == 1
    assert 'external CA mode: the CA key is absent, so "/etc/kubernetes/scheduler.conf" must be provided' in \
        result.stderr


def test_rsa_encryption_algorithm_and_validity_period(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cfg = tmp_path / "kubeadm.yaml"
    cfg.write_text(config_v1beta4(port=free_port(), healthz_port=free_port()).replace(
        "encryptionAlgorithm: ECDSA-P256", "encryptionAlgorithm: RSA-2048\ncertificateValidityPeriod: 48h0m0s"))
    result = run_kubeadm(root, "init", "phase", "certs", "apiserver", f"--config={cfg}")
    assert result.returncode == 1  # no CA yet and the `ca` sub-phase is not part of this run
    assert "couldn't load the ca certificate authority" in result.stderr
    for sub in ("ca", "apiserver"):
        result = run_kubeadm(root, "init", "phase", "certs", sub, f"--config={cfg}")
        assert result.returncode == 0, result.stderr
    text = openssl_out("x509", "-in", str(pki_dir(root) / "apiserver.crt"), "-noout", "-text")
    assert "Public-Key: (2048 bit)" in text and "rsaEncryption" in text
    assert (pki_dir(root) / "apiserver.key").read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    end = openssl_out("x509", "-in", str(pki_dir(root) / "apiserver.crt"), "-noout", "-checkend", str(47 * 3600))
    assert "will not expire" in end
    with pytest.raises(subprocess.CalledProcessError):
        openssl_out("x509", "-in", str(pki_dir(root) / "apiserver.crt"), "-noout", "-checkend", str(49 * 3600))


def test_rsa_sa_key_with_pkcs1_public_key_is_reused(node: tuple[Path, Path], copy_pki: Callable[[Path, str], None]
                                                   ) -> None:
    root, cfg = node
    pki = pki_dir(root)
    copy_pki(pki, "full")
    openssl_out("genrsa", "-out", str(pki / "sa.key"), "2048")
    openssl_out("rsa", "-in", str(pki / "sa.key"), "-RSAPublicKey_out", "-out", str(pki / "sa.pub"))
    assert (pki / "sa.pub").read_text().startswith("-----BEGIN RSA PUBLIC KEY-----")
    before = tree_hash(pki)
    result = run_kubeadm(root, "init", "phase", "certs", "sa", f"--config={cfg}")
    assert result.returncode == 0, result.stderr
    assert '[certs] Using the existing "sa" key' in result.stdout
    assert tree_hash(pki) == before
