"""The boot after a restart in `running` (issue 10 part 3), with test steps: steps with boot evidence are trusted
on it (their full check, slow here, is not waited for), the kubelet starts at once, the deferred full checks run in
the background and what they find wrong is repaired through the usual path; a cancel meanwhile has nothing to
cancel. Events say it was the boot fast path."""

from __future__ import annotations

import time
from pathlib import Path

from lifecycle_fakes import FakeStep, _append, fake_dir, fake_reset, journal, make_config, null_ports, steer
from test_engine import Rig

from lifecycle.bus import Bus
from lifecycle.config import STEP_NAMES
from lifecycle.engine import Engine
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.protocol import Event, EventType
from lifecycle.statefile import state_file
from lifecycle.step import BootCheck, Step, StepContext

SLOW_CHECK_S = 3.0  # a full check the boot must not wait for


class EvidenceStep(FakeStep):
    """A test step with boot evidence: `<root>/fake/<name>.evidence` holds what `boot_check` answers."""

    async def boot_check(self, ctx: StepContext) -> BootCheck:
        path = fake_dir(ctx.paths.root) / f"{self.name}.evidence"
        return BootCheck(path.read_text()) if path.exists() else BootCheck.UNKNOWN

    async def record_boot_evidence(self, ctx: StepContext) -> None:
        _append(ctx.paths.root, f"evidence {self.name}")


def evidence(root: Path, **checks: BootCheck) -> None:
    for name, check in checks.items():
        (fake_dir(root) / f"{name}.evidence").write_text(check.value)


def make_rig(root: Path, *, kubelet_started_at_boot: bool = False) -> Rig:
    bus = Bus()
    sub = bus.subscribe("test")
    plan: list[Step] = [EvidenceStep(n) if n in ("images", "binaries") else FakeStep(n) for n in STEP_NAMES]
    engine = Engine(config=make_config(root), paths=HostPaths(root), ports=null_ports(), plan=plan,
                    reset=fake_reset, store=state_file(HostPaths(root)), bus=bus,
                    kubelet_started_at_boot=kubelet_started_at_boot)
    return Rig(root=root, engine=engine, sub=sub)


async def installed_then_rebooted(root: Path) -> Rig:
    first = make_rig(root)
    await first.engine.install(request_id="r1", version=None)
    await first.engine.wait_job()
    await first.engine.shutdown()
    assert {"evidence images", "evidence binaries"} <= set(journal(root))  # recorded when each step held
    (fake_dir(root) / "kubelet.done").unlink()  # the host rebooted: the kubelet is gone
    return make_rig(root)


def progress(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.data["state"], e.data["message"]) for e in events if e.type == EventType.STEP_PROGRESS]


async def test_boot_trusts_the_evidence_starts_the_kubelet_and_checks_the_rest_in_the_background(
    tmp_path: Path,
) -> None:
    rig = await installed_then_rebooted(tmp_path)
    evidence(tmp_path, images=BootCheck.HOLDS, binaries=BootCheck.VERIFY_LATER)
    steer(tmp_path, "images", check_s=SLOW_CHECK_S)  # its full check (a registry round trip) is never made
    steer(tmp_path, "binaries", check_s=1.0)  # its full check (hashing) runs while the kubelet starts
    started_s = time.monotonic()
    await rig.engine.start()
    await rig.engine.wait_job()
    assert time.monotonic() - started_s < SLOW_CHECK_S
    events = rig.events()
    assert rig.states(events) == ["kubelet", "readiness", "addons", "running"]
    said = progress(events)
    assert said[0][0] == "kubelet" and said[0][1].startswith("boot fast path: images, binaries held on local"), said
    assert "the full check of binaries runs in the background" in said[0][1]
    assert said[-1] == ("running", "boot: the full check of binaries held")
    assert journal(tmp_path)[-1] == "evidence binaries"  # the full check held: the evidence is renewed
    await rig.engine.shutdown()


