"""PKI bundles from the host, made with the openssl CLI alone: what is accepted (and then kept as it is by the
certs planner), what is refused and how the refusal names the file and the reason without quoting any key."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from openssl_pki import BAD_BUNDLES, Breaker, OpensslPki, key_bodies
from referencing import Registry, Resource

from lifecycle.pki import plan_pki
from lifecycle.pki_bundle import MAX_FILE_BYTES, BundleError, load_bundle
from lifecycle.pki_specs import PkiParams
from lifecycle.protocol import MAX_PKI_PAYLOAD_BYTES, BadRequestError, Reply, parse_request

NODE = "node1"
ENDPOINT = "kubernetes.internal"
PARAMS = PkiParams(node_name=NODE, node_ip="127.0.0.1", endpoint_name=ENDPOINT, api_port=6443)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One openssl PKI with every leaf, copied per test that changes a file."""
    work = tmp_path_factory.mktemp("bundle")
    OpensslPki(work / "pki", node=NODE, endpoint=ENDPOINT).cas_only().with_leaves()
    return work / "pki"


def maker(base: Path, tmp_path: Path) -> OpensslPki:
    shutil.copytree(base, tmp_path / "pki")
    return OpensslPki(tmp_path / "pki", node=NODE, endpoint=ENDPOINT)


def cas_only(bundle: dict[str, str]) -> dict[str, str]:
    wanted = {"ca", "front-proxy-ca", "etcd/ca", "sa"}
    return {k: v for k, v in bundle.items() if k.rsplit(".", 1)[0] in wanted}


def refusal(raw: object) -> BundleError:
    with pytest.raises(BundleError) as info:
        load_bundle(raw, PARAMS, now=datetime.now(UTC))
    assert info.value.code == "invalid_pki"
    return info.value


def test_cas_only_are_enough_and_the_planner_issues_every_leaf_from_them(base: Path, tmp_path: Path) -> None:
    given = cas_only(OpensslPki(base, node=NODE).bundle())
    bundle = load_bundle(given, PARAMS, now=datetime.now(UTC))
    assert bundle.names() == sorted(given) and "PRIVATE KEY" not in repr(bundle)
    planned, _ = plan_pki(dict(bundle.files), PARAMS, now=datetime.now(UTC))
    written = {p.name for p in planned}
    assert not written & set(given), "a CA or the SA pair of the host was replaced"
    assert {"apiserver.crt", "etcd/peer.key", "admin.conf"} <= written
    out = tmp_path / "out"
    (out / "etcd").mkdir(parents=True)
    for item in planned:
        if not item.name.endswith(".conf"):
            (out / item.name).write_bytes(item.data)
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(base / "ca.crt"), str(out / "apiserver.crt")],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_full_bundle_is_accepted_and_kept_as_it_is(base: Path) -> None:
    given = OpensslPki(base, node=NODE).bundle()
    assert len(given) == 22
    bundle = load_bundle(given, PARAMS, now=datetime.now(UTC))
    planned, _ = plan_pki(dict(bundle.files), PARAMS, now=datetime.now(UTC))
    assert {p.name for p in planned} == {"admin.conf", "super-admin.conf", "kubelet.conf",
                                         "controller-manager.conf", "scheduler.conf"}


def test_text_around_the_block_and_crlf_are_normalised(base: Path) -> None:
    given = cas_only(OpensslPki(base, node=NODE).bundle())
    given["ca.crt"] = "issuer: whoever\r\n" + given["ca.crt"].replace("\n", "\r\n") + "trailing words\n"
    bundle = load_bundle(given, PARAMS, now=datetime.now(UTC))
    assert bundle.files["ca.crt"].startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert bundle.files["ca.crt"].endswith(b"-----END CERTIFICATE-----\n") and b"\r" not in bundle.files["ca.crt"]


BAD_IDS = [b[0].__name__.strip("_") for b in BAD_BUNDLES]


@pytest.mark.parametrize(("breaker", "file", "reason"), BAD_BUNDLES, ids=BAD_IDS)
def test_a_bad_file_is_refused_naming_the_file_and_the_reason(
    base: Path, tmp_path: Path, breaker: Breaker, file: str, reason: str
) -> None:
    m = maker(base, tmp_path)
    breaker(m)
    given = {k: v for k, v in m.bundle().items() if not k.startswith("other-ca")}
    error = refusal(given)
    reason = reason.format(endpoint=ENDPOINT)
    assert any(p.file == file and reason in p.reason for p in error.problems), error.message
    assert error.message.startswith(f"{file}: ") or f"; {file}: " in error.message, error.message
    assert "PRIVATE KEY" not in error.message
    assert not any(body in error.message for body in key_bodies(list(given.values())))


