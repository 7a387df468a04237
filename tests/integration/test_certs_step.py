"""The certs step in a tmp node root: writes the PKI, kubeconfigs and kubeadm config; is done afterwards; keeps a
valid PKI untouched; re-issues only what a config change invalidates; bad input changes nothing. The simulated
kubeadm (a separate process reading the files) accepts and keeps what the step wrote."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stepkit import make_config, make_ctx, with_k8s, with_pki

from lifecycle.config import Config
from lifecycle.errors import PermanentError
from states.certs import Certs

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _engine_cgroup_driver() -> str:
    return subprocess.run(["docker", "info", "--format", "{{.CgroupDriver}}"], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "root", extra_sans=("api.example.test",))


async def test_run_writes_everything_and_then_is_done(config: Config) -> None:
    ctx, progress = make_ctx(config)
    step = Certs()
    assert not await step.is_done(ctx)
    await step.run(ctx)

    paths = ctx.paths
    assert (paths.pki_dir / "apiserver.crt").exists() and (paths.pki_dir / "etcd/peer.key").exists()
    assert all((paths.kubernetes_dir / n).exists() for n in ("admin.conf", "kubelet.conf", "scheduler.conf"))
    assert await step.is_done(ctx)
    written = [c for c in progress.calls if c["message"].startswith("wrote ")]
    assert len(written) == written[-1]["total"] == 27 and written[-1]["unit"] == "files"

    docs = list(yaml.safe_load_all(paths.kubeadm_config.read_text()))
    init, cluster, kubelet = docs
    assert init["kind"] == "InitConfiguration" and init["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert init["localAPIEndpoint"] == {"advertiseAddress": "127.0.0.1", "bindPort": 16443}
    assert init["nodeRegistration"]["name"] == "node-a" and init["nodeRegistration"]["taints"] == []
    assert init["nodeRegistration"]["kubeletExtraArgs"] == [{"name": "node-ip", "value": "127.0.0.1"}]
    assert cluster["certificatesDir"] == str(paths.pki_dir)
    assert cluster["controlPlaneEndpoint"] == "localhost:16443"
    assert cluster["kubernetesVersion"] == "v1.31.4" and cluster["encryptionAlgorithm"] == "ECDSA-P256"
    assert cluster["apiServer"]["certSANs"] == ["api.example.test"]
    assert kubelet["healthzPort"] == 20248 and kubelet["healthzBindAddress"] == "127.0.0.1"
    # The engine's own driver (finding 6): a kubelet on another one gets no pod sandbox from cri-dockerd.
    engine_driver = _engine_cgroup_driver()
    assert engine_driver in ("systemd", "cgroupfs") and kubelet["cgroupDriver"] == engine_driver


async def test_rerun_on_a_valid_pki_changes_nothing(config: Config) -> None:
    ctx, progress = make_ctx(config)
    await Certs().run(ctx)
    before = tree(config.root)
    progress.calls.clear()
    await Certs().run(ctx)
    assert tree(config.root) == before
    assert progress.messages() == ["kept every certificate and kubeconfig"]


async def test_config_change_reissues_only_the_apiserver_cert_and_rewrites_the_kubeadm_config(config: Config) -> None:
    ctx, _ = make_ctx(config)
    await Certs().run(ctx)
    before = tree(config.root)
    changed, _ = make_ctx(with_k8s(config, extra_sans=("api.example.test", "10.9.8.7")))
    assert not await Certs().is_done(changed)
    await Certs().run(changed)
    after = tree(config.root)
    assert sorted(k for k in after if before.get(k) != after[k]) == [
        "etc/kubernetes/pki/apiserver.crt", "etc/kubernetes/pki/apiserver.key", "var/lib/lifecycle/kubeadm.yaml",
    ]
    assert await Certs().is_done(changed)


async def test_a_changed_kubeadm_config_alone_is_not_done(config: Config) -> None:
    ctx, _ = make_ctx(config)
    await Certs().run(ctx)
    other_port, _ = make_ctx(config, api_port=16444)  # the port is in the kubeadm config and kubeconfig URLs
    assert not await Certs().is_done(other_port)
    ctx.paths.kubeadm_config.write_text(ctx.paths.kubeadm_config.read_text() + "# edited\n")
    assert not await Certs().is_done(ctx)


async def test_bad_input_fails_permanently_and_writes_nothing(config: Config) -> None:
    ctx, _ = make_ctx(config)
    await Certs().run(ctx)
    before = tree(config.root)
    bad, _ = make_ctx(with_k8s(config, extra_sans=("not a name",)))
    assert not await Certs().is_done(bad)
    with pytest.raises(PermanentError) as info:
        await Certs().run(bad)
    assert info.value.code == "invalid_config"
    assert "kubernetes.extra_sans: 'not a name'" in info.value.message
    assert tree(config.root) == before


async def test_rsa_pki(config: Config) -> None:
    ctx, _ = make_ctx(with_pki(config, key_algorithm="rsa-2048"))
    await Certs().run(ctx)
    assert (ctx.paths.pki_dir / "apiserver.key").read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert yaml.safe_load_all(ctx.paths.kubeadm_config.read_text()).__next__()["kind"] == "InitConfiguration"
    assert "encryptionAlgorithm: RSA-2048" in ctx.paths.kubeadm_config.read_text()
    assert await Certs().is_done(ctx)


def _kubeadm(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "simnode", "kubeadm", *args, "--rootfs", str(root)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


async def test_simulated_kubeadm_keeps_the_pki_and_kubeconfigs(config: Config) -> None:
    ctx, _ = make_ctx(config)
    await Certs().run(ctx)
    before = tree(ctx.paths.kubernetes_dir)
    for phase in (["certs", "all"], ["kubeconfig", "all"]):
        result = _kubeadm(config.root, "init", "phase", *phase, "--config", str(ctx.paths.kubeadm_config))
        assert result.returncode == 0, result.stdout + result.stderr
    assert tree(ctx.paths.kubernetes_dir) == before