async def test_a_kubelet_started_before_the_engine_is_walked_with_events_not_found_running_quietly(
    tmp_path: Path,
) -> None:
    await installed_then_rebooted(tmp_path)
    evidence(tmp_path, images=BootCheck.HOLDS, binaries=BootCheck.HOLDS)
    (fake_dir(tmp_path) / "kubelet.done").touch()  # lifecycle.__main__ `boot_first` started it: it runs
    quiet = make_rig(tmp_path)  # a kubelet that outlived a restart of the service: nothing to say
    await quiet.engine.start()
    await quiet.engine.wait_job()
    assert quiet.states(quiet.events()) == []
    await quiet.engine.shutdown()
    rig = make_rig(tmp_path, kubelet_started_at_boot=True)  # the node is coming up: the status says so
    await rig.engine.start()
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events) == ["kubelet", "readiness", "addons", "running"]
    said = progress(events)
    assert said[0][0] == "kubelet" and said[0][1].startswith("boot fast path: ") and \
        said[0][1].endswith("the kubelet was started first"), said
    await rig.engine.shutdown()


async def test_what_the_background_check_finds_is_repaired_with_an_event_saying_why(tmp_path: Path) -> None:
    rig = await installed_then_rebooted(tmp_path)
    evidence(tmp_path, images=BootCheck.HOLDS, binaries=BootCheck.VERIFY_LATER)
    (fake_dir(tmp_path) / "binaries.done").unlink()  # size and mtime as recorded, the content damaged
    await rig.engine.start()
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events) == ["kubelet", "readiness", "addons", "running",
                                  "binaries", "network", "kubeadm", "kubelet", "readiness", "addons", "running"]
    assert ("binaries", "boot: the full check found binaries no longer holding (the boot fast path trusted its "
            "local evidence); repairing from here") in progress(events)
    assert "run binaries 1" in journal(tmp_path)
    assert rig.engine.state == State.RUNNING
    await rig.engine.shutdown()


async def test_a_step_without_usable_evidence_is_checked_in_full_and_repaired_from_there(tmp_path: Path) -> None:
    rig = await installed_then_rebooted(tmp_path)
    evidence(tmp_path, images=BootCheck.UNKNOWN, binaries=BootCheck.UNKNOWN)
    (fake_dir(tmp_path) / "images.done").unlink()  # an image gone from the engine
    await rig.engine.start()
    await rig.engine.wait_job()
    events = rig.events()
    assert rig.states(events) == ["images", "binaries", "network", "kubeadm", "kubelet", "readiness", "addons",
                                  "running"]
    assert progress(events)[0] == ("images", "after a restart: images no longer holds; repairing from here")
    await rig.engine.shutdown()


async def test_cancel_during_the_boot_has_nothing_to_cancel_and_the_boot_goes_on(tmp_path: Path) -> None:
    rig = await installed_then_rebooted(tmp_path)
    evidence(tmp_path, images=BootCheck.HOLDS, binaries=BootCheck.VERIFY_LATER)
    steer(tmp_path, "kubelet", run_s=0.5)
    await rig.engine.start()
    await rig.until(State.KUBELET)
    accepted = await rig.engine.cancel(request_id="c1")
    assert (accepted.request_id, accepted.note) == ("r1", "nothing to cancel")
    joined = await rig.engine.install(request_id="i1", version=None)
    assert (joined.request_id, joined.note) == ("r1", "already booting")
    await rig.engine.wait_job()
    assert rig.engine.state == State.RUNNING
    assert rig.states(rig.events()) == ["kubelet", "readiness", "addons", "running"]
    await rig.engine.shutdown()


async def test_a_repair_at_boot_takes_later_steps_on_their_whole_evidence(tmp_path: Path) -> None:
    """A renewal due at boot (certs no longer holds) repairs from certs on; images, whose evidence is whole, is not
    checked in full again (that check asks the registry: a boot needs no network)."""
    rig = await installed_then_rebooted(tmp_path)
    evidence(tmp_path, images=BootCheck.HOLDS, binaries=BootCheck.UNKNOWN)
    (fake_dir(tmp_path) / "certs.done").unlink()
    steer(tmp_path, "images", check_s=SLOW_CHECK_S)
    started_s = time.monotonic()
    await rig.engine.start()
    await rig.engine.wait_job()
    assert time.monotonic() - started_s < SLOW_CHECK_S
    events = rig.events()
    assert rig.states(events) == ["certs", "images", "binaries", "network", "kubeadm", "kubelet", "readiness",
                                  "addons", "running"]
    assert ("images", "already done (its local evidence held at boot)") in progress(events)
    assert journal(tmp_path)[-1] == "run kubelet 1" and "run certs 1" in journal(tmp_path)
    await rig.engine.shutdown()
