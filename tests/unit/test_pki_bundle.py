"""PKI bundles from the host, made with the openssl CLI alone: what is accepted (and then kept as it is by the
certs planner), what is refused and how the refusal names the file and the reason without quoting any key."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from openssl_pki import OpensslPki, key_bodies, openssl

from lifecycle.pki import plan_pki
from lifecycle.pki_bundle import MAX_FILE_BYTES, BundleError, load_bundle
from lifecycle.pki_specs import PkiParams
from lifecycle.protocol import MAX_PKI_PAYLOAD_BYTES, BadRequestError, parse_request

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


Breaker = Callable[[OpensslPki], None]


def _expired_ca(m: OpensslPki) -> None:
    m.ca("ca", days=-1)


def _leaf_of_another_ca(m: OpensslPki) -> None:
    m.ca("other-ca")
    m.apiserver(ca="other-ca")


def _key_does_not_match(m: OpensslPki) -> None:
    m.key("apiserver")


def _ca_without_ca_flag(m: OpensslPki) -> None:
    m.ca("ca", ca_flag=False)


def _apiserver_without_endpoint(m: OpensslPki) -> None:
    m.apiserver(without_sans=(ENDPOINT,))


def _rsa_1024_ca(m: OpensslPki) -> None:
    m.ca("ca", algorithm="rsa1024")


def _garbage_pem(m: OpensslPki) -> None:
    (m.dir / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")


def _not_pem_at_all(m: OpensslPki) -> None:
    (m.dir / "front-proxy-ca.crt").write_text("hello, I am a certificate\n")


def _sa_pub_of_another_key(m: OpensslPki) -> None:
    m.key("other")
    openssl("pkey", "-in", "other.key", "-pubout", "-out", "sa.pub", cwd=m.dir)
    (m.dir / "other.key").unlink()


def _p521_etcd_ca(m: OpensslPki) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521", "-out", "etcd/ca.key", cwd=m.dir)
    openssl("req", "-x509", "-key", "etcd/ca.key", "-subj", "/CN=etcd-ca", "-days", "365", "-out", "etcd/ca.crt",
            "-addext", "keyUsage=critical,keyCertSign", cwd=m.dir)


def _leaf_expiring_soon(m: OpensslPki) -> None:
    m.leaf("front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client", days=2)


def _leaf_without_key(m: OpensslPki) -> None:
    (m.dir / "etcd/peer.key").unlink()


def _two_certificates(m: OpensslPki) -> None:
    (m.dir / "apiserver.crt").write_text((m.dir / "apiserver.crt").read_text() + (m.dir / "ca.crt").read_text())


def _ca_without_cert_sign(m: OpensslPki) -> None:
    openssl("req", "-x509", "-key", "ca.key", "-subj", "/CN=kubernetes", "-days", "365", "-out", "ca.crt",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,digitalSignature",
            cwd=m.dir)


def _sha1_leaf(m: OpensslPki) -> None:
    openssl("req", "-new", "-key", "front-proxy-client.key", "-subj", "/CN=front-proxy-client", "-out", "fp.csr",
            cwd=m.dir)
    (m.dir / "fp.ext").write_text("extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", "fp.csr", "-CA", "front-proxy-ca.crt", "-CAkey", "front-proxy-ca.key",
            "-days", "30", "-sha1", "-extfile", "fp.ext", "-out", "front-proxy-client.crt", cwd=m.dir)


def _encrypted_key(m: OpensslPki) -> None:
    openssl("pkey", "-in", "sa.key", "-aes256", "-passout", "pass:secret", "-out", "sa.enc", cwd=m.dir)
    (m.dir / "sa.enc").replace(m.dir / "sa.key")


BAD = [
    (_expired_ca, "ca.crt", "has expired"),
    (_leaf_of_another_ca, "apiserver.crt", "not signed by ca.crt"),
    (_key_does_not_match, "apiserver.key", "does not match apiserver.crt"),
    (_ca_without_ca_flag, "ca.crt", "is not a CA certificate"),
    (_apiserver_without_endpoint, "apiserver.crt", f"'{ENDPOINT}'"),
    (_rsa_1024_ca, "ca.key", "RSA key of 1024 bits"),
    (_garbage_pem, "ca.crt", "not a PEM certificate"),
    (_not_pem_at_all, "front-proxy-ca.crt", "no PEM block"),
    (_sa_pub_of_another_key, "sa.pub", "not the public half of sa.key"),
    (_p521_etcd_ca, "etcd/ca.key", "secp521r1"),
    (_leaf_expiring_soon, "front-proxy-client.crt", "expires within"),
    (_leaf_without_key, "etcd/peer.key", "missing"),
    (_two_certificates, "apiserver.crt", "2 PEM blocks"),
    (_ca_without_cert_sign, "ca.crt", "keyCertSign"),
    (_sha1_leaf, "front-proxy-client.crt", "SHA1"),
    (_encrypted_key, "sa.key", "encrypted"),
]


@pytest.mark.parametrize(("breaker", "file", "reason"), BAD, ids=[b[0].__name__.strip("_") for b in BAD])
def test_a_bad_file_is_refused_naming_the_file_and_the_reason(
    base: Path, tmp_path: Path, breaker: Breaker, file: str, reason: str
) -> None:
    m = maker(base, tmp_path)
    breaker(m)
    given = {k: v for k, v in m.bundle().items() if not k.startswith("other-ca")}
    error = refusal(given)
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
