"""The service as a process of its own with test steps: the `offline` will on SIGKILL, resume after SIGKILL,
clean shutdown on SIGTERM, a forced exit on the second signal, two nodes side by side, one service per root."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
from lifecycle_fakes import eventually, journal, steer, write_config
from lifecycle_mqtt import REPO, ServiceProcess, probe, retained, start_service_process, unique_prefix

from lifecycle.protocol import Topics

KEEPALIVE_S = 2


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker; fail with the command that starts it."""


def _config(tmp_path: Path, prefix: str) -> Path:
    return write_config(tmp_path / "lifecycle.toml", root=tmp_path / "unused-root", node="unused", prefix=prefix,
                        broker="mqtt://127.0.0.1:1883", keepalive_s=KEEPALIVE_S)


def _start(tmp_path: Path, config: Path, *, node: str, root: Path) -> ServiceProcess:
    root.mkdir(parents=True, exist_ok=True)
    return start_service_process(config, root=root, node=node, log_path=tmp_path / f"{node}.log")


def _state_file(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "var/lib/lifecycle/state.json").read_text())
    return data


async def test_sigkill_publishes_offline_through_the_will_within_keepalive(tmp_path: Path) -> None:
    prefix = unique_prefix("will")
    topics = Topics(prefix, "killed")
    svc = _start(tmp_path, _config(tmp_path, prefix), node="killed", root=tmp_path / "root")
    try:
        async with probe(topics) as p:
            await p.wait_for(lambda m: m.topic == topics.availability and m.payload == b"online", timeout_s=10)
            killed_at = time.monotonic()
            svc.proc.send_signal(signal.SIGKILL)
            await p.wait_for(lambda m: m.topic == topics.availability and m.payload == b"offline",
                             timeout_s=KEEPALIVE_S * 1.5)
            assert time.monotonic() - killed_at <= KEEPALIVE_S * 1.5
        assert await retained(topics.availability) == b"offline"
    finally:
        svc.proc.kill()
        svc.wait()


async def test_sigkill_during_images_then_restart_resumes_to_running(tmp_path: Path) -> None:
    prefix, root = unique_prefix("resume"), tmp_path / "root"
    topics = Topics(prefix, "crashy")
    config = _config(tmp_path, prefix)
    steer(root, "images", run_s=30, progress=2)
    first = _start(tmp_path, config, node="crashy", root=root)
    try:
        async with probe(topics) as p:
            await p.ready(timeout_s=10)
            assert (await p.ask({"id": "i-1", "action": "install"}))["ok"]
            await eventually(lambda: "run images 1" in journal(root), timeout_s=5)
            first.proc.send_signal(signal.SIGKILL)
            first.wait()
            assert _state_file(root)["state"] == "images"

            steer(root, "images", run_s=0.05)
            second = _start(tmp_path, config, node="crashy", root=root)
            try:
                await p.wait_state("running", timeout_s=10)
            finally:
                second.proc.send_signal(signal.SIGTERM)
                assert second.wait() == 0
        assert journal(root).count("run certs 1") == 1  # done before the crash: not run again
        assert "run images 1" in journal(root) and journal(root)[-1] == "run addons 1"
        seqs = [e["data"]["seq"] for e in p.events()]
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == sorted(first_seen), "sequence numbers go on increasing across the crash"
        ids = {e["data"]["seq"]: e["id"] for e in p.events()}
        # A state change re-published after the crash (its PUBACK had not been recorded) is the same event again.
        assert all(ids[e["data"]["seq"]] == e["id"] for e in p.events()), "a repeat carries the same id"
        assert _state_file(root)["state"] == "running"
    finally:
        first.proc.kill()


async def test_sigterm_cancels_the_step_cleanly_publishes_offline_and_the_next_start_resumes(tmp_path: Path) -> None:
    prefix, root = unique_prefix("term"), tmp_path / "root"
    topics = Topics(prefix, "termed")
    config = _config(tmp_path, prefix)
    steer(root, "kubeadm", block=True)
    svc = _start(tmp_path, config, node="termed", root=root)
    async with probe(topics) as p:
        await p.ready(timeout_s=10)
        await p.ask({"id": "i-1", "action": "install"})
        await eventually(lambda: "run kubeadm 1" in journal(root), timeout_s=5)
        svc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(svc.wait, 10) == 0
        assert journal(root)[-1] == "cleanup kubeadm"
        assert _state_file(root)["state"] == "kubeadm"  # not failed: the next start picks it up
        await p.wait_for(lambda m: m.topic == topics.availability and m.payload == b"offline")

        steer(root, "kubeadm")
        again = _start(tmp_path, config, node="termed", root=root)
        try:
            await p.wait_state("running", timeout_s=10)
        finally:
            again.proc.send_signal(signal.SIGTERM)
            again.wait()
    lines = journal(root)
    assert lines.count("run certs 1") == 1 and lines.count("run kubeadm 1") == 2 and lines[-1] == "run addons 1"


async def test_a_second_signal_forces_the_exit(tmp_path: Path) -> None:
    prefix, root = unique_prefix("force"), tmp_path / "root"
    topics = Topics(prefix, "stuck")
    steer(root, "certs", block=True, ignore_cancel=True)  # a step that will not stop: shutdown hangs
    svc = _start(tmp_path, _config(tmp_path, prefix), node="stuck", root=root)
    try:
        async with probe(topics) as p:
            await p.ready(timeout_s=10)
            await p.ask({"id": "i-1", "action": "install"})
            await eventually(lambda: "run certs 1" in journal(root), timeout_s=5)
            svc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert svc.proc.poll() is None, "still waiting for the step to stop"
            svc.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(svc.wait, 5) == 1
            await p.wait_for(lambda m: m.topic == topics.availability and m.payload == b"offline")
    finally:
        svc.proc.kill()


async def test_two_nodes_run_side_by_side_from_the_simnode_config_and_a_root_takes_one_service(
    tmp_path: Path,
) -> None:
    config = REPO / "simnode" / "lifecycle.toml"  # as shipped: prefix `lifecycle`, so the node names are unique
    suffix = unique_prefix("side").removeprefix("test-side-")
    nodes = {f"node-a-{suffix}": tmp_path / "a", f"node-b-{suffix}": tmp_path / "b"}
    running = {node: _start(tmp_path, config, node=node, root=root) for node, root in nodes.items()}
    try:
        for node in nodes:
            async with probe(Topics("lifecycle", node)) as p:
                await p.ready(timeout_s=10)
                assert (await p.ask({"id": f"i-{node}", "action": "install"}))["ok"]
                await p.wait_state("running", timeout_s=10)
        third = _start(tmp_path, config, node=f"node-c-{suffix}", root=tmp_path / "a")
        assert await asyncio.to_thread(third.wait, 10) == 1
        assert "another lifecycle service" in third.log()
        assert all(svc.proc.poll() is None for svc in running.values())
    finally:
        for svc in running.values():
            svc.proc.send_signal(signal.SIGTERM)
        assert all(svc.wait() == 0 for svc in running.values())


async def test_a_broken_state_file_stops_the_start_with_its_name_and_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = root / "var/lib/lifecycle/state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"format": 1, "state": "half-written')
    svc = _start(tmp_path, _config(tmp_path, unique_prefix("broken")), node="broken", root=root)
    assert await asyncio.to_thread(svc.wait, 10) == 1
    assert f"{state}: not a valid state file" in svc.log()
    assert state.read_text() == '{"format": 1, "state": "half-written'
