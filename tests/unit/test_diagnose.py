"""The diagnostics bundle (lifecycle.diagnose): what it redacts, how it is cut into chunks and put together again,
and a bundle collected from a node root full of secrets that keeps none of them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from lifecycle_fakes import make_config

from lifecycle.config import MqttConfig
from lifecycle.diagnose import REDACTED, chunk, collect, missing_chunks, reassemble, redact
from lifecycle.paths import HostPaths
from lifecycle.ports import EngineError, Ports
from lifecycle.protocol import ErrorInfo, Event, EventType, Status

TOKEN = "abcdef.0123456789abcdef"
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.eyJpc3MiOiJrdWJlcm5ldGVzL3NlcnZpY2VhY2NvdW50In0."
       "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU")


def _pem(kind: str = "ec") -> str:
    key: Any = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if kind == "rsa" else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _body(pem: str) -> str:
    """The base64 of a PEM block without its armour and line breaks' positions: what must never appear."""
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))[:64]


@pytest.mark.parametrize("text, secret", [
    (f"kubeadm join --token {TOKEN} --discovery-token-ca-cert-hash sha256:00", TOKEN),
    (f"bootstrapTokens:\n- token: {TOKEN}\n  ttl: 24h", TOKEN),
    ('{"password": "hunter2hunter2", "user": "x"}', "hunter2hunter2"),
    ("password = 'hunter2hunter2'", "hunter2hunter2"),
    ("MQTT_PASSWORD=hunter2hunter2 next", "hunter2hunter2"),
    ('{"event": "x", "doc": "{\\"token\\": \\"s3cr3t-s3cr3t\\"}"}', "s3cr3t-s3cr3t"),
    ("client-key-data: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0t", "LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0t"),
    (f"Authorization: Bearer {JWT}", JWT[:40]),
])
def test_redact_removes_tokens_passwords_and_jwts(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and REDACTED in out, out


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_redact_removes_pem_private_keys_but_keeps_certificates_and_plain_text(kind: str) -> None:
    pem = _pem(kind)
    cert = "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHHIG\n-----END CERTIFICATE-----"
    out = redact(f"before\n{pem}\n{cert}\nafter state=running seq=12")
    assert _body(pem) not in out and "PRIVATE KEY" not in out
    assert cert in out and "after state=running seq=12" in out


def test_chunks_reassemble_in_any_order_and_each_fits_in_256_kib() -> None:
    bundle = bytes(range(256)) * 3000  # 768000 bytes: four chunks
    parts = chunk(bundle)
    assert len(parts) == 4 and {p["count"] for p in parts} == {4}
    assert all(len(json.dumps(p)) < 256 * 1024 for p in parts)
    assert reassemble(reversed(parts)) == bundle
    assert missing_chunks({p["index"]: p for p in parts[:3]}) == 1 and missing_chunks({}) == -1
    assert reassemble(chunk(b"")) == b""


@pytest.mark.parametrize("damage", ["missing", "doubled", "flipped", "other bundle"])
def test_reassemble_refuses_a_damaged_set_of_chunks(damage: str) -> None:
    parts = [dict(p) for p in chunk(b"x" * 1000 + b"y" * 1000, chunk_bytes=700)]
    if damage == "missing":
        parts.pop(1)
    elif damage == "doubled":
        parts.append(parts[0])
    elif damage == "flipped":
        raw = bytearray(base64.b64decode(parts[2]["data"]))
        raw[0] ^= 1
        parts[2]["data"] = base64.b64encode(bytes(raw)).decode()
    else:
        parts[2] = dict(chunk(b"z" * 2000, chunk_bytes=700)[2])
    with pytest.raises(ValueError):
        reassemble(parts)


class _DeadEngine:
    async def info(self) -> dict[str, Any]:
        raise EngineError("Cannot connect to the Docker daemon", unreachable=True)


def test_a_bundle_from_a_node_full_of_secrets_holds_its_parts_and_none_of_them(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    key = _pem("rsa")
    (paths.pki_dir).mkdir(parents=True)
    (paths.pki_dir / "ca.key").write_text(key)  # never read: only what the logs and state say can leak
    paths.log_dir.mkdir(parents=True)
    (paths.log_dir / "kubelet.log.1").write_text(f"older line\nleaked {key}\n")
    (paths.log_dir / "kubelet.log").write_text(f"newest line token={TOKEN}\n")
    paths.state_dir.mkdir(parents=True)
    (paths.state_dir / "kubeadm.yaml").write_text(f"bootstrapTokens:\n- token: {TOKEN}\n")
    (paths.state_dir / "state.json").write_text('{"state": "failed"}')
    paths.under("/proc").mkdir()
    paths.under("/proc/meminfo").write_text("MemTotal:        4194304 kB\n")
    config = dataclasses.replace(make_config(tmp_path), mqtt=MqttConfig(username="lc", password="mqtt-pass-4711"))
    # Unscrubbed on purpose (a state file written by an older version): the bundle must scrub it itself.
    error = ErrorInfo("kubeadm_failed", "kubeadm init failed", details={"output": f"x\n{key}\ny"})
    status = Status(node="unit", state="failed", since=0.0, seq=3, request_id="r1", kubernetes_version=None,
                    step=6, steps=9, error=error)
    ports = Ports(docker=cast(Any, _DeadEngine()), commands=cast(Any, None), kubelet=cast(Any, None),
                  kube=cast(Any, None))
    log_lines = [json.dumps({"event": "request", "password": "mqtt-pass-4711"}), f"kubeadm said {key}"]
    bundle = asyncio.run(collect(config=config, paths=paths, ports=ports, status=status, events=[],
                                 log_lines=log_lines, source="/lifecycle/unit"))

    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()  # type: ignore[union-attr]
                   if m.isfile()}
    assert {"MANIFEST.json", "status.json", "events.json", "config.json", "versions.json", "service.log",
            "kubelet.log", "host.json", "state/kubeadm.yaml", "state/state.json"} <= set(members)
    assert "older line" in members["kubelet.log"] and "newest line" in members["kubelet.log"]
    assert "kubeadm init failed" in members["status.json"]
    assert "MemTotal" in members["host.json"]
    notes = " ".join(json.loads(members["MANIFEST.json"])["notes"])
    assert "docker-info.json: skipped" in notes and "cluster/: skipped" in notes
    everything = "\n".join(members.values())
    for secret in (_body(key), TOKEN, "mqtt-pass-4711", "PRIVATE KEY-----"):
        assert secret not in everything, secret


def test_every_json_member_of_a_bundle_stays_json_once_redacted(tmp_path: Path) -> None:
    """Found by hand (issue 11's check): a node with an MQTT password gave a config.json with
    `"password_file": [redacted]` and an events.json whose kubeadm line "Using token: <token>" lost its closing
    quote: neither parsed. JSON members are redacted as data now."""
    paths = HostPaths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    (paths.state_dir / "state.json").write_text(json.dumps({"state": "failed", "token_file": None, "n": 3}))
    paths.under("/proc").mkdir()
    paths.under("/proc/meminfo").write_text("MemTotal:        4194304 kB\n")
    config = dataclasses.replace(make_config(tmp_path), mqtt=MqttConfig(username="lc", password="mqtt-pass-4711"))
    said = f"[bootstrap-token] Using token: {TOKEN}"
    progress = Event(type=EventType.STEP_PROGRESS, seq=7, data={"seq": 7, "state": "kubeadm", "message": said})
    status = Status(node="unit", state="failed", since=0.0, seq=7, request_id="r1", kubernetes_version=None,
                    step=None, steps=9, error=None)
    ports = Ports(docker=cast(Any, _DeadEngine()), commands=cast(Any, None), kubelet=cast(Any, None),
                  kube=cast(Any, None))
    bundle = asyncio.run(collect(config=config, paths=paths, ports=ports, status=status, events=[progress],
                                 log_lines=[], source="/lifecycle/unit"))

    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()  # type: ignore[union-attr]
                   if m.isfile()}
    parsed = {name: json.loads(text) for name, text in members.items() if name.endswith(".json")}
    assert {"config.json", "events.json", "state/state.json", "status.json"} <= set(parsed)
    assert parsed["config.json"]["mqtt"]["password"] == REDACTED
    assert parsed["config.json"]["mqtt"]["password_file"] is None, "none is not a secret: it stays null"
    assert parsed["events.json"][0]["data"]["message"] == f"[bootstrap-token] Using token: {REDACTED}"
    assert parsed["state/state.json"] == {"state": "failed", "token_file": None, "n": 3}
    everything = "\n".join(members.values())
    assert TOKEN not in everything and "mqtt-pass-4711" not in everything
