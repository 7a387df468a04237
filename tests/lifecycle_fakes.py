"""Test steps for the service core: real classes satisfying the `Step` protocol, steered by JSON files in the
node root (`<root>/fake/<step>.json`), so a service running in another process is steered the same way.

Each step leaves `<root>/fake/<step>.done` when it ran (that is its `is_done`) and appends what happened to
`<root>/fake/journal` ("run images 1", "cleanup images", "before_retry images", "reset", ...).
Run as a script, it is a service (`run_service` from `lifecycle.__main__`) with these steps:
`python tests/lifecycle_fakes.py --config FILE [--root DIR] [--node NAME] [--broker URL]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lifecycle.bus import Subscription
from lifecycle.config import STEP_NAMES, AddonsConfig, Config, KubernetesConfig, StepPolicy, VersionImages
from lifecycle.errors import CommandError, PermanentError, TemporaryError
from lifecycle.ports import Ports
from lifecycle.protocol import Event
from lifecycle.step import Step, StepContext

FAKE_DIR = "fake"


def drain_events(sub: Subscription) -> list[Event]:
    """Every event queued on a bus subscription so far (other items, like status, are dropped)."""
    out: list[Event] = []
    while len(sub):
        item = sub.pop()
        if isinstance(item, Event):
            out.append(item)
    return out


def fake_dir(root: Path) -> Path:
    return root / FAKE_DIR


def journal(root: Path) -> list[str]:
    path = fake_dir(root) / "journal"
    return path.read_text().splitlines() if path.exists() else []


def steer(root: Path, name: str, **behaviour: Any) -> None:
    """Set how step `name` (or "reset") behaves from its next call on."""
    fake_dir(root).mkdir(parents=True, exist_ok=True)
    (fake_dir(root) / f"{name}.json").write_text(json.dumps(behaviour))


def mark_done(root: Path, *names: str) -> None:
    fake_dir(root).mkdir(parents=True, exist_ok=True)
    for name in names:
        (fake_dir(root) / f"{name}.done").touch()


@dataclass(frozen=True)
class Behaviour:
    run_s: float = 0.0  # how long `run` takes
    fail: str | None = None  # "permanent" | "temporary" | "command" | "internal"
    fail_times: int = 1_000_000  # attempts that fail before one succeeds
    block: bool = False  # `run` waits until cancelled
    check_s: float = 0.0  # how long `is_done` takes (a quiet re-check that can be caught under way)
    ignore_cancel: bool = False  # a badly behaved step: swallows the first cancellation
    progress: int = 0  # progress reports (as pulls: bytes of "item<i>") before finishing
    output: tuple[str, ...] = ("preflight ok",)  # what a failing command printed ("command" failures)
    incomplete: bool = False  # `run` returns without error but leaves no outcome (its `is_done` stays false)

    @classmethod
    def read(cls, root: Path, name: str) -> Behaviour:
        path = fake_dir(root) / f"{name}.json"
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(**{**raw, "output": tuple(raw.get("output", cls.output))})


def _append(root: Path, line: str) -> None:
    fake_dir(root).mkdir(parents=True, exist_ok=True)
    with open(fake_dir(root) / "journal", "a") as f:
        f.write(line + "\n")


class FakeStep:
    def __init__(self, name: str, *, timeout_s: float = 5.0, retries: int = 0) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.retries = retries
        self.attempts = 0

    async def is_done(self, ctx: StepContext) -> bool:
        await asyncio.sleep(Behaviour.read(ctx.paths.root, self.name).check_s)
        return (fake_dir(ctx.paths.root) / f"{self.name}.done").exists()

    async def run(self, ctx: StepContext) -> None:
        root = ctx.paths.root
        self.attempts += 1
        b = Behaviour.read(root, self.name)
        _append(root, f"run {self.name} {self.attempts}")
        try:
            for i in range(b.progress):
                ctx.progress(f"pulling item{i}", current=(i + 1) * 1000, total=b.progress * 1000, unit="bytes")
            if b.block:
                await _wait_forever(ignore_first_cancel=b.ignore_cancel)
            await asyncio.sleep(b.run_s)
        except asyncio.CancelledError:
            _append(root, f"cleanup {self.name}")
            raise
        if b.fail and self.attempts <= b.fail_times:
            if b.fail == "permanent":
                raise PermanentError(f"{self.name} cannot work", code="fake_permanent", details={"hint": "fix it"})
            if b.fail == "command":
                raise CommandError([f"/usr/bin/{self.name}", "init"], 3, [*b.output, f"error: {self.name} broke"])
            if b.fail == "temporary":
                raise TemporaryError(f"{self.name} hiccup {self.attempts}", code="fake_temporary", delay_s=0.01)
            raise RuntimeError(f"{self.name} exploded")
        if not b.incomplete:
            (fake_dir(root) / f"{self.name}.done").touch()

    async def before_retry(self, ctx: StepContext) -> None:
        _append(ctx.paths.root, f"before_retry {self.name}")


async def _wait_forever(*, ignore_first_cancel: bool) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        if not ignore_first_cancel:
            raise
    await asyncio.Event().wait()


def fake_plan(*, timeout_s: float = 5.0, retries: int = 0) -> list[Step]:
    return [FakeStep(name, timeout_s=timeout_s, retries=retries) for name in STEP_NAMES]


async def fake_reset(ctx: StepContext) -> None:
    root = ctx.paths.root
    b = Behaviour.read(root, "reset")
    _append(root, "reset")
    ctx.progress("removing generated files")
    await asyncio.sleep(b.run_s)
    if b.fail:
        raise PermanentError("reset failed on purpose", code="fake_reset_failed")
    for done in fake_dir(root).glob("*.done"):
        done.unlink()


async def fake_stop_node(ctx: StepContext) -> None:
    """The stop routine of the fakes: the kubelet and readiness steps no longer hold, the rest does."""
    root = ctx.paths.root
    b = Behaviour.read(root, "stop")
    _append(root, "stop")
    ctx.progress("stopping the kubelet")
    await asyncio.sleep(b.run_s)
    if b.fail:
        raise PermanentError("stop failed on purpose", code="fake_stop_failed")
    for name in ("kubelet", "readiness"):
        (fake_dir(root) / f"{name}.done").unlink(missing_ok=True)


class _NullDocker:
    """The only port the service itself touches is `docker.close()` at exit; fake steps use none. The real certs
    step, used with fake steps after it, asks for the engine's cgroup driver."""

    async def close(self) -> None:
        return None

    async def cgroup_driver(self) -> str:
        return "systemd"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fake steps do not use the container engine ({name})")


