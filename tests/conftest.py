"""Shared fixtures: the real local services (Docker Engine, registry, MQTT broker) and the simulated-node images.

A missing service fails the test with the command that starts it; nothing is skipped. `sim_images` builds
and pushes the images once per session with a small padding ($SIM_PAD_SCALE, default 0.005).
Import the helper with `from conftest import free_port`.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DOCKER_HOST = "unix:///tmp/lifecycle-services/docker/docker.sock"
REGISTRY = os.environ.get("LIFECYCLE_REGISTRY", "127.0.0.1:5000")
MQTT_HOST = "127.0.0.1"
MQTT_PORT = int(os.environ.get("LIFECYCLE_MQTT_PORT", "1883"))
TEST_PAD_SCALE = float(os.environ.get("SIM_PAD_SCALE", "0.005"))
# A registry path of its own for the simulated-node images ($SIM_NAMESPACE): two checkouts with different
# simnode sources can then run their tests side by side without pushing over each other's tags.
SIM_NAMESPACE = os.environ.get("SIM_NAMESPACE", "")
SIM_REPO = f"{REGISTRY}/{SIM_NAMESPACE}" if SIM_NAMESPACE else REGISTRY
START_HINT = "start the local services with `make services` (scripts/services.sh up)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _docker_ping(docker_host: str, timeout_s: float = 5.0) -> str | None:
    """None when the engine answers /_ping, else the reason it does not."""
    if not docker_host.startswith("unix://"):
        return f"DOCKER_HOST={docker_host!r}: the tests expect a unix:// socket"
    conn = _UnixHTTPConnection(docker_host.removeprefix("unix://"), timeout_s)
    try:
        conn.request("GET", "/_ping")
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        return str(exc)
    finally:
        conn.close()
    return None if resp.status == 200 and body == b"OK" else f"/_ping answered {resp.status} {body!r}"


def _mqtt_connack(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """None when an MQTT 3.1.1 CONNECT is accepted (CONNACK return code 0), else the reason."""
    client_id = f"pytest-check-{os.getpid()}".encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive 10 s
    payload = len(client_id).to_bytes(2, "big") + client_id
    remaining = len(variable) + len(payload)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(bytes([0x10, remaining]) + variable + payload)
            connack = sock.recv(4)
            sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError as exc:
        return str(exc)
    if len(connack) != 4 or connack[0] != 0x20 or connack[3] != 0:
        return f"unexpected CONNACK {connack!r}"
    return None


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The Docker Engine URL ($DOCKER_HOST or the default socket), checked to answer."""
    url = os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    problem = _docker_ping(url)
    if problem is not None:
        pytest.fail(f"Docker Engine at {url} is not reachable ({problem}); {START_HINT}", pytrace=False)
    return url


@pytest.fixture(scope="session")
def registry() -> str:
    """host:port of the local registry, checked to answer /v2/."""
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=5) as resp:
            status = resp.status
    except (urllib.error.URLError, OSError) as exc:
        pytest.fail(f"registry at {REGISTRY} is not reachable ({exc}); {START_HINT}", pytrace=False)
    if status != 200:
        pytest.fail(f"registry at {REGISTRY} answered /v2/ with {status}; {START_HINT}", pytrace=False)
    return REGISTRY


@pytest.fixture(scope="session")
def mqtt_broker() -> tuple[str, int]:
    """(host, port) of the local MQTT broker, checked to accept an anonymous connection."""
    problem = _mqtt_connack(MQTT_HOST, MQTT_PORT)
    if problem is not None:
        pytest.fail(f"MQTT broker at {MQTT_HOST}:{MQTT_PORT} is not usable ({problem}); {START_HINT}", pytrace=False)
    return (MQTT_HOST, MQTT_PORT)


@dataclass(frozen=True)
class SimImages:
    """What `sim_images` built: image references by Kubernetes version."""

    repo: str
    versions: tuple[str, ...]
    pad_scale: float
    binaries: dict[str, str]  # version -> <repo>/desktop-kubernetes:kubernetes-<version>-cni-...-1-debian
    components: dict[str, dict[str, str]] = field(default_factory=dict)  # version -> component -> ref
    addons: dict[str, str] = field(default_factory=dict)  # addon -> ref

    def binaries_image(self, version: str) -> str:
        return self.binaries[version]


@pytest.fixture(scope="session")
def sim_images(docker_host: str, registry: str) -> Iterator[SimImages]:
    """Ensures the small-padding images are built and pushed (seconds when already up to date)."""
    from simnode import versions as v
    from simnode.images import BuildRequest, ImageBuildError, build_images_sync

    req = BuildRequest(registry=registry, versions=tuple(v.VERSIONS), pad_scale=TEST_PAD_SCALE, docker_host=docker_host,
                       namespace=SIM_NAMESPACE)
    try:
        build_images_sync(req, log=sys.stderr)
    except ImageBuildError as exc:
        pytest.fail(f"building the simulated-node images failed: {exc}", pytrace=False)
    yield SimImages(
        repo=req.repo,
        versions=req.versions,
        pad_scale=req.pad_scale,
        binaries={ver: v.binaries_image(req.repo, ver) for ver in req.versions},
        components={ver: v.component_images(req.repo, ver) for ver in req.versions},
        addons=v.addon_images(req.repo),
    )
