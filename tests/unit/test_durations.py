"""Step duration history (lifecycle.durations) and the engine's `lifecycle.step.slow`: a rolling window per step,
a corrupt file ignored, writes that never leave half a file; one slow event per slow run, carried by the status."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
import structlog
from lifecycle_fakes import drain_events, fake_plan, fake_reset, make_config, null_ports, steer

from lifecycle.bus import Bus
from lifecycle.cli_render import Renderer
from lifecycle.durations import StepDurations
from lifecycle.engine import Engine
from lifecycle.paths import HostPaths
from lifecycle.protocol import EventType
from lifecycle.service import state_file


def test_keeps_the_last_runs_per_step_and_their_median_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "durations.json"
    history = StepDurations(path, keep=3)
    for seconds in (100.0, 1.0, 2.0, 30.0):
        history.record("images", seconds)
    history.record("readiness", 21.0)
    again = StepDurations(path, keep=3)
    assert again.runs("images") == [1.0, 2.0, 30.0]  # the oldest (100 s) fell out of the window
    assert (again.usual_s("images"), again.usual_s("readiness"), again.usual_s("kubeadm")) == (2.0, 21.0, None)
    assert again.all_usual_s() == {"images": 2.0, "readiness": 21.0}


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe", b"[]", b'{"format": 2, "steps": {}}', b'{"format": 1, "steps": []}',
    b'{"format": 1, "steps": {"images": [1.0, "fast"]}}', b'{"format": 1, "steps": {"images": [-1]}}',
    b'{"format": 1, "steps": {"images": [true]}}', b'{"format": 1, "steps": {"images": 3}}',
])
def test_a_corrupt_file_is_logged_and_ignored_then_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "durations.json"
    path.write_bytes(content)
    with structlog.testing.capture_logs() as logs:
        history = StepDurations(path)
    assert history.all_usual_s() == {} and history.slow_after_s("images") is None
    assert [(entry["log_level"], entry["path"]) for entry in logs] == [("warning", str(path))]
    history.record("images", 4.0)
    assert json.loads(path.read_text()) == {"format": 1, "steps": {"images": [4.0]}}


def test_a_failed_write_leaves_the_saved_history_whole(tmp_path: Path) -> None:
    path = tmp_path / "durations.json"
    StepDurations(path).record("images", 4.0)
    (tmp_path / ".durations.json.tmp").mkdir()  # the temporary file cannot be written
    history = StepDurations(path)
    history.record("images", 6.0)  # logged, not raised: history never fails a step
    assert history.runs("images") == [4.0, 6.0]
    assert json.loads(path.read_text())["steps"] == {"images": [4.0]}  # never written in place
    (tmp_path / ".durations.json.tmp").rmdir()
    history.record("images", 8.0)
    assert StepDurations(path).runs("images") == [4.0, 6.0, 8.0]
    assert [p.name for p in tmp_path.iterdir()] == ["durations.json"]


def test_slow_means_twice_the_median_and_at_least_the_minimum(tmp_path: Path) -> None:
    history = StepDurations(tmp_path / "d.json", slow_min_s=10.0)
    history.record("readiness", 21.0)
    history.record("certs", 0.2)
    assert history.slow_after_s("readiness") == 42.0
    assert history.slow_after_s("certs") == 10.0


async def test_a_step_slower_than_its_history_emits_one_slow_event_and_the_status_carries_it(tmp_path: Path) -> None:
    history = StepDurations(tmp_path / "durations.json", slow_min_s=0.0)
    for step in ("images", "kubeadm"):
        for _ in range(3):
            history.record(step, 0.05)
    bus = Bus()
    sub = bus.subscribe("test")
    engine = Engine(config=make_config(tmp_path), paths=HostPaths(tmp_path), ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(HostPaths(tmp_path)), bus=bus, durations=history)
    steer(tmp_path, "images", run_s=0.4)  # eight times its usual 0.05 s
    await engine.install(request_id="r1", version=None)
    try:
        slow_status = None
        while slow_status is None and engine.state.value in ("idle", "preflight", "certs", "images"):
            await asyncio.sleep(0.01)
            status = engine.status()
            slow_status = status.slow if status.state == "images" else None
        assert slow_status is not None
        assert slow_status["state"] == "images" and slow_status["usual_s"] == 0.1 and slow_status["runs"] == 3
        await engine.wait_job()
    finally:
        await engine.shutdown()
    slow = [e.data for e in drain_events(sub) if e.type == EventType.STEP_SLOW]
    assert len(slow) == 1  # kubeadm kept to its usual time; images said it once
    assert slow[0]["state"] == "images" and slow[0]["request_id"] == "r1"
    assert 0.1 <= slow[0]["elapsed_s"] < 0.4 and slow[0]["message"].startswith("images: ")
    assert engine.status().slow is None  # the next state change cleared it
    assert len(history.runs("images")) == 4 and history.runs("images")[-1] >= 0.4
    assert set(engine.status().usual_s) == {step.name for step in fake_plan()}


def test_status_and_watch_lines_show_usual_and_slow_durations() -> None:
    out = io.StringIO()
    render = Renderer(json_output=False, stream=out)
    base = {"node": "n1", "since": "2026-12-03T15:00:00.000Z", "request_id": "r1", "kubernetes_version": "v1.31.4",
            "steps": 9, "error": None, "certs": None, "config_drift": [], "usual_s": {"images": 3.2, "readiness": 21.0}}
    render.status({**base, "state": "readiness", "step": 8,
                   "slow": {"state": "readiness", "elapsed_s": 48.2, "usual_s": 21.0, "runs": 10}})
    render.status({**base, "state": "running", "step": None, "slow": None})
    render.event({"type": "lifecycle.step.slow",
                  "data": {"state": "readiness", "message": "readiness: 48 s, usually 21 s"}})
    assert out.getvalue().splitlines() == [
        "node n1: readiness step 8/9 (v1.31.4) since 2026-12-03T15:00:00.000Z, usually 21 s, request r1",
        "  slow: readiness had run 48 s, usually 21 s (median of its last 10 runs)",
        "node n1: running (v1.31.4) since 2026-12-03T15:00:00.000Z, request r1",
        "  steps usually take: images 3.2 s, readiness 21 s",
        "    slower than usual: readiness: 48 s, usually 21 s",
    ]