class NullKube:
    """The Kubernetes API port of the fakes: `serve` preloads its client at start (counted); fake steps connect
    to nothing."""

    def __init__(self) -> None:
        self.preloads = 0

    async def preload(self) -> None:
        self.preloads += 1

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fake steps do not use the Kubernetes API ({name})")


class _Unused:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fake steps do not use this port ({name})")


def null_ports(_config: Config | None = None) -> Ports:
    unused = cast(Any, _Unused())
    return Ports(docker=cast(Any, _NullDocker()), commands=unused, kubelet=unused, kube=cast(Any, NullKube()))


async def eventually(predicate: Callable[[], bool], *, timeout_s: float = 5.0, interval_s: float = 0.01) -> None:
    """Wait until `predicate()` holds (for state kept in files or in another process); TimeoutError if not."""
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(interval_s)


# The component versions the default binaries image template names ({cni}, {critools}, {cri_dockerd}).
BINARIES_TAGS = {"cni": "v1.6.0", "critools": "v1.31.1", "cri_dockerd": "v0.3.16"}
_BINARIES_TOML = "".join(f'{k} = "{v}"\n' for k, v in BINARIES_TAGS.items())


DEPLOY_ADDONS = Path(__file__).resolve().parent.parent / "deploy/addons"


def make_config(root: Path, *, node: str = "unit", **policies: StepPolicy) -> Config:
    """A config for in-process tests: both versions, free ports, short deadlines, no retries unless asked."""
    versions = {
        "v1.31.4": VersionImages(etcd="3.5.15-0", coredns="v1.11.3", pause="3.10", **BINARIES_TAGS),
        "v1.32.1": VersionImages(etcd="3.5.16-0", coredns="v1.11.3", pause="3.10", **BINARIES_TAGS),
    }
    steps = {name: StepPolicy(timeout_s=5.0, retries=0, retry_delay_s=0.0) for name in STEP_NAMES}
    steps.update(policies)
    return Config(
        node_name=node, root=root, steps=steps,
        kubernetes=KubernetesConfig(version="v1.31.4", versions=versions, api_port=0, kubelet_healthz_port=0),
        addons=AddonsConfig(manifests_dir=DEPLOY_ADDONS),  # preflight reads them (a package installs them)
    )


def write_config(
    path: Path, *, root: Path, node: str, prefix: str, broker: str, keepalive_s: int = 2,
    timeout_s: float = 5.0, retries: int = 0, extra: str = "", mqtt_extra: str = "",
) -> Path:
    steps = "\n".join(
        f"[steps.{name}]\ntimeout_s = {timeout_s}\nretries = {retries}\nretry_delay_s = 0.0\n" for name in STEP_NAMES
    )
    path.write_text(f"""
[node]
name = "{node}"
root = "{root}"
log_level = "debug"

[mqtt]
broker = "{broker}"
prefix = "{prefix}"
keepalive_s = {keepalive_s}
reconnect_min_s = 0.1
reconnect_max_s = 0.5
{mqtt_extra}

[kubernetes]
version = "v1.31.4"
api_port = 0
kubelet_healthz_port = 0

[kubernetes.versions."v1.31.4"]
etcd = "3.5.15-0"
coredns = "v1.11.3"
pause = "3.10"
{_BINARIES_TOML}
[kubernetes.versions."v1.32.1"]
etcd = "3.5.16-0"
coredns = "v1.11.3"
pause = "3.10"
{_BINARIES_TOML}
{steps}
{extra}
""")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from lifecycle.__main__ import load_serve_config, run_service
    from lifecycle.logging import configure_logging

    parser = argparse.ArgumentParser(description="the lifecycle service with fake steps (tests only)")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--node")
    parser.add_argument("--broker")
    args = parser.parse_args(argv)
    config = load_serve_config(args)
    configure_logging(config.log_level)
    return run_service(config, plan=fake_plan(), reset=fake_reset, ports_factory=null_ports, stop_node=fake_stop_node)


if __name__ == "__main__":
    sys.exit(main())
