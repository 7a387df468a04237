"""The service and the CLI behind a TLS listener that requires client certificates (mqtts://, cert_file and
key_file in [mqtt]). The shipped deploy/mosquitto config (users, passwords, ACL, TLS) is tested in
test_broker_acl.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from lifecycle_fakes import write_config
from lifecycle_mqtt import REPO, PrivateBroker, service_in_process


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: the service under test shares this event loop and must keep running."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "lifecycle", *args], capture_output=True,
                                   text=True, cwd=REPO, timeout=30, check=False)


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
