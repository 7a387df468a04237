"""The engine with real test steps in a tmp root: order of events, skips, retries, deadlines, cancellation,
reset pre-emption, resume after a failure or a restart."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from lifecycle_fakes import (
    drain_events,
    eventually,
    fake_plan,
    fake_reset,
    journal,
    make_config,
    mark_done,
    null_ports,
    steer,
)

from lifecycle.bus import Bus, Subscription
from lifecycle.config import STEP_NAMES, Config, StepPolicy
from lifecycle.engine import Engine
from lifecycle.errors import RequestError
from lifecycle.logging import configure_logging
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.protocol import Event, EventType
from lifecycle.service import state_file


@dataclass
class Rig:
    root: Path
    engine: Engine
    sub: Subscription

    def events(self) -> list[Event]:
        return drain_events(self.sub)

    def states(self, events: list[Event]) -> list[str]:
        return [e.data["to"] for e in events if e.type == EventType.STATE_CHANGED]

    async def until(self, state: State, timeout_s: float = 5.0) -> None:
        """Wait until the engine is in `state` and, for an install state, its step's run has started."""
        def reached() -> bool:
            started = any(line.startswith(f"run {state.value}") for line in journal(self.root))
            return self.engine.state == state and (started or state.value not in STEP_NAMES)

        await eventually(reached, timeout_s=timeout_s)


def make_rig(root: Path, config: Config | None = None) -> Rig:
    config = config or make_config(root)
    bus = Bus()
    sub = bus.subscribe("test")
    engine = Engine(config=config, paths=HostPaths(root), ports=null_ports(), plan=fake_plan(), reset=fake_reset,
                    store=state_file(HostPaths(root)), bus=bus)
    return Rig(root=root, engine=engine, sub=sub)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    await r.engine.shutdown()


async def test_install_walks_every_step_in_order_with_gapless_seq(rig: Rig) -> None:
    accepted = await rig.engine.install(request_id="r1", version=None)
    assert accepted.request_id == "r1"
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events) == [*STEP_NAMES, "running"]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    first = events[0].data
    assert (first["from"], first["to"], first["step"], first["steps"]) == ("idle", "preflight", 1, 9)
    assert all(e.data["request_id"] == "r1" for e in events)
    assert all(e.data["duration_s"] >= 0 for e in events if e.type == EventType.STATE_CHANGED)
    assert journal(rig.root) == [f"run {name} 1" for name in STEP_NAMES]
    status = rig.engine.status()
    assert (status.state, status.kubernetes_version, status.seq) == ("running", "v1.31.4", events[-1].seq)


async def test_done_steps_are_skipped_with_an_already_done_progress_event(rig: Rig) -> None:
    mark_done(rig.root, "certs", "images")
    await rig.engine.install(request_id="r1", version=None)
    await rig.engine.wait_job()
    events = rig.events()
    skipped = [e.data["state"] for e in events
               if e.type == EventType.STEP_PROGRESS and e.data["message"] == "already done"]
    assert skipped == ["certs", "images"]
    assert rig.states(events) == [*STEP_NAMES, "running"]
    assert "run certs 1" not in journal(rig.root) and "run binaries 1" in journal(rig.root)


async def test_temporary_error_is_retried_then_succeeds(tmp_path: Path) -> None:
    r = make_rig(tmp_path, make_config(tmp_path, images=StepPolicy(timeout_s=5, retries=2, retry_delay_s=0.01)))
    steer(tmp_path, "images", fail="temporary", fail_times=2)
    await r.engine.install(request_id="r1", version=None)
    await r.engine.wait_job()
    events = r.events()
    retrying = [e for e in events if e.type == EventType.STEP_RETRYING]
    assert [e.data["attempt"] for e in retrying] == [1, 2]
    assert retrying[0].data["error"]["code"] == "fake_temporary" and retrying[0].data["delay_s"] >= 0.01
    assert r.engine.state == State.RUNNING
    assert journal(tmp_path)[2:7] == ["run images 1", "before_retry images", "run images 2", "before_retry images",
                                      "run images 3"]


async def test_exhausted_retries_fail_with_the_last_error(tmp_path: Path) -> None:
    r = make_rig(tmp_path, make_config(tmp_path, images=StepPolicy(timeout_s=5, retries=1, retry_delay_s=0)))
    steer(tmp_path, "images", fail="temporary")
    await r.engine.install(request_id="r1", version=None)
    await r.engine.wait_job()
    status = r.engine.status()
    assert status.state == "failed" and status.step == 3
    assert status.error is not None and status.error.code == "fake_temporary"
    assert status.error.retryable and status.error.details["attempts"] == 2


