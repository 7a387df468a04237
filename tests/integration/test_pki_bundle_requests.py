"""PKI bundles and the kubeconfig request over a real broker: the service runs in-process with the real certs
step (the other steps are test steps), bundles are made with the openssl CLI. Checks what is written, what is
refused (and that the PKI directory does not change then), and that no key travels anywhere but in the
kubeconfig reply, which goes to the requester's response topic only, with a message expiry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from lifecycle_fakes import fake_plan, fake_reset, null_ports, steer
from lifecycle_mqtt import Probe, RunningService, probe, retained, service_config, unique_prefix
from openssl_pki import BAD_BUNDLES, OpensslPki, key_bodies
from paho.mqtt.packettypes import PacketTypes

from lifecycle.adapters.mqtt import mqtt_properties
from lifecycle.config import Config
from lifecycle.paths import HostPaths
from lifecycle.pki_bundle import load_bundle
from lifecycle.pki_bundle_disk import write_bundle
from lifecycle.pki_specs import PkiParams
from lifecycle.protocol import Topics
from lifecycle.service import serve
from lifecycle.step import StepContext
from states.certs import Certs

NODE = "n1"
LIFECYCLE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "lifecycle"
ENDPOINT = "kubernetes.docker.internal"  # the default endpoint_name of the test config


@pytest.fixture(autouse=True)
def _broker(mqtt_broker: tuple[str, int]) -> None:
    """Every test here needs the shared broker."""


@pytest.fixture(scope="module")
def openssl_cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("cas")
    return OpensslPki(work, node=NODE, endpoint=ENDPOINT).cas_only().bundle()


@pytest.fixture(scope="module")
def other_cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("other")
    return OpensslPki(work, node=NODE, endpoint=ENDPOINT).cas_only().bundle()


async def reset_removing_pki(ctx: StepContext) -> None:
    await fake_reset(ctx)
    shutil.rmtree(ctx.paths.pki_dir, ignore_errors=True)


@asynccontextmanager
async def certs_service(config: Config) -> AsyncIterator[RunningService]:
    """The service with the real certs step and test steps after it."""
    stop = asyncio.Event()
    plan = [Certs() if step.name == "certs" else step for step in fake_plan()]
    task = asyncio.create_task(serve(config, plan=plan, reset=reset_removing_pki, ports=null_ports(), stop=stop,
                                     drain_timeout_s=2.0), name=f"service-{config.node_name}")
    try:
        yield RunningService(config, Topics(config.mqtt.prefix, config.node_name), task, stop)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


def pki_hash(config: Config) -> dict[str, str]:
    pki = HostPaths(config.root).pki_dir
    if not pki.exists():
        return {}
    return {str(p.relative_to(pki)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{oct(p.stat().st_mode)}"
            for p in sorted(pki.rglob("*")) if p.is_file()}


async def kubeconfig_request(topics: Topics) -> tuple[dict[str, Any], int | None, str]:
    """A `kubeconfig` request from a client of its own: (reply, its message expiry, the topic it came on)."""
    reply_topic = f"{topics.base}/replies/kc-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5,
                              identifier=f"kc-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(reply_topic, qos=1)
        props = mqtt_properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"kc"
        await client.publish(topics.requests, json.dumps({"id": "kc", "action": "kubeconfig"}).encode(), qos=1,
                             properties=props)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                expiry = getattr(message.properties, "MessageExpiryInterval", None)
                return json.loads(message.payload), expiry, str(message.topic)
    raise AssertionError("no reply")


async def run_cli(config: Config, *args: str) -> tuple[int, str]:
    """The `lifecycle` CLI as a process against the in-process service: (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(LIFECYCLE), *args, "--broker", config.mqtt.broker, "--prefix", config.mqtt.prefix, "--node",
        config.node_name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def openssl_verify(ca: Path, cert: Path) -> None:
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True, text=True,
                              check=False, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def assert_no_key_material(p: Probe, keys: list[str]) -> None:
    """Nothing the service published under the node's topics carries a key, but a kubeconfig reply (the test's
    own requests, on the requests topic, are not the service's)."""
    bodies = key_bodies(keys)
    assert bodies, "nothing to look for"
    for message in p.seen:
        if message.topic == p.topics.requests or message.topic.startswith(f"{p.topics.base}/replies/kc-"):
            continue
        text = message.payload.decode(errors="replace")
        assert "PRIVATE KEY" not in text, message.topic
        leaked = [b for b in bodies if b in text]
        assert not leaked, f"key material on {message.topic}"


async def test_a_cas_only_bundle_is_used_and_the_kubeconfig_reply_carries_the_admin_credentials(
    tmp_path: Path, openssl_cas: dict[str, str], other_cas: dict[str, str]
) -> None:
    config = service_config(tmp_path, prefix=unique_prefix("bundle"), node=NODE)
    async with certs_service(config) as svc, probe(svc.topics) as p:
        await p.ready()
        early = await p.ask({"id": "k0", "action": "kubeconfig"})
        assert (early["ok"], early["error"]["code"]) == (False, "not_ready")
        code, err = await run_cli(config, "kubeconfig", "-o", str(tmp_path / "never"))
        assert code == 1 and "not_ready" in err and not (tmp_path / "never").exists(), err

        reply = await p.ask({"id": "i-1", "action": "install", "pki": openssl_cas})
        assert reply["ok"] and reply["note"] == "install started", reply
        await p.wait_state("running")
        pki = HostPaths(config.root).pki_dir
        for name, pem in openssl_cas.items():
            assert (pki / name).read_text() == pem, name
        openssl_verify(pki / "ca.crt", pki / "apiserver.crt")

        got, expiry, topic = await kubeconfig_request(svc.topics)
        assert got["ok"] and got["error"] is None and topic.startswith(f"{svc.topics.base}/replies/kc-")
        assert expiry is not None and 0 < expiry <= 60
        doc = yaml.safe_load(got["kubeconfig"])
        assert doc["current-context"] == "docker-desktop"
        assert doc["clusters"][0]["cluster"]["server"].startswith(f"https://{ENDPOINT}:")
        ca = base64.b64decode(doc["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
        assert ca.strip() == openssl_cas["ca.crt"].strip()
        (tmp_path / "admin.crt").write_bytes(base64.b64decode(doc["users"][0]["user"]["client-certificate-data"]))
        openssl_verify(pki / "ca.crt", tmp_path / "admin.crt")

        # The CLI writes the same kubeconfig, mode 0600.
        target = tmp_path / "kube" / "config"
        target.parent.mkdir()
        code, err = await run_cli(config, "kubeconfig", "-o", str(target))
        assert code == 0 and "wrote the admin kubeconfig" in err, err
        assert target.read_text() == got["kubeconfig"] and stat.S_IMODE(target.stat().st_mode) == 0o600

        # The same bundle again, while running: accepted, nothing written. Another one: reset first.
        before = pki_hash(config)
        again = await p.ask({"id": "i-2", "action": "install", "pki": openssl_cas})
        assert (again["ok"], again["note"]) == (True, "already running")
        refused = await p.ask({"id": "i-3", "action": "install", "pki": other_cas})
        assert (refused["ok"], refused["error"]["code"]) == (False, "reset_required")
        assert refused["error"]["message"].endswith("reset first")
        assert pki_hash(config) == before

        # After a reset, the other bundle is taken.
        assert (await p.ask({"id": "r-1", "action": "reset"}))["ok"]
        await p.wait_state("idle")
        assert (await p.ask({"id": "i-4", "action": "install", "pki": other_cas}))["ok"]
        await p.wait_for(lambda m: m.topic == svc.topics.events and m.json()["data"].get("to") == "running"
                         and m.json()["data"]["request_id"] == "i-4")
        assert (pki / "ca.crt").read_text().strip() == other_cas["ca.crt"].strip()

        generated = [p.read_text() for p in pki.rglob("*.key")]
        assert_no_key_material(p, [*openssl_cas.values(), *other_cas.values(), *generated])


@pytest.fixture(scope="module")
def bad_bundles(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict[str, str], str, str]]:
    """(label, bundle, file and reason named in the refusal) for every way openssl_pki knows to break one."""
    base = tmp_path_factory.mktemp("bad") / "base"
    OpensslPki(base, node=NODE, endpoint=ENDPOINT).cas_only().with_leaves()
    out = []
    for breaker, file, reason in BAD_BUNDLES:
        work = tmp_path_factory.mktemp("variant") / "pki"
        shutil.copytree(base, work)
        maker = OpensslPki(work, node=NODE, endpoint=ENDPOINT)
        breaker(maker)
        bundle = {k: v for k, v in maker.bundle().items() if not k.startswith("other")}
        out.append((breaker.__name__.strip("_"), bundle, file, reason.format(endpoint=ENDPOINT)))
    return out


async def test_bad_bundles_change_nothing_in_idle_or_running(
    tmp_path: Path, openssl_cas: dict[str, str], bad_bundles: list[tuple[str, dict[str, str], str, str]]
) -> None:
    config = service_config(tmp_path, prefix=unique_prefix("badpki"), node=NODE)
    # Idle with a PKI on disk: a valid bundle would replace it, a bad one must leave it as it is.
    write_bundle(load_bundle(openssl_cas, PkiParams.from_config(config, api_port=6443), now=datetime.now(UTC)),
                 HostPaths(config.root).pki_dir)
    async with certs_service(config) as svc, probe(svc.topics) as p:
        await p.ready()
        for state in ("idle", "running"):
            if state == "running":
                assert (await p.ask({"id": "i-0", "action": "install"}))["ok"]
                await p.wait_state("running")
            before = pki_hash(config)
            assert before
            for label, bundle, file, reason in bad_bundles:
                reply = await p.ask({"id": f"b-{state}-{label}", "action": "install", "pki": bundle})
                assert (reply["ok"], reply["error"]["code"], reply["state"]) == (False, "invalid_pki", state), reply
                problems = reply["error"]["message"].split("; ")
                assert any(x.startswith(f"{file}: ") and reason in x for x in problems), (label, problems)
            oversized = json.dumps({"id": "big", "action": "install", "pki": openssl_cas, "pad": "x" * 300 * 1024})
            reply = await p.ask_raw(oversized.encode())
            assert (reply["ok"], reply["error"]["code"]) == (False, "payload_too_large")
            assert pki_hash(config) == before
        assert_no_key_material(p, [key for _, bundle, _, _ in bad_bundles for key in bundle.values()])


async def test_a_bundle_replaces_the_pki_after_a_failure_before_kubeadm_but_not_after(
    tmp_path: Path, openssl_cas: dict[str, str], other_cas: dict[str, str]
) -> None:
    config = service_config(tmp_path, prefix=unique_prefix("failed"), node=NODE)
    pki = HostPaths(config.root).pki_dir
    async with certs_service(config) as svc, probe(svc.topics) as p:
        await p.ready()
        steer(config.root, "binaries", fail="permanent")
        assert (await p.ask({"id": "i-1", "action": "install", "pki": openssl_cas}))["ok"]
        await p.wait_state("failed")
        steer(config.root, "binaries")
        steer(config.root, "kubeadm", fail="permanent")
        assert (await p.ask({"id": "i-2", "action": "install", "pki": other_cas}))["ok"]  # failed in step 3
        assert (pki / "ca.crt").read_text().strip() == other_cas["ca.crt"].strip()
        await p.wait_for(lambda m: m.topic == svc.topics.events and m.json()["data"].get("to") == "failed"
                         and m.json()["data"]["request_id"] == "i-2")
        before = pki_hash(config)
        refused = await p.ask({"id": "i-3", "action": "install", "pki": openssl_cas})  # failed in step 4
        assert (refused["ok"], refused["error"]["code"]) == (False, "reset_required"), refused
        assert pki_hash(config) == before


async def test_a_retained_request_carrying_keys_is_ignored_and_cleared(
    tmp_path: Path, openssl_cas: dict[str, str]
) -> None:
    config = service_config(tmp_path, prefix=unique_prefix("retainedpki"), node=NODE)
    async with certs_service(config) as svc, probe(svc.topics) as p:
        await p.ready()
        # Published retained while the service is subscribed: it arrives with the retain flag all the same.
        await p.send(json.dumps({"id": "stale", "action": "install", "pki": openssl_cas}).encode(), retain=True)
        await p.wait_for(lambda m: m.topic == svc.topics.requests and m.payload == b"")  # the clearing
        reply = await p.ask({"id": "s", "action": "status"})
        assert reply["state"] == "idle" and p.events() == []
        assert pki_hash(config) == {}
    with pytest.raises((AssertionError, TimeoutError)):
        await retained(svc.topics.requests, timeout_s=1.0)


async def test_the_cli_sends_the_pki_of_a_directory(tmp_path: Path) -> None:
    config = service_config(tmp_path / "node", prefix=unique_prefix("clipki"), node=NODE)
    made = OpensslPki(tmp_path / "host-pki", node=NODE, endpoint=ENDPOINT).cas_only()
    (made.dir / "notes.txt").write_text("not part of the PKI\n")
    async with certs_service(config) as svc, probe(svc.topics) as p:
        await p.ready()
        (tmp_path / "empty").mkdir()
        code, err = await run_cli(config, "install", "--pki", str(tmp_path / "empty"))
        assert code == 2 and "no PKI file" in err, err
        code, err = await run_cli(config, "install", "--watch", "--pki", str(made.dir))
        assert code == 0, err
        pki = HostPaths(config.root).pki_dir
        assert all((pki / name).read_text() == pem for name, pem in made.bundle().items())
        assert not (pki / "notes.txt").exists()
        assert_no_key_material(p, list(made.bundle().values()))
