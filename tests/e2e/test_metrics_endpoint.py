"""The Prometheus endpoint of the real `lifecycle serve` (docs/metrics.md), scraped with plain HTTP during and
after an install on the simulated node, and linted with `promtool check metrics` (Debian package prometheus)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_install_over_mqtt import SIM_CONFIG, Node, _in_sim_namespace, _wait_state, make_node, payload  # noqa: F401

INSTALL_STEPS = {"preflight", "certs", "images", "binaries", "network", "kubeadm", "kubelet", "readiness", "addons"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def _current_state(samples: Samples) -> str:
    (state,) = [dict(labels)["state"] for (name, labels), v in samples.items() if name == "lifecycle_state" and v]
    return state


def _listening_tcp_ports(pid: int) -> set[int]:
    """Ports the process listens on: its socket inodes matched against /proc/net/tcp{,6} in state LISTEN (0A)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_follow_an_install_and_are_off_by_default(
    make_node: Callable[..., Node],  # noqa: F811 (the fixture imported above)
) -> None:
    # Off by default: the sample config opens no port at all.
    plain = make_node()
    plain.start_service()
    assert plain.service is not None
    assert _listening_tcp_ports(plain.service.pid) == set()
    plain.kill_service()

    port = free_port()
    metrics_section = f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    node = make_node(config_text=_in_sim_namespace(SIM_CONFIG.read_text()) + metrics_section)
    node.start_service()
    assert node.service is not None
    assert _listening_tcp_ports(node.service.pid) == {port}
    _, before = _scrape(port)
    assert _current_state(before) == "idle"
    assert before[("lifecycle_mqtt_connected", frozenset())] == 1

    seen: list[str] = []  # the current state of each scrape during the install
    done = threading.Event()

    def scrape_while_installing() -> None:
        while not done.is_set():
            state = _current_state(_scrape(port)[1])
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape_while_installing, daemon=True)
    scraper.start()
    events = node.subscribe("events")
    reply = payload(node.request({"id": "metrics-install", "action": "install"}, correlation="m-1"))
    assert reply["ok"] is True, reply
    last = _wait_state(events, "running", timeout_s=120)
    done.set()
    scraper.join(timeout=10)
    assert last["data"]["to"] == "running", f"install failed: {last}\n{node.log_path.read_text()[-3000:]}"

    text, after = _scrape(port)
    assert _current_state(after) == "running"
    assert len(seen) >= 3 and seen[0] in ("idle", "preflight"), seen  # the gauge moved through the install
    durations = {dict(labels)["step"]: v for (name, labels), v in after.items()
                 if name == "lifecycle_step_duration_seconds_count" and dict(labels)["outcome"] == "success"}
    assert durations == dict.fromkeys(INSTALL_STEPS, 1.0), durations
    assert after[("lifecycle_requests_total", frozenset({("action", "install"), ("outcome", "ok")}))] == 1
    assert ("lifecycle_image_pull_bytes_total", frozenset()) in after  # 0 here: the engine has the images
    expiry = {dict(labels)["file"]: v for (name, labels), v in after.items()
              if name == "lifecycle_certificate_expiry_timestamp_seconds"}
    assert {"ca.crt", "apiserver.crt"} <= set(expiry), expiry
    now = time.time()  # leaves for pki.cert_validity_days (365), CAs for ca_validity_days (3650)
    assert now + 364 * 86400 < expiry["apiserver.crt"] < now + 366 * 86400, expiry
    assert now + 3649 * 86400 < expiry["ca.crt"] < now + 3651 * 86400, expiry
    assert after[("lifecycle_kubelet_restarts_total", frozenset())] == 0
    assert after[("lifecycle_mqtt_reconnects_total", frozenset())] == 0

    if shutil.which("promtool") is not None:  # scripts/services.sh installs it; the unit tests say if it is missing
        out = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, check=False)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out
