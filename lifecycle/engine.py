"""Runs the plan: one install or reset job at a time, with deadlines, retries, cancellation and events.

The only place that changes state and emits events: each change is checked against the graph, saved, then
published. Steps run as named tasks owned here; a cancellation lets them clean up and is never swallowed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from lifecycle.bus import Bus
from lifecycle.config import Config, StepPolicy
from lifecycle.drift import Change, apply, compare, pending, read_installed, reset_required_message
from lifecycle.durations import StepDurations
from lifecycle.errors import PermanentError, RequestError, StepError
from lifecycle.exposures import CLEARED, Exposure
from lifecycle.exposurestate import Change as ExposureChange
from lifecycle.exposurestate import PublishedExposures, SkippedPort
from lifecycle.logging import get_logger
from lifecycle.machine import INSTALL_STATES, PREEMPTS, UPGRADE_LAST_UNCHANGED, UPGRADE_STATES, State, StateMachine
from lifecycle.nodeaddr import NodeAddressError, node_ip_for_install
from lifecycle.outbox import Outbox, is_durable
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.protocol import STOPPED_MESSAGE, Action, CertsStatus, ErrorInfo, Event, EventType, Status
from lifecycle.step import BootCheck, BootEvidence, ClusterParams, ProgressFn, Step, StepContext, node_ip_of
from lifecycle.store import Snapshot, Store, snapshot_from_json
from lifecycle.upgrade import UpgradeRecord, check_upgrade, control_plane_version, read_record, write_record
from lifecycle.upgrade import clear as clear_upgrade

T = TypeVar("T")
ResetRoutine = Callable[[StepContext], Coroutine[Any, Any, None]]  # states.reset.reset
# Run by `install` under the lock once its own checks passed, with the state and the snapshot's step: may raise
# RequestError to refuse the install (lifecycle.pki_bundle_disk puts a host's PKI bundle in place this way).
InstallPrepare = Callable[[State, int | None], Coroutine[Any, Any, None]]
RESET_TIMEOUT_S = 300.0
RenewRoutine = Callable[[StepContext], Coroutine[Any, Any, list[str]]]  # states.renewing.renew: the renewed files
RENEW_TIMEOUT_S = 180.0
# states.renewing.renewal_due: the leaves the certs step would re-issue on a node that has a cluster ([]: none).
RenewalDue = Callable[[StepContext], Coroutine[Any, Any, list[str]]]
# states.stopping.stop_node: ends the kubelet and the pods of the node, keeps everything else.
StopRoutine = Callable[[StepContext], Coroutine[Any, Any, None]]
STOP_NODE_TIMEOUT_S = 120.0
STOP_RETRY_S = 5.0  # a step that ignores its cancellation is cancelled again this often


@dataclass(frozen=True)
class Accepted:
    """A request the engine took (or joined): the install/reset it belongs to, and what happened."""

    request_id: str | None
    note: str


@dataclass(frozen=True)
class _Job:
    kind: str  # "install", "boot", "reset", "renew", "stop", "start" or "upgrade"
    request_id: str | None
    cluster: ClusterParams | None
    task: asyncio.Task[None]


class _StepFailedError(Exception):
    """Stops the walk; the engine has already moved to `failed`."""


def free_ports(*hosts: str) -> list[int]:
    """One free TCP port per host; all sockets stay bound until every port is chosen, so they differ."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for host in hosts:
            sock = stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


