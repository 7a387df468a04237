"""deploy/mosquitto as shipped, on a real Mosquitto: Debian's main mosquitto.conf including the shipped
lifecycle.conf from conf.d (only ports and paths changed) with the shipped ACL, users made with mosquitto_passwd,
the broker certificate made with openssl as the README says. The service (test steps, a process of its own) logs
in as `lifecycle` on the loopback listener; the host backend (`host`) and an observer use the TLS listener.
Checked: what each role may publish and read, that the service may clear a retained request carrying keys, the
CLI as host and as observer, refused logins and TLS, and credentials that cannot be read; that no reply (a
kubeconfig least of all) can be steered onto a shared topic and the service's user writes only its own node's
topics; that no other user can take the service's client id."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import free_port
from forwarding import exposure, forward_process, message, tcp_ask, tcp_echo
from lifecycle_fakes import eventually, journal, write_config
from lifecycle_mqtt import REPO, PrivateBroker, Probe, ServiceProcess, probe, start_service_process
from paho.mqtt.packettypes import PacketTypes

from lifecycle.adapters.mqtt import mqtt_properties
from lifecycle.config import STEP_NAMES
from lifecycle.protocol import Topics

DEPLOY = REPO / "deploy" / "mosquitto"
PREFIX = "lifecycle"  # the prefix the shipped ACL names
NODE = "docker-desktop"  # the node the shipped ACL's service block names (node.name's default)
TOPICS = Topics(PREFIX, NODE)
PASSWORDS = {"lifecycle": "service-secret", "host": "host-secret", "observer": "observer-secret"}

# Debian 12's /etc/mosquitto/mosquitto.conf (package mosquitto 2.0.11) with its paths moved into the test's dir
# and without its `log_dest file` (PrivateBroker adds its own; two are an error): the shipped file must work
# included from it (setting persistence again there, for one, is a startup error).
DEBIAN_MAIN_CONF = """pid_file {dir}/mosquitto.pid
persistence true
persistence_location {dir}/data/
include_dir {dir}/conf.d
"""


def shipped_conf(*, plain_port: int, tls_port: int, workdir: Path) -> str:
    """deploy/mosquitto/lifecycle.conf with free ports, the TLS listener on the loopback, the test's files."""
    text = (DEPLOY / "lifecycle.conf").read_text()
    lines = {"listener 1883 127.0.0.1": f"listener {plain_port} 127.0.0.1",
             "listener 8883": f"listener {tls_port} 127.0.0.1"}
    for old, new in lines.items():
        assert text.splitlines().count(old) == 1, f"lifecycle.conf has no line {old!r} any more: adapt this test"
        text = "\n".join(new if line == old else line for line in text.splitlines())
    paths = {"/etc/mosquitto/certs/": f"{workdir}/certs/", "/etc/mosquitto/lifecycle.passwd": f"{workdir}/passwd",
             "/etc/mosquitto/lifecycle.acl": str(DEPLOY / "lifecycle.acl")}
    for old, new in paths.items():
        assert old in text, f"lifecycle.conf does not name {old} any more: adapt this test"
        text = text.replace(old, new)
    return text


def _openssl(*args: str, cwd: Path) -> str:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"
    return done.stdout


def make_broker_certs(certs: Path) -> None:
    """The README's commands, for a broker reached as localhost / 127.0.0.1."""
    certs.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=lifecycle MQTT CA", "-keyout", "ca.key",
             "-out", "ca.crt", cwd=certs)
    _openssl("req", *ec, "-subj", "/CN=lifecycle broker", "-keyout", "broker.key", "-out", "broker.csr", cwd=certs)
    (certs / "broker.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", "broker.ext", "-out", "broker.crt", cwd=certs)


