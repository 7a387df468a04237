"""The engine's `renewing` state with a test renewal routine: when a renew-certs request is taken or refused,
what pre-empts a renewal, how its outcome ends (running, or failed only once something changed), and a restart
in the middle of one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lifecycle_fakes import drain_events, fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus, Subscription
from lifecycle.engine import Engine
from lifecycle.errors import PermanentError, RequestError, TemporaryError
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.protocol import Event, EventType
from lifecycle.service import state_file
from lifecycle.step import StepContext


@dataclass
class Renewal:
    """The routine the engine runs in `renewing`; `behaviour` says what the next call does."""

    behaviour: str = "ok"  # ok | block | unchanged | changed
    calls: list[str] = field(default_factory=list)
    cancelled: bool = False

    async def __call__(self, ctx: StepContext) -> list[str]:
        self.calls.append(str(ctx.request_id))
        ctx.progress("renewed apiserver.crt", current=1, total=1, unit="files")
        if self.behaviour == "block":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if self.behaviour == "unchanged":
            raise PermanentError("ca.key: missing", code="renewal_impossible", details={"node_changed": False})
        if self.behaviour == "changed":
            raise TemporaryError("kubelet not healthy", code="kubelet_unhealthy")
        return ["apiserver.crt", "admin.conf"]


@dataclass
class Rig:
    engine: Engine
    sub: Subscription
    renewal: Renewal

    def events(self) -> list[Event]:
        return drain_events(self.sub)


def make_rig(root: Path, renewal: Renewal | None = None) -> Rig:
    bus = Bus()
    sub = bus.subscribe("test")
    renewal = renewal or Renewal()
    engine = Engine(config=make_config(root), paths=HostPaths(root), ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(HostPaths(root)), bus=bus, renew=renewal)
    return Rig(engine, sub, renewal)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = make_rig(tmp_path)
    await rig.engine.install(request_id="i1", version=None)
    await rig.engine.wait_job()
    assert rig.engine.state == State.RUNNING
    rig.events()
    yield rig
    await rig.engine.shutdown()


async def test_renewal_is_refused_unless_the_cluster_runs(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    with pytest.raises(RequestError) as err:
        await rig.engine.renew_certs(request_id="r0")
    assert err.value.code == "not_running" and rig.renewal.calls == []
    assert rig.events() == []


async def test_a_renewal_goes_running_renewing_running_with_the_files_reported(running: Rig) -> None:
    accepted = await running.engine.renew_certs(request_id="r1")
    assert (accepted.request_id, accepted.note, running.engine.state) == ("r1", "renewal started", State.RENEWING)
    await running.engine.wait_job()
    events = running.events()
    changes = [(e.data["from"], e.data["to"]) for e in events if e.type == EventType.STATE_CHANGED]
    assert changes == [("running", "renewing"), ("renewing", "running")]
    renewed = [e.data for e in events if e.type == EventType.CERTS_RENEWED]
    assert renewed == [{"seq": renewed[0]["seq"], "request_id": "r1", "files": ["apiserver.crt", "admin.conf"]}]
    progress = [e.data for e in events if e.type == EventType.STEP_PROGRESS]
    assert progress[0]["state"] == "renewing" and progress[0]["request_id"] == "r1"
    assert running.engine.status().request_id == "r1" and running.engine.status().error is None


async def test_during_a_renewal_install_is_busy_cancel_refused_renew_joins_and_reset_preempts(running: Rig) -> None:
    running.renewal.behaviour = "block"
    await running.engine.renew_certs(request_id="r1")
    await asyncio.sleep(0.05)
    with pytest.raises(RequestError) as err:
        await running.engine.install(request_id="i2", version=None)
    assert err.value.code == "busy"
    with pytest.raises(RequestError) as err:
        await running.engine.cancel(request_id="c1")
    assert err.value.code == "not_cancellable"
    joined = await running.engine.renew_certs(request_id="r2")
    assert (joined.request_id, joined.note) == ("r1", "already renewing")
    await running.engine.reset(request_id="x1")
    await running.engine.wait_job()
    assert running.renewal.cancelled and running.engine.state == State.IDLE
    assert running.renewal.calls == ["r1"]


async def test_a_failure_before_any_change_goes_back_to_running_and_says_why(running: Rig) -> None:
    running.renewal.behaviour = "unchanged"
    await running.engine.renew_certs(request_id="r1")
    await running.engine.wait_job()
    events = running.events()
    failed = [e.data for e in events if e.type == EventType.STEP_FAILED]
    assert failed[0]["state"] == "renewing" and failed[0]["error"]["code"] == "renewal_impossible"
    assert running.engine.state == State.RUNNING and running.engine.status().error is None


async def test_a_failure_after_changes_ends_in_failed_and_install_resumes(running: Rig) -> None:
    running.renewal.behaviour = "changed"
    await running.engine.renew_certs(request_id="r1")
    await running.engine.wait_job()
    status = running.engine.status()
    assert (status.state, status.error.code if status.error else None) == ("failed", "kubelet_unhealthy")
    await running.engine.install(request_id="i2", version=None)
    await running.engine.wait_job()
    assert running.engine.state == State.RUNNING


async def test_a_restart_during_a_renewal_renews_again(tmp_path: Path) -> None:
    first = make_rig(tmp_path, Renewal(behaviour="block"))
    await first.engine.install(request_id="i1", version=None)
    await first.engine.wait_job()
    await first.engine.renew_certs(request_id="r1")
    await asyncio.sleep(0.05)
    await first.engine.shutdown()  # as a SIGTERM would: the saved state stays `renewing`
    assert first.engine.state == State.RENEWING

    second = make_rig(tmp_path, Renewal())
    await second.engine.start()
    await second.engine.wait_job()
    assert second.renewal.calls == ["r1"] and second.engine.state == State.RUNNING
    assert any(e.type == EventType.CERTS_RENEWED for e in second.events())
    await second.engine.shutdown()
