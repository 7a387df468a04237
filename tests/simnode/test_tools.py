"""The kubectl and crictl stand-ins, run as the zipapp a node gets, against the real kubectl and Docker Engine."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import SimImages

from simnode.zipapp import build_zipapp

VERSION = "v1.32.1"


@pytest.fixture(scope="module")
def app() -> bytes:
    return build_zipapp(VERSION)


def install(root: Path, app: bytes, *tools: str) -> Path:
    """Copy the zipapp to <root>/usr/bin/<tool>, as the service does on a node."""
    bin_dir = root / "usr/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        (bin_dir / tool).write_bytes(app)
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def run(exe: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: val for k, val in os.environ.items() if not k.startswith(("SIMNODE_", "CONTAINER_RUNTIME"))}
    return subprocess.run([str(exe), *args], env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=30, check=False)


def test_kubectl_version_client(tmp_path: Path, app: bytes) -> None:
    kubectl = install(tmp_path, app, "kubectl") / "kubectl"
    plain = run(kubectl, "version", "--client")
    assert plain.returncode == 0 and plain.stdout.splitlines()[0] == f"Client Version: {VERSION}"
    as_json = json.loads(run(kubectl, "version", "--client", "-o", "json").stdout)
    as_yaml = yaml.safe_load(run(kubectl, "version", "--client=true", "--output=yaml").stdout)
    assert as_json == as_yaml
    assert as_json["clientVersion"]["gitVersion"] == VERSION
    assert (as_json["clientVersion"]["major"], as_json["clientVersion"]["minor"]) == ("1", "32")
    bad = run(kubectl, "version", "--client", "-o", "xml")
    assert bad.returncode == 1 and "'xml'" in bad.stderr


def test_kubectl_delegates_to_the_real_kubectl(tmp_path: Path, app: bytes) -> None:
    root = tmp_path / "node"
    kubectl = install(root, app, "kubectl") / "kubectl"
    other_copy = install(tmp_path / "other", app, "kubectl")  # another simnode build earlier on PATH
    admin = root / "etc/kubernetes/admin.conf"
    admin.parent.mkdir(parents=True)
    admin.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "sim", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "sim", "user": "admin"}}],
        "users": [{"name": "admin", "user": {}}],
    }))
    path = os.pathsep.join([str(kubectl.parent), str(other_copy), os.environ.get("PATH", "")])
    # A real node path in the flag is re-rooted under the node the program belongs to.
    out = run(kubectl, "--kubeconfig", "/etc/kubernetes/admin.conf", "config", "view", "-o", "json",
              env={"PATH": path})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    # Global flags do not stop `version --client` from being answered by the stand-in.
    ours = run(kubectl, "--kubeconfig", str(admin), "version", "--client", env={"PATH": path})
    assert ours.returncode == 0 and f"Client Version: {VERSION}" in ours.stdout

    alone = run(kubectl, "get", "pods", env={"PATH": os.pathsep.join([str(kubectl.parent), str(other_copy)])})
    assert alone.returncode == 1 and "a real kubectl must be on PATH" in alone.stderr


@pytest.fixture
def tagged_image(docker_host: str, sim_images: SimImages) -> Iterator[str]:
    """A uniquely named local image (a second tag of the pause image), removed afterwards."""
    ref = f"{sim_images.repo}/crictl-test-{uuid.uuid4().hex[:8]}:t1"
    env = dict(os.environ, DOCKER_HOST=docker_host)
    source = sim_images.components[sim_images.versions[0]]["pause"]
    subprocess.run(["docker", "tag", source, ref], env=env, check=True, capture_output=True, timeout=30)
    yield ref
    subprocess.run(["docker", "rmi", ref], env=env, check=False, capture_output=True, timeout=30)


def test_crictl_versions(tmp_path: Path, app: bytes, docker_host: str) -> None:
    crictl = install(tmp_path, app, "crictl") / "crictl"
    assert run(crictl, "--version").stdout.strip() == "crictl version v1.32.0"
    out = run(crictl, "--runtime-endpoint", docker_host, "version")
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert fields["RuntimeName"].strip() == "docker" and fields["RuntimeVersion"].strip()


def test_crictl_images_lists_the_engine(tmp_path: Path, app: bytes, docker_host: str, tagged_image: str) -> None:
    crictl = install(tmp_path, app, "crictl") / "crictl"
    repo, tag = tagged_image.rsplit(":", 1)
    env = dict(os.environ, DOCKER_HOST=docker_host)
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tagged_image], env=env,
                              capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    out = run(crictl, "-r", docker_host, "images")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    row = next(line.split() for line in lines if line.startswith(repo + " "))
    assert row[:3] == [repo, tag, image_id.removeprefix("sha256:")[:13]] and row[3].endswith("kB")

    only = run(crictl, "-r", docker_host, "images", tagged_image)
    assert [line.split()[0] for line in only.stdout.splitlines()[1:]] == [repo]
    quiet = run(crictl, "-r", docker_host, "images", "-q", repo)
    assert quiet.stdout.split() == [image_id]

    # No flag and no environment: the node's /etc/crictl.yaml names the endpoint, as on a real node.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/crictl.yaml").write_text(f"runtime-endpoint: {docker_host}\n")
    from_config = run(crictl, "images", repo, env={"DOCKER_HOST": ""})
    assert from_config.returncode == 0 and repo in from_config.stdout


def test_crictl_errors_are_clear(tmp_path: Path, app: bytes) -> None:
    crictl = install(tmp_path, app, "crictl") / "crictl"
    missing = run(crictl, "--runtime-endpoint", f"unix://{tmp_path}/none.sock", "images")
    assert missing.returncode == 1 and f"cannot connect to the runtime at unix://{tmp_path}/none.sock" in missing.stderr
    assert "only unix:///path" in run(crictl, "-r", "tcp://127.0.0.1:1", "images").stderr
    nowhere = run(crictl, "images", env={"DOCKER_HOST": ""})
    assert nowhere.returncode == 1 and "no runtime endpoint" in nowhere.stderr
    unsupported = run(crictl, "pods")
    assert unsupported.returncode == 1 and "unsupported command 'pods'" in unsupported.stderr