@dataclass
class Deploy:
    dir: Path
    broker: PrivateBroker
    tls_port: int

    @property
    def plain_port(self) -> int:
        return self.broker.port

    @property
    def ca(self) -> Path:
        return self.dir / "certs" / "ca.crt"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def password_file(self, user: str) -> Path:
        path = self.dir / f"{user}-password"
        path.write_text(PASSWORDS[user] + "\n")  # with the newline `echo` adds
        path.chmod(0o600)
        return path

    def client_config(self, user: str) -> Path:
        """A host-side config as the README shows it: only [mqtt] and the node name."""
        path = self.dir / f"{user}.toml"
        path.write_text(f'[mqtt]\nbroker = "mqtts://127.0.0.1:{self.tls_port}"\nusername = "{user}"\n'
                        f'password_file = "{self.password_file(user)}"\nca_file = "{self.ca}"\n\n'
                        f'[node]\nname = "{NODE}"\n')
        return path


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Deploy]:
    make_broker_certs(tmp_path / "certs")
    passwd = tmp_path / "passwd"
    for index, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwd), user, password], check=True, timeout=30)
    tls_port = free_port()

    def conf(port: int, workdir: Path) -> str:
        (workdir / "data").mkdir()
        (workdir / "conf.d").mkdir()
        (workdir / "conf.d" / "lifecycle.conf").write_text(shipped_conf(plain_port=port, tls_port=tls_port,
                                                                        workdir=workdir))
        return DEBIAN_MAIN_CONF.format(dir=workdir)

    broker = PrivateBroker(tmp_path, conf)
    broker.start()
    yield Deploy(tmp_path, broker, tls_port)
    broker.stop()


@pytest.fixture
def service(deploy: Deploy) -> Iterator[ServiceProcess]:
    """The service logging in as `lifecycle` on the loopback listener, configured from its TOML file."""
    root = deploy.dir / "root"
    mqtt = f'username = "lifecycle"\npassword_file = "{deploy.password_file("lifecycle")}"'
    config = write_config(deploy.dir / "service.toml", root=root, node=NODE, prefix=PREFIX,
                          broker=f"mqtt://127.0.0.1:{deploy.plain_port}", mqtt_extra=mqtt)
    svc = start_service_process(config, root=root, node=NODE, log_path=deploy.dir / "service.log")
    yield svc
    svc.proc.send_signal(signal.SIGTERM)
    svc.wait()


def as_user(deploy: Deploy, user: str) -> AbstractAsyncContextManager[Probe]:
    return probe(TOPICS, port=deploy.tls_port, username=user, password=PASSWORDS[user], tls=deploy.tls())


def logged_requests(svc: ServiceProcess) -> list[str]:
    """Ids of the requests the service logged receiving (JSON lines, event "request")."""
    ids = []
    for line in svc.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "request":
                ids.append(entry.get("request_id"))
    return ids


def forged_event() -> bytes:
    return json.dumps({"specversion": "1.0", "id": uuid.uuid4().hex, "source": f"/{TOPICS.base}",
                       "type": "lifecycle.state.changed", "data": {"seq": 999, "from": "idle", "to": "forged"}}
                      ).encode()


async def forge(client: aiomqtt.Client) -> None:
    """Publish, acknowledged, what only the service may publish."""
    await client.publish(TOPICS.status, b'{"state": "forged"}', qos=1, retain=True)
    await client.publish(TOPICS.events, forged_event(), qos=1)
    await client.publish(TOPICS.availability, b"forged", qos=1, retain=True)
    await client.publish(f"{TOPICS.base}/replies/forged", b'{"ok": true, "state": "forged"}', qos=1)


async def test_an_observer_request_never_reaches_the_service_and_the_observer_still_reads_status_and_events(
    deploy: Deploy, service: ServiceProcess,
) -> None:
    async with as_user(deploy, "host") as host:
        await host.ready(timeout_s=15)
        async with as_user(deploy, "observer") as observer:
            status = await observer.wait_for(lambda m: m.topic == TOPICS.status and m.retain)
            assert status.json()["state"] == "idle" and status.json()["node"] == NODE
            # A request with a response topic under replies/ (where the service may answer), then forged
            # service messages; all acknowledged by the broker before the host's requests below, which the
            # service handles in order: had the install reached it, the host's status would no longer be idle.
            await observer.send(json.dumps({"id": "observer-install", "action": "install"}).encode())
            await forge(observer.client)
            await forge(host.client)
            reply = await host.ask({"id": "host-status", "action": "status"})
            assert reply["ok"] and reply["state"] == "idle", reply
            reply = await host.ask({"id": "host-install", "action": "install"})
            assert reply["ok"], reply
            await host.wait_state("running", timeout_s=15)
            await observer.wait_state("running", timeout_s=5)
            await observer.wait_for(lambda m: m.topic == TOPICS.status and m.json()["state"] == "running")

        assert logged_requests(service) == ["host-status", "host-install"], service.log()
        assert journal(deploy.dir / "root") == [f"run {name} 1" for name in STEP_NAMES]  # one install only
        # The observer got status and events only: no requests, no replies (not even to its own request's
        # response topic), no availability.
        assert {m.topic for m in observer.seen} == {TOPICS.status, TOPICS.events}
        # The host got replies and availability, never a request; nobody saw a forged message.
        assert {m.topic for m in host.seen} == {TOPICS.status, TOPICS.events, TOPICS.availability, host.reply_topic}
        assert [m.payload for m in host.seen if m.topic == TOPICS.availability] == [b"online"]
        assert not [m for m in host.seen + observer.seen if b"forged" in m.payload]

    async with as_user(deploy, "observer") as late:  # the retained status is still the service's
        status = await late.wait_for(lambda m: m.topic == TOPICS.status and m.retain)
        assert status.json()["state"] == "running"


