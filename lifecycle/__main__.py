"""The `lifecycle` console script and the only wiring of the service: config, real adapters, signals, serve().

Everything else receives what it needs as parameters, so tests run the same `run_service` with their own plan.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVarTuple, Unpack

# Only what a boot needs before it starts the kubelet (`boot_first`); the rest of the service (aiomqtt, aiodocker,
# cryptography, the engine and the steps) is imported after it: tests/unit/test_boot_first.py holds that.
from lifecycle.adapters.kubelet import ProcessKubeletSupervisor
from lifecycle.adapters.mqtt_credentials import load_credentials
from lifecycle.cli_args import EXIT_USAGE, build_parser
from lifecycle.config import Config, ConfigError, load_config
from lifecycle.errors import MetricsListenError
from lifecycle.logging import configure_logging, get_logger
from lifecycle.loopwatch import budget_from_environ, heartbeat, watch_callbacks
from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.sdnotify import Notifier
from lifecycle.statefile import state_file
from lifecycle.store import Store, StoreError

if TYPE_CHECKING:
    from lifecycle.engine import RenewalDue, RenewRoutine, ResetRoutine, StopRoutine
    from lifecycle.ports import Ports
    from lifecycle.step import Step

EXIT_FORCED = 1  # a second SIGTERM/SIGINT: exit at once, the broker publishes the `offline` will
EXIT_BRIDGE_FAILED = 3  # the request loop died of a bug: a restart (systemd's Restart=on-failure) revives it
GIL_SWITCH_INTERVAL_S = 0.001  # sys.setswitchinterval: see `run_service`
# Fault knob for tests (docs/real-vm.md, "Fault knob"): when set, SIGUSR1 blocks the event loop for that many
# seconds, as a stuck callback would, so a test can see the systemd watchdog pings stop. Unset in production: then
# SIGUSR1 keeps its default action and nothing here runs.
STALL_LOOP_ENV = "LIFECYCLE_FAULT_STALL_LOOP_S"


def install_stall_knob(loop: asyncio.AbstractEventLoop) -> None:
    raw = os.environ.pop(STALL_LOOP_ENV, None)  # popped: the kubelet and kubeadm never see it
    if raw is None:
        return
    log = get_logger("lifecycle.main")
    try:
        stall_s = float(raw)
    except ValueError:
        log.warning("fault knob ignored: not a number of seconds", variable=STALL_LOOP_ENV, value=raw)
        return

    def stall() -> None:
        log.warning("fault knob: stalling the event loop", stall_s=stall_s)
        time.sleep(stall_s)  # on the loop on purpose: this is the fault

    loop.add_signal_handler(signal.SIGUSR1, stall)


def kubelet_supervisor(config: Config) -> ProcessKubeletSupervisor:
    return ProcessKubeletSupervisor(
        pid_file=HostPaths(config.root).state_dir / "kubelet.pid", log=get_logger("lifecycle.kubelet"),
        log_rotation=(config.kubernetes.kubelet_log_max_bytes, config.kubernetes.kubelet_log_files),
    )


def real_ports(config: Config, *, kubelet: ProcessKubeletSupervisor | None = None) -> Ports:
    # Imported here: `lifecycle status` and friends never pay for aiodocker or kubernetes_asyncio.
    from lifecycle.adapters.docker import DockerEngine
    from lifecycle.adapters.kube import KubernetesApiFactory, remove_legacy_key_dirs
    from lifecycle.adapters.process import SubprocessRunner
    from lifecycle.ports import Ports

    # Admin keys in /tmp that a killed older version left; this version never writes one (lifecycle.tls).
    for stale in remove_legacy_key_dirs():
        get_logger("lifecycle.main", node=config.node_name).warning("removed a stale client key dir", path=str(stale))
    kube = KubernetesApiFactory()
    return Ports(
        docker=DockerEngine(config.docker.host),
        commands=SubprocessRunner(),
        kubelet=kubelet or kubelet_supervisor(config),
        kube=kube,
        services=kube,
    )


def boot_first(config: Config, store: Store, kubelet: ProcessKubeletSupervisor) -> bool:
    """A boot (the saved state `running`: after a reboot, or a restart of the service) starts the kubelet before
    the service imports the rest of itself, when its cheap local evidence holds (states.kubelet.start_at_boot):
    the node's own start-up runs while the service's goes on. The boot job checks everything as before. True when
    it started the kubelet."""
    from states.kubelet import start_at_boot

    log = get_logger("lifecycle.main", node=config.node_name)
    try:
        snap = store.load()
    except StoreError:
        return False  # the engine's load says what is wrong with it, and stops the start
    if snap is None or snap.state != State.RUNNING.value or snap.cluster is None:
        return False
    # What the service's own start removes from its environment before any child (Notifier.from_environ has
    # already run; the stall knob is popped in the loop): the kubelet never sees either.
    env = {key: value for key, value in os.environ.items() if key != STALL_LOOP_ENV}
    started, what = start_at_boot(HostPaths(config.root), kubelet, env=env)
    log.info(f"boot: {what}")
    return started


def load_serve_config(args: argparse.Namespace) -> Config:
    return load_config(args.config).with_overrides(root=args.root, node_name=args.node, broker=args.broker)


_Ts = TypeVarTuple("_Ts")


class _PidfdWatcher(asyncio.PidfdChildWatcher):
    """asyncio's pidfd watcher that can let go of the children still running when the service stops: the kubelet
    and its log pipe, which outlive it on purpose. Without `let_go`, closing the loop warns of each ("RuntimeWarning:
    A loop is being detached from a child watcher with pending handlers") on every stop, in the operator's journal."""

    def __init__(self) -> None:
        super().__init__()
        self._running: set[int] = set()

    def add_child_handler(self, pid: int, callback: Callable[[int, int, Unpack[_Ts]], object],
                          *args: *_Ts) -> None:
        def ended(pid: int, returncode: int, *args: *_Ts) -> None:
            self._running.discard(pid)
            callback(pid, returncode, *args)

        self._running.add(pid)
        super().add_child_handler(pid, ended, *args)

    @property
    def running(self) -> frozenset[int]:
        """The children watched that have not ended."""
        return frozenset(self._running)

    def let_go(self) -> None:
        for pid in self._running:
            self.remove_child_handler(pid)
        self._running.clear()


def watch_children_by_pidfd(loop: asyncio.AbstractEventLoop) -> _PidfdWatcher | None:
    """Child processes (kubeadm, crictl, the kubelet) watched through a pidfd on the loop itself. asyncio's default
    on 3.11 starts a thread per child and waits on the loop for it to start: 3-5 ms of a stalled loop per spawn,
    seen by lifecycle.loopwatch as `loop slow` in `add_child_handler` and as late events (issue 11). Kept when
    the kernel has no pidfd (before Linux 5.3): None."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return None
    watcher = _PidfdWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    return watcher


def run_service(
    config: Config, *, plan: Sequence[Step], reset: ResetRoutine, ports_factory: Callable[[Config], Ports],
    renew: RenewRoutine | None = None, renewal_due: RenewalDue | None = None,
    on_start: Callable[[Config, Ports], Awaitable[None]] | None = None, stop_node: StopRoutine | None = None,
    upgrade_plan: Sequence[Step] = (), store: Store | None = None, notifier: Notifier | None = None,
    kubelet_started_at_boot: bool = False,
) -> int:
    """Run until SIGTERM/SIGINT (a clean, staged shutdown); a second signal forces the exit. A `store` is the state
    file, already locked; a `notifier`, systemd's, already taken from the environment (serve_command does both
    before the kubelet may start, and says whether it did: `kubelet_started_at_boot`)."""
    from lifecycle.service import BridgeFailedError, serve

    async def main() -> None:
        loop = asyncio.get_running_loop()
        children = watch_children_by_pidfd(loop)
        stop = asyncio.Event()
        log = get_logger("lifecycle.main", node=config.node_name)

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second signal: exiting at once", signal=signal.Signals(signum).name)
                os._exit(EXIT_FORCED)
            log.info("signal: shutting down", signal=signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        install_stall_knob(loop)
        budget_s = budget_from_environ()
        if budget_s is not None:
            watch_callbacks(budget_s)
            log.info("timing every event loop callback", budget_ms=round(budget_s * 1000))
        beat = asyncio.create_task(heartbeat(), name="lifecycle-loop-heartbeat")
        sd = notifier if notifier is not None else Notifier.from_environ()  # before any child: not inherited
        if sd.enabled:
            log.info("systemd notify socket found", watchdog_interval_s=sd.watchdog_interval_s)
        ports = ports_factory(config)
        # What the start imported and built lives as long as the process: kept out of the garbage collector's
        # full collections, which would otherwise walk it all on the loop (lifecycle.loopwatch, issue 11).
        gc.freeze()
        # A thread running Python (tar extraction, YAML, the Kubernetes client) keeps the GIL up to this long
        # before the loop gets it back: 5 ms by default, which showed in event delivery (issue 11).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            if on_start is not None:  # before any job: clean-ups of what a killed service left
                await on_start(config, ports)
            await serve(config, plan=plan, reset=reset, ports=ports, stop=stop, renew=renew,
                        renewal_due=renewal_due, notifier=sd, stop_node=stop_node,
                        upgrade_plan=upgrade_plan, store=store, kubelet_started_at_boot=kubelet_started_at_boot)
        finally:
            beat.cancel()
            sd.close()
            await ports.docker.close()
            if children is not None:
                children.let_go()  # the kubelet (and its log pipe) is left running on purpose
                # Process-wide: asyncio's default again for a loop run after this one (a test runs the service inside
                # pytest's process). The policy takes None (asyncio/unix_events.py); typeshed's stub does not say so.
                asyncio.set_child_watcher(None)  # type: ignore[arg-type]

    try:
        asyncio.run(main())
    except StoreError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return 1
    except MetricsListenError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return 1
    except BridgeFailedError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return EXIT_BRIDGE_FAILED
    return 0


def serve_command(args: argparse.Namespace) -> int:
    try:
        config = load_serve_config(args)
        load_credentials(config.mqtt)  # a missing password or CA file stops the start here, not in a retry loop
    except ConfigError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level)
    notifier = Notifier.from_environ()  # before any child process: they must not inherit NOTIFY_SOCKET
    store = state_file(HostPaths(config.root))
    try:
        store.lock()  # before the kubelet may start: one service per root
    except StoreError as exc:
        print(f"lifecycle: {exc}", file=sys.stderr)
        return 1
    kubelet = kubelet_supervisor(config)
    started = boot_first(config, store, kubelet)
    from states import build_plan, build_upgrade_plan
    from states.binaries import remove_leftover_copies
    from states.renewing import renew, renewal_due
    from states.reset import reset
    from states.stopping import stop_node

    return run_service(config, plan=build_plan(), reset=reset, ports_factory=functools.partial(real_ports,
                       kubelet=kubelet), renew=renew, renewal_due=renewal_due, on_start=remove_leftover_copies,
                       stop_node=stop_node, upgrade_plan=build_upgrade_plan(), store=store, notifier=notifier,
                       kubelet_started_at_boot=started)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    from lifecycle import cli

    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
