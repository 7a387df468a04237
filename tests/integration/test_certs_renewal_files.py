"""Certificates on disk, checked with openssl: a changed endpoint name or node IP re-issues exactly the affected
files on the next install (certs state) and never the CAs; a renewal re-issues every leaf and kubeconfig from the
same CAs (the kubelet's rotatable pem instead of kubelet.conf after kubelet-finalize), and a renewal that cannot
be done changes nothing."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from stepkit import make_config, make_ctx, with_k8s

from lifecycle.config import Config
from lifecycle.pki_specs import PkiParams
from lifecycle.pki_x509 import load_cert
from lifecycle.renewal import RenewalError, RenewedFile, plan_renewal, write_renewal
from states.certs import Certs

CAS = ("ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key")
KUBELET_PEM = "/var/lib/kubelet/pki/kubelet-client-current.pem"


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in after if before.get(k) != after[k])


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "root")


async def _install_certs(config: Config) -> dict[str, str]:
    ctx, _ = make_ctx(config)
    await Certs().run(ctx)
    return tree(config.root)


async def test_a_new_endpoint_name_reissues_the_apiserver_cert_and_endpoint_kubeconfigs_not_the_cas(
    config: Config,
) -> None:
    before = await _install_certs(config)
    moved, _ = make_ctx(with_k8s(config, endpoint_name="k8s.example.test"))
    assert not await Certs().is_done(moved)
    await Certs().run(moved)
    assert changed(before, tree(config.root)) == [
        "etc/kubernetes/admin.conf", "etc/kubernetes/kubelet.conf", "etc/kubernetes/pki/apiserver.crt",
        "etc/kubernetes/pki/apiserver.key", "etc/kubernetes/super-admin.conf", "var/lib/lifecycle/kubeadm.yaml",
    ]
    sans = _openssl(["x509", "-noout", "-ext", "subjectAltName", "-in",
                     str(moved.paths.pki_dir / "apiserver.crt")])
    assert "DNS:k8s.example.test" in sans
    assert await Certs().is_done(moved)


async def test_a_new_node_ip_reissues_what_names_it_and_keeps_the_cas(config: Config) -> None:
    before = await _install_certs(config)
    moved, _ = make_ctx(with_k8s(config, node_ip="127.0.0.2"))
    await Certs().run(moved)
    assert changed(before, tree(config.root)) == [
        "etc/kubernetes/controller-manager.conf", "etc/kubernetes/pki/apiserver.crt",
        "etc/kubernetes/pki/apiserver.key", "etc/kubernetes/pki/etcd/peer.crt", "etc/kubernetes/pki/etcd/peer.key",
        "etc/kubernetes/pki/etcd/server.crt", "etc/kubernetes/pki/etcd/server.key",
        "etc/kubernetes/scheduler.conf", "var/lib/lifecycle/kubeadm.yaml",
    ]
    for name in ("apiserver.crt", "etcd/server.crt"):
        assert "IP Address:127.0.0.2" in _openssl(["x509", "-noout", "-ext", "subjectAltName", "-in",
                                                   str(moved.paths.pki_dir / name)])


def _openssl(args: list[str]) -> str:
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _finalize_kubelet_conf(root: Path) -> Path:
    """What the kubelet's certificate store does at its first start (kubelet.conf's embedded pair into a dated pem,
    `kubelet-client-current.pem` a symlink to it), then kubeadm's kubelet-finalize (kubelet.conf points at the
    symlink). Returns the dated file."""
    conf = root / "etc/kubernetes/kubelet.conf"
    doc = yaml.safe_load(conf.read_text())
    user = doc["users"][0]["user"]
    pem = base64.b64decode(user["client-certificate-data"]) + base64.b64decode(user["client-key-data"])
    current = root / KUBELET_PEM.lstrip("/")
    current.parent.mkdir(parents=True)
    dated = current.with_name("kubelet-client-2026-01-02-03-04-05.pem")
    dated.write_bytes(pem)
    dated.chmod(0o600)
    current.symlink_to(dated)
    doc["users"][0]["user"] = {"client-certificate": KUBELET_PEM, "client-key": KUBELET_PEM}
    conf.write_text(yaml.safe_dump(doc))
    return dated


def _params(config: Config) -> PkiParams:
    return PkiParams.from_config(config, api_port=16443)


async def test_renewal_reissues_every_leaf_and_kubeconfig_from_the_same_cas(config: Config) -> None:
    await _install_certs(config)
    root = config.root
    first_dated = _finalize_kubelet_conf(root)
    first_pem = first_dated.read_bytes()
    before = tree(root)
    pki = root / "etc/kubernetes/pki"
    serials = {p.name: load_cert(p.read_bytes()).serial_number for p in pki.rglob("*.crt")}

    names = write_renewal(plan_renewal(make_ctx(config)[0].paths, _params(config), now=datetime.now(UTC)))

    after = tree(root)
    assert len(names) == 19 and KUBELET_PEM in names and "kubelet.conf" not in names
    pem = root / KUBELET_PEM.lstrip("/")
    dated = pem.readlink()
    assert changed(before, after) == sorted(
        [f"etc/kubernetes/pki/{n}" for n in names if not n.endswith(".conf") and not n.startswith("/")]
        + [f"etc/kubernetes/{n}" for n in names if n.endswith(".conf")]
        + [KUBELET_PEM.lstrip("/"), str(dated.relative_to(root))])
    assert all(before[f"etc/kubernetes/pki/{ca}"] == after[f"etc/kubernetes/pki/{ca}"] for ca in CAS)
    assert before["etc/kubernetes/pki/sa.key"] == after["etc/kubernetes/pki/sa.key"]
    assert before["etc/kubernetes/kubelet.conf"] == after["etc/kubernetes/kubelet.conf"]
    for cert in sorted(pki.rglob("*.crt")):
        rel = str(cert.relative_to(pki))
        if rel in CAS:
            continue
        ca = "etcd/ca.crt" if rel.startswith("etcd/") or rel == "apiserver-etcd-client.crt" else \
            "front-proxy-ca.crt" if rel.startswith("front-proxy") else "ca.crt"
        assert _openssl(["verify", "-CAfile", str(pki / ca), str(cert)]).strip().endswith(": OK")
        assert load_cert(cert.read_bytes()).serial_number != serials[cert.name]
    _check_kubelet_store(pem, previous=first_dated, previous_pem=first_pem)
    assert _openssl(["verify", "-CAfile", str(pki / "ca.crt"), str(pem)]).strip().endswith(": OK")
    for key in [*pki.rglob("*.key"), *(root / "etc/kubernetes").glob("*.conf")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not list(root.rglob(".*renew-*")), "no staged file is left behind"
    ctx, _ = make_ctx(config)
    assert await Certs().is_done(ctx), "the certs state accepts what the renewal wrote"


def _check_kubelet_store(pem: Path, *, previous: Path, previous_pem: bytes) -> None:
    """The kubelet's certificate store can rotate after us (client-go certificate_store.go updateSymlink): the
    current pem is a symlink (absolute) to a new dated pem, 0600, holding the new pair; the old one is kept; the
    store's temporary `-updated.pem` link is gone."""
    assert pem.is_symlink(), "kubelet-client-current.pem must stay a symlink: the kubelet cannot rotate a file"
    target = pem.readlink()
    assert target.is_absolute() and target.parent == pem.parent, target
    assert re.fullmatch(r"kubelet-client-\d{4}(-\d\d){5}\.pem", target.name), target.name
    assert target != previous and previous.read_bytes() == previous_pem, "the previous dated pem is kept as it was"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    data = target.read_bytes()
    assert b"CERTIFICATE" in data and b"PRIVATE KEY" in data
    assert load_cert(data).serial_number != load_cert(previous_pem).serial_number
    assert not (pem.parent / "kubelet-client-updated.pem").exists()


