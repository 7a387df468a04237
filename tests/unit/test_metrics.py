"""The metrics: config validation, and the sink turning the engine's events into series (docs/metrics.md).
The whole path (real service, HTTP scrape, promtool) is tests/e2e/test_metrics_endpoint.py."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import free_port
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lifecycle.adapters.metrics_http import MetricsServer
from lifecycle.certwatch import CertInfo
from lifecycle.config import ConfigError, load_config
from lifecycle.errors import MetricsListenError
from lifecycle.metrics import LiveSources, Metrics
from lifecycle.protocol import Event, EventType, Reply

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, metrics: str) -> Path:
    path = tmp_path / "lifecycle.toml"
    path.write_text((REPO / "simnode" / "lifecycle.toml").read_text() + "\n[metrics]\n" + metrics)
    return path


@pytest.mark.parametrize(("text", "listen"), [
    ("", None),
    ("enabled = false\nlisten = \"127.0.0.1:9464\"\n", None),
    ("enabled = true\n", ("127.0.0.1", 9464)),
    ("listen = \"127.0.0.1:9500\"\n", ("127.0.0.1", 9500)),
    ("listen = \"localhost:9500\"\n", ("127.0.0.1", 9500)),
    ("listen = \"[::1]:9464\"\n", ("::1", 9464)),
    ("listen = \"0.0.0.0:9464\"\n", ("0.0.0.0", 9464)),  # explicit: the operator's choice
])
def test_metrics_listen_is_off_by_default_and_loopback_when_only_enabled(
    tmp_path: Path, text: str, listen: tuple[str, int] | None
) -> None:
    assert load_config(_config(tmp_path, text)).metrics.listen == listen


def test_the_sample_configs_leave_metrics_off() -> None:
    for sample in (REPO / "deploy" / "lifecycle.toml", REPO / "simnode" / "lifecycle.toml"):
        assert load_config(sample).metrics.listen is None, sample


@pytest.mark.parametrize(("text", "message"), [
    ("listen = \"9464\"\n", "metrics.listen: expected host:port"),
    ("listen = \"example.com:9464\"\n", "metrics.listen: 'example.com' is not an IP address"),
    ("listen = \"::1:9464\"\n", "metrics.listen: an IPv6 address goes in brackets"),
    ("listen = \"127.0.0.1:0\"\n", "metrics.listen: port must be 1..65535, got 0"),
    ("listen = \"127.0.0.1:70000\"\n", "metrics.listen: port must be 1..65535"),
    # Fullwidth digits: str.isdigit() says yes, int() would take them.
    ("listen = \"127.0.0.1:\uff19\uff14\uff16\uff14\"\n", "metrics.listen: expected host:port"),
    ("listen = 9464\n", "metrics.listen: expected"),
    ("port = 9464\n", "metrics.port: unknown key"),
])
def test_a_bad_metrics_address_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        load_config(_config(tmp_path, text))


def _metrics() -> Metrics:
    return Metrics(LiveSources(mqtt_connected=lambda: True, mqtt_connects=lambda: 3, queued_events=lambda: 2,
                               kubelet_restarts=lambda: 1))


def _changed(seq: int, left: str, entered: str, duration_s: float) -> Event:
    return Event(type=EventType.STATE_CHANGED, seq=seq,
                 data={"seq": seq, "from": left, "to": entered, "duration_s": duration_s})


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_events_become_state_durations_retries_and_pulled_bytes() -> None:
    m = _metrics()
    m.observe(_changed(1, "idle", "images", 0.0))
    for current in (100, 400, 400):  # cumulative per image: counted once
        m.observe(Event(type=EventType.STEP_PROGRESS, seq=2, data={
            "state": "images", "message": "pulling a:1", "current": current, "total": 400, "unit": "bytes"}))
    m.observe(Event(type=EventType.STEP_PROGRESS, seq=3, data={
        "state": "images", "message": "pulling b:1", "current": 50, "total": 50, "unit": "bytes"}))
    m.observe(Event(type=EventType.STEP_RETRYING, seq=4, data={"state": "images", "error": {"code": "pull_failed"}}))
    m.observe(_changed(5, "images", "binaries", 2.0))
    m.observe(Event(type=EventType.STEP_FAILED, seq=6, data={"state": "binaries", "error": {"code": "cancelled"}}))
    m.observe(_changed(7, "binaries", "failed", 0.3))
    m.observe(_changed(8, "failed", "kubeadm", 0.0))
    m.observe(Event(type=EventType.STEP_FAILED, seq=9, data={"state": "kubeadm", "error": {"code": "command"}}))
    m.observe(_changed(10, "kubeadm", "failed", 4.0))
    m.request_answered("install", Reply(id="r", ok=True, state="idle"))
    m.request_answered("install", Reply(id="r", ok=False, state="images", error=("busy", "an install runs")))
    m.request_answered("invalid", Reply(id=None, ok=False, state="images", error=("malformed", "not JSON")))
    m.certificates([CertInfo("ca.crt", 2e9, True), CertInfo("apiserver.crt", 1.9e9, False)])
    m.certificates([CertInfo("apiserver.crt", 1.95e9, False)])  # the next scan replaces the last one's

    s = _samples(m)
    assert s[("lifecycle_state", (("state", "failed"),))] == 1
    assert sum(v for (name, _), v in s.items() if name == "lifecycle_state") == 1
    count = "lifecycle_step_duration_seconds_count"
    assert s[(count, (("outcome", "success"), ("step", "images")))] == 1
    assert s[("lifecycle_step_duration_seconds_sum", (("outcome", "success"), ("step", "images")))] == 2.0
    assert s[(count, (("outcome", "cancelled"), ("step", "binaries")))] == 1
    assert s[(count, (("outcome", "failure"), ("step", "kubeadm")))] == 1
    assert not any(dict(labels).get("step") in ("idle", "failed") for (_, labels) in s)
    assert s[("lifecycle_step_retries_total", (("code", "pull_failed"), ("step", "images")))] == 1
    assert s[("lifecycle_image_pull_bytes_total", ())] == 450
    assert s[("lifecycle_requests_total", (("action", "install"), ("outcome", "ok")))] == 1
    assert s[("lifecycle_requests_total", (("action", "install"), ("outcome", "refused")))] == 1
    assert s[("lifecycle_requests_total", (("action", "invalid"), ("outcome", "refused")))] == 1
    expiry = {dict(labels)["file"]: v for (name, labels), v in s.items()
              if name == "lifecycle_certificate_expiry_timestamp_seconds"}
    assert expiry == {"apiserver.crt": 1.95e9}
    assert s[("lifecycle_mqtt_connected", ())] == 1
    assert s[("lifecycle_mqtt_reconnects_total", ())] == 2
    assert s[("lifecycle_mqtt_queued_events", ())] == 2
    assert s[("lifecycle_kubelet_restarts_total", ())] == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_finds_nothing_to_lint_in_the_output() -> None:
    m = _metrics()
    m.observe(_changed(1, "preflight", "certs", 0.1))
    m.request_answered("status", Reply(id="r", ok=True, state="idle"))
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(m.registry), capture_output=True,
                         check=False)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


async def test_the_endpoint_serves_the_registry_and_a_port_in_use_is_a_clear_error() -> None:
    m = _metrics()
    port = free_port()
    server = MetricsServer(m.registry, host="127.0.0.1", port=port)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = (await reader.read()).decode()
        writer.close()
        assert response.startswith("HTTP/1.0 200 OK") and "\nlifecycle_mqtt_connected 1.0\n" in response
        with pytest.raises(MetricsListenError, match=rf"^metrics.listen: cannot listen on 127.0.0.1:{port}: "):
            await MetricsServer(m.registry, host="127.0.0.1", port=port).start()
    finally:
        await server.close()