class Engine:
    stop_retry_s = STOP_RETRY_S

    def __init__(
        self, *, config: Config, paths: HostPaths, ports: Ports, plan: Sequence[Step], reset: ResetRoutine,
        store: Store, bus: Bus, renew: RenewRoutine | None = None, renewal_due: RenewalDue | None = None,
        outbox: Outbox | None = None, durations: StepDurations | None = None, stop_node: StopRoutine | None = None,
        upgrade_plan: Sequence[Step] = (), kubelet_started_at_boot: bool = False,
    ) -> None:
        names = tuple(step.name for step in plan)
        if names != tuple(s.value for s in INSTALL_STATES):
            raise ValueError(f"plan steps {names} must be the install states {[s.value for s in INSTALL_STATES]}")
        upgrade_names = tuple(step.name for step in upgrade_plan)
        if upgrade_names and upgrade_names != tuple(s.value for s in UPGRADE_STATES):
            raise ValueError(f"upgrade steps {upgrade_names} must be the upgrade states "
                             f"{[s.value for s in UPGRADE_STATES]}")
        self._upgrade_plan = list(upgrade_plan)
        self._config = config
        # What the node runs on: `config` with the keys only a reset applies held at their installed values
        # (lifecycle.drift); those keys are `_drift` and show in the status until a reset.
        self._effective = config
        self._drift: list[Change] = []
        self._paths = paths
        self._ports = ports
        self._plan = list(plan)
        self._reset = reset
        self._stop_node = stop_node
        self._renew = renew
        self._renewal_due = renewal_due
        self._certs: CertsStatus | None = None  # what the certificate watch last reported
        self._store = store
        self._bus = bus
        self._outbox = outbox  # state changes and failures are written here before they are published
        self._log = get_logger("lifecycle.engine", node=config.node_name)
        self._snap = store.load() or Snapshot(state=State.IDLE.value, since=time.time(), seq=0)
        if outbox is not None:
            self._snap = self._newer_in_outbox(outbox, store, self._snap)
        self._snap = replace(self._snap, cluster=self._with_node_ip(self._snap.cluster))
        if outbox is not None:  # a change appended to the outbox just before a kill keeps its numbers
            self._snap = replace(self._snap, seq=max(self._snap.seq, outbox.last_seq),
                                 state_seq=max(self._snap.state_seq, outbox.last_state_seq))
        self._machine = StateMachine(State(self._snap.state))
        self._job: _Job | None = None
        self._lock = asyncio.Lock()  # one control operation (install/reset/cancel/shutdown) at a time
        self._stopping = False
        self._exposures = PublishedExposures(paths.state_dir / "exposures.json", host=config.exposures.host)
        self._exposures_cleared = False  # the empty retained message went out since this start
        # The last successful runs of each step, and the running step's `lifecycle.step.slow` data once it
        # outlasted them (in the status until the next state change).
        self._durations = durations or StepDurations(paths.state_dir / "durations.json")
        self._slow: dict[str, Any] | None = None
        # Set once a boot after a restart has started the kubelet, or has ended (at once when there is no boot).
        self._past_boot_checks = asyncio.Event()
        # The kubelet was started before the engine, by the boot's first step (lifecycle.__main__ `boot_first`): the
        # boot then walks from `kubelet` with its events, as when it starts the kubelet itself, instead of finding
        # it running and saying nothing (which is for a kubelet that outlived a restart of the service).
        self._kubelet_started_at_boot = kubelet_started_at_boot

    # ---- public API ---------------------------------------------------------------------------------------

    def _newer_in_outbox(self, outbox: Outbox, store: Store, saved: Snapshot) -> Snapshot:
        """The state the hosts may have heard of: a state change is published before state.json is replaced (in
        the same callback), so a kill between the two leaves state.json one change behind the outbox, whose record
        holds the file's new content. That one is taken, and written to state.json now (before the outbox could
        be emptied), so the restart goes on from where the hosts heard it went instead of making the change
        again."""
        if outbox.last_snapshot is None:
            return saved
        try:
            newer = snapshot_from_json(outbox.last_snapshot, known_states={state.value for state in State})
        except (TypeError, ValueError) as exc:  # a record of another version: the change is made again instead
            self._log.warning("the outbox's newest state could not be read; keeping state.json's", error=str(exc))
            return saved
        if newer.state_seq <= saved.state_seq:  # its own number: the record's, not the outbox's newest
            return saved
        self._log.info("state.json was one change behind the outbox (a kill after the publish): taking the "
                       "outbox's", state=newer.state, saved_state=saved.state, state_seq=newer.state_seq)
        store.save(newer)
        return newer

    @property
    def state(self) -> State:
        return self._machine.current

    @property
    def config(self) -> Config:
        """The settings the node runs on: the file's, except keys that wait for a reset (`config_drift`)."""
        return self._effective

    @property
    def paths(self) -> HostPaths:
        return self._paths

    def status(self) -> Status:
        snap = self._snap
        return Status(
            node=self._config.node_name, state=snap.state, since=snap.since, seq=snap.seq,
            request_id=snap.request_id, kubernetes_version=snap.cluster.kubernetes_version if snap.cluster else None,
            step=snap.step, steps=self._steps_in(State(snap.state)), error=snap.error, certs=self._certs,
            config_drift=tuple(change.to_json() for change in self._drift), state_seq=snap.state_seq,
            usual_s=self._durations.all_usual_s(), slow=self._slow,
        )

    async def past_boot_checks(self) -> None:
        """Returns once the boot after a restart is past its checks (entering `kubelet`, or over), at once when the
        start made no boot. What the service starts besides the engine (the certificate and exposure watches)
        waits for this: their first passes (the Kubernetes client's import alone costs a second of CPU) would
        compete with the boot for the one event loop and delay the kubelet (bench/bench_boot.py)."""
        await self._past_boot_checks.wait()

    async def start(self) -> None:
        """Pick up where the last run stopped: resume an install or a reset, re-check a running cluster."""
        snap, state = self._snap, self.state
        cluster_now = self._follow_config(snap.cluster)
        snap = replace(snap, cluster=cluster_now)
        self._bus.publish(self.status())
        if state in INSTALL_STATES:
            cluster = snap.cluster or self._resolve_cluster(None)
            self._emit_progress(state, snap.request_id, "resuming after a restart")
            first = INSTALL_STATES.index(state)
            self._start_install(snap.request_id, cluster, first=first, quiet_until=0)
        elif state == State.RENEWING and snap.cluster is not None:
            self._emit_progress(state, snap.request_id, "renewing again after a restart")  # every file is re-issued
            self._start_job("renew", snap.request_id, snap.cluster, lambda: self._renew_job(snap.request_id))
        elif state in UPGRADE_STATES:
            self._resume_upgrade(state, snap.request_id)
        elif state == State.RESETTING:
            self._emit_progress(state, snap.request_id, "resuming the reset after a restart")
            self._start_job("reset", snap.request_id, snap.cluster, lambda: self._reset_job(snap.request_id))
        elif state == State.STOPPED and self._stop_node is not None:
            # Stays stopped: the stop is made again (a kill may have cut it short), nothing is started.
            self._emit_progress(state, snap.request_id, "making sure the node is stopped after a restart")
            self._start_job("stop", snap.request_id, snap.cluster, lambda: self._stop_node_job(snap.request_id))
        elif state == State.RUNNING and snap.cluster is not None:
            # Quietly: no event unless some step's outcome no longer holds (a kubelet that died with the host).
            cluster = snap.cluster
            self._start_job("boot", snap.request_id, cluster, lambda: self._boot_job(snap.request_id, cluster))
            return
        self._past_boot_checks.set()

    async def install(self, *, request_id: str, version: str | None, prepare: InstallPrepare | None = None) -> Accepted:
        async with self._lock:
            self._check_accepting()
            if version is not None and version not in self._config.kubernetes.versions:
                known = ", ".join(sorted(self._config.kubernetes.versions))
                raise RequestError("unsupported_version", f"{version} is not a configured version ({known})")
            job = self._job
            if job is not None and job.kind == "reset":
                raise RequestError("busy", "a reset is in progress; request the install once it finished")
            if job is not None and job.kind in ("stop", "start"):
                doing = "stopped" if job.kind == "stop" else "started"
                raise RequestError("busy", f"the cluster is being {doing}; try again once that finished")
            if job is not None and job.kind == "renew":
                raise RequestError("busy", "certificates are being renewed; request the install once that finished")
            if job is not None and job.kind == "upgrade":
                raise RequestError("busy", "the cluster is being upgraded; request the install once that finished")
            current = job.cluster if job is not None else self._snap.cluster
            if version is not None and current is not None and version != current.kubernetes_version:
                raise RequestError(
                    "upgrade_unsupported",
                    f"the node is set up for {current.kubernetes_version}; reset before installing {version}",
                )
            if job is None:
                drift_before = self._drift
                current = self._follow_config(current)
                if self._drift != drift_before:
                    self._bus.publish(self.status())
            if self._drift:
                raise RequestError("reset_required", reset_required_message(self._drift))
            if prepare is not None:
                await prepare(self.state, self._snap.step)
            if job is not None:  # in running (or the states it re-enters), the boot after a restart is the job
                return Accepted(job.request_id, "already running" if self.state == State.RUNNING else
                                "already booting" if job.kind == "boot" else "already installing")
            if self.state == State.RUNNING:
                return Accepted(self._snap.request_id, "already running")
            if self.state == State.STOPPED:
                raise RequestError("stopped", "the cluster is stopped; request a start to bring it back")
            if self.state == State.FAILED:
                # Steps before the one that failed are checked quietly; the walk re-enters the failed one.
                quiet_until = (self._snap.step - 1) if self._snap.step else 0
                if self._snap.step == INSTALL_STATES.index(State.PREFLIGHT) + 1:
                    current = None  # preflight wrote nothing: start over with the config and machine as they are now
                cluster = self._with_node_ip(current) or self._resolve_cluster(version)
                self._start_install(request_id, cluster, first=0, quiet_until=quiet_until)
                return Accepted(request_id, "install resumed")
            if self.state != State.IDLE:
                raise RequestError("busy", f"cannot install in state {self.state}")
            self._start_install(request_id, self._resolve_cluster(version), first=0, quiet_until=0)
            return Accepted(request_id, "install started")

    async def reset(self, *, request_id: str) -> Accepted:
        async with self._lock:
            self._check_accepting()
            job = self._job
            if job is not None and job.kind == "reset":
                return Accepted(job.request_id, "already resetting")
            if job is not None:
                if self.state not in PREEMPTS[Action.RESET]:
                    raise RequestError("busy", f"a reset cannot interrupt state {self.state}")
                await self._stop_job()
            self._transition(State.RESETTING, step=None, request_id=request_id, cluster=self._snap.cluster)
            self._start_job("reset", request_id, self._snap.cluster, lambda: self._reset_job(request_id))
            return Accepted(request_id, "reset started")

    async def stop(self, *, request_id: str) -> Accepted:
        """Stop the kubelet and every pod of a running cluster, keep everything else (state stopped)."""
        async with self._lock:
            self._check_accepting()
            job = self._job
            if job is not None and job.kind == "stop":
                return Accepted(job.request_id, "already stopping")
            if self._stop_node is None:
                raise RequestError("not_supported", "this service was started without stop and start")
            if self.state == State.STOPPED:
                return Accepted(self._snap.request_id, "already stopped")
            if self.state == State.IDLE:
                raise RequestError("not_installed", "nothing to stop: no cluster is installed")
            if job is not None or self.state != State.RUNNING:
                doing = f"a {job.kind} runs" if job is not None else "the install failed"
                raise RequestError("busy", f"cannot stop in state {self.state} ({doing}); a stop needs `running`")
            self._transition(State.STOPPED, step=None, request_id=request_id, cluster=self._snap.cluster)
            self._start_job("stop", request_id, self._snap.cluster, lambda: self._stop_node_job(request_id))
            return Accepted(request_id, "stop started")

    async def start_cluster(self, *, request_id: str) -> Accepted:
        """Bring a stopped cluster back: the install from the kubelet step on (no pull, extraction or kubeadm)."""
        async with self._lock:
            self._check_accepting()
            job = self._job
            if job is not None and job.kind == "start":
                return Accepted(job.request_id, "already starting")
            if self.state == State.RUNNING and (job is None or job.kind in ("install", "boot")):
                return Accepted(self._snap.request_id, "already running")
            if self.state == State.STOPPED and job is not None:
                raise RequestError("busy", "the cluster is still being stopped; request the start once it is")
            if self.state != State.STOPPED or self._snap.cluster is None:
                if job is not None:
                    raise RequestError("busy", f"{job.kind} in progress in state {self.state}")
                hint = "request an install" if self.state in (State.IDLE, State.FAILED) else "wait for it"
                raise RequestError("not_stopped", f"only a stopped cluster is started, not one in {self.state}; {hint}")
            cluster = self._snap.cluster
            first = INSTALL_STATES.index(State.KUBELET)
            self._start_job("start", request_id, cluster,
                            lambda: self._walk(request_id, cluster, first=first, quiet_until=0))
            return Accepted(request_id, "start started")

    async def renew_certs(self, *, request_id: str) -> Accepted:
        """Re-issue leaf certificates and kubeconfigs from the same CAs on a running cluster (state renewing)."""
        async with self._lock:
            self._check_accepting()
            job = self._job
            if job is not None and job.kind == "renew":
                return Accepted(job.request_id, "already renewing")
            if self._renew is None:
                raise RequestError("not_supported", "this service was started without certificate renewal")
            if job is not None and job.kind == "boot":  # a renewal due at boot is made by the boot itself
                raise RequestError("busy", "the node is booting; try again once it is running")
            if self.state != State.RUNNING:
                raise RequestError("not_running", f"certificates are renewed on a running cluster, not in {self.state}")
            if job is not None:
                doing = "started" if job.kind == "start" else "re-checked"
                raise RequestError("busy", f"the cluster is being {doing}; try again shortly")
            self._transition(State.RENEWING, step=None, request_id=request_id, cluster=self._snap.cluster)
            self._start_job("renew", request_id, self._snap.cluster, lambda: self._renew_job(request_id))
            return Accepted(request_id, "renewal started")

    async def upgrade(self, *, request_id: str, version: str) -> Accepted:
        """Move a running cluster to `version` in place (docs/protocol.md "Upgrade"); every refusal comes before
        anything changes."""
        async with self._lock:
            self._check_accepting()
            if not self._upgrade_plan:
                raise RequestError("not_supported", "this service was started without upgrades")
            if version not in self._config.kubernetes.versions:
                known = ", ".join(sorted(self._config.kubernetes.versions))
                raise RequestError("unsupported_version", f"{version} is not a configured version ({known})")
            job, state = self._job, self.state
            if state in UPGRADE_STATES or (job is not None and job.kind == "upgrade"):
                record = read_record(self._paths)
                if record is not None and record.to_version == version and job is not None:
                    return Accepted(job.request_id, "already upgrading")
                going_to = record.to_version if record is not None else "another version"
                raise RequestError("busy", f"an upgrade to {going_to} is in progress")
            if state != State.RUNNING or self._snap.cluster is None:
                if state in (State.IDLE, State.FAILED, State.STOPPED):
                    raise RequestError("not_running", f"only a running cluster is upgraded, not one in {state}")
                raise RequestError("busy", f"cannot upgrade in state {state}; try again once it is running")
            if job is not None and job.kind != "install":
                raise RequestError("busy", f"a {job.kind} is in progress; try again once it finished")
            if self._drift:
                raise RequestError("reset_required", reset_required_message(self._drift))
            current = self._snap.cluster
            check_upgrade(current.kubernetes_version, version)
            if job is not None:
                await self._stop_job()  # the quiet re-check after a restart: it only reads, in running
            record = UpgradeRecord(from_version=current.kubernetes_version, to_version=version)
            await asyncio.to_thread(write_record, self._paths, record)
            target = replace(current, kubernetes_version=version)
            self._start_job("upgrade", request_id, current,
                            lambda: self._upgrade_walk(request_id, current, target, first=0))
            return Accepted(request_id, "upgrade started")

    def report_certs(self, certs: CertsStatus | None, *, expiring: Sequence[dict[str, Any]] = ()) -> None:
        """From the certificate watch: one `lifecycle.certs.expiring` per item, and the status when `certs` changed."""
        for data in expiring:
            self._emit(EventType.CERTS_EXPIRING, {"request_id": None, **data})
        if certs != self._certs:
            self._certs = certs
            self._bus.publish(self.status())

    @property
    def node_ip(self) -> str:
        """The node's address as the install chose it ("" when not known)."""
        cluster = self._snap.cluster
        return node_ip_of(self._effective, cluster) if cluster is not None else self._effective.kubernetes.node_ip

    def report_exposures(self, exposures: tuple[Exposure, ...]) -> None:
        """From the exposure watch (lifecycle.exposewatch): the LoadBalancer ports now wanted. One event per
        change, then the whole set as the retained exposures message (seq saved before it goes out)."""
        message, found = self._exposures.update(exposures)
        self._emit_exposure_changes(found)
        if message is not None:
            self._bus.publish(message)

    def report_skipped_ports(self, skipped: Sequence[SkippedPort]) -> None:
        """From the exposure watch: LoadBalancer ports the host cannot be given (SCTP, no node port), newly seen.
        An event and a warning each, so that a Service left `<pending>` says why."""
        for port in skipped:
            self._log.warning("exposure skipped", exposure=f"{port.namespace}/{port.service}", port=port.port,
                              protocol=port.protocol, reason=port.reason)
            self._emit(EventType.EXPOSURE_SKIPPED, {"request_id": None, **port.to_json()})

    def clear_exposures(self) -> None:
        """Nothing is exposed any more (the cluster is being reset): `removed` for each, the message cleared."""
        if self._exposures.current is None and self._exposures_cleared:
            return
        # Once per start even when nothing is saved: a kill after the clear was saved but before the broker had
        # it would otherwise leave the old retained message there for good.
        self._exposures_cleared = True
        self._emit_exposure_changes(self._exposures.clear())
        self._bus.publish(CLEARED)

    def _emit_exposure_changes(self, found: Sequence[ExposureChange]) -> None:
        kinds = {"added": EventType.EXPOSURE_ADDED, "removed": EventType.EXPOSURE_REMOVED,
                 "conflict": EventType.EXPOSURE_CONFLICT}
        for change in found:
            self._log.info(f"exposure {change.kind}", exposure=change.exposure.name, port=change.exposure.port,
                           protocol=change.exposure.protocol, conflict=change.exposure.conflict)
            self._emit(kinds[change.kind], {"request_id": None, **change.exposure.to_json()})

    async def cancel(self, *, request_id: str) -> Accepted:
        async with self._lock:
            self._check_accepting()
            job = self._job
            if job is None:
                return Accepted(self._snap.request_id, "nothing to cancel")
            if job.kind == "boot":
                # The boot after a restart: nothing was requested, so there is nothing to cancel; stopping it would
                # leave `running` claimed by a node whose processes may be gone (or the kubelet half started). Once a
                # check finds a step not done, the boot becomes a repair (an install job), which a cancel stops.
                return Accepted(self._snap.request_id, "nothing to cancel")
            if job.kind == "stop":
                raise RequestError("not_cancellable", "a stop cannot be cancelled; request a start once it finished")
            if job.kind == "upgrade":
                raise RequestError("not_cancellable", "an upgrade cannot be cancelled (a reset does interrupt it)")
            if job.kind == "reset" or self.state not in PREEMPTS[Action.CANCEL]:
                raise RequestError("not_cancellable", f"a {job.kind} in state {self.state} cannot be cancelled")
            await self._stop_job()
            state = self.state
            if state in INSTALL_STATES:
                error = ErrorInfo.safe("cancelled", f"cancelled by request {request_id}", retryable=True,
                                       details={"step": state.value})
                self._fail(state, job.request_id, job.cluster, error, step=self._snap.step)
            return Accepted(job.request_id, f"cancelled in {state}")

    async def shutdown(self) -> None:
        """Stop taking requests and cancel the running job cleanly; the saved state lets the next start resume."""
        self._stopping = True
        async with self._lock:
            await self._stop_job()
        await self._state_saved()

    async def wait_job(self) -> None:
        """Return when no job is running and state.json says where it ended (tests and the CLI-less use)."""
        while self._job is not None:
            await asyncio.wait({self._job.task})
        await self._state_saved()

    async def _state_saved(self) -> None:
        if self._outbox is not None:
            await self._outbox.checkpoints_done()

    # ---- jobs ----------------------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self._stopping:
            raise RequestError("shutting_down", "the service is shutting down")

    def _follow_config(self, cluster: ClusterParams | None) -> ClusterParams | None:
        """Compare the configuration with the settings the installed cluster was made from (none: nothing is
        installed) and decide what the steps are given: live changes as configured, others held until a reset.
        Returns the cluster parameters to use (a changed kubelet healthz port is live)."""
        installed = read_installed(self._paths) if cluster is not None else None
        if installed is None or cluster is None:
            self._effective, self._drift = self._config, []
            return cluster
        changes = compare(installed, self._config)
        self._effective, cluster = apply(self._config, cluster, changes)
        if pending(changes) != self._drift:
            self._drift = pending(changes)
            if self._drift:
                self._log.warning("configuration changes wait for a reset",
                                  keys=[change.key for change in self._drift])
        live = [change.key for change in changes if change.live]
        if live:
            self._log.info("configuration changes to apply to the running cluster", keys=live)
        return cluster

    def _resolve_cluster(self, version: str | None) -> ClusterParams:
        k8s = self._config.kubernetes
        # used where the config says 0; the API server listens on every address
        api_port, healthz_port, metrics_port = free_ports("0.0.0.0", "127.0.0.1", "127.0.0.1")
        return ClusterParams(
            kubernetes_version=version or k8s.version,
            api_port=k8s.api_port or api_port,
            kubelet_healthz_port=k8s.kubelet_healthz_port or healthz_port,
            etcd_metrics_port=k8s.etcd_metrics_port or metrics_port,
            node_ip=self._node_ip(),
        )

    def _node_ip(self) -> str:
        """The configured node address, else the detected one; "" when neither is known (the preflight step then
        fails with the reason, and the next install detects again)."""
        try:
            return node_ip_for_install(self._config.kubernetes.node_ip, self._paths.root)
        except NodeAddressError:
            return ""

    def _with_node_ip(self, cluster: ClusterParams | None) -> ClusterParams | None:
        """A saved install whose address was not known (state from before the key existed, or detection failed):
        the configured or detected address from now on."""
        if cluster is None or cluster.node_ip:
            return cluster
        return replace(cluster, node_ip=self._node_ip())

    def _start_install(self, request_id: str | None, cluster: ClusterParams, *, first: int, quiet_until: int) -> None:
        self._start_job("install", request_id, cluster,
                        lambda: self._walk(request_id, cluster, first=first, quiet_until=quiet_until))

    def _start_job(
        self, kind: str, request_id: str | None, cluster: ClusterParams | None,
        work: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        task = asyncio.create_task(self._supervise(work), name=f"lifecycle-{kind}-{request_id or 'resumed'}")
        self._job = _Job(kind, request_id, cluster, task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        if self._job is not None and self._job.task is task:
            self._job = None

    async def _supervise(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await work()  # created here: a job cancelled before it ran leaves no un-awaited coroutine behind
        except _StepFailedError:
            pass
        except Exception as exc:  # a bug in the engine itself or a failing disk: make it visible, never silent
            self._log.exception("job crashed", state=self.state.value)
            if self._machine.allows(State.FAILED):
                error = ErrorInfo.safe("internal", f"{type(exc).__name__}: {exc}")
                self._fail(self.state, self._snap.request_id, self._snap.cluster, error, step=self._snap.step)

    async def _stop_job(self) -> None:
        job = self._job
        if job is None:
            return
        while not job.task.done():
            job.task.cancel()
            done, _ = await asyncio.wait({job.task}, timeout=self.stop_retry_s)
            if not done:
                self._log.warning("job ignores cancellation, cancelling again", job=job.task.get_name())
        self._job = None

    async def _walk(
        self, request_id: str | None, cluster: ClusterParams, *, first: int, quiet_until: int,
        note: str | None = None, on_enter: Callable[[], None] | None = None, trusted: frozenset[str] = frozenset(),
    ) -> None:
        """Enter each step's state and run it; steps below `quiet_until` are only checked, without events,
        until one of them is found not done. `note` is said (progress) in the first state the walk enters, and
        `on_enter` called then. Steps named in `trusted` are done on their boot evidence (lifecycle.step)."""
        for index, step in enumerate(self._plan):
            if index < first:
                continue
            if index < quiet_until:
                if await self._quietly_done(step, request_id, cluster):
                    continue
                quiet_until = 0
            # A step resumed after a restart ran partly before it: its duration here is not a whole run's.
            whole_run = self._snap.state != step.name
            if whole_run:
                self._transition(State(step.name), step=index + 1, request_id=request_id, cluster=cluster)
            if note is not None:
                self._emit_progress(State(step.name), request_id, note)
                note = None
            if on_enter is not None:
                on_enter()
                on_enter = None
            await self._run_step(step, index, request_id, cluster, record=whole_run, trusted=step.name in trusted)
        if self.state != State.RUNNING:
            self._transition(State.RUNNING, step=None, request_id=request_id, cluster=cluster)

    async def _boot_job(self, request_id: str | None, cluster: ClusterParams) -> None:
        """After a restart in `running` (a reboot: every process of the node gone). The steps before the kubelet
        are checked on their local evidence where they keep some (lifecycle.step.BootEvidence: no registry request,
        no hashing), the kubelet is started at once and the costly checks run in the background while the node
        comes up. A step found not holding, before or after, goes the usual repair path, its event saying why."""
        try:
            await self._boot(request_id, cluster)
        finally:
            self._past_boot_checks.set()

    async def _boot(self, request_id: str | None, cluster: ClusterParams) -> None:
        kubelet_at = INSTALL_STATES.index(State.KUBELET)
        checks = {step.name: await self._boot_check(step, request_id, cluster) for step in self._plan[:kubelet_at]}
        trusted = [name for name, check in checks.items() if check != BootCheck.UNKNOWN]
        deferred = [step for step in self._plan if checks.get(step.name) == BootCheck.VERIFY_LATER]
        for index, step in enumerate(self._plan[:kubelet_at]):
            if checks[step.name] == BootCheck.UNKNOWN and not await self._quietly_done(step, request_id, cluster):
                # The usual repair from here; a later step whose evidence is whole (no check left for later) is
                # taken as done: a renewal due at boot must not make the boot ask the registry.
                whole = frozenset(name for name, check in checks.items() if check == BootCheck.HOLDS)
                self._boot_becomes_repair()
                await self._walk(request_id, cluster, first=index, quiet_until=0,
                                 note=f"after a restart: {step.name} no longer holds; repairing from here",
                                 on_enter=self._past_boot_checks.set, trusted=whole)
                return
        preload: list[asyncio.Task[None]] = []

        def entered_kubelet() -> None:
            self._past_boot_checks.set()
            # The Kubernetes client's import (a second of CPU) while the kubelet starts, not when readiness asks.
            preload.append(asyncio.create_task(self.preload_kube_client(), name="boot-preload-kube-client"))

        note = "boot fast path: " + (f"{', '.join(trusted)} held on local evidence (no registry request, no "
                                     "hashing), the rest checked in full; " if trusted else "")
        if deferred:
            note += f"the full check of {', '.join(step.name for step in deferred)} runs in the background; "
        state_seq = self._snap.state_seq
        verify = asyncio.create_task(self._verify_later(deferred, request_id, cluster), name="boot-verify")
        failed: _StepFailedError | None = None
        try:
            try:
                quiet_until = kubelet_at if self._kubelet_started_at_boot else len(self._plan)
                await self._walk(request_id, cluster, first=kubelet_at, quiet_until=quiet_until,
                                 note=note + ("the kubelet was started first" if self._kubelet_started_at_boot
                                              else "starting the kubelet"), on_enter=entered_kubelet)
            except _StepFailedError as exc:
                failed = exc
            wrong = await verify
        finally:
            for task in (verify, *preload):
                task.cancel()
            await asyncio.gather(verify, *preload, return_exceptions=True)
        if wrong is None:
            if failed is not None:
                raise failed
            if deferred and self._snap.state_seq != state_seq:
                self._emit_progress(State.RUNNING, request_id, f"boot: the full check of "
                                    f"{', '.join(step.name for step in deferred)} held")
            return
        self._boot_becomes_repair()  # from running, or from failed when the kubelet tripped over what was wrong
        await self._walk(request_id, cluster, first=0, quiet_until=len(self._plan),
                         note=f"boot: the full check found {wrong} no longer holding (the boot fast path trusted "
                              "its local evidence); repairing from here")

    async def preload_kube_client(self) -> None:
        """Import the Kubernetes client off the loop, once (the adapter's `preload`); never raises."""
        try:
            await self._ports.kube.preload()
        except Exception as exc:  # best effort: the readiness step's first connect loads it anyway
            self._log.info("could not preload the Kubernetes client", error=f"{type(exc).__name__}: {exc}")

    async def _boot_check(self, step: Step, request_id: str | None, cluster: ClusterParams) -> BootCheck:
        if not isinstance(step, BootEvidence):
            return BootCheck.UNKNOWN
        ctx = self._context(step.name, request_id, cluster, self._policy(step).timeout_s)
        try:
            async with asyncio.timeout_at(ctx.deadline):
                return await self._in_task(step.boot_check(ctx), name=f"step-{step.name}-boot-check")
        except Exception as exc:  # the full check that follows says what is wrong
            ctx.log.info("boot check failed; checking in full", error=f"{type(exc).__name__}: {exc}")
            return BootCheck.UNKNOWN

    async def _verify_later(self, steps: Sequence[Step], request_id: str | None, cluster: ClusterParams) -> str | None:
        """The full checks the boot deferred, one after the other: the first step that does not hold, else None."""
        for step in steps:
            if not await self._quietly_done(step, request_id, cluster):
                return step.name
        return None

    def _boot_becomes_repair(self) -> None:
        """Something was found wrong: from here the job is an install repairing the node, which a cancel stops."""
        if self._job is not None and self._job.kind == "boot":
            self._job = replace(self._job, kind="install")

    def _resume_upgrade(self, state: State, request_id: str | None) -> None:
        """After a restart in an upgrade state: the saved record names the target; each step's `is_done` says
        what already holds, so the walk goes on from the state the kill interrupted."""
        record = read_record(self._paths)
        cluster = self._snap.cluster
        if record is None or cluster is None:
            error = ErrorInfo.safe("internal", f"restarted in {state} without the upgrade's record "
                                               f"({self._paths.state_dir / 'upgrade.json'})")
            self._fail(state, request_id, cluster, error, step=self._snap.step)
            return
        old = replace(cluster, kubernetes_version=record.from_version)
        target = replace(cluster, kubernetes_version=record.to_version)
        self._emit_progress(state, request_id, f"resuming the upgrade to {record.to_version} after a restart")
        first = UPGRADE_STATES.index(state)
        self._start_job("upgrade", request_id, cluster,
                        lambda: self._upgrade_walk(request_id, old, target, first=first))

    async def _upgrade_walk(self, request_id: str | None, old: ClusterParams, target: ClusterParams, *,
                            first: int) -> None:
        """Each upgrade step with the target in its context; the status names the old version until
        `upgrade_apply` is done (the control plane changed), the new one from then on. A failure after that is
        repaired once from `upgrade_kubelet` (the kubelet restarted on the new binaries, readiness waited for
        again): the cluster then runs on the new version, and the status' error says what failed."""
        changed_at = UPGRADE_STATES.index(UPGRADE_LAST_UNCHANGED)
        kubelet_at = UPGRADE_STATES.index(State.UPGRADE_KUBELET)
        first_failure: ErrorInfo | None = None  # the failure a repair is recovering from
        repaired: ErrorInfo | None = None  # what `running` says of it once the repair worked
        to_repair: list[tuple[State, ErrorInfo]] = []  # set by `failed` below when the step's failure is repaired
        index = first
        while index < len(self._upgrade_plan):
            step = self._upgrade_plan[index]
            shown = old if index <= changed_at else target
            whole_run = self._snap.state != step.name
            if whole_run:
                self._transition(State(step.name), step=index + 1, request_id=request_id, cluster=shown)
            to_repair.clear()

            def failed(state: State, error: ErrorInfo, step_no: int, *, before: ErrorInfo | None = first_failure,
                       repairable: bool = index > changed_at) -> None:
                if repairable and before is None:
                    to_repair.append((state, error))
                    return
                self._upgrade_failed(state, error, step_no, request_id=request_id, old=old, target=target,
                                     first_failure=before)

            try:
                await self._run_step(step, index, request_id, target, record=whole_run, on_fail=failed)
            except _StepFailedError:
                if not to_repair:
                    raise
                [(state, first_failure)] = to_repair
                repaired = self._upgrade_repair(state, first_failure, request_id=request_id, target=target)
                index = kubelet_at
                continue
            index += 1
        await asyncio.to_thread(clear_upgrade, self._paths)
        self._transition(State.RUNNING, step=None, request_id=request_id, cluster=target, error=repaired)

    def _upgrade_repair(self, state: State, error: ErrorInfo, *, request_id: str | None,
                        target: ClusterParams) -> ErrorInfo:
        """A step after `upgrade_apply` failed: the control plane already runs the new version (kubeadm keeps it
        once healthy), so going back is no option; the kubelet is restarted on the new binaries and readiness
        waited for again, each step under a fresh deadline. Returns the error `running` will carry."""
        version = target.kubernetes_version
        self._log.error("upgrade step failed after the control plane changed; repairing", state=state.value,
                        code=error.code, error=error.message, version=version)
        self._emit(EventType.STEP_FAILED, {"request_id": request_id, "state": state.value, "error": error.to_json()})
        self._emit_progress(state, request_id, f"the control plane runs {version}: repairing from upgrade_kubelet "
                                               "(the kubelet restarted on the new binaries, readiness again)")
        if state != State.UPGRADE_KUBELET:
            self._transition(State.UPGRADE_KUBELET, step=UPGRADE_STATES.index(State.UPGRADE_KUBELET) + 1,
                             request_id=request_id, cluster=target)
        return ErrorInfo.safe(error.code, f"upgrade to {version}: {state.value} failed, then was repaired (the "
                                          f"cluster runs {version}): {error.message}", error.retryable,
                              details={**error.details, "state": state.value, "repaired": True,
                                       "running_version": version})

    def _upgrade_failed(self, state: State, error: ErrorInfo, step_no: int, *, request_id: str | None,
                        old: ClusterParams, target: ClusterParams, first_failure: ErrorInfo | None = None) -> None:
        """Before the control plane changed, or rolled back by kubeadm: `running` on the old version, the error in
        the status. After, once the repair failed too: `failed` on the new version (an `install` repairs)."""
        running = control_plane_version(self._paths)
        if UPGRADE_STATES.index(state) <= UPGRADE_STATES.index(UPGRADE_LAST_UNCHANGED) and \
                running != target.kubernetes_version:
            self._log.error("upgrade failed; the cluster runs on", state=state.value, code=error.code,
                            error=error.message, version=old.kubernetes_version)
            self._emit(EventType.STEP_FAILED, {"request_id": request_id, "state": state.value,
                                               "error": error.to_json()})
            clear_upgrade(self._paths)
            self._transition(State.RUNNING, step=None, request_id=request_id, cluster=old, error=error)
            return
        if first_failure is not None:
            error = ErrorInfo.safe(error.code, f"{error.message} (repairing after: {first_failure.message})",
                                   error.retryable, details={**error.details, "first_failure": first_failure.to_json()})
        clear_upgrade(self._paths)  # `failed` is not resumed as an upgrade: an install repairs on the new version
        self._fail(state, request_id, target, error, step=step_no)

    async def _quietly_done(self, step: Step, request_id: str | None, cluster: ClusterParams) -> bool:
        ctx = self._context(step.name, request_id, cluster, self._policy(step).timeout_s)
        try:
            async with asyncio.timeout_at(ctx.deadline):
                done = await self._in_task(step.is_done(ctx), name=f"step-{step.name}-check")
        except Exception as exc:  # the loud pass calls is_done again and classifies the error properly
            ctx.log.info("quiet check failed; running the step", error=f"{type(exc).__name__}: {exc}")
            return False
        if done:
            await self._record_evidence(step, ctx)
        return done

    async def _record_evidence(self, step: Step, ctx: StepContext) -> None:
        """The full check just held: the step notes the cheap evidence the next boot trusts (lifecycle.boot)."""
        if not isinstance(step, BootEvidence):
            return
        try:
            await self._in_task(step.record_boot_evidence(ctx), name=f"step-{step.name}-record-evidence")
        except Exception as exc:  # without it the next boot runs the full check: slower, never wrong
            ctx.log.warning("could not record boot evidence", error=f"{type(exc).__name__}: {exc}")

    async def _run_step(
        self, step: Step, index: int, request_id: str | None, cluster: ClusterParams, *, record: bool = False,
        trusted: bool = False,
        on_fail: Callable[[State, ErrorInfo, int], None] | None = None,
    ) -> None:
        if trusted:
            self._emit_progress(State(step.name), request_id, "already done (its local evidence held at boot)")
            return
        started_s = asyncio.get_running_loop().time()
        slow_after_s = self._durations.slow_after_s(step.name)
        watch = None if slow_after_s is None else asyncio.create_task(
            self._say_when_slow(step.name, request_id, started_s=started_s, after_s=slow_after_s),
            name=f"step-{step.name}-slow-watch")
        try:
            ran = await self._run_step_timed(step, index, request_id, cluster, on_fail=on_fail)
        finally:
            if watch is not None:
                watch.cancel()
        if record and ran:
            # The file's rename took 8 ms on the loop while image layers were written (issue 11's loop check).
            took_s = asyncio.get_running_loop().time() - started_s
            await asyncio.to_thread(self._durations.record, step.name, took_s)

    async def _say_when_slow(self, state: str, request_id: str | None, *, started_s: float, after_s: float) -> None:
        """One `lifecycle.step.slow` once the step outlasted its usual duration; the status carries it too."""
        await asyncio.sleep(after_s)
        elapsed_s = round(asyncio.get_running_loop().time() - started_s, 1)
        usual_s = self._durations.usual_s(state)
        runs = len(self._durations.runs(state))
        self._slow = {"state": state, "elapsed_s": elapsed_s, "usual_s": usual_s, "runs": runs}
        self._log.warning("step slower than usual", state=state, elapsed_s=elapsed_s, usual_s=usual_s)
        self._emit(EventType.STEP_SLOW, {"request_id": request_id, **self._slow,
                                         "message": f"{state}: {elapsed_s:.0f} s, usually {usual_s:g} s"})
        self._bus.publish(self.status())

    async def _run_step_timed(
        self, step: Step, index: int, request_id: str | None, cluster: ClusterParams, *,
        on_fail: Callable[[State, ErrorInfo, int], None] | None = None,
    ) -> bool:
        """The step under its deadline and retry policy: True when it ran and worked, False when already done."""
        if step.name == State.CERTS.value:
            await self._renew_instead(index, request_id, cluster)
        policy = self._policy(step)
        ctx = self._context(step.name, request_id, cluster, policy.timeout_s)
        attempts = 0
        timer = asyncio.timeout_at(ctx.deadline)  # one deadline covering every attempt and the waits between
        try:
            async with timer:
                if await self._in_task(step.is_done(ctx), name=f"step-{step.name}-is-done"):
                    self._emit_progress(State(step.name), request_id, "already done")
                    await self._record_evidence(step, ctx)
                    return False
                while True:
                    attempts += 1
                    try:
                        await self._in_task(step.run(ctx), name=f"step-{step.name}-run-{attempts}")
                    except StepError as exc:
                        if not exc.retryable or attempts > policy.retries or not self._time_to_retry(ctx, exc, policy):
                            raise  # a retry the deadline would cut off says less than the step's own error
                        await self._retry_pause(step, ctx, exc, attempts=attempts, policy=policy)
                    else:
                        break
                await self._check_outcome(step, ctx)
                await self._record_evidence(step, ctx)
                return True
        except TimeoutError as exc:
            if timer.expired():
                error = ErrorInfo.safe(
                    "deadline_exceeded", f"step {step.name} did not finish within {policy.timeout_s:g} s",
                    details={"step": step.name, "timeout_s": policy.timeout_s, "attempts": attempts},
                )
            else:
                error = self._internal(ctx, exc, attempts)
        except StepError as exc:
            details = {**exc.details, "attempts": attempts}
            if exc.code == "deadline_exceeded":  # a step that gave up just before the deadline, saying what was left
                details = {"step": step.name, "timeout_s": policy.timeout_s, **details}
            error = ErrorInfo.safe(exc.code, exc.message, exc.retryable, details=details)
        except Exception as exc:
            error = self._internal(ctx, exc, attempts)
        if on_fail is not None:
            on_fail(State(step.name), error, index + 1)
        else:
            self._fail(State(step.name), request_id, cluster, error, step=index + 1)
        raise _StepFailedError

    @staticmethod
    def _time_to_retry(ctx: StepContext, exc: StepError, policy: StepPolicy) -> bool:
        return asyncio.get_running_loop().time() + max(exc.delay_s, policy.retry_delay_s) < ctx.deadline
    async def _check_outcome(self, step: Step, ctx: StepContext) -> None:
        """A run that returned without error has not necessarily done its work (a kubeadm that printed "fine" and
        exited 0): checked here, so the failure is named at the step that made it, not at a later one that trips
        over what is missing."""
        if not await self._in_task(step.is_done(ctx), name=f"step-{step.name}-check-outcome"):
            raise PermanentError(
                f"step {step.name} ran without error, but its outcome does not hold afterwards",
                code="step_incomplete", details={"step": step.name},
            )

    async def _retry_pause(
        self, step: Step, ctx: StepContext, exc: StepError, *, attempts: int, policy: StepPolicy
    ) -> None:
        delay_s = max(exc.delay_s, policy.retry_delay_s)
        ctx.log.warning("step failed, retrying", attempt=attempts, delay_s=delay_s, error=exc.message)
        self._emit(EventType.STEP_RETRYING, {
            "request_id": ctx.request_id, "state": step.name, "attempt": attempts, "retries": policy.retries,
            "delay_s": delay_s,
            "error": ErrorInfo.safe(exc.code, exc.message, exc.retryable, dict(exc.details)).to_json(),
        })
        await asyncio.sleep(delay_s)
        await self._in_task(step.before_retry(ctx), name=f"step-{step.name}-before-retry-{attempts}")

    async def _reset_job(self, request_id: str | None) -> None:
        cluster = self._snap.cluster or self._resolve_cluster(None)
        ctx = self._context(State.RESETTING.value, request_id, cluster, RESET_TIMEOUT_S)
        error = await self._routine(ctx, self._reset(ctx), task="reset", what="reset", step="resetting",
                                    timeout_s=RESET_TIMEOUT_S)
        if isinstance(error, ErrorInfo):
            self._fail(State.RESETTING, request_id, self._snap.cluster, error, step=None)
            return
        self._follow_config(None)  # nothing installed any more: the next install takes the file as it is
        self._transition(State.IDLE, step=None, request_id=request_id, cluster=None)

    async def _stop_node_job(self, request_id: str | None) -> None:
        """In state stopped: end the node's processes. What could not be ended fails the state (a stopped node
        with a kubelet still running would claim what it is not)."""
        assert self._stop_node is not None
        cluster = self._snap.cluster or self._resolve_cluster(None)
        ctx = self._context(State.STOPPED.value, request_id, cluster, STOP_NODE_TIMEOUT_S)
        error = await self._routine(ctx, self._stop_node(ctx), task="stop-node", what="stop", step="stopped",
                                    timeout_s=STOP_NODE_TIMEOUT_S)
        if isinstance(error, ErrorInfo):
            self._fail(State.STOPPED, request_id, self._snap.cluster, error, step=None)
            return
        self._emit_progress(State.STOPPED, request_id, STOPPED_MESSAGE)

    async def _renew_job(self, request_id: str | None) -> None:
        cluster = self._snap.cluster or self._resolve_cluster(None)
        ctx = self._context(State.RENEWING.value, request_id, cluster, RENEW_TIMEOUT_S)
        error = await self._renewal(ctx)
        if error is None:
            self._transition(State.RUNNING, step=None, request_id=request_id, cluster=cluster)
            return
        if error.details.get("node_changed") is False:
            # Nothing was written: the cluster runs on as it was; the failure is reported, the state is not failed.
            self._log.error("renewal failed before changing anything", code=error.code, error=error.message)
            self._emit(EventType.STEP_FAILED, {"request_id": request_id, "state": State.RENEWING.value,
                                               "error": error.to_json()})
            self._transition(State.RUNNING, step=None, request_id=request_id, cluster=cluster)
            return
        self._fail(State.RENEWING, request_id, cluster, error, step=None)

    async def _renew_instead(self, index: int, request_id: str | None, cluster: ClusterParams) -> None:
        """Before the certs step runs on a node that has a cluster: leaves it would re-issue are renewed instead,
        by the renew-certs routine, which also restarts what reads them (the step alone would rewrite the files
        under running components, which keep their old certificates until those expire). The step then runs as
        usual: it finds them done, or fixes what a renewal does not touch (the kubeadm config, a CA, sa.key)."""
        if self._renew is None or self._renewal_due is None:
            return
        ctx = self._context(State.CERTS.value, request_id, cluster, RENEW_TIMEOUT_S)
        try:
            due = await self._in_task(self._renewal_due(ctx), name="renewal-due")
        except Exception as exc:  # the certs step's own checks say what is wrong
            ctx.log.info("renewal check failed; the certs step decides", error=f"{type(exc).__name__}: {exc}")
            return
        if not due:
            return
        ctx.progress(f"renewing certificates of the running cluster ({', '.join(due[:4])}"
                     f"{f' and {len(due) - 4} more' if len(due) > 4 else ''})")
        error = await self._renewal(ctx)
        if error is None:
            return
        if error.details.get("node_changed") is False:
            ctx.log.warning("renewal impossible; the certs step decides", code=error.code, error=error.message)
            return
        self._fail(State.CERTS, request_id, cluster, error, step=index + 1)
        raise _StepFailedError

    async def _renewal(self, ctx: StepContext) -> ErrorInfo | None:
        """The renewal routine under its own deadline; `lifecycle.certs.renewed` when it worked, else the error."""
        assert self._renew is not None
        files = await self._routine(ctx, self._renew(ctx), task="renew-certs", what="renewal", step="renewing",
                                    timeout_s=RENEW_TIMEOUT_S)
        if isinstance(files, ErrorInfo):
            return files
        self._emit(EventType.CERTS_RENEWED, {"request_id": ctx.request_id, "files": files})
        return None

    async def _routine(self, ctx: StepContext, work: Coroutine[Any, Any, T], *, task: str, what: str, step: str,
                       timeout_s: float) -> T | ErrorInfo:
        """A job's routine (reset, stop, renewal) as a named task under `ctx`'s deadline: its result, or what it
        raised as the error the job reports (the deadline's own expiry as `deadline_exceeded`)."""
        timer = asyncio.timeout_at(ctx.deadline)
        try:
            async with timer:
                return await self._in_task(work, name=task)
        except TimeoutError as exc:
            if not timer.expired():
                return self._internal(ctx, exc, 1)
            return ErrorInfo.safe("deadline_exceeded", f"{what} did not finish within {timeout_s:g} s",
                                  details={"step": step, "timeout_s": timeout_s})
        except StepError as exc:
            return ErrorInfo.safe(exc.code, exc.message, exc.retryable, dict(exc.details))
        except Exception as exc:
            return self._internal(ctx, exc, 1)

    async def _in_task(self, work: Coroutine[Any, Any, T], *, name: str) -> T:
        """Run step code as its own named task. Cancelling the caller cancels it and waits for its cleanup."""
        task = asyncio.create_task(work, name=name)
        current = asyncio.current_task()
        try:
            result = await task
        except asyncio.CancelledError:
            raise
        except BaseException:
            if current is not None and current.cancelling():
                raise asyncio.CancelledError from None  # the step turned our cancellation into an error
            raise
        if current is not None and current.cancelling():
            raise asyncio.CancelledError  # the step swallowed our cancellation: stop anyway
        return result

    # ---- state, events -----------------------------------------------------------------------------------

    def _steps_in(self, state: State) -> int:
        """The length of the plan whose step `step` counts: the upgrade's in an upgrade state, else the install's."""
        return len(self._upgrade_plan) if state in UPGRADE_STATES else len(self._plan)

    def _policy(self, step: Step) -> StepPolicy:
        return self._config.steps.get(step.name) or StepPolicy(timeout_s=step.timeout_s, retries=step.retries)

    def _context(self, state: str, request_id: str | None, cluster: ClusterParams, timeout_s: float) -> StepContext:
        return StepContext(
            config=self._effective, paths=self._paths, cluster=cluster, ports=self._ports, request_id=request_id,
            deadline=asyncio.get_running_loop().time() + timeout_s,
            log=self._log.bind(request_id=request_id, state=state),
            progress=self._progress_fn(State(state), request_id),
            job=self._job.kind if self._job is not None else "install",
        )

    def _internal(self, ctx: StepContext, exc: BaseException, attempts: int) -> ErrorInfo:
        ctx.log.error("step raised an unexpected error", exc_info=exc)
        return ErrorInfo.safe("internal", f"{type(exc).__name__}: {exc}", details={"attempts": attempts})

    def _progress_fn(self, state: State, request_id: str | None) -> ProgressFn:
        def progress(
            message: str, *, current: int | float | None = None, total: int | float | None = None,
            unit: str | None = None,
        ) -> None:
            self._emit_progress(state, request_id, message, current=current, total=total, unit=unit)

        return progress

    def _emit_progress(
        self, state: State, request_id: str | None, message: str, *, current: int | float | None = None,
        total: int | float | None = None, unit: str | None = None,
    ) -> None:
        self._emit(EventType.STEP_PROGRESS, {
            "request_id": request_id, "state": state.value, "message": message, "current": current,
            "total": total, "unit": unit,
        })

    def _emit(self, kind: EventType, data: dict[str, Any]) -> Event:
        seq = self._snap.seq + 1
        self._snap = replace(self._snap, seq=seq)
        self._store.save_seq(seq)  # before publishing: a seq seen on the wire is never handed out again
        event = Event(type=kind, seq=seq, data={"seq": seq, **data})
        if self._outbox is not None and is_durable(event):
            self._outbox.append(event)
        self._bus.publish(event)
        return event

    def _fail(
        self, state: State, request_id: str | None, cluster: ClusterParams | None, error: ErrorInfo, *,
        step: int | None,
    ) -> None:
        self._log.error("step failed", state=state.value, request_id=request_id, code=error.code,
                        error=error.message)
        self._emit(EventType.STEP_FAILED, {"request_id": request_id, "state": state.value, "error": error.to_json()})
        self._transition(State.FAILED, step=step, request_id=request_id, cluster=cluster, error=error)

    def _transition(
        self, dest: State, *, step: int | None, request_id: str | None, cluster: ClusterParams | None,
        error: ErrorInfo | None = None,
    ) -> None:
        prev = self._snap
        if not self._machine.allows(dest):
            self._machine.move(dest)  # raises IllegalTransitionError naming both states
        now = time.time()
        seq, state_seq = prev.seq + 1, prev.state_seq + 1
        snap = Snapshot(state=dest.value, since=now, seq=seq, request_id=request_id, cluster=cluster, step=step,
                        error=error, state_seq=state_seq)
        self._slow = None  # said of the state being left
        duration_s = round(max(0.0, now - prev.since), 3)
        event = Event(type=EventType.STATE_CHANGED, seq=seq, time_s=now, data={
            "seq": seq, "state_seq": state_seq, "request_id": request_id, "from": prev.state, "to": dest.value,
            "step": step, "steps": self._steps_in(dest), "duration_s": duration_s,
        })
        # The event reaches the outbox, with state.json's new content, before anything else: a kill after that
        # finds the change there, and the restart takes its state from it (`_newer_in_outbox`) and publishes it
        # again (the same event), never a change no host heard of, nor one made twice.
        if self._outbox is not None:
            self._store.save_seq(seq)  # a kill right after the append must not hand out this seq again
            content = snap.to_json()
            self._outbox.append(event, snapshot=content)
            # Published before state.json is replaced (the MQTT bridge writes it to the broker's socket on the
            # bus's offer): replacing the file first cost every state change ~1 ms, up to 10 ms while image
            # layers were written (bench_event_latency). No PUBACK can be taken before the replace (this runs on
            # the loop), so the outbox is never emptied ahead of it.
            self._bus.publish(event)
            # state.json replaced here (a kill finds it: the restart resumes where the hosts heard it went), its
            # fsyncs (1-10 ms here, more while image layers are written) in the outbox's thread: never on the loop.
            self._store.replace(snap, content=content)
            self._outbox.checkpoint(self._store.sync)
        else:
            self._store.save(snap)
            self._bus.publish(event)
        self._machine.move(dest)
        self._snap = snap
        self._bus.publish(self.status())
        self._log.info("state changed", request_id=request_id, state=dest.value, previous=prev.state,
                       duration_s=duration_s)
