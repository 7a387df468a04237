"""The registry and the Docker Engine go away in the middle of an install, from outside: the real `lifecycle serve`
reaches both through proxies the test cuts (faultlib.CutProxy; the registry over TCP, the engine's unix socket as
the service's `docker.host`; the simulated kubelet keeps the real socket). The step fails with the documented code
(docs/protocol.md: `pull_failed` naming the image for a registry that refuses, `engine_unavailable` naming the
socket for an engine that does not answer, both retryable), nothing of the node is left in the engine once it is
back, and a new `install` after the fault is gone resumes to `running` without redoing finished work."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEFAULT_DOCKER_HOST, REGISTRY
from faultlib import (
    INSTALL_CHAIN,
    CutProxy,
    Node,
    Subscriber,
    _wait_state,
    engine_leftovers,
    kubelets_under,
    make_node,
    payload,
    state_changes,
    wait_until,
)
from test_install_over_mqtt import SIM_CONFIG, _big_image

__all__ = ["make_node"]  # the fixture, used by name

BIG_IMAGE_MB = 30
SLOW_PULL_BYTES_S = 10 * 2**20  # the big image takes ~3 s through the registry proxy: cut in the middle


@pytest.fixture
def big_image() -> Iterator[str]:
    """A 30 MB image in the registry only, pushed for this test."""
    ref = _big_image(f"fault-big-{uuid.uuid4().hex[:8]}", BIG_IMAGE_MB)
    yield ref
    subprocess.run(["docker", "rmi", "-f", ref], check=False, capture_output=True)


@pytest.fixture
def registry_proxy() -> Iterator[CutProxy]:
    host, port = REGISTRY.rsplit(":", 1)
    proxy = CutProxy(upstream_tcp=(host, int(port)), rate_bytes_s=SLOW_PULL_BYTES_S)
    yield proxy
    proxy.close()


@pytest.fixture
def engine_proxy(tmp_path: Path) -> Iterator[CutProxy]:
    proxy = CutProxy(upstream_unix=DEFAULT_DOCKER_HOST.removeprefix("unix://"), listen_unix=tmp_path / "docker.sock")
    yield proxy
    proxy.close()


def _node(make_node: Callable[..., Node], big: str | None, *, docker_host: str | None = None) -> Node:
    text = SIM_CONFIG.read_text()
    if big is not None:
        text = text.replace("addon_images = []", f'addon_images = ["{big}"]')
    if docker_host is not None:
        text = text.replace(f'host = "{DEFAULT_DOCKER_HOST}"', f'host = "{docker_host}"')
        assert docker_host in text
    node = make_node(config_text=text)
    node.start_service()
    return node


def _mid_pull_of(big: str) -> Callable[[dict[str, Any]], bool]:
    def hit(m: dict[str, Any]) -> bool:
        data = payload(m)["data"]
        return (payload(m)["type"] == "lifecycle.step.progress" and data.get("message") == f"pulling {big}"
                and bool(data["total"]) and 0 < data["current"] < data["total"])

    return hit


def _failure(events: Subscriber) -> dict[str, Any]:
    failed = payload(events.wait_for(lambda m: payload(m)["type"] == "lifecycle.step.failed", timeout_s=120))
    assert _wait_state(events, "failed", timeout_s=30)["data"]["to"] == "failed"
    return dict(failed["data"])


def _pulled_in_full(events: Subscriber, since: int = 0) -> set[str]:
    datas = [payload(m)["data"] for m in events.messages[since:]]
    return {d["message"].removeprefix("pulling ") for d in datas
            if d.get("unit") == "bytes" and d.get("state") == "images" and d["total"] and d["current"] == d["total"]}


def _held_by_engine(refs: set[str]) -> set[str]:
    """The images of `refs` the engine holds. Every byte of a pull may have arrived (a progress line at its total)
    and the pull still fail when the registry goes away before the last request: only an image the engine holds
    is work that must not be done again."""
    return {ref for ref in refs if subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                                                  check=False).returncode == 0}


def _resume_to_running(node: Node, events: Subscriber, *, failed_in: str) -> list[dict[str, Any]]:
    """A new install after the fault: ends `running`, entering only the failed step and those after it; returns
    the events it caused."""
    seen = len(events.messages)
    assert payload(node.request({"id": "again", "action": "install"}, correlation="c2"))["ok"] is True
    last = _wait_state(events, "running", timeout_s=180, request_id="again")
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    resumed = [c for c in state_changes(events) if c["request_id"] == "again"]
    assert resumed[0]["from"] == "failed" and resumed[0]["to"] == failed_in, resumed
    done_before = set(INSTALL_CHAIN[1:INSTALL_CHAIN.index(failed_in)])
    assert not ({c["to"] for c in resumed} & done_before), resumed
    after = [payload(m)["data"] for m in events.messages[seen:]]
    wait_until(lambda: len(kubelets_under(node.root)) == 1, timeout_s=10, what="not exactly one kubelet")
    assert engine_leftovers(node.name) == []
    return after


def test_registry_down_mid_pull_fails_images_naming_the_image_then_an_install_resumes(
    make_node: Callable[..., Node], big_image: str, registry_proxy: CutProxy
) -> None:
    big = big_image.replace(REGISTRY, f"127.0.0.1:{registry_proxy.port}", 1)
    try:
        node = _node(make_node, big)
        events = node.subscribe("events")
        assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True
        events.wait_for(_mid_pull_of(big), timeout_s=120)
        registry_proxy.down()  # connection refused from now on; the pull under way is cut

        failed = _failure(events)
        error = failed["error"]
        assert (failed["state"], error["code"], error["retryable"]) == ("images", "pull_failed", True), error
        assert error["details"]["image"] == big and big in error["message"], error
        assert engine_leftovers(node.name) == []
        pulled_before = _held_by_engine(_pulled_in_full(events))

        registry_proxy.up()
        after = _resume_to_running(node, events, failed_in="images")
        pulled_again = {d["message"].removeprefix("pulling ") for d in after
                        if d.get("unit") == "bytes" and d.get("state") == "images"}
        assert big in pulled_again
        assert not (pulled_before & pulled_again), pulled_before & pulled_again
    finally:
        subprocess.run(["docker", "rmi", "-f", big], check=False, capture_output=True)


def test_engine_unreachable_mid_pull_fails_images_as_engine_unavailable_then_an_install_resumes(
    make_node: Callable[..., Node], big_image: str, registry_proxy: CutProxy, engine_proxy: CutProxy
) -> None:
    big = big_image.replace(REGISTRY, f"127.0.0.1:{registry_proxy.port}", 1)
    docker_host = f"unix://{engine_proxy.listen_path}"
    try:
        node = _node(make_node, big, docker_host=docker_host)
        events = node.subscribe("events")
        assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True
        events.wait_for(_mid_pull_of(big), timeout_s=120)
        engine_proxy.down()  # the engine's socket is gone: as a stopped daemon

        failed = _failure(events)
        error = failed["error"]
        assert (failed["state"], error["code"], error["retryable"]) == ("images", "engine_unavailable", True), error
        assert error["details"]["docker_host"] == docker_host and engine_proxy.listen_path in error["message"]

        engine_proxy.up()
        _resume_to_running(node, events, failed_in="images")
    finally:
        subprocess.run(["docker", "rmi", "-f", big], check=False, capture_output=True)


def test_engine_unreachable_mid_copy_fails_binaries_as_engine_unavailable_and_leaves_no_container(
    make_node: Callable[..., Node], engine_proxy: CutProxy
) -> None:
    docker_host = f"unix://{engine_proxy.listen_path}"
    node = _node(make_node, None, docker_host=docker_host)
    events = node.subscribe("events")
    assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True

    def mid_copy(m: dict[str, Any]) -> bool:
        data = payload(m)["data"]
        return payload(m)["type"] == "lifecycle.step.progress" and data.get("state") == "binaries" and str(
            data.get("message", "")).startswith("extracting /usr/bin/kubelet")

    events.wait_for(mid_copy, timeout_s=120)
    engine_proxy.down()  # the copy container stays in the engine: the service cannot reach it to remove it

    failed = _failure(events)
    error = failed["error"]
    assert (failed["state"], error["code"], error["retryable"]) == ("binaries", "engine_unavailable", True), error
    assert error["details"]["docker_host"] == docker_host and engine_proxy.listen_path in error["message"]

    engine_proxy.up()
    after = _resume_to_running(node, events, failed_in="binaries")
    # The images step is done: not entered again, nothing pulled.
    assert not [d for d in after if d.get("state") == "images"], [d for d in after if d.get("state") == "images"]
