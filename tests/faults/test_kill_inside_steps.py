"""SIGKILL of the real `lifecycle serve` inside each install step (at a progress event of the step, or a fixed
delay after entering it: mid-pull, mid-copy, during a kubeadm phase, while readiness polls, while addons apply),
then a restart: the install resumes (docs/protocol.md, "After a restart of the service") and ends `running` with
one kubelet, at most one process per static pod component, no kubeadm left, no container labelled with the node,
no admin key outside the node root, no step entered twice, no image pulled again after it had finished, and no
`state_seq` missed by a subscriber that stayed connected. With test_kill_at_step_boundaries.py: 33 kill points.

A kill point is seen from outside: the subscriber sees the event, then the test kills. The shortest steps
(preflight, network: a few ms) may be over by then; the test prints where the service resumed."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import REGISTRY
from faultlib import (
    INSTALL_CHAIN,
    CutProxy,
    Node,
    _wait_state,
    admin_key_pem,
    components_under,
    engine_leftovers,
    kube_temp_dirs,
    kubelets_under,
    make_node,
    payload,
    processes_under,
    state_changes,
    state_seqs,
    temp_files_holding,
    wait_until,
)
from test_install_over_mqtt import SIM_CONFIG, _big_image

__all__ = ["make_node"]  # the fixture, used by name

BIG_IMAGE_MB = 30  # pulled by the images points through a registry proxy at SLOW_PULL_BYTES_S: a pull of ~3 s
SLOW_PULL_BYTES_S = 10 * 2**20


@dataclass(frozen=True)
class KillPoint:
    step: str
    point: str
    message: str | None = None  # kill at the step's first progress whose message starts with this ("" = any)
    delay_s: float = 0.0  # ... or this long after the event (or after entering the step when message is None)


POINTS = [
    KillPoint("preflight", "first-progress", ""),
    KillPoint("preflight", "entered+10ms", None, 0.01),
    KillPoint("certs", "first-file-written", "wrote ca.key"),  # rsa-2048 here: the step lasts ~1 s
    KillPoint("certs", "entered+300ms", None, 0.3),
    KillPoint("certs", "kubeconfigs", "wrote admin.conf"),
    KillPoint("images", "first-skip", "skipped "),
    KillPoint("images", "mid-pull", "pulling "),  # the big image's bytes under way (see _matches)
    KillPoint("images", "pulls-done", "cri-dockerd restarted"),  # every image in the engine, the step not yet over
    KillPoint("binaries", "first-extract", "extracting /usr/bin/kubeadm"),
    KillPoint("binaries", "mid-copy", "extracting /opt/cni/bin/bridge"),
    KillPoint("binaries", "entered+300ms", None, 0.3),
    KillPoint("network", "first-progress", ""),
    KillPoint("network", "entered+10ms", None, 0.01),
    KillPoint("kubeadm", "phase-certs", "kubeadm init phase certs"),
    KillPoint("kubeadm", "phase-etcd", "kubeadm init phase etcd"),
    KillPoint("kubeadm", "phase-kubelet-start", "[kubelet-start] Starting the kubelet"),
    KillPoint("kubelet", "starting", "starting the kubelet"),
    KillPoint("kubelet", "starting+500ms", "starting the kubelet", 0.5),  # kubelet_start delay: /healthz not yet ok
    KillPoint("readiness", "polling-apiserver", "waiting for the API server"),
    KillPoint("readiness", "phase-bootstrap-token", "kubeadm init phase bootstrap-token"),
    KillPoint("readiness", "waiting-components", "waiting for kube-apiserver"),
    KillPoint("addons", "first-apply", "applied Namespace"),
    KillPoint("addons", "mid-apply", "applied Deployment"),
    KillPoint("addons", "waiting-available", "applied ConfigMap"),
]


def _config(point: KillPoint, big: str | None) -> str:
    text = SIM_CONFIG.read_text()
    if point.step == "certs":
        text = text.replace('key_algorithm = "ecdsa-p256"', 'key_algorithm = "rsa-2048"')
        assert "rsa-2048" in text
    if big is not None:
        text = text.replace("addon_images = []", f'addon_images = ["{big}"]')
        assert big in text
    return text


def _matches(point: KillPoint, big: str | None) -> Callable[[dict[str, Any]], bool]:
    def hit(m: dict[str, Any]) -> bool:
        body = payload(m)
        data = body["data"]
        if point.message is None:
            return bool(body["type"] == "lifecycle.state.changed" and data["to"] == point.step)
        if body["type"] != "lifecycle.step.progress" or data["state"] != point.step:
            return False
        message = str(data.get("message", ""))
        if point.point == "mid-pull":
            return message == f"pulling {big}" and bool(data["total"]) and 0 < data["current"] < data["total"]
        return message.startswith(point.message)

    return hit


def _pulled_in_full(datas: list[dict[str, Any]]) -> set[str]:
    """The images whose pull had begun and that the engine holds right after the kill. (A pull whose bytes all
    arrived is not yet an image: dockerd extracts after downloading, and drops the pull when its client dies.)"""
    started = {d["message"].removeprefix("pulling ") for d in datas
               if d.get("unit") == "bytes" and d.get("state") == "images"}
    return {ref for ref in started
            if subprocess.run(["docker", "image", "inspect", ref], capture_output=True, check=False).returncode == 0}


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"{p.step}-{p.point}")
def test_sigkill_inside_a_step_then_restart_reaches_running_without_redoing_work(
    make_node: Callable[..., Node], point: KillPoint
) -> None:
    if point.step != "images":
        _kill_inside_and_resume(make_node, point, None)
        return
    pushed = _big_image(f"fault-big-{uuid.uuid4().hex[:8]}", BIG_IMAGE_MB)
    host, port = REGISTRY.rsplit(":", 1)
    slow = CutProxy(upstream_tcp=(host, int(port)), rate_bytes_s=SLOW_PULL_BYTES_S)
    big = pushed.replace(REGISTRY, f"127.0.0.1:{slow.port}", 1)
    try:
        _kill_inside_and_resume(make_node, point, big)
    finally:
        slow.close()
        subprocess.run(["docker", "rmi", "-f", big, pushed], check=False, capture_output=True)


def _kill_inside_and_resume(make_node: Callable[..., Node], point: KillPoint, big: str | None) -> None:
    started_s = time.time()
    kube_dirs_before = kube_temp_dirs()
    node = make_node(config_text=_config(point, big))
    if point.step == "kubelet":
        node.write_faults({"delays_s": {"kubelet_start": 1.5}})
    node.start_service()
    events = node.subscribe("events")  # stays connected across the kill and the restart
    assert payload(node.request({"id": "i1", "action": "install"}, correlation="c1"))["ok"] is True

    events.wait_for(_matches(point, big), timeout_s=180)
    if point.delay_s:
        time.sleep(point.delay_s)
    node.kill_service()
    before = [payload(m)["data"] for m in events.messages]
    seen = len(events.messages)
    changes = state_changes(events)
    assert changes and changes[-1]["to"] != "failed", node.log_path.read_text()[-3000:]
    killed_in = changes[-1]["to"]  # the last state the subscriber saw entered before the kill
    done_before = set(INSTALL_CHAIN[1:INSTALL_CHAIN.index(killed_in)])
    pulled_before = _pulled_in_full(before)

    node.start_service()
    last = _wait_state(events, "running", timeout_s=180)
    assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]
    after = [payload(m)["data"] for m in events.messages[seen:]]
    resumed_in = next((d.get("state") for d in after if d.get("state")), None)
    print(f"{point.step}/{point.point}: killed in {killed_in}, first event after restart from {resumed_in}")

    # No state change lost, none repeated: each state entered once, in order, with consecutive state_seq.
    seqs = state_seqs(events)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"state_seq gap or reorder: {seqs}"
    tos = [c["to"] for c in state_changes(events)]
    assert tos == INSTALL_CHAIN[1:], tos
    # No redone work: no step finished before the kill shows progress again; no image pulled in full is pulled again.
    redone = {d["state"] for d in after if d.get("state") in done_before}
    assert not redone, f"steps done before the kill ran again: {redone}"
    pulled_again = {d["message"].removeprefix("pulling ") for d in after
                    if d.get("unit") == "bytes" and d.get("state") == "images"}
    assert not (pulled_before & pulled_again), f"pulled again after the restart: {pulled_before & pulled_again}"

    # One of each process, nothing left behind in the engine, no kubeadm still running.
    try:
        wait_until(lambda: len(kubelets_under(node.root)) == 1, timeout_s=10, what="not exactly one kubelet")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {kubelets_under(node.root)} among {processes_under(node.root)}") from None
    components = components_under(node.root)
    assert {"kube-apiserver", "etcd"} <= components.keys(), components
    assert all(len(pids) == 1 for pids in components.values()), components
    wait_until(lambda: not [p for p in processes_under(node.root) if "kubeadm" in p], timeout_s=10,
               what=f"kubeadm still running: {[p for p in processes_under(node.root) if 'kubeadm' in p]}")
    assert engine_leftovers(node.name) == []
    # The admin key is nowhere outside the node root (the service's log included), and no API client temp dir.
    assert temp_files_holding(admin_key_pem(node.root), newer_than_s=started_s, outside=node.root) == []
    assert kube_temp_dirs() - kube_dirs_before == set()
    assert " Ready " in node.kubectl("get", "nodes", node.name)