async def test_renewal_turns_a_plain_kubelet_pem_into_the_symlink_the_kubelet_rotates(config: Config) -> None:
    """A pem left as a plain file (by a renewal of an older version) is turned back into the store's symlink."""
    await _install_certs(config)
    root = config.root
    dated = _finalize_kubelet_conf(root)
    pem = root / KUBELET_PEM.lstrip("/")
    pem.unlink()
    plain = dated.read_bytes()
    dated.rename(pem)
    write_renewal(plan_renewal(make_ctx(config)[0].paths, _params(config), now=datetime.now(UTC)))
    assert pem.is_symlink()
    assert load_cert(pem.read_bytes()).serial_number != load_cert(plain).serial_number


async def test_a_stray_file_where_the_kubelet_keeps_its_temporary_link_refuses_the_renewal(config: Config) -> None:
    await _install_certs(config)
    root = config.root
    _finalize_kubelet_conf(root)
    (root / "var/lib/kubelet/pki/kubelet-client-updated.pem").write_bytes(b"not a link")
    before = tree(root)
    with pytest.raises(RenewalError, match="expected a symlink"):
        write_renewal(plan_renewal(make_ctx(config)[0].paths, _params(config), now=datetime.now(UTC)))
    assert tree(root) == before, "refused while staging: nothing changed"


@pytest.mark.parametrize("damage", ["missing CA key", "expired CA"])
async def test_a_renewal_that_cannot_be_done_changes_nothing(config: Config, damage: str) -> None:
    await _install_certs(config)
    pki = config.root / "etc/kubernetes/pki"
    now = datetime.now(UTC)
    if damage == "missing CA key":
        (pki / "front-proxy-ca.key").unlink()
    else:
        now = load_cert((pki / "etcd/ca.crt").read_bytes()).not_valid_after_utc + timedelta(seconds=1)
    before = tree(config.root)
    with pytest.raises(RenewalError) as err:
        plan_renewal(make_ctx(config)[0].paths, _params(config), now=now)
    assert err.value.file == ("front-proxy-ca.key" if damage == "missing CA key" else "ca.crt")
    assert "PRIVATE KEY" not in str(err.value)
    assert tree(config.root) == before


async def test_a_failure_while_staging_leaves_every_file_as_it_was(config: Config) -> None:
    await _install_certs(config)
    files = plan_renewal(make_ctx(config)[0].paths, _params(config), now=datetime.now(UTC))
    before = tree(config.root)
    broken = [*files[:-1], RenewedFile(files[-1].name, config.root / "no/such/dir/x.conf", b"x", 0o600)]
    with pytest.raises(FileNotFoundError):
        write_renewal(broken)
    assert tree(config.root) == before
