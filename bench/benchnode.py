"""A simulated node driven through the real `lifecycle serve` process, for the benchmarks that time whole
lifecycles (bench_boot.py, bench_stop_start.py): its root and config, the service, requests over MQTT, the
processes under its root, and this checkout's simulated images."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from benchlib import REPO_ROOT

from lifecycle.config import DEFAULT_BINARIES
from simnode.host import prepare_host

VERSION = "v1.31.4"
REGISTRY = os.environ.get("LIFECYCLE_REGISTRY", "127.0.0.1:5000")
LIFECYCLE = REPO_ROOT / ".venv" / "bin" / "lifecycle"


class BenchNode:
    """One node under `base`: its root, config (the simulated node's, images from `namespace`, with `/pad` among
    the binaries: what real binaries weigh) and service log."""

    def __init__(self, base: Path, namespace: str, *, label: str, broker: str | None = None) -> None:
        self.label = label
        self.name = f"{label}-{uuid.uuid4().hex[:8]}"
        self.root = base / "root"
        self.root.mkdir()
        prepare_host(self.root)
        self.config = base / "lifecycle.toml"
        text = (REPO_ROOT / "simnode" / "lifecycle.toml").read_text()
        text = text.replace('"../deploy/addons"', f'"{REPO_ROOT / "deploy" / "addons"}"')
        binaries = ", ".join(f'"{path}"' for path in (*DEFAULT_BINARIES, "/pad"))
        text = text.replace("\nbinaries_image = ", f"\nbinaries = [{binaries}]\nbinaries_image = ", 1)
        if broker is not None:  # the simulated node's config names the local Mosquitto on 1883
            text = text.replace('broker = "mqtt://127.0.0.1:1883"', f'broker = "{broker}"', 1)
        self.config.write_text(text.replace(f'image_repository = "{REGISTRY}"',
                                            f'image_repository = "{REGISTRY}/{namespace}"'))
        self.log = base / "service.log"
        self.service: subprocess.Popen[bytes] | None = None

    def start_service(self, *, code: Path | None = None) -> None:
        """`lifecycle serve` of this checkout, or of the source tree `code` (another commit's, for a baseline)."""
        argv = [str(LIFECYCLE)] if code is None else [sys.executable, "-m", "lifecycle"]
        env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
        with open(self.log, "ab") as log:
            self.service = subprocess.Popen(
                [*argv, "serve", "--config", str(self.config), "--root", str(self.root), "--node", self.name],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=code)

    def request(self, host: str, port: int, request_id: str, action: str) -> float:
        """Publish a request (QoS 1); monotonic time at which it was handed to the client."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.label}-req-{uuid.uuid4().hex[:8]}")
        client.connect(host, port)
        client.loop_start()
        start_s = time.monotonic()
        info = client.publish(f"lifecycle/{self.name}/requests", json.dumps({"id": request_id, "action": action}),
                              qos=1)
        info.wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        return start_s

    def processes(self) -> list[tuple[int, list[str]]]:
        """(pid, argv) of every live process but this one (zombies left out)."""
        found: list[tuple[int, list[str]]] = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
                        found.append((int(entry.name), argv))
        return found

    def pids_under_root(self) -> list[int]:
        return [pid for pid, argv in self.processes() if any(f"{self.root}/" in a for a in argv)]

    def kill_all(self, *also: subprocess.Popen[bytes] | None) -> None:
        """The service (and `also`) SIGKILLed, then every process of the node: as after a power cut."""
        for proc in (self.service, *also):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        self.service = None
        deadline = time.monotonic() + 15
        while pids := self.pids_under_root():
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: processes of the node survived SIGKILL: {pids}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def ensure_images(namespace: str, pad_scale: float, *, who: str) -> None:
    """This checkout's simulated images of VERSION in `namespace` (seconds when they are up to date)."""
    argv = [sys.executable, "-m", "simnode.images", "--pad-scale", str(pad_scale), "--namespace", namespace,
            "--versions", VERSION]
    proc = subprocess.run(argv, cwd=REPO_ROOT, env={**os.environ, "DOCKER_BUILDKIT": "0"}, capture_output=True,
                          text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{who}: building the images failed: {proc.stderr.strip()[-2000:]}")