async def test_deadline_fails_the_step_naming_step_and_limit(tmp_path: Path) -> None:
    r = make_rig(tmp_path, make_config(tmp_path, kubeadm=StepPolicy(timeout_s=0.2, retries=3, retry_delay_s=0)))
    steer(tmp_path, "kubeadm", block=True)
    await r.engine.install(request_id="r1", version=None)
    await r.engine.wait_job()
    events = r.events()
    failed = [e for e in events if e.type == EventType.STEP_FAILED]
    assert len(failed) == 1
    error = failed[0].data["error"]
    assert error["code"] == "deadline_exceeded"
    assert "kubeadm" in error["message"] and "0.2 s" in error["message"]
    assert error["details"] == {"step": "kubeadm", "timeout_s": 0.2, "attempts": 1}
    assert r.states(events)[-2:] == ["kubeadm", "failed"]
    assert "cleanup kubeadm" in journal(tmp_path)  # the deadline cancels the step, which cleans up


async def test_a_retry_the_deadline_would_cut_off_is_not_tried_and_the_step_error_stands(tmp_path: Path) -> None:
    """A step's own error says more than `deadline_exceeded` during a retry pause that could not end in time."""
    r = make_rig(tmp_path, make_config(tmp_path, images=StepPolicy(timeout_s=0.5, retries=3, retry_delay_s=1.0)))
    steer(tmp_path, "images", fail="temporary")
    await r.engine.install(request_id="r1", version=None)
    await r.engine.wait_job()
    error = r.engine.status().error
    assert error is not None and (error.code, error.retryable) == ("fake_temporary", True)
    assert error.details["attempts"] == 1


async def test_permanent_error_is_not_retried(tmp_path: Path) -> None:
    r = make_rig(tmp_path, make_config(tmp_path, certs=StepPolicy(timeout_s=5, retries=3, retry_delay_s=0)))
    steer(tmp_path, "certs", fail="permanent")
    await r.engine.install(request_id="r1", version=None)
    await r.engine.wait_job()
    assert journal(tmp_path) == ["run preflight 1", "run certs 1"]
    events = r.events()
    assert not [e for e in events if e.type == EventType.STEP_RETRYING]
    failed = next(e for e in events if e.type == EventType.STEP_FAILED)
    assert failed.data["error"] == {"code": "fake_permanent", "message": "certs cannot work", "retryable": False,
                                    "details": {"hint": "fix it", "attempts": 1}}


async def test_a_run_that_leaves_no_outcome_fails_its_own_step_as_incomplete(rig: Rig) -> None:
    # A kubeadm that prints "fine" and exits 0 writes nothing: the failure is named at kubeadm, not at the kubelet.
    steer(rig.root, "kubeadm", incomplete=True)
    await rig.engine.install(request_id="r1", version=None)
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events)[-2:] == ["kubeadm", "failed"]
    failed = next(e for e in events if e.type == EventType.STEP_FAILED)
    assert failed.data["state"] == "kubeadm"
    error = failed.data["error"]
    assert (error["code"], error["retryable"]) == ("step_incomplete", False)
    assert "kubeadm" in error["message"] and error["details"] == {"step": "kubeadm", "attempts": 1}
    assert "run kubelet 1" not in journal(rig.root)


async def test_unexpected_exception_becomes_internal_with_its_text(rig: Rig) -> None:
    steer(rig.root, "binaries", fail="internal")
    await rig.engine.install(request_id="r1", version=None)
    await rig.engine.wait_job()
    error = rig.engine.status().error
    assert error is not None and error.code == "internal"
    assert error.message == "RuntimeError: binaries exploded"


async def test_cancel_fails_with_cancelled_after_the_step_cleaned_up(rig: Rig) -> None:
    steer(rig.root, "images", block=True)
    await rig.engine.install(request_id="r1", version=None)
    await rig.until(State.IMAGES)
    accepted = await rig.engine.cancel(request_id="c1")
    assert accepted.request_id == "r1"
    assert journal(rig.root)[-1] == "cleanup images"
    status = rig.engine.status()
    assert status.state == "failed" and status.error is not None and status.error.code == "cancelled"
    assert status.step == 3


async def test_a_step_that_swallows_cancellation_is_stopped_anyway(rig: Rig) -> None:
    steer(rig.root, "certs", block=True, ignore_cancel=True)
    rig.engine.stop_retry_s = 0.1
    await rig.engine.install(request_id="r1", version=None)
    await rig.until(State.CERTS)
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await rig.engine.cancel(request_id="c1")
    assert rig.engine.state == State.FAILED
    assert "run images 1" not in journal(rig.root)