async def test_the_service_may_clear_a_retained_request_that_carries_keys(
    deploy: Deploy, service: ServiceProcess,
) -> None:
    key = ("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIHJldGFpbmVkLWtleS1mb3ItdGhlLWFjbC10ZXN0\n"
           "-----END PRIVATE KEY-----\n")  # what a bundle's key looks like; the service never parses it here
    request = {"id": "retained-keys", "action": "install", "pki": {"ca.key": key}}
    async with as_user(deploy, "host") as host:
        await host.ready(timeout_s=15)
        await host.client.publish(TOPICS.requests, json.dumps(request).encode(), qos=1, retain=True)
        await eventually(lambda: "cleared a retained request carrying private keys" in service.log(), timeout_s=10)
    service.proc.send_signal(signal.SIGTERM)  # its user connects once at a time: the check below would take over
    service.wait()

    # Only the service's user may read requests: another client of it finds nothing retained there. Retained
    # messages follow each SUBACK, so a retained request would arrive before the retained status.
    async with aiomqtt.Client("127.0.0.1", deploy.plain_port, identifier=f"check-{uuid.uuid4().hex[:8]}",
                              username="lifecycle", password=PASSWORDS["lifecycle"],
                              protocol=aiomqtt.ProtocolVersion.V5) as check:
        await check.subscribe(TOPICS.requests, qos=1)
        await check.subscribe(TOPICS.status, qos=1)
        async with asyncio.timeout(5):
            async for message in check.messages:
                assert not message.topic.matches(TOPICS.requests), "the retained request with keys is still there"
                break
    assert journal(deploy.dir / "root") == []  # and it was never acted on


async def test_no_reply_goes_onto_a_shared_topic_and_the_service_user_writes_only_its_own_node(
    deploy: Deploy, service: ServiceProcess,
) -> None:
    other = Topics(PREFIX, "other-node")
    steered = [TOPICS.events, TOPICS.status, TOPICS.availability, TOPICS.requests, other.events, other.status,
               other.availability, other.requests]
    async with as_user(deploy, "host") as host, as_user(deploy, "observer") as observer:
        await host.ready(timeout_s=15)
        await observer.client.subscribe(f"{PREFIX}/#", qos=1)
        for topic in steered:
            correlation = uuid.uuid4().bytes
            props = mqtt_properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = topic, correlation
            # The kubeconfig reply carries the admin key (#16); the refusal goes to the valid reply_to.
            body = {"id": "kc", "action": "kubeconfig", "reply_to": host.reply_topic}
            await host.client.publish(TOPICS.requests, json.dumps(body).encode(), qos=1, properties=props)
            reply = await host.wait_for(lambda m, c=correlation: m.topic == host.reply_topic and m.correlation == c)
            assert reply.json()["error"]["code"] == "invalid_reply_topic", (topic, reply.json())

        # The service's user itself may write only its own node's topics and replies trees (the ACL, #17). Its
        # client id is its user name: the service goes first, or this client and the service would take turns.
        service.proc.send_signal(signal.SIGTERM)
        service.wait()
        await host.client.subscribe(f"{PREFIX}-replies/#", qos=1)  # (the probe reads lifecycle/<node>/# only)
        async with aiomqtt.Client("127.0.0.1", deploy.plain_port, username="lifecycle",
                                  password=PASSWORDS["lifecycle"], protocol=aiomqtt.ProtocolVersion.V5) as raw:
            for topic in [other.events, other.status, other.availability, other.requests, f"{other.base}/replies/x",
                          f"{PREFIX}-replies/{other.node}/x", f"{PREFIX}/x", "elsewhere/x"]:
                await raw.publish(topic, b'{"steered": true}', qos=1)
            await raw.publish(f"{PREFIX}-replies/{NODE}/allowed", b'{"allowed": true}', qos=1)
        await host.wait_for(lambda m: m.topic == f"{PREFIX}-replies/{NODE}/allowed")

    # The observer: the service's status and events only, and no reply among them.
    assert {m.topic for m in observer.seen} <= {TOPICS.status, TOPICS.events}, {m.topic for m in observer.seen}
    assert not [m for m in observer.seen if b'"ok"' in m.payload or b"steered" in m.payload]
    assert not [m for m in host.seen if b"steered" in m.payload]
    assert "kc" not in logged_requests(service)  # refused before it was handled


