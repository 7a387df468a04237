"""The engine's upgrade job with fake steps in a tmp root: the upgrade states in order and the version the status
names, where a failure leaves the cluster (old version running, repaired on the new one, or failed there when the
repair fails too), refusals that change
nothing, and a restart in an upgrade state resuming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from lifecycle_fakes import (
    FakeStep,
    drain_events,
    eventually,
    fake_plan,
    fake_reset,
    journal,
    make_config,
    null_ports,
    steer,
)
from test_engine import Rig

from lifecycle.bus import Bus
from lifecycle.engine import Engine
from lifecycle.errors import RequestError
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.protocol import EventType
from lifecycle.service import state_file
from states import UPGRADE_ORDER


def make_upgrade_rig(root: Path) -> Rig:
    bus = Bus()
    sub = bus.subscribe("test")
    engine = Engine(config=make_config(root), paths=HostPaths(root), ports=null_ports(), plan=fake_plan(),
                    reset=fake_reset, store=state_file(HostPaths(root)), bus=bus,
                    upgrade_plan=[FakeStep(name) for name in UPGRADE_ORDER])
    return Rig(root=root, engine=engine, sub=sub)


async def _running_on(rig: Rig, version: str) -> None:
    await rig.engine.install(request_id="inst", version=version)
    await rig.engine.wait_job()
    assert rig.engine.state == State.RUNNING
    drain_events(rig.sub)


async def test_upgrade_walks_the_upgrade_states_and_ends_running_on_the_new_version(tmp_path: Path) -> None:
    rig = make_upgrade_rig(tmp_path)
    await _running_on(rig, "v1.31.4")
    accepted = await rig.engine.upgrade(request_id="up", version="v1.32.1")
    assert (accepted.request_id, accepted.note) == ("up", "upgrade started")
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events) == [*UPGRADE_ORDER, "running"]
    changes = [e.data for e in events if e.type == EventType.STATE_CHANGED]
    assert [c["steps"] for c in changes[:-1]] == [6] * 6 and [c["step"] for c in changes[:-1]] == [1, 2, 3, 4, 5, 6]
    assert rig.engine.status().kubernetes_version == "v1.32.1" and rig.engine.status().error is None
    assert not (tmp_path / "var/lib/lifecycle/upgrade.json").exists()
    await rig.engine.shutdown()


@pytest.mark.parametrize(("failing", "state", "version"), [
    ("upgrade_images", "running", "v1.31.4"), ("upgrade_plan", "running", "v1.31.4"),
    ("upgrade_apply", "running", "v1.31.4"),  # no manifest at the new version: kubeadm rolled back
    ("upgrade_kubelet", "failed", "v1.32.1"), ("upgrade_readiness", "failed", "v1.32.1"),  # the repair failed too
])
async def test_a_failed_upgrade_says_which_version_the_cluster_is_on(
    tmp_path: Path, failing: str, state: str, version: str,
) -> None:
    rig = make_upgrade_rig(tmp_path)
    await _running_on(rig, "v1.31.4")
    steer(tmp_path, failing, fail="permanent")
    await rig.engine.upgrade(request_id="up", version="v1.32.1")
    await rig.engine.wait_job()
    events = rig.events()
    failures = [e.data for e in events if e.type == EventType.STEP_FAILED]
    assert {f["state"] for f in failures} == {failing}
    assert len(failures) == (2 if state == "failed" else 1)  # after upgrade_apply: the failure, then the repair's
    status = rig.engine.status()
    assert (status.state, status.kubernetes_version) == (state, version)
    assert status.error is not None and status.error.code == failures[-1]["error"]["code"]
    if state == "failed":
        assert status.error.details["first_failure"]["message"] == f"{failing} cannot work"
    assert not (tmp_path / "var/lib/lifecycle/upgrade.json").exists()
    await rig.engine.shutdown()


@pytest.mark.parametrize("failing", ["upgrade_kubelet", "upgrade_readiness"])
async def test_a_failure_after_apply_is_repaired_once_and_runs_on_the_new_version_with_the_error(
    tmp_path: Path, failing: str,
) -> None:
    rig = make_upgrade_rig(tmp_path)
    await _running_on(rig, "v1.31.4")
    steer(tmp_path, failing, fail="permanent", fail_times=1)
    await rig.engine.upgrade(request_id="up", version="v1.32.1")
    await rig.engine.wait_job()
    events = rig.events()
    # upgrade_kubelet is run again in its own state; from upgrade_readiness the repair goes back to it.
    repair = ["upgrade_kubelet", "upgrade_readiness"] if failing == "upgrade_readiness" else []
    assert rig.states(events) == [*UPGRADE_ORDER, *repair, "running"]
    said = [e.data["message"] for e in events if e.type == EventType.STEP_PROGRESS and e.data["state"] == failing]
    assert any(m.startswith("the control plane runs v1.32.1: repairing from upgrade_kubelet") for m in said), said
    [failed] = [e.data for e in events if e.type == EventType.STEP_FAILED]
    assert failed["state"] == failing
    status = rig.engine.status()
    assert (status.state, status.kubernetes_version) == ("running", "v1.32.1")
    assert status.error is not None and status.error.code == failed["error"]["code"]
    assert status.error.details["repaired"] is True and status.error.details["state"] == failing
    assert "then was repaired (the cluster runs v1.32.1)" in status.error.message
    assert not (tmp_path / "var/lib/lifecycle/upgrade.json").exists()
    await rig.engine.shutdown()


async def test_refusals_come_before_anything_changes(tmp_path: Path) -> None:
    rig = make_upgrade_rig(tmp_path)
    with pytest.raises(RequestError) as info:
        await rig.engine.upgrade(request_id="u0", version="v1.32.1")
    assert info.value.code == "not_running"  # idle
    await _running_on(rig, "v1.32.1")
    seq = rig.engine.status().seq
    for version, code in (("v1.31.4", "upgrade_not_allowed"), ("v1.32.1", "upgrade_not_allowed"),
                          ("v1.99.0", "unsupported_version")):
        with pytest.raises(RequestError) as info:
            await rig.engine.upgrade(request_id="u1", version=version)
        assert info.value.code == code, version
    assert rig.engine.status().seq == seq and rig.events() == []
    assert not (tmp_path / "var/lib/lifecycle/upgrade.json").exists()
    await rig.engine.shutdown()


async def test_install_cancel_and_a_second_upgrade_during_an_upgrade(tmp_path: Path) -> None:
    rig = make_upgrade_rig(tmp_path)
    await _running_on(rig, "v1.31.4")
    steer(tmp_path, "upgrade_binaries", block=True)
    await rig.engine.upgrade(request_id="up", version="v1.32.1")
    await eventually(lambda: rig.engine.state == State.UPGRADE_BINARIES, timeout_s=5)
    again = await rig.engine.upgrade(request_id="up2", version="v1.32.1")
    assert (again.request_id, again.note) == ("up", "already upgrading")
    for call, code in ((rig.engine.install(request_id="i", version=None), "busy"),
                       (rig.engine.cancel(request_id="c"), "not_cancellable")):
        with pytest.raises(RequestError) as info:
            await call
        assert info.value.code == code
    await rig.engine.reset(request_id="rs")
    await rig.engine.wait_job()
    assert rig.engine.state == State.IDLE
    await rig.engine.shutdown()


async def test_restart_in_an_upgrade_state_resumes_the_upgrade(tmp_path: Path) -> None:
    first = make_upgrade_rig(tmp_path)
    await _running_on(first, "v1.31.4")
    steer(tmp_path, "upgrade_kubelet", block=True)
    await first.engine.upgrade(request_id="up", version="v1.32.1")
    await eventually(lambda: first.engine.state == State.UPGRADE_KUBELET, timeout_s=5)
    await first.engine.shutdown()  # as on SIGTERM: the state stays upgrade_kubelet
    assert first.engine.status().kubernetes_version == "v1.32.1"  # apply was done

    steer(tmp_path, "upgrade_kubelet")
    second = make_upgrade_rig(tmp_path)
    await second.engine.start()
    await second.engine.wait_job()
    events = second.events()
    assert second.states(events) == ["upgrade_readiness", "running"]
    assert any(e.data.get("message") == "resuming the upgrade to v1.32.1 after a restart" for e in events)
    assert journal(tmp_path).count("run upgrade_apply 1") == 1
    assert second.engine.status().kubernetes_version == "v1.32.1"
    await second.engine.shutdown()
