"""Broker credentials from [mqtt]: each unusable file or combination is a ConfigError naming its key, never a
traceback; the password stays out of reprs; TLS contexts verify the broker with TLS 1.2 or newer."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from lifecycle.adapters.mqtt_credentials import load_credentials
from lifecycle.config import ConfigError, MqttConfig, load_client_config

TLS = MqttConfig(broker="mqtts://broker.example:8883")


def _key_and_cert(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return key, cert


def test_password_file_is_read_without_its_newline_and_kept_out_of_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret-value\n")
    creds = load_credentials(MqttConfig(username="lifecycle", password_file=tmp_path / "pw"))
    assert creds.username == "lifecycle" and creds.password == "s3cret-value" and creds.tls is None
    assert "s3cret-value" not in repr(creds)


NEEDS_USER = "a password needs mqtt.username (MQTT sends no password without a user name)"
# name -> ([mqtt] settings for the test's dir, the error expected)
CASES: dict[str, tuple[Callable[[Path], MqttConfig], str]] = {
    "missing password file": (lambda d: MqttConfig(username="u", password_file=d / "missing"),
                              "mqtt.password_file: cannot read {d}/missing: No such file or directory"),
    "empty password file": (lambda d: MqttConfig(username="u", password_file=d / "empty"),
                            "mqtt.password_file: {d}/empty is empty"),
    "password file, no user": (lambda d: MqttConfig(password_file=d / "pw"), f"mqtt.password_file: {NEEDS_USER}"),
    "password, no user": (lambda d: MqttConfig(password="x"), f"mqtt.password: {NEEDS_USER}"),
    "missing CA": (lambda d: replace(TLS, ca_file=d / "missing.crt"),
                   "mqtt.ca_file: cannot load {d}/missing.crt: No such file or directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_credentials_name_the_key_and_the_cause(tmp_path: Path, case: str) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "pw").write_text("x\n")
    settings, message = CASES[case]
    with pytest.raises(ConfigError) as caught:
        load_credentials(settings(tmp_path))
    assert str(caught.value) == message.format(d=tmp_path)


def test_a_ca_file_that_is_no_certificate_and_a_key_of_another_certificate_are_refused(tmp_path: Path) -> None:
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^mqtt.ca_file: cannot load .*garbage.crt: "):
        load_credentials(replace(TLS, ca_file=tmp_path / "garbage.crt"))
    key_a, _ = _key_and_cert(tmp_path, "a")
    _, cert_b = _key_and_cert(tmp_path, "b")
    with pytest.raises(ConfigError, match=r"^mqtt.cert_file/key_file: cannot load .*b.crt with .*a.key: "
                                          r"KEY_VALUES_MISMATCH"):
        load_credentials(replace(TLS, cert_file=cert_b, key_file=key_a))


def test_tls_context_verifies_the_broker_with_tls_1_2_or_newer_and_only_the_given_ca(tmp_path: Path) -> None:
    _, ca = _key_and_cert(tmp_path, "ca")
    context = load_credentials(replace(TLS, ca_file=ca)).tls
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ca"),),)]  # no system CAs
    assert load_credentials(MqttConfig(broker="mqtt://127.0.0.1:1883", ca_file=ca)).tls is None  # plain MQTT


def test_a_client_config_needs_only_mqtt_and_the_node_name(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text('[mqtt]\nbroker = "mqtts://vm.internal:8883"\nusername = "host"\npassword_file = "pw"\n\n'
                    '[node]\nname = "docker-desktop"\n\n[kubernetes]\nanything = "is ignored"\n')
    mqtt, node = load_client_config(path)
    assert node == "docker-desktop" and mqtt.port == 8883 and mqtt.tls and mqtt.username == "host"
    assert mqtt.password_file == tmp_path / "pw"  # relative to the file
    path.write_text('[mqtt]\nbroker = "http://x"\n')
    with pytest.raises(ConfigError, match=r"^mqtt.broker: expected mqtt://"):
        load_client_config(path)