async def test_reset_preempts_a_running_step_then_returns_to_idle(rig: Rig) -> None:
    steer(rig.root, "kubelet", block=True)
    await rig.engine.install(request_id="r1", version=None)
    await rig.until(State.KUBELET)
    accepted = await rig.engine.reset(request_id="z1")
    assert accepted.request_id == "z1" and rig.engine.state == State.RESETTING
    await rig.engine.wait_job()
    assert journal(rig.root)[-2:] == ["cleanup kubelet", "reset"]
    assert rig.states(rig.events())[-3:] == ["kubelet", "resetting", "idle"]
    status = rig.engine.status()
    assert status.state == "idle" and status.kubernetes_version is None and status.error is None


async def test_install_after_a_failure_resumes_at_the_failed_step(rig: Rig) -> None:
    steer(rig.root, "kubeadm", fail="permanent")
    await rig.engine.install(request_id="r1", version=None)
    await rig.engine.wait_job()
    first_cluster = rig.engine.status()
    rig.events()
    steer(rig.root, "kubeadm")
    accepted = await rig.engine.install(request_id="r2", version=None)
    assert accepted.note == "install resumed"
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events) == ["kubeadm", "kubelet", "readiness", "addons", "running"]
    assert events[0].data["from"] == "failed" and events[0].seq == first_cluster.seq + 1
    assert journal(rig.root).count("run certs 1") == 1  # earlier steps only checked, not run again


async def test_install_while_installing_joins_the_running_request(rig: Rig) -> None:
    steer(rig.root, "certs", block=True)
    await rig.engine.install(request_id="r1", version=None)
    again = await rig.engine.install(request_id="r2", version=None)
    assert (again.request_id, again.note) == ("r1", "already installing")
    with pytest.raises(RequestError) as info:
        await rig.engine.install(request_id="r3", version="v1.32.1")
    assert info.value.code == "upgrade_unsupported"


async def test_install_while_running_is_a_no_op_and_versions_are_checked(rig: Rig) -> None:
    await rig.engine.install(request_id="r1", version="v1.32.1")
    await rig.engine.wait_job()
    rig.events()
    noop = await rig.engine.install(request_id="r2", version=None)
    assert (noop.request_id, noop.note) == ("r1", "already running")
    assert rig.events() == []
    for version, code in (("v1.31.4", "upgrade_unsupported"), ("v1.99.0", "unsupported_version")):
        with pytest.raises(RequestError) as info:
            await rig.engine.install(request_id="r3", version=version)
        assert info.value.code == code


async def test_cluster_params_resolve_free_ports_once_and_persist(rig: Rig) -> None:
    await rig.engine.install(request_id="r1", version=None)
    await rig.engine.wait_job()
    snap = state_file(HostPaths(rig.root)).load()
    assert snap is not None and snap.cluster is not None
    assert snap.cluster.api_port > 0 and snap.cluster.kubelet_healthz_port > 0
    assert snap.cluster.api_port != snap.cluster.kubelet_healthz_port


