"""The PKI planner and checker: what kubeadm would make, checked with the real openssl and kubectl; valid files
kept byte for byte, only what a change invalidates re-issued."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lifecycle.kubefiles import parse_kubeconfig
from lifecycle.pki import (
    PkiError,
    PlannedFile,
    earliest_expiry,
    plan_pki,
    read_existing,
    rooted_reader,
    validate_pki,
    write_files,
)
from lifecycle.pki_specs import CERT_NAMES, PkiParams, cert_specs
from lifecycle.pki_x509 import load_cert, load_key

NOW = datetime.now(UTC)
PARAMS = PkiParams(node_name="node-a", node_ip="192.168.65.3", endpoint_name="kubernetes.docker.internal",
                   api_port=6443, extra_sans=("api.example.test", "10.20.30.40"))
LEAVES = {  # name -> (CA, CN, O, serverAuth, clientAuth)
    "apiserver": ("ca", "kube-apiserver", [], True, False),
    "apiserver-kubelet-client": ("ca", "kube-apiserver-kubelet-client", ["kubeadm:cluster-admins"], False, True),
    "front-proxy-client": ("front-proxy-ca", "front-proxy-client", [], False, True),
    "etcd/server": ("etcd/ca", "node-a", [], True, True),
    "etcd/peer": ("etcd/ca", "node-a", [], True, True),
    "etcd/healthcheck-client": ("etcd/ca", "kube-etcd-healthcheck-client", [], False, True),
    "apiserver-etcd-client": ("etcd/ca", "kube-apiserver-etcd-client", [], False, True),
}


def make(tmp_path: Path, params: PkiParams = PARAMS, *, now: datetime = NOW) -> tuple[Path, Path]:
    kube_dir, pki_dir = tmp_path / "etc/kubernetes", tmp_path / "etc/kubernetes/pki"
    files, _ = plan_pki(read_existing(pki_dir, kube_dir), params, now=now)
    write_files(files, pki_dir=pki_dir, kubeconfig_dir=kube_dir)
    return pki_dir, kube_dir


def replan(pki_dir: Path, kube_dir: Path, params: PkiParams = PARAMS, *, now: datetime = NOW) -> list[PlannedFile]:
    files, _ = plan_pki(read_existing(pki_dir, kube_dir), params, now=now,
                        read_file=rooted_reader(kube_dir.parent.parent, kube_dir))
    return files


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def cert(pki_dir: Path, name: str) -> x509.Certificate:
    return load_cert((pki_dir / f"{name}.crt").read_bytes())


def sans(c: x509.Certificate) -> set[str]:
    ext = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)) | {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def openssl_verify(ca: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(leaf)], capture_output=True, text=True,
                          check=False)


def test_every_leaf_verifies_against_its_ca_with_openssl(tmp_path: Path) -> None:
    pki_dir, _ = make(tmp_path)
    for name, (ca, *_rest) in LEAVES.items():
        result = openssl_verify(pki_dir / f"{ca}.crt", pki_dir / f"{name}.crt")
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    wrong = openssl_verify(pki_dir / "etcd/ca.crt", pki_dir / "apiserver.crt")
    assert wrong.returncode != 0, "the check can fail: apiserver is not signed by the etcd CA"


def test_subjects_usages_and_constraints_are_kubeadms(tmp_path: Path) -> None:
    pki_dir, _ = make(tmp_path)
    for name, (_ca, cn, orgs, server, client) in LEAVES.items():
        c = cert(pki_dir, name)
        assert [a.value for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [cn], name
        assert [a.value for a in c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == orgs, name
        ekus = set(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert (ExtendedKeyUsageOID.SERVER_AUTH in ekus, ExtendedKeyUsageOID.CLIENT_AUTH in ekus) == (server, client)
        assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = c.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
        assert (c.not_valid_after_utc - NOW).days in (364, 365)
    for ca, cn in (("ca", "kubernetes"), ("front-proxy-ca", "front-proxy-ca"), ("etcd/ca", "etcd-ca")):
        c = cert(pki_dir, ca)
        assert c.subject.rfc4514_string() == f"CN={cn}"
        assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert c.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        assert (c.not_valid_after_utc - NOW).days in (3649, 3650)
        assert c.not_valid_before_utc < NOW - timedelta(minutes=4)  # backdated like kubeadm


def test_sans_cover_kubeadms_names(tmp_path: Path) -> None:
    pki_dir, _ = make(tmp_path)
    assert sans(cert(pki_dir, "apiserver")) == {
        "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
        "10.96.0.1", "node-a", "192.168.65.3", "kubernetes.docker.internal", "api.example.test", "10.20.30.40",
    }
    for name in ("etcd/server", "etcd/peer"):
        assert sans(cert(pki_dir, name)) == {"node-a", "localhost", "192.168.65.3", "127.0.0.1", "::1"}


def test_file_modes_keys_0600_certs_0644(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    for path in pki_dir.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == (0o600 if path.suffix == ".key" else 0o644), path
    assert (pki_dir / "sa.pub").stat().st_mode & 0o777 == 0o644
    for conf in kube_dir.glob("*.conf"):
        assert conf.stat().st_mode & 0o777 == 0o600, conf
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()], "no temp files left"


def test_kubeconfigs_work_with_real_kubectl_and_name_the_right_identities(tmp_path: Path) -> None:
    params = replace(PARAMS, cluster_name="docker-desktop", user_name="docker-desktop", context_name="docker-desktop")
    pki_dir, kube_dir = make(tmp_path, params)
    expected = {
        "admin.conf": ("kubernetes-admin", ["kubeadm:cluster-admins"], "https://kubernetes.docker.internal:6443"),
        "super-admin.conf": ("kubernetes-super-admin", ["system:masters"], "https://kubernetes.docker.internal:6443"),
        "kubelet.conf": ("system:node:node-a", ["system:nodes"], "https://kubernetes.docker.internal:6443"),
        "controller-manager.conf": ("system:kube-controller-manager", [], "https://192.168.65.3:6443"),
        "scheduler.conf": ("system:kube-scheduler", [], "https://192.168.65.3:6443"),
    }
    for name, (cn, orgs, server) in expected.items():
        out = subprocess.run(["kubectl", "--kubeconfig", str(kube_dir / name), "config", "view", "--minify",
                              "--raw", "-o", "json"], capture_output=True, text=True, check=True).stdout
        view = yaml.safe_load(out)
        assert view["clusters"][0]["cluster"]["server"] == server
        content = parse_kubeconfig((kube_dir / name).read_bytes(), read_file=lambda _: b"")
        client = load_cert(content.cert_pem)
        assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        assert [a.value for a in client.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == orgs
        assert content.ca_pem == (pki_dir / "ca.crt").read_bytes()
    admin = yaml.safe_load((kube_dir / "admin.conf").read_text())
    assert admin["current-context"] == "docker-desktop"
    assert admin["users"][0]["name"] == "docker-desktop" and admin["clusters"][0]["name"] == "docker-desktop"


def test_a_valid_pki_is_kept_byte_for_byte(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    before = snapshot(tmp_path)
    assert validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir, root=tmp_path) == []
    assert replan(pki_dir, kube_dir) == []
    make(tmp_path)
    assert snapshot(tmp_path) == before


def test_changed_extra_sans_reissue_only_the_apiserver_cert(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    changed = replace(PARAMS, extra_sans=("api.example.test", "10.20.30.40", "new.example.test"))
    assert [p.file for p in validate_pki(pki_dir, changed, kubeconfig_dir=kube_dir)] == ["apiserver.crt"]
    assert sorted(f.name for f in replan(pki_dir, kube_dir, changed)) == ["apiserver.crt", "apiserver.key"]
    before = snapshot(tmp_path)
    make(tmp_path, changed)
    after = snapshot(tmp_path)
    assert {k for k in before if before[k] != after[k]} == {"etc/kubernetes/pki/apiserver.crt",
                                                            "etc/kubernetes/pki/apiserver.key"}
    assert "new.example.test" in sans(cert(pki_dir, "apiserver"))


def test_changed_node_ip_reissues_only_what_names_it(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    changed = replace(PARAMS, node_ip="192.168.65.9")
    names = sorted(f.name for f in replan(pki_dir, kube_dir, changed))
    # The node IP is in the apiserver and etcd SANs and in the control plane's kubeconfig server URL.
    assert names == ["apiserver.crt", "apiserver.key", "controller-manager.conf", "etcd/peer.crt", "etcd/peer.key",
                     "etcd/server.crt", "etcd/server.key", "scheduler.conf"]


def test_expired_leaves_are_reissued_from_the_kept_ca(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path, now=NOW - timedelta(days=400))  # leaves expired 35 days ago
    ca_before = (pki_dir / "ca.crt").read_bytes()
    problems = validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir)
    assert any(p.file == "apiserver.crt" and "certificate has expired" in p.reason for p in problems)
    make(tmp_path)
    assert (pki_dir / "ca.crt").read_bytes() == ca_before
    assert cert(pki_dir, "apiserver").not_valid_after_utc > NOW + timedelta(days=300)
    assert openssl_verify(pki_dir / "ca.crt", pki_dir / "apiserver.crt").returncode == 0
    assert validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir) == []


def test_a_leaf_close_to_expiry_is_renewed(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    problems = validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir, now=NOW + timedelta(days=340))
    assert any(p.file == "apiserver.crt" and "expires within 30 days" in p.reason for p in problems)


def test_a_mismatched_key_is_detected_and_reissued(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    (pki_dir / "apiserver.key").write_bytes((pki_dir / "front-proxy-client.key").read_bytes())
    problems = validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir)
    assert [str(p) for p in problems] == ["apiserver.crt: private key does not match certificate"]
    assert sorted(f.name for f in replan(pki_dir, kube_dir)) == ["apiserver.crt", "apiserver.key"]


def test_missing_ca_means_a_new_tree_and_kubeconfigs(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    (pki_dir / "ca.crt").unlink()
    (pki_dir / "ca.key").unlink()
    names = {f.name for f in replan(pki_dir, kube_dir)}
    assert {"ca.crt", "apiserver.crt", "apiserver-kubelet-client.crt", "admin.conf", "kubelet.conf"} <= names
    assert not names & {"etcd/ca.crt", "etcd/server.crt", "front-proxy-ca.crt", "sa.key"}


def test_ca_without_key_cannot_issue_and_says_so(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    (pki_dir / "ca.key").unlink()
    assert validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir) == []  # external CA: valid while nothing is due
    (pki_dir / "apiserver.crt").unlink()
    with pytest.raises(PkiError, match=r"ca.key: missing \(external CA mode\): cannot issue apiserver"):
        replan(pki_dir, kube_dir)
    assert [p.file for p in validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir)] == ["ca.key"]


def test_kubeconfig_with_wrong_server_is_reissued(tmp_path: Path) -> None:
    pki_dir, kube_dir = make(tmp_path)
    admin = kube_dir / "admin.conf"
    admin.write_text(admin.read_text().replace("kubernetes.docker.internal:6443", "elsewhere:6443"))
    problems = validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir)
    assert [p.file for p in problems] == ["admin.conf"] and "wrong API server URL" in problems[0].reason


def test_kubelet_conf_pointing_at_a_rooted_pem_file_is_accepted(tmp_path: Path) -> None:
    """After kubelet-finalize, kubelet.conf names /var/lib/kubelet/pki/kubelet-client-current.pem (a real path)."""
    pki_dir, kube_dir = make(tmp_path)
    conf = yaml.safe_load((kube_dir / "kubelet.conf").read_text())
    user = conf["users"][0]["user"]
    content = parse_kubeconfig((kube_dir / "kubelet.conf").read_bytes(), read_file=lambda _: b"")
    pem = tmp_path / "var/lib/kubelet/pki/kubelet-client-current.pem"
    pem.parent.mkdir(parents=True)
    pem.write_bytes(content.cert_pem + content.key_pem)
    del user["client-certificate-data"], user["client-key-data"]
    user["client-certificate"] = user["client-key"] = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    (kube_dir / "kubelet.conf").write_text(yaml.safe_dump(conf))
    assert validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir, root=tmp_path) == []
    pem.unlink()
    assert [p.file for p in validate_pki(pki_dir, PARAMS, kubeconfig_dir=kube_dir, root=tmp_path)] == ["kubelet.conf"]


def test_rsa_option_makes_rsa_2048_keys(tmp_path: Path) -> None:
    params = replace(PARAMS, key_algorithm="rsa-2048")
    pki_dir, _ = make(tmp_path, params)
    for name in ("ca", "apiserver", "etcd/server"):
        key = load_key((pki_dir / f"{name}.key").read_bytes())
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
        assert (pki_dir / f"{name}.key").read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert openssl_verify(pki_dir / "ca.crt", pki_dir / "apiserver.crt").returncode == 0
    ec_key = load_key(make(tmp_path / "ec")[0].joinpath("ca.key").read_bytes())
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey) and ec_key.curve.name == "secp256r1"


@pytest.mark.parametrize("bad", ["bad_name!", "-leading.example", "a..b"])
def test_bad_extra_sans_are_rejected_naming_the_key(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=rf"kubernetes.extra_sans: '{bad}' is neither"):
        plan_pki({}, replace(PARAMS, extra_sans=(bad,)), now=NOW)


def test_earliest_expiry_names_the_first_certificate_to_expire(tmp_path: Path) -> None:
    _, kube_dir = make(tmp_path)
    assert earliest_expiry(tmp_path / "nothing") is None
    first = earliest_expiry(kube_dir)
    assert first is not None and first[1] < NOW + timedelta(days=366)
    old = replace(PARAMS, cert_validity_days=10)
    files, _ = plan_pki({}, old, now=NOW)
    scheduler = next(f for f in files if f.name == "scheduler.conf")
    (kube_dir / "scheduler.conf").write_bytes(scheduler.data)
    assert earliest_expiry(kube_dir) == (kube_dir / "scheduler.conf", load_cert(
        parse_kubeconfig(scheduler.data, read_file=lambda _: b"").cert_pem).not_valid_after_utc)


def test_the_static_file_list_matches_the_specs() -> None:
    assert tuple(spec.name for spec in cert_specs(PARAMS)) == CERT_NAMES


def test_planned_files_never_show_key_material(tmp_path: Path) -> None:
    files, _ = plan_pki({}, PARAMS, now=NOW)
    key = next(f for f in files if f.name == "ca.key")
    assert b"PRIVATE KEY" in key.data
    assert "PRIVATE" not in repr(key) and "PRIVATE" not in repr(files)
