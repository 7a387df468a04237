"""The `lifecycle` console script and the only wiring of the service: config, real adapters, signals, serve().

Everything else receives what it needs as parameters, so tests run the same `run_service` with their own plan.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from lifecycle import cli
from lifecycle.adapters.mqtt_credentials import load_credentials
from lifecycle.config import Config, ConfigError, load_config
from lifecycle.engine import RenewalDue, RenewRoutine, ResetRoutine, StopRoutine
from lifecycle.errors import MetricsListenError
from lifecycle.logging import configure_logging, get_logger
from lifecycle.loopwatch import budget_from_environ, heartbeat, watch_callbacks
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.sdnotify import Notifier
from lifecycle.service import BridgeFailedError, serve
from lifecycle.step import Step
from lifecycle.store import StoreError

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


def real_ports(config: Config) -> Ports:
    # Imported here: `lifecycle status` and friends never pay for aiodocker or kubernetes_asyncio.
    from lifecycle.adapters.docker import DockerEngine
    from lifecycle.adapters.kube import KubernetesApiFactory, remove_legacy_key_dirs
    from lifecycle.adapters.kubelet import ProcessKubeletSupervisor
    from lifecycle.adapters.process import SubprocessRunner

    paths = HostPaths(config.root)
    # Admin keys in /tmp that a killed older version left; this version never writes one (lifecycle.tls).
    for stale in remove_legacy_key_dirs():
        get_logger("lifecycle.main", node=config.node_name).warning("removed a stale client key dir", path=str(stale))
    kube = KubernetesApiFactory()
    return Ports(
        docker=DockerEngine(config.docker.host),
        commands=SubprocessRunner(),
        kubelet=ProcessKubeletSupervisor(
            pid_file=paths.state_dir / "kubelet.pid", log=get_logger("lifecycle.kubelet"),
            log_rotation=(config.kubernetes.kubelet_log_max_bytes, config.kubernetes.kubelet_log_files),
        ),
        kube=kube,
        services=kube,
    )


def load_serve_config(args: argparse.Namespace) -> Config:
    return load_config(args.config).with_overrides(root=args.root, node_name=args.node, broker=args.broker)


def run_service(
    config: Config, *, plan: Sequence[Step], reset: ResetRoutine, ports_factory: Callable[[Config], Ports],
    renew: RenewRoutine | None = None, renewal_due: RenewalDue | None = None,
    on_start: Callable[[Config, Ports], Awaitable[None]] | None = None, stop_node: StopRoutine | None = None,
    upgrade_plan: Sequence[Step] = (),
) -> int:
    """Run until SIGTERM/SIGINT (a clean, staged shutdown); a second signal forces the exit."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
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
        notifier = Notifier.from_environ()  # before any child process: they must not inherit NOTIFY_SOCKET
        if notifier.enabled:
            log.info("systemd notify socket found", watchdog_interval_s=notifier.watchdog_interval_s)
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
                        renewal_due=renewal_due, notifier=notifier, stop_node=stop_node,
                        upgrade_plan=upgrade_plan)
        finally:
            beat.cancel()
            notifier.close()
            await ports.docker.close()  # the kubelet is left running on purpose

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
        return cli.EXIT_USAGE
    configure_logging(config.log_level)
    from states import build_plan, build_upgrade_plan
    from states.binaries import remove_leftover_copies
    from states.renewing import renew, renewal_due
    from states.reset import reset
    from states.stopping import stop_node

    return run_service(config, plan=build_plan(), reset=reset, ports_factory=real_ports, renew=renew,
                       renewal_due=renewal_due, on_start=remove_leftover_copies, stop_node=stop_node,
                       upgrade_plan=build_upgrade_plan())


def main(argv: list[str] | None = None) -> int:
    args = cli.build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