async def test_restart_in_an_install_state_resumes_without_rerunning_done_steps(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    steer(tmp_path, "images", block=True)
    await first.engine.install(request_id="r1", version=None)
    await first.until(State.IMAGES)
    await first.engine.shutdown()  # as on SIGTERM: the step is cancelled, the state stays `images`
    last_seq = first.engine.status().seq
    assert state_file(HostPaths(tmp_path)).load().state == "images"  # type: ignore[union-attr]

    steer(tmp_path, "images")
    second = make_rig(tmp_path)
    await second.engine.start()
    await second.engine.wait_job()
    events = second.events()
    assert second.engine.state == State.RUNNING
    assert [e.seq for e in events] == list(range(last_seq + 1, last_seq + 1 + len(events)))
    assert journal(tmp_path).count("run certs 1") == 1 and "run images 1" in journal(tmp_path)
    assert second.states(events)[0] == "binaries"  # no second `images` transition: it was already the state
    await second.engine.shutdown()


async def test_running_recheck_repairs_only_what_no_longer_holds(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    await first.engine.install(request_id="r1", version=None)
    await first.engine.wait_job()
    (tmp_path / "fake" / "kubelet.done").unlink()  # as if the kubelet died with the host
    second = make_rig(tmp_path)
    await second.engine.start()
    await second.engine.wait_job()
    assert second.states(second.events()) == ["kubelet", "readiness", "addons", "running"]
    assert journal(tmp_path)[-1] == "run kubelet 1"

    third = make_rig(tmp_path)
    await third.engine.start()
    await third.engine.wait_job()
    assert [i for i in third.events() if isinstance(i, Event)] == []  # all done: quiet


async def test_cancel_during_the_running_recheck_has_nothing_to_cancel_and_the_repair_goes_on(tmp_path: Path) -> None:
    """Issue 8 defect 4: after a reboot the re-check is no install anyone asked for; a cancel must not stop it and
    leave `running` claimed by a node without a kubelet."""
    first = make_rig(tmp_path)
    await first.engine.install(request_id="r1", version=None)
    await first.engine.wait_job()
    (tmp_path / "fake" / "kubelet.done").unlink()  # the host rebooted: the kubelet is gone
    steer(tmp_path, "binaries", check_s=0.5)  # the re-check is under way, still quiet, when the cancel arrives
    second = make_rig(tmp_path)
    await second.engine.start()
    await asyncio.sleep(0.2)
    assert second.engine.state == State.RUNNING
    accepted = await second.engine.cancel(request_id="c1")
    assert (accepted.request_id, accepted.note) == ("r1", "nothing to cancel")
    await second.engine.wait_job()
    assert second.states(second.events()) == ["kubelet", "readiness", "addons", "running"]
    assert journal(tmp_path)[-1] == "run kubelet 1"
    await second.engine.shutdown()


async def test_reset_failure_ends_in_failed_and_a_new_reset_is_accepted(rig: Rig) -> None:
    steer(rig.root, "reset", fail=True)
    await rig.engine.reset(request_id="z1")
    await rig.engine.wait_job()
    assert rig.engine.status().error.code == "fake_reset_failed"  # type: ignore[union-attr]
    steer(rig.root, "reset")
    await rig.engine.reset(request_id="z2")
    await rig.engine.wait_job()
    assert rig.engine.state == State.IDLE


async def test_requests_during_a_reset_and_after_shutdown_are_refused(rig: Rig) -> None:
    steer(rig.root, "reset", run_s=10)
    await rig.engine.reset(request_id="z1")
    with pytest.raises(RequestError) as info:
        await rig.engine.install(request_id="r1", version=None)
    assert info.value.code == "busy"
    with pytest.raises(RequestError) as info:
        await rig.engine.cancel(request_id="c1")
    assert info.value.code == "not_cancellable"
    assert (await rig.engine.reset(request_id="z2")).request_id == "z1"
    await rig.engine.shutdown()
    assert rig.engine.state == State.RESETTING  # the next start resumes the reset
    with pytest.raises(RequestError) as info:
        await rig.engine.install(request_id="r2", version=None)
    assert info.value.code == "shutting_down"


async def test_progress_reports_become_progress_events(rig: Rig) -> None:
    steer(rig.root, "images", progress=3)
    await rig.engine.install(request_id="r1", version=None)
    await rig.engine.wait_job()
    progress = [e.data for e in rig.events() if e.type == EventType.STEP_PROGRESS]
    assert [(p["state"], p["current"], p["total"], p["unit"]) for p in progress] == [
        ("images", 1000, 3000, "bytes"), ("images", 2000, 3000, "bytes"), ("images", 3000, 3000, "bytes")]



KEY_LINES = ["-----BEGIN EC PRIVATE KEY-----", "MHcCAQEEIBx6Ks2pQmSecretSecretSecretAoGCCqGSM49AwEHoUQDQgAE",
             "-----END EC PRIVATE KEY-----"]


async def test_private_keys_in_step_output_reach_neither_events_nor_logs(tmp_path: Path) -> None:
    logs = io.StringIO()
    configure_logging("debug", stream=logs)  # before the engine binds its logger, as __main__ does
    try:
        rig = make_rig(tmp_path)
        steer(rig.root, "certs", fail="command", output=["writing key", *KEY_LINES, "done"])
        await rig.engine.install(request_id="r1", version=None)
        await rig.engine.wait_job()
    finally:
        structlog.reset_defaults()
    failed = next(e for e in rig.events() if e.type == EventType.STEP_FAILED)
    wire = json.dumps(failed.to_cloudevent("/x")) + json.dumps(rig.engine.status().to_json())
    on_disk = (rig.root / "var/lib/lifecycle/state.json").read_text()
    for text in (wire, on_disk, logs.getvalue()):
        assert "Secret" not in text and "BEGIN EC PRIVATE KEY" not in text
    assert failed.data["error"]["details"]["output_tail"] == ["writing key", "[private key redacted]", "done",
                                                              "error: certs broke"]
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    failure = next(line for line in lines if line["event"] == "step failed")
    assert (failure["request_id"], failure["state"], failure["code"]) == ("r1", "certs", "command_failed")