async def test_another_user_cannot_take_the_service_client_id(deploy: Deploy, service: ServiceProcess) -> None:
    async with as_user(deploy, "host") as host:
        await host.ready(timeout_s=15)
        await eventually(lambda: "connected" in service.log(), timeout_s=10)
        lost = service.log().count("broker connection lost")
        for identifier in (f"lifecycle-{NODE}", "lifecycle"):  # its configured id and its user name
            async with aiomqtt.Client("127.0.0.1", deploy.tls_port, identifier=identifier, username="observer",
                                      password=PASSWORDS["observer"], tls_context=deploy.tls(),
                                      protocol=aiomqtt.ProtocolVersion.V5):
                await asyncio.sleep(0.3)
                reply = await host.ask({"id": f"during-{identifier}", "action": "status"})
                assert reply["ok"], reply
        await asyncio.sleep(0.5)
    assert service.log().count("broker connection lost") == lost, service.log()


def lifecycle(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout_s, check=False)


async def test_the_cli_installs_as_host_over_tls_and_an_observer_only_watches(
    deploy: Deploy, service: ServiceProcess,
) -> None:
    host, observer = str(deploy.client_config("host")), str(deploy.client_config("observer"))
    done = await asyncio.to_thread(lifecycle, "install", "--watch", "--config", host, "--timeout", "20")
    assert done.returncode == 0, done.stderr + service.log()
    assert done.stdout.rstrip().splitlines()[-1].startswith("done: running")

    refused = await asyncio.to_thread(lifecycle, "reset", "--no-wait", "--config", observer, "--timeout", "1")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "this broker user may not send requests" in refused.stderr

    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lifecycle", "watch", "-o", "json", "--config", observer,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=REPO)
    try:
        assert watch.stdout is not None
        first = await asyncio.wait_for(watch.stdout.readline(), timeout=15)
    finally:
        watch.terminate()
        await asyncio.wait_for(watch.wait(), timeout=10)
    assert json.loads(first)["state"] == "running", first  # the retained status, not cut short by the reset

    status = await asyncio.to_thread(lifecycle, "status", "-o", "json", "--config", host, "--timeout", "10")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["state"] == "running"
    assert len(logged_requests(service)) == 2  # the host's install and status; the observer's reset never came