def test_names_counts_and_sizes_are_bounded(base: Path) -> None:
    good = cas_only(OpensslPki(base, node=NODE).bundle())
    assert "unknown file name 'apiserver.pem'" in refusal({**good, "apiserver.pem": good["ca.crt"]}).message
    missing = refusal({k: v for k, v in good.items() if k != "etcd/ca.key"})
    assert missing.message == "etcd/ca.key: missing (the CAs and the service-account key pair are required)"
    huge = refusal({**good, "ca.crt": good["ca.crt"] + " " * MAX_FILE_BYTES})
    assert huge.problems[0].file == "ca.crt" and "the limit is 16384" in huge.problems[0].reason
    assert "must be PEM text (a string), got int" in refusal({**good, "sa.pub": 7}).message
    assert "got list" in refusal([good]).message
    assert "holds a CERTIFICATE, expected PUBLIC KEY" in refusal({**good, "sa.pub": good["ca.crt"]}).message


def test_requests_with_pki_may_be_larger_and_others_keep_the_small_limit(base: Path) -> None:
    good = cas_only(OpensslPki(base, node=NODE).bundle())
    padded = {"id": "r", "action": "install", "pki": good, "pad": "x" * 100_000}
    request = parse_request(json.dumps(padded).encode())
    assert request.pki == good and "PRIVATE KEY" not in repr(request)
    for body in ({**padded, "pki": None}, {"id": "r", "action": "install", "pad": "x" * 100_000},
                 {**padded, "pad": "x" * (300 * 1024)}):
        with pytest.raises(BadRequestError) as info:
            parse_request(json.dumps(body).encode())
        assert info.value.code == "payload_too_large", body.keys()
    assert len(json.dumps({**padded, "pad": "x" * (300 * 1024)})) > MAX_PKI_PAYLOAD_BYTES
    with pytest.raises(BadRequestError) as info:
        parse_request(json.dumps({"id": "r", "action": "status", "pki": good}).encode())
    assert info.value.code == "invalid_request"
    with pytest.raises(BadRequestError) as info:
        parse_request(json.dumps({"id": "r", "action": "install", "pki": "-----BEGIN PRIVATE KEY-----"}).encode())
    assert info.value.code == "invalid_pki" and "BEGIN" not in info.value.message


def _validator(name: str) -> Any:
    schemas = Path(__file__).resolve().parents[2] / "docs" / "schemas"
    loaded = [json.loads(p.read_text()) for p in schemas.glob("*.schema.json")]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in loaded)
    schema = json.loads((schemas / f"{name}.schema.json").read_text())
    return Draft202012Validator(schema, registry=registry)


def test_the_documented_schemas_describe_pki_requests_and_kubeconfig_replies(base: Path) -> None:
    request = _validator("request")
    good = cas_only(OpensslPki(base, node=NODE).bundle())
    assert request.is_valid({"id": "r", "action": "install", "pki": good})
    assert request.is_valid({"id": "r", "action": "install", "pki": OpensslPki(base, node=NODE).bundle()})
    assert request.is_valid({"id": "k", "action": "kubeconfig"})
    assert not request.is_valid({"id": "r", "action": "status", "pki": good})
    assert not request.is_valid({"id": "r", "action": "install", "pki": {**good, "kubelet.crt": good["ca.crt"]}})
    assert not request.is_valid({"id": "r", "action": "install", "pki": "text"})
    reply = _validator("reply")
    kubeconfig = Reply(id="k", ok=True, state="running", request_id="i", kubeconfig="apiVersion: v1\n",
                       message_expiry_s=60)
    refused = Reply(id="b", ok=False, state="idle", error=("invalid_pki", "ca.crt: not a PEM certificate"))
    for answer in (kubeconfig, refused):
        reply.validate(answer.to_json())
    assert "kubeconfig" not in refused.to_json() and "message_expiry_s" not in kubeconfig.to_json()


def test_a_key_pasted_as_a_file_name_is_not_echoed(base: Path) -> None:
    good = cas_only(OpensslPki(base, node=NODE).bundle())
    error = refusal({**good, good["ca.key"]: good["ca.crt"]})
    assert "a name that is not a file name" in error.message and "PRIVATE" not in error.message
    assert not any(body in error.message for body in key_bodies([good["ca.key"]]))
