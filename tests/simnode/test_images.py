"""The image builder against the real Docker Engine and registry, in a unique namespace removed afterwards."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import aiodocker
import pytest
from conftest import SimImages

from simnode import versions as v
from simnode.images import (
    INPUTS_LABEL,
    BuildRequest,
    ImageBuildError,
    ImageSpec,
    PadReader,
    _build,
    build_images_sync,
    pad_size_bytes,
)
from simnode.zipapp import PACKAGE_DIR, build_zipapp

REPO_ROOT = Path(__file__).resolve().parents[2]


def docker(docker_host: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, DOCKER_HOST=docker_host)
    return subprocess.run(["docker", *args], env=env, input=stdin, capture_output=True, check=False, timeout=120)


def manifest(registry: str, ref: str) -> tuple[str, dict[str, object]]:
    repository, tag = ref.removeprefix(f"{registry}/").rsplit(":", 1)
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    req = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers["Docker-Content-Digest"], json.loads(resp.read())


def layer_sizes(registry: str, ref: str) -> list[int]:
    layers = manifest(registry, ref)[1]["layers"]
    assert isinstance(layers, list)
    return [int(layer["size"]) for layer in layers]


@pytest.fixture
def namespace(docker_host: str, registry: str) -> Iterator[str]:
    """A unique repository path; its local images and registry manifests are removed afterwards."""
    ns = f"test-{uuid.uuid4().hex[:10]}"
    yield ns
    listed = docker(docker_host, "images", "--format", "{{.Repository}}:{{.Tag}}")
    for ref in [r for r in listed.stdout.decode().split() if r.startswith(f"{registry}/{ns}/")]:
        try:
            digest = manifest(registry, ref)[0]
            repository = ref.removeprefix(f"{registry}/").rsplit(":", 1)[0]
            urllib.request.urlopen(
                urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{digest}", method="DELETE"),
                timeout=10,
            ).close()
        except OSError:
            pass  # already gone from the registry
        docker(docker_host, "rmi", "-f", ref)


def test_zipapp_is_reproducible_and_complete() -> None:
    first, second = build_zipapp("v1.32.1"), build_zipapp("v1.32.1")
    assert first == second
    assert first.startswith(f"#!{sys.executable}\n".encode())
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        names = zf.namelist()
        assert zf.read("simnode/_build.py").decode().strip().endswith('KUBERNETES_VERSION = "v1.32.1"')
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        # Bytecode next to every module (zipimport cannot cache what it compiles), each checked against its source:
        # hash-based (PEP 552: flags 0b11), made for this source by this interpreter.
        sources = [n for n in names if n.startswith("simnode/") and n.endswith(".py")]
        assert sorted(n for n in names if n.endswith(".pyc")) == sorted(n + "c" for n in sources)
        for name in sources:
            pyc = zf.read(name + "c")
            assert pyc[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(pyc[4:8], "little") == 0b11
            assert pyc[8:16] == importlib.util.source_hash(zf.read(name)), name
    assert "__main__.py" in names and "simnode/__main__.py" in names and "simnode/tools/crictl.py" in names
    assert not [n for n in names if "__pycache__" in n or "/tests/" in n]
    assert build_zipapp("v1.31.4") != first
    # Reproducible also from a process that has imported much more (marshal's output depends on reference counts).
    busy = subprocess.run([sys.executable, "-c", "import aiohttp, cryptography.x509, yaml, lifecycle.service, "
                           "simnode.apiserver.main, sys; from simnode.zipapp import build_zipapp; "
                           "sys.stdout.buffer.write(build_zipapp('v1.32.1'))"],
                          capture_output=True, check=True, timeout=120, cwd=REPO_ROOT)
    assert busy.stdout == first


def test_zipapp_runs_from_wherever_it_is_copied(tmp_path: Path) -> None:
    app = build_zipapp("v1.32.1")
    for where in ("a/usr/bin", "b/elsewhere"):
        for tool in ("kubectl", "crictl"):
            exe = tmp_path / where / tool
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_bytes(app)
            exe.chmod(0o755)
    env = {k: val for k, val in os.environ.items() if k not in ("SIMNODE_VERSION", "SIMNODE_TOOL", "PYTHONPATH")}
    # The version comes from the generated _build module, so this proves the zip's own code runs.
    out = subprocess.run([tmp_path / "a/usr/bin/kubectl", "version", "--client", "-o", "json"],
                         cwd="/", env=env, capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(out.stdout)["clientVersion"]["gitVersion"] == "v1.32.1"
    out = subprocess.run([tmp_path / "b/elsewhere/crictl", "--version"],
                         cwd="/", env=env, capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "crictl version v1.32.0"


def test_pad_bytes_are_deterministic_and_incompressible() -> None:
    a = PadReader("etcd:100000", 100_000)
    chunks = [a.read(7), a.read(65_536), a.read(-1)]
    whole = PadReader("etcd:100000", 100_000).read()
    assert b"".join(chunks) == whole and len(whole) == 100_000
    assert PadReader("etcd:100001", 100_000).read() != whole
    assert len(zlib.compress(whole, 9)) > 0.99 * len(whole)
    assert pad_size_bytes("pause", 0.00001) >= 8 * 1024


def test_layer_sizes_follow_the_pad_scale(namespace: str, registry: str, docker_host: str) -> None:
    only = ("etcd", v.BINARIES_IMAGE)
    sizes: dict[float, dict[str, int]] = {}
    for scale in (0.002, 0.008):
        req = BuildRequest(registry=registry, versions=("v1.31.4",), pad_scale=scale,
                           docker_host=docker_host, namespace=f"{namespace}/s{int(scale * 1000)}", only=only)
        results = build_images_sync(req, log=None)
        assert sorted(r.ref.split("/")[-1] for r in results) == [
            "desktop-kubernetes:kubernetes-v1.31.4-cni-v1.6.0-critools-v1.31.1-cri-dockerd-v0.3.16-1-debian",
            "etcd:3.5.15-0",
        ]
        assert {r.action for r in results} == {"built, pushed"}
        for r in results:
            assert r.compressed_size_bytes == sum(layer_sizes(registry, r.ref))
        # The first layer holds /pad alone (the binaries image keeps its zipapps in a second one).
        sizes[scale] = {r.ref.split("/")[-1].split(":")[0]: layer_sizes(registry, r.ref)[0] for r in results}
    for name in ("etcd", v.BINARIES_IMAGE):
        small, big = sizes[0.002][name], sizes[0.008][name]
        expected_small = v.REALISTIC_SIZES_BYTES[name] * 0.002
        # gzip cannot shrink random bytes: the layer is the pad plus a little tar/gzip framing.
        assert expected_small <= small <= expected_small * 1.01 + 4096
        assert 2.95 < (big - small) / (v.REALISTIC_SIZES_BYTES[name] * 0.002) < 3.05


def test_second_run_is_up_to_date_and_repairs_what_changed(
    namespace: str, registry: str, docker_host: str, tmp_path: Path
) -> None:
    # A frozen copy of the sources: edits to the checkout during the test must not count as changed inputs.
    package_dir = tmp_path / "simnode"
    shutil.copytree(PACKAGE_DIR, package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    req = BuildRequest(registry=registry, versions=("v1.32.1",), pad_scale=0.001, docker_host=docker_host,
                       namespace=namespace, only=(v.BINARIES_IMAGE, "kube-scheduler", "pause"), package_dir=package_dir)
    first = build_images_sync(req, log=None)
    assert [r.action for r in first] == ["built, pushed"] * 3
    started = time.monotonic()
    second = build_images_sync(req, log=None)
    assert [r.action for r in second] == ["up to date"] * 3
    assert time.monotonic() - started < 10
    assert [r.compressed_size_bytes for r in second] == [r.compressed_size_bytes for r in first]

    binaries, scheduler, pause = (r.ref for r in first)
    # Registry lost a tag: push again, no rebuild.
    digest = manifest(registry, scheduler)[0]
    repository = scheduler.removeprefix(f"{registry}/").rsplit(":", 1)[0]
    urllib.request.urlopen(urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{digest}", method="DELETE"), timeout=10).close()
    # Local tag now points at an image without our inputs label: rebuild and push.
    assert docker(docker_host, "tag", pause, binaries).returncode == 0
    third = {r.ref: r.action for r in build_images_sync(req, log=None)}
    # The build cache may hand back the very image that was pushed before; then no push is needed.
    assert third[binaries] in ("built", "built, pushed")
    assert (third[scheduler], third[pause]) == ("pushed", "up to date")
    for ref in (binaries, scheduler):
        info = json.loads(docker(docker_host, "image", "inspect", ref).stdout)[0]
        assert f"{ref.rsplit(':', 1)[0]}@{manifest(registry, ref)[0]}" in info["RepoDigests"]

    info = json.loads(docker(docker_host, "image", "inspect", binaries).stdout)[0]
    assert info["Config"]["Cmd"] == ["/usr/bin/kubelet"]
    assert len(info["Config"]["Labels"][INPUTS_LABEL]) == 64
    assert json.loads(docker(docker_host, "image", "inspect", scheduler).stdout)[0]["Config"]["Cmd"] is None


def test_binaries_image_holds_runnable_tools(namespace: str, registry: str, docker_host: str, tmp_path: Path) -> None:
    req = BuildRequest(registry=registry, versions=("v1.32.1",), pad_scale=0.0005, docker_host=docker_host,
                       namespace=namespace, only=(v.BINARIES_IMAGE,))
    (result,) = build_images_sync(req, log=None)
    created = docker(docker_host, "create", result.ref)
    assert created.returncode == 0, created.stderr
    container = created.stdout.decode().strip()
    try:
        exported = docker(docker_host, "export", container)
    finally:
        docker(docker_host, "rm", container)
    with tarfile.open(fileobj=io.BytesIO(exported.stdout)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["pad"].size == pad_size_bytes(v.BINARIES_IMAGE, 0.0005)
        for tool in v.BINARIES:
            assert members[f"usr/bin/{tool}"].mode & 0o777 == 0o755
        # Shaped like Docker Desktop's Debian-based image: merged /usr, many other programs, the CNI release.
        assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
        assert members["usr/bin/sh"].issym() and members["etc/os-release"].issym()
        assert len([n for n in members if n.startswith("usr/bin/")]) > 30
        for plugin in ("bridge", "host-local", "loopback", "portmap"):
            assert members[f"opt/cni/bin/{plugin}"].isreg() and members[f"opt/cni/bin/{plugin}"].mode & 0o111
        assert members["opt/cni/bin/LICENSE"].mode & 0o777 == 0o644
        tar.extractall(tmp_path / "root", filter="tar")
    out = subprocess.run([tmp_path / "root/usr/bin/kubectl", "version", "--client"],
                         capture_output=True, text=True, check=True, timeout=30)
    assert "Client Version: v1.32.1" in out.stdout
    version = subprocess.run([tmp_path / "root/opt/cni/bin/bridge"], env={"CNI_COMMAND": "VERSION"},
                             capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(version.stdout)["cniVersion"] == "1.0.0"
    assert result.ref.endswith(":kubernetes-v1.32.1-cni-v1.6.0-critools-v1.31.1-cri-dockerd-v0.3.16-1-debian")


def test_bad_input_is_rejected_before_anything_is_built(namespace: str, registry: str, docker_host: str) -> None:
    cases = {
        "--versions=v9.9.9": "unknown Kubernetes versions ['v9.9.9']",
        "--pad-scale=0": "pad scale 0.0",
        "--only=kube-apiservr": "unknown image names ['kube-apiservr']",
        "--registry=http://x:5000": "expected host:port",
    }
    for arg, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "simnode.images", f"--namespace={namespace}", arg],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (arg, proc.stderr)
        assert message in proc.stderr
    listed = docker(docker_host, "images", "--format", "{{.Repository}}")
    assert f"{registry}/{namespace}/" not in listed.stdout.decode()
    with pytest.raises(ImageBuildError, match=r"cannot reach the Docker Engine at unix:///nonexistent\.sock"):
        build_images_sync(BuildRequest(registry=registry, docker_host="unix:///nonexistent.sock",
                                       namespace=namespace, only=("pause",)), log=None)


async def test_engine_errors_inside_the_stream_are_reported(namespace: str, registry: str, docker_host: str) -> None:
    class Broken(ImageSpec):
        def dockerfile(self, inputs_sha256: str = "") -> str:
            return "FROM scratch\nCOPY no-such-file /x\n"

    spec = Broken(name="pause", ref=f"{registry}/{namespace}/broken:1", pad_size_bytes=8192)
    client = aiodocker.Docker(url=docker_host)
    try:
        with pytest.raises(ImageBuildError, match=r"building .*/broken:1 failed: .*no-such-file"):
            await _build(client, spec, "0" * 64)
    finally:
        await client.close()


def test_sim_images_fixture_serves_every_version(sim_images: SimImages, registry: str) -> None:
    assert sim_images.versions == tuple(v.VERSIONS)
    for version in sim_images.versions:
        assert layer_sizes(registry, sim_images.binaries[version])
        for ref in sim_images.components[version].values():
            assert layer_sizes(registry, ref)
