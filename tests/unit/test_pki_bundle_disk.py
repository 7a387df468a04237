"""Putting a checked bundle in place: exactly its files with the right modes, all or nothing, an identical bundle
accepted in any state without a write, a different one refused once kubeadm has run on the PKI in place."""

from __future__ import annotations

import errno
import hashlib
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from lifecycle import pki_bundle_disk
from lifecycle.config import Config
from lifecycle.errors import RequestError
from lifecycle.logging import get_logger
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.pki import plan_pki
from lifecycle.pki_bundle import PkiBundle, load_bundle
from lifecycle.pki_bundle_disk import bundle_prepare, cluster_on_pki, same_as_disk, write_bundle
from lifecycle.pki_specs import PkiParams
from lifecycle.pki_x509 import load_key

CONFIG = Config(node_name="node1")
PARAMS = PkiParams.from_config(CONFIG, api_port=6443)
CAS = ("ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "etcd/ca.crt", "etcd/ca.key", "sa.key",
       "sa.pub")


def generated(*, full: bool = False) -> dict[str, str]:
    planned, _ = plan_pki({}, PARAMS, now=datetime.now(UTC), kubeconfigs=False)
    return {p.name: p.data.decode() for p in planned if full or p.name in CAS}


def bundle_of(files: dict[str, str]) -> PkiBundle:
    return load_bundle(files, PARAMS, now=datetime.now(UTC))


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{oct(p.stat().st_mode)}"
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_writes_exactly_the_bundle_with_key_and_cert_modes(tmp_path: Path) -> None:
    pki = tmp_path / "etc/kubernetes/pki"
    bundle = bundle_of(generated())
    write_bundle(bundle, pki)
    assert sorted(str(p.relative_to(pki)) for p in pki.rglob("*") if p.is_file()) == sorted(CAS)
    for name in CAS:
        mode = stat.S_IMODE((pki / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
        assert (pki / name).read_bytes() == bundle.files[name]
    assert stat.S_IMODE(pki.stat().st_mode) == 0o755
    assert [p.name for p in pki.parent.iterdir()] == ["pki"], "a staging dir was left behind"


def test_replaces_the_whole_previous_pki(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    write_bundle(bundle_of(generated(full=True)), pki)
    assert (pki / "etcd/peer.key").exists()
    write_bundle(bundle_of(generated()), pki)
    assert sorted(str(p.relative_to(pki)) for p in pki.rglob("*") if p.is_file()) == sorted(CAS)


def test_a_failure_while_staging_leaves_the_old_pki_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = tmp_path / "pki"
    write_bundle(bundle_of(generated(full=True)), pki)
    before = tree(pki)
    real_write = pki_bundle_disk._write_new
    calls: list[Path] = []

    def failing(path: Path, data: bytes, mode: int) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data, mode)

    monkeypatch.setattr(pki_bundle_disk, "_write_new", failing)
    with pytest.raises(OSError, match="No space"):
        write_bundle(bundle_of(generated()), pki)
    assert tree(pki) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pki"]


def test_without_an_atomic_exchange_two_renames_do_the_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(pki_bundle_disk, "_exchange", unsupported)
    pki = tmp_path / "pki"
    write_bundle(bundle_of(generated(full=True)), pki)
    write_bundle(bundle_of(generated()), pki)
    assert sorted(str(p.relative_to(pki)) for p in pki.rglob("*") if p.is_file()) == sorted(CAS)
    assert [p.name for p in tmp_path.iterdir()] == ["pki"]


def test_identical_means_the_same_certificates_and_keys_whatever_the_pem_flavour(tmp_path: Path) -> None:
    files = generated()
    pki = tmp_path / "pki"
    write_bundle(bundle_of(files), pki)
    pkcs8 = load_key(files["ca.key"].encode()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    same = {**files, "ca.key": pkcs8.decode(), "ca.crt": files["ca.crt"].replace("\n", "\r\n")}
    assert same_as_disk(bundle_of(same), pki)
    assert same_as_disk(bundle_of(files), pki)
    assert not same_as_disk(bundle_of(generated()), pki)  # other CAs
    (pki / "sa.pub").unlink()
    assert not same_as_disk(bundle_of(files), pki)


def test_which_states_let_a_bundle_replace_the_pki(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    assert cluster_on_pki(State.IDLE, None, paths) is None
    assert cluster_on_pki(State.FAILED, 4, paths) is None  # binaries failed: kubeadm never ran
    assert cluster_on_pki(State.FAILED, 5, paths) is None  # network failed: kubeadm never ran either
    for state, step in ((State.RUNNING, None), (State.IMAGES, 3), (State.FAILED, 6), (State.FAILED, None)):
        why = cluster_on_pki(state, step, paths)
        assert why is not None and ("runs on it" in why or "may run on it" in why), (state, step, why)
    paths.manifests_dir.mkdir(parents=True)
    (paths.manifests_dir / "kube-apiserver.yaml").write_text("kind: Pod\n")
    assert "etc/kubernetes/manifests/kube-apiserver.yaml exists" in str(cluster_on_pki(State.IDLE, None, paths))


async def test_the_install_hook_writes_refuses_or_keeps(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    log = get_logger("test")
    files = generated()
    prepare = await bundle_prepare(files, config=CONFIG, paths=paths, log=log)
    await prepare(State.IDLE, None)
    written = tree(paths.pki_dir)
    assert sorted(written) == sorted(CAS)

    await prepare(State.RUNNING, None)  # identical: fine anywhere, nothing written
    assert tree(paths.pki_dir) == written

    other = await bundle_prepare(generated(), config=CONFIG, paths=paths, log=log)
    with pytest.raises(RequestError) as info:
        await other(State.RUNNING, None)
    assert info.value.code == "reset_required" and info.value.message.endswith("reset first")
    assert tree(paths.pki_dir) == written


def test_the_swap_is_one_atomic_exchange_here(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from-a").touch()
    (b / "from-b").touch()
    pki_bundle_disk._exchange(a, b)  # renameat2(RENAME_EXCHANGE): ext4, xfs, btrfs, tmpfs support it
    assert [p.name for p in a.iterdir()] == ["from-b"] and [p.name for p in b.iterdir()] == ["from-a"]
