"""The `lifecycle` command as a user runs it, against the service (test steps) in another process."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lifecycle_fakes import steer, write_config
from lifecycle_mqtt import REPO, ServiceProcess, start_service_process, unique_prefix

from lifecycle.cli_render import ProgressBoard, progress_text


@dataclass
class Node:
    root: Path
    flags: list[str]
    svc: ServiceProcess


@pytest.fixture
def node(tmp_path: Path, mqtt_broker: tuple[str, int]) -> Iterator[Node]:
    prefix, root = unique_prefix("cli"), tmp_path / "root"
    config = write_config(tmp_path / "lifecycle.toml", root=root, node="clinode", prefix=prefix,
                          broker="mqtt://127.0.0.1:1883")
    steer(root, "images", run_s=0.05, progress=3)
    svc = start_service_process(config, root=root, node="clinode", log_path=tmp_path / "service.log")
    flags = ["--config", str(config), "--timeout", "10"]
    first = lifecycle("status", *flags)  # sent while the service starts: the CLI waits for its `online`
    assert first.returncode == 0, first.stderr + svc.log()
    yield Node(root, flags, svc)
    svc.proc.send_signal(signal.SIGTERM)
    svc.wait()


def lifecycle(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout_s, check=False)


def test_install_watch_shows_each_state_with_durations_and_pull_progress(node: Node) -> None:
    done = lifecycle("install", "--watch", *node.flags)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    states = ("preflight", "certs", "images", "binaries", "network", "kubeadm", "kubelet", "readiness", "addons")
    for index, state in enumerate(states, 1):
        assert f"[{index}/9] {state}\n" in out
        assert f"  {state} took " in out
    assert re.search(r"pulling item2 +\[#+\] 100% ", out)  # plain lines when not a terminal
    assert out.rstrip().splitlines()[-1].startswith("done: running after ")

    again = lifecycle("install", "--watch", *node.flags)
    assert again.returncode == 0 and "already running" in again.stdout


def test_install_watch_exits_non_zero_with_the_cause_and_command_output(node: Node) -> None:
    steer(node.root, "kubeadm", fail="command")
    failed = lifecycle("install", "--watch", *node.flags)
    assert failed.returncode == 1
    assert "failed in kubeadm" in failed.stderr
    assert "error command_failed: kubeadm exited with code 3" in failed.stderr
    assert "error: kubeadm broke" in failed.stderr


def test_status_json_reset_and_the_state_after_it(node: Node) -> None:
    assert lifecycle("install", "--watch", *node.flags).returncode == 0
    status = lifecycle("status", "-o", "json", *node.flags)
    assert status.returncode == 0
    body = json.loads(status.stdout)
    assert body["ok"] and body["status"]["state"] == "running" and body["status"]["steps"] == 9

    reset = lifecycle("reset", *node.flags)
    assert reset.returncode == 0, reset.stderr
    assert "done: idle" in reset.stdout
    assert json.loads(lifecycle("status", "-o", "json", *node.flags).stdout)["state"] == "idle"


def test_unsupported_version_is_refused_with_exit_1(node: Node) -> None:
    refused = lifecycle("install", "--version", "v1.99.9", *node.flags)
    assert refused.returncode == 1 and "unsupported_version" in refused.stderr


def test_no_service_means_exit_3_and_bad_flags_exit_2(mqtt_broker: tuple[str, int]) -> None:
    nobody = lifecycle("status", "--node", "nobody-home", "--prefix", unique_prefix("none"), "--timeout", "1")
    assert nobody.returncode == 3 and "no reply" in nobody.stderr
    bad = lifecycle("status", "--broker", "http://x")
    assert bad.returncode == 2 and "mqtt.broker: expected mqtt://host" in bad.stderr
    assert lifecycle("install", "--bogus").returncode == 2


def test_graph_prints_mermaid_and_help_documents_exit_codes() -> None:
    graph = lifecycle("graph")
    assert graph.returncode == 0
    assert "stateDiagram-v2" in graph.stdout and "failed --> kubeadm: resume" in graph.stdout
    assert "addons --> running: next" in graph.stdout
    helptext = lifecycle("install", "--help").stdout
    assert "exit codes:" in helptext and "no reply within --timeout" in helptext


def test_watch_follows_events_until_interrupted(node: Node) -> None:
    # SIGINT back to its default in the child: a test run started in the background by a shell inherits SIGINT
    # ignored (POSIX: asynchronous lists), and Python then installs no handler, so ^C would never reach the watcher.
    watcher = subprocess.Popen([sys.executable, "-m", "lifecycle", "watch", *node.flags], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the retained status comes first: the watcher is subscribed
        assert first.startswith("node clinode: idle")
        assert lifecycle("install", "--watch", *node.flags).returncode == 0
        lines = []
        while "running" not in lines:
            lines.append(watcher.stdout.readline().strip())
        assert "[1/9] preflight" in lines and "[9/9] addons" in lines
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=10) == 0


def test_pull_progress_redraws_its_own_line_on_a_terminal() -> None:
    stream = io.StringIO()
    board = ProgressBoard(stream, tty=True)
    for current in (10, 50):
        for image in ("etcd", "coredns"):
            board.update(image, progress_text({"message": f"pulling {image}", "current": current * 1e6,
                                               "total": 100e6, "unit": "bytes"}))
    out = stream.getvalue()
    assert out.count("\n") == 2  # one line per image
    assert "\x1b[2A\r\x1b[2Kpulling etcd" in out and "50% 50.0 MB/100.0 MB\x1b[2B" in out
    assert "\x1b[1A\r\x1b[2Kpulling coredns" in out


def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nbroker = "tcp://127.0.0.1"\n')
    served = lifecycle("serve", "--config", str(bad), "--root", str(tmp_path / "root"))
    assert served.returncode == 2 and "mqtt.broker: expected mqtt://host" in served.stderr
    assert not (tmp_path / "root").exists()


def test_stop_and_start_wait_for_their_end_and_say_what_is_refused(node: Node) -> None:
    """`lifecycle stop` / `start` (issue 10 part 2): each waits for its end; a refusal exits 1 with its code."""
    refused = lifecycle("stop", *node.flags)
    assert refused.returncode == 1 and "not_installed" in refused.stderr
    assert lifecycle("install", "--watch", *node.flags).returncode == 0
    stopped = lifecycle("stop", *node.flags)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.rstrip().splitlines()[-1].startswith("done: stopped after ")
    assert json.loads(lifecycle("status", "-o", "json", *node.flags).stdout)["state"] == "stopped"
    assert "already stopped" in lifecycle("stop", *node.flags).stdout
    started = lifecycle("start", *node.flags)
    assert started.returncode == 0, started.stderr
    assert "kubelet" in started.stdout and "images" not in started.stdout
    assert started.stdout.rstrip().splitlines()[-1].startswith("done: running after ")
