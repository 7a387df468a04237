"""Broker credentials from `[mqtt]`: the password (from `password_file`) and the TLS context (TLS 1.2 or newer,
CA, client certificate), loaded once for the service and the CLI. A file that cannot be used is a `ConfigError`
naming its key and the cause. Reads files, writes nothing; the password and keys never reach a message."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle.config import ConfigError, MqttConfig


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None = field(repr=False)  # a repr or a traceback must not show it
    tls: ssl.SSLContext | None


def load_credentials(config: MqttConfig) -> Credentials:
    """Everything `aiomqtt.Client` needs to authenticate; raises `ConfigError` (`mqtt.<key>: ...`)."""
    return Credentials(username=config.username, password=_password(config), tls=tls_context(config))


def _password(config: MqttConfig) -> str | None:
    if config.password_file is None:
        password, key = config.password, "mqtt.password"
    else:
        key = "mqtt.password_file"
        # Editors and `echo` add a newline that is not part of the password.
        password = _read_text(config.password_file, key=key).strip()
        if not password:
            raise ConfigError(f"{key}: {config.password_file} is empty")
    if password is not None and config.username is None:
        raise ConfigError(f"{key}: a password needs mqtt.username (MQTT sends no password without a user name)")
    return password


def _read_text(path: Path, *, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {_reason(exc)}") from None


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """For mqtts:// only: verify the broker's certificate and host name, TLS 1.2 or newer. With `ca_file`, only
    that CA is trusted (not the system's), so a broker certificate from any public CA is refused."""
    if not config.tls:
        return None
    try:
        context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.ca_file: cannot load {config.ca_file}: {_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the default today; said here so it never drifts lower
    if config.cert_file is not None and config.key_file is not None:
        try:
            context.load_cert_chain(certfile=str(config.cert_file), keyfile=str(config.key_file))
        except (OSError, ssl.SSLError) as exc:
            # One message for both files: OpenSSL does not say which of them it could not use.
            raise ConfigError(f"mqtt.cert_file/key_file: cannot load {config.cert_file} with {config.key_file}: "
                              f"{_reason(exc)}") from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)  # OpenSSL's short reason ("PEM_LIB", "KEY_VALUES_MISMATCH")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