async def test_forward_as_host_follows_the_service_users_exposures_and_ignores_an_observers(deploy: Deploy) -> None:
    """Issue 9, part 2: only the service's user may say where the host's forwarded ports lead."""
    web, forged = free_port(), free_port()

    async def publish(user: str, payload: bytes) -> None:
        port, tls = (deploy.plain_port, None) if user == "lifecycle" else (deploy.tls_port, deploy.tls())
        async with aiomqtt.Client("127.0.0.1", port, username=user, password=PASSWORDS[user], tls_context=tls,
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.publish(TOPICS.exposures, payload, qos=1, retain=True)

    async with tcp_echo() as node_port:
        await publish("lifecycle", message(1, exposure(web, node_port)))
        async with forward_process(PREFIX, NODE, flags=("--config", str(deploy.client_config("host")))) as fwd:
            await fwd.wait_line(f"tcp 127.0.0.1:{web}: forwarding to 127.0.0.1:{node_port}", timeout_s=10)
            assert await tcp_ask(web, b"over tls") == b"over tls"
            await publish("observer", message(2, exposure(forged, node_port)))  # dropped by the broker
            await publish("host", message(3, exposure(forged, node_port)))  # the host reads, never writes
            mark = len(fwd.lines)
            await publish("lifecycle", message(4))
            await fwd.wait_line(f"tcp port {web}: closed", after=mark)
            assert not [line for line in fwd.lines if str(forged) in line], fwd.lines


async def _connect(*, port: int, user: str | None = None, password: str | None = None,
                   tls: ssl.SSLContext | None = None, timeout_s: float = 5.0) -> None:
    async with aiomqtt.Client("127.0.0.1", port, username=user, password=password, tls_context=tls,
                              protocol=aiomqtt.ProtocolVersion.V5, timeout=timeout_s):
        pass


def _tls_handshake(port: int, *, version: ssl.TLSVersion, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1: only the broker may say no
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          context.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        return str(tls.version())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_the_broker_refuses_strangers_wrong_passwords_plain_mqtt_on_tls_and_old_tls(deploy: Deploy) -> None:
    await _connect(port=deploy.tls_port, user="observer", password="observer-secret", tls=deploy.tls())
    await _connect(port=deploy.plain_port, user="lifecycle", password="service-secret")
    host = {"user": "host", "password": "host-secret"}
    refusals: list[tuple[str, dict[str, Any], str]] = [
        ("anonymous on the loopback", {"port": deploy.plain_port}, "Not authorized"),
        ("anonymous over TLS", {"port": deploy.tls_port, "tls": deploy.tls()}, "Not authorized"),
        ("wrong password", {"port": deploy.tls_port, "tls": deploy.tls(), "user": "host", "password": "guess"},
         "Not authorized"),
        # The broker waits for a TLS hello that never comes: no answer at all.
        ("plain MQTT on the TLS port", {"port": deploy.tls_port, "timeout_s": 1.0, **host}, "timed out"),
        ("TLS not trusting the broker's CA", {"port": deploy.tls_port, "tls": ssl.create_default_context(), **host},
         "CERTIFICATE_VERIFY_FAILED"),
    ]
    for case, kwargs, reason in refusals:
        with pytest.raises(aiomqtt.MqttError, match=reason):
            await _connect(**kwargs)
            pytest.fail(f"connected: {case}")

    assert _tls_handshake(deploy.tls_port, version=ssl.TLSVersion.TLSv1_2, ca=deploy.ca) == "TLSv1.2"
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|protocol version"):
        _tls_handshake(deploy.tls_port, version=ssl.TLSVersion.TLSv1_1, ca=deploy.ca)

    # The README's check from the host.
    checked = await asyncio.to_thread(
        subprocess.run, ["openssl", "s_client", "-connect", f"127.0.0.1:{deploy.tls_port}", "-CAfile", str(deploy.ca),
                         "-verify_return_error"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        check=False)
    assert "Verify return code: 0 (ok)" in checked.stdout, checked.stdout + checked.stderr

    anonymous = await asyncio.to_thread(lifecycle, "status", "--broker", f"mqtt://127.0.0.1:{deploy.plain_port}",
                                        "--node", NODE, "--timeout", "2")
    assert anonymous.returncode == 3 and "not authorized" in anonymous.stderr.lower(), anonymous.stderr


async def test_unreadable_credentials_stop_serve_and_the_cli_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password"
    credentials = f'username = "lifecycle"\npassword_file = "{missing}"'
    config = write_config(tmp_path / "service.toml", root=tmp_path / "root", node=NODE, prefix=PREFIX,
                          broker="mqtt://127.0.0.1:1", mqtt_extra=credentials)
    for args in (("serve", "--config", str(config)), ("status", "--config", str(config), "--timeout", "1")):
        done = await asyncio.to_thread(lifecycle, *args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"lifecycle: mqtt.password_file: cannot read {missing}: No such file or directory"
    assert not (tmp_path / "root").exists()

    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    tls = write_config(tmp_path / "tls.toml", root=tmp_path / "root", node=NODE, prefix=PREFIX,
                       broker="mqtts://127.0.0.1:1", mqtt_extra=f'ca_file = "{tmp_path / "garbage.crt"}"')
    done = await asyncio.to_thread(lifecycle, "serve", "--config", str(tls))
    assert done.returncode == 2 and "mqtt.ca_file: cannot load" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
