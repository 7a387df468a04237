"""The service and the CLI behind a broker that wants credentials: the shipped deploy/mosquitto config (users,
ACL) with username + password_file, and a TLS listener that requires client certificates (mqtts://)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
from lifecycle_fakes import write_config
from lifecycle_mqtt import REPO, PrivateBroker, probe, service_config, service_in_process

from lifecycle.protocol import Topics

DEPLOY = REPO / "deploy" / "mosquitto"


def _deploy_conf(port: int, workdir: Path) -> str:
    """deploy/mosquitto/lifecycle.conf as shipped, moved to a free port and the test's files."""
    (workdir / "data").mkdir(exist_ok=True)
    return ((DEPLOY / "lifecycle.conf").read_text()
            .replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
            .replace("/etc/mosquitto/lifecycle.passwd", str(workdir / "passwd"))
            .replace("/etc/mosquitto/lifecycle.acl", str(DEPLOY / "lifecycle.acl"))
            .replace("/var/lib/mosquitto/", f"{workdir / 'data'}/"))


@pytest.fixture
def deploy_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "lifecycle", "service-secret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "operator", "operator-secret"], check=True)
    broker = PrivateBroker(tmp_path, _deploy_conf)
    broker.start()
    yield broker
    broker.stop()


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: the service under test shares this event loop and must keep running."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "lifecycle", *args], capture_output=True,
                                   text=True, cwd=REPO, timeout=30, check=False)


async def test_deploy_broker_config_users_and_acl(tmp_path: Path, deploy_broker: PrivateBroker) -> None:
    (tmp_path / "service-pw").write_text("service-secret\n")
    (tmp_path / "operator-pw").write_text("operator-secret\n")
    config = service_config(tmp_path / "root", prefix="lifecycle", node="authnode", port=deploy_broker.port)
    config = replace(config, mqtt=replace(config.mqtt, username="lifecycle", password_file=tmp_path / "service-pw"))
    topics = Topics("lifecycle", "authnode")
    operator = write_config(tmp_path / "operator.toml", root=tmp_path / "unused", node="authnode", prefix="lifecycle",
                            broker=f"mqtt://127.0.0.1:{deploy_broker.port}",
                            mqtt_extra=f'username = "operator"\npassword_file = "{tmp_path / "operator-pw"}"')
    async with service_in_process(config):
        async with probe(topics, port=deploy_broker.port, username="operator", password="operator-secret") as p:
            await p.ready()
            # The ACL keeps operators from writing what the service owns.
            await p.client.publish(topics.status, b'{"state": "forged"}', qos=1, retain=True)
            reply = await p.ask({"id": "op-1", "action": "status"})
            assert reply["ok"] and reply["status"]["node"] == "authnode"
        async with probe(topics, port=deploy_broker.port, username="operator", password="operator-secret") as p:
            status = await p.wait_for(lambda m: m.topic == topics.status and m.retain)
            assert status.json()["state"] == "idle"

        by_cli = await _cli("status", "-o", "json", "--config", str(operator), "--timeout", "5")
        assert by_cli.returncode == 0, by_cli.stderr
        assert json.loads(by_cli.stdout)["status"]["node"] == "authnode"

        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", deploy_broker.port, protocol=aiomqtt.ProtocolVersion.V5):
                pass  # anonymous: refused
        anonymous = await _cli("status", "--broker", f"mqtt://127.0.0.1:{deploy_broker.port}", "--node", "authnode",
                         "--timeout", "2")
        assert anonymous.returncode == 3 and "broker" in anonymous.stderr


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
             str(d / "ca.key"), "-out", str(d / "ca.crt"), "-subj", "/CN=test-mqtt-ca", "-days", "1")
    for name, cn, san in (("server", "localhost", "DNS:localhost,IP:127.0.0.1"), ("client", "lifecycle", None)):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                 str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n" if san else "extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.crt"), "-days", "1",
                 "-extfile", str(ext))


async def test_mqtts_with_client_certificates(tmp_path: Path) -> None:
    _make_pki(tmp_path)

    def tls_conf(port: int, workdir: Path) -> str:
        return (f"listener {port} 127.0.0.1\ncafile {workdir / 'ca.crt'}\ncertfile {workdir / 'server.crt'}\n"
                f"keyfile {workdir / 'server.key'}\nrequire_certificate true\nuse_identity_as_username true\n"
                "allow_anonymous false")

    broker = PrivateBroker(tmp_path, tls_conf)
    broker.start()
    try:
        tls = (f'ca_file = "{tmp_path / "ca.crt"}"\ncert_file = "{tmp_path / "client.crt"}"\n'
               f'key_file = "{tmp_path / "client.key"}"')
        cfg = write_config(tmp_path / "tls.toml", root=tmp_path / "root", node="tlsnode", prefix="tlstest",
                           broker=f"mqtts://localhost:{broker.port}", mqtt_extra=tls)
        from lifecycle.__main__ import load_serve_config
        from lifecycle.cli import build_parser

        config = load_serve_config(build_parser().parse_args(["serve", "--config", str(cfg)]))
        assert config.mqtt.tls
        async with service_in_process(config):
            by_cli = await _cli("status", "-o", "json", "--config", str(cfg), "--timeout", "10")
            assert by_cli.returncode == 0, by_cli.stderr + broker.log()
            assert json.loads(by_cli.stdout)["status"]["node"] == "tlsnode"
            no_cert = write_config(tmp_path / "nocert.toml", root=tmp_path / "root", node="tlsnode", prefix="tlstest",
                                   broker=f"mqtts://localhost:{broker.port}",
                                   mqtt_extra=f'ca_file = "{tmp_path / "ca.crt"}"')
            refused = await _cli("status", "--config", str(no_cert), "--timeout", "2")
            assert refused.returncode == 3 and "certificate required" in refused.stderr
    finally:
        broker.stop()
