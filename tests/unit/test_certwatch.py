"""Certificate expiry: each threshold announced once (remembered across a restart, re-armed by a new certificate),
the earliest expiry in the status, automatic renewal when due and not in a loop; with a real engine, test steps
and a real PKI on disk."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lifecycle_fakes import fake_plan, fake_reset, make_config, null_ports

from lifecycle.bus import Bus, Subscription
from lifecycle.certwatch import DAY_S, CertInfo, CertWatch, Scan, due_warning, next_wake_s, scan_certs
from lifecycle.config import Config, PkiConfig
from lifecycle.engine import Engine
from lifecycle.errors import PermanentError
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.pki import plan_pki, write_files
from lifecycle.pki_specs import PkiParams
from lifecycle.protocol import Event, EventType, Status
from lifecycle.service import state_file
from lifecycle.step import StepContext

T0 = 2_000_000_000.0
LEAF = CertInfo("apiserver.crt", T0 + 100 * DAY_S, is_ca=False)


def test_each_threshold_fires_once_the_tightest_when_several_are_crossed_and_a_new_cert_rearms() -> None:
    thresholds = (90.0, 30.0, 7.0)
    warning, fired = due_warning(LEAF, thresholds, None, now=T0)
    assert warning is None and fired.thresholds == ()
    warning, fired = due_warning(LEAF, thresholds, fired, now=T0 + 11 * DAY_S)
    assert warning is not None and warning["threshold_days"] == 90 and warning["file"] == "apiserver.crt"
    assert warning["days_left"] == 89 and warning["not_after"].endswith("Z")
    assert due_warning(LEAF, thresholds, fired, now=T0 + 12 * DAY_S)[0] is None
    warning, fired = due_warning(LEAF, thresholds, fired, now=T0 + 95 * DAY_S)
    assert warning is not None and warning["threshold_days"] == 7 and fired.thresholds == (90, 30, 7)
    assert due_warning(LEAF, thresholds, fired, now=T0 + 99 * DAY_S)[0] is None
    renewed = replace(LEAF, not_after=T0 + 200 * DAY_S)
    warning, fired = due_warning(renewed, thresholds, fired, now=T0 + 111 * DAY_S)
    assert warning is not None and warning["threshold_days"] == 90 and fired.thresholds == (90,)


def test_renewal_time_is_the_lead_before_the_first_leaf_unless_disabled_impossible_or_useless() -> None:
    ca = CertInfo("ca.crt", T0 + 3650 * DAY_S, is_ca=True)
    other = CertInfo("admin.conf", T0 + 50 * DAY_S, is_ca=False)
    scan = Scan((ca, LEAF, other), can_renew=True)
    assert scan.earliest == other and scan.renew_at(30) == T0 + 20 * DAY_S
    assert scan.renew_at(0) is None
    assert replace(scan, can_renew=False).renew_at(30) is None
    capped = Scan((replace(ca, not_after=other.not_after), other), can_renew=True)
    assert capped.renew_at(30) is None, "a renewal cannot outlive the CA"


def test_the_watch_wakes_at_the_next_threshold_or_renewal_within_the_interval() -> None:
    scan = Scan((LEAF,), can_renew=True)
    pki = PkiConfig(expiry_warning_days=(90.0, 30.0), renew_before_days=20, check_interval_s=3600)
    assert next_wake_s(scan, None, pki, now=T0 + 10 * DAY_S - 60) == 60  # 90 days left in a minute
    assert next_wake_s(scan, None, pki, now=T0) == 3600
    _, fired = due_warning(LEAF, pki.expiry_warning_days, None, now=T0 + 75 * DAY_S)
    assert next_wake_s(scan, fired, pki, now=T0 + 80 * DAY_S - 5) == 5  # the renewal, 30 was announced


def _write_pki(root: Path, *, issued: datetime, validity_s: float) -> None:
    params = PkiParams(node_name="unit", node_ip="127.0.0.1", endpoint_name="localhost", api_port=6443,
                       cert_validity_days=validity_s / DAY_S)
    files, _ = plan_pki({}, params, now=issued)
    paths = HostPaths(root)
    write_files(files, pki_dir=paths.pki_dir, kubeconfig_dir=paths.kubernetes_dir)


def test_scan_names_pki_files_and_kubeconfigs(tmp_path: Path) -> None:
    _write_pki(tmp_path, issued=datetime.now(UTC), validity_s=3600)
    scan = scan_certs(HostPaths(tmp_path))
    names = {c.file for c in scan.certs}
    assert {"ca.crt", "etcd/server.crt", "apiserver.crt", "admin.conf", "kubelet.conf"} <= names
    assert scan.can_renew and {c.file for c in scan.certs if c.is_ca} == {"ca.crt", "front-proxy-ca.crt",
                                                                          "etcd/ca.crt"}
    (tmp_path / "etc/kubernetes/pki/etcd/ca.key").unlink()
    assert not scan_certs(HostPaths(tmp_path)).can_renew


class _Rig:
    def __init__(self, root: Path, pki: PkiConfig, *, renew_fails: bool = False) -> None:
        self.root = root
        self.config: Config = replace(make_config(root), pki=pki)
        self.renewals = 0
        self.renew_fails = renew_fails
        self.bus = Bus()
        self.sub: Subscription = self.bus.subscribe("test")
        self.engine = Engine(config=self.config, paths=HostPaths(root), ports=null_ports(), plan=fake_plan(),
                             reset=fake_reset, store=state_file(HostPaths(root)), bus=self.bus, renew=self._renew)

    async def _renew(self, ctx: StepContext) -> list[str]:
        self.renewals += 1
        if self.renew_fails:
            raise PermanentError("etcd/ca.key: missing", code="renewal_impossible", details={"node_changed": False})
        return ["apiserver.crt"]

    def watch(self) -> CertWatch:
        return CertWatch(pki=self.config.pki, paths=HostPaths(self.root), engine=self.engine, bus=self.bus)

    def drain(self) -> tuple[list[Event], list[Status]]:
        events: list[Event] = []
        statuses: list[Status] = []
        while len(self.sub):
            item = self.sub.pop()
            if isinstance(item, Event):
                events.append(item)
            else:
                statuses.append(item)
        return events, statuses


async def test_expiry_is_announced_once_across_restarts_and_shown_in_the_status(tmp_path: Path) -> None:
    _write_pki(tmp_path, issued=datetime.now(UTC) - timedelta(seconds=60), validity_s=200)  # 140 s left
    pki = PkiConfig(cert_validity_days=200 / DAY_S, expiry_warning_days=(150 / DAY_S, 30 / DAY_S),
                    renew_before_days=0, check_interval_s=3600)
    rig = _Rig(tmp_path, pki)
    wait_s = await rig.watch().check()
    events, statuses = rig.drain()
    expiring = [e.data for e in events if e.type == EventType.CERTS_EXPIRING]
    assert len(expiring) == 1 and expiring[0]["threshold_days"] == 150 / DAY_S
    assert expiring[0]["renew_at"] is None and expiring[0]["request_id"] is None
    assert statuses[-1].certs is not None and statuses[-1].certs.renew_at is None
    assert statuses[-1].certs.earliest_expiry == min(c.not_after for c in scan_certs(HostPaths(tmp_path)).certs)
    assert 100 < wait_s <= 111, "next: the 30 s threshold"

    restarted = _Rig(tmp_path, pki)
    await restarted.watch().check()
    assert not [e for e in restarted.drain()[0] if e.type == EventType.CERTS_EXPIRING], "not again after a restart"


async def test_automatic_renewal_runs_when_due_on_a_running_cluster_and_does_not_loop(tmp_path: Path) -> None:
    _write_pki(tmp_path, issued=datetime.now(UTC) - timedelta(seconds=20), validity_s=3600)  # due 10 s ago
    pki = PkiConfig(cert_validity_days=3600 / DAY_S, expiry_warning_days=(3595 / DAY_S,),
                    renew_before_days=3590 / DAY_S, check_interval_s=600)
    rig = _Rig(tmp_path, pki, renew_fails=True)
    in_idle = CertWatch(pki=replace(pki, expiry_warning_days=()), paths=HostPaths(tmp_path), engine=rig.engine,
                        bus=rig.bus)
    assert await in_idle.check() == 600 and rig.renewals == 0, "not in idle: nothing to renew yet"
    await rig.engine.install(request_id="i1", version=None)
    await rig.engine.wait_job()
    assert rig.engine.state == State.RUNNING
    watch = rig.watch()
    await watch.check()
    await rig.engine.wait_job()
    assert rig.renewals == 1 and rig.engine.state == State.RUNNING
    events = rig.drain()[0]
    failed = [e.data for e in events if e.type == EventType.STEP_FAILED]
    assert failed[-1]["state"] == "renewing" and failed[-1]["error"]["details"]["node_changed"] is False
    assert not [e for e in events if e.type == EventType.CERTS_EXPIRING], "no warning while a renewal may fix it"
    wait_s = await watch.check()
    assert rig.renewals == 1 and 590 < wait_s <= 600, "a failed renewal waits for the check interval"
    expiring = [e.data for e in rig.drain()[0] if e.type == EventType.CERTS_EXPIRING]
    assert [e["threshold_days"] for e in expiring] == [3595 / DAY_S], "the warning says what the renewal did not fix"

    rig.renew_fails = False
    await rig.watch().check()  # a new watch (the service restarted) tries again
    await rig.engine.wait_job()
    renewed = [e.data for e in rig.drain()[0] if e.type == EventType.CERTS_RENEWED]
    assert rig.renewals == 2 and renewed[-1]["files"] == ["apiserver.crt"]
    assert renewed[-1]["request_id"].startswith("auto-renew-")
    await rig.engine.shutdown()
