"""PKI bundles for install requests made with the openssl CLI alone (no Python crypto), as a host would make them:
the three CAs and the service-account pair, optionally every leaf kubeadm makes, and the broken variants the
bundle checks must refuse. Files live in the maker's work dir; `bundle()` returns name -> PEM text.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

CAS = {"ca": "kubernetes", "front-proxy-ca": "front-proxy-ca", "etcd/ca": "etcd-ca"}


def openssl(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    out = subprocess.run(["openssl", *args], cwd=cwd, input=stdin, capture_output=True, timeout=30, check=False)
    if out.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {out.stderr.decode(errors='replace')}")
    return out.stdout


class OpensslPki:
    """kubeadm's PKI for one node, file by file, with knobs to make each file wrong in one way."""

    def __init__(self, workdir: Path, *, node: str, node_ip: str = "127.0.0.1", endpoint: str = "localhost",
                 service_ip: str = "10.96.0.1") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "etcd").mkdir(exist_ok=True)
        self.node, self.node_ip, self.endpoint, self.service_ip = node, node_ip, endpoint, service_ip

    # ---- keys and certificates ------------------------------------------------------------------------

    def key(self, name: str, *, algorithm: str = "ec") -> None:
        """`ec` (P-256), `ec384`, `rsa2048`, `rsa1024`."""
        if algorithm.startswith("rsa"):
            opts = ["-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{algorithm.removeprefix('rsa')}"]
        else:
            opts = ["-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{'P-384' if algorithm == 'ec384' else 'P-256'}"]
        openssl("genpkey", *opts, "-out", f"{name}.key", cwd=self.dir)

    def ca(self, name: str, *, algorithm: str = "ec", days: int = 3650, ca_flag: bool = True) -> None:
        """A self-signed CA from a new key; `days` -1 makes one that has expired, `ca_flag` False a non-CA."""
        self.key(name, algorithm=algorithm)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={CAS.get(name, name)}", "-out", f"{name}.csr",
                cwd=self.dir)
        ext = ("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature,keyEncipherment,keyCertSign\n"
               if ca_flag else "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        self._sign(name, signer=None, ext=ext, days=days)

    def leaf(self, name: str, ca: str, subject: str, *, server: bool = False, client: bool = True,
             sans: list[str] | None = None, days: int = 365, algorithm: str = "ec") -> None:
        self.key(name, algorithm=algorithm)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=self.dir)
        usages = ",".join(u for u, on in (("serverAuth", server), ("clientAuth", client)) if on)
        ext = f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" \
              f"extendedKeyUsage={usages}\n"
        if sans:
            ext += "subjectAltName=" + ",".join(sans) + "\n"
        self._sign(name, signer=ca, ext=ext, days=days)

    def _sign(self, name: str, *, signer: str | None, ext: str, days: int) -> None:
        (self.dir / f"{name}.ext").write_text(ext)
        by = ["-signkey", f"{name}.key"] if signer is None else ["-CA", f"{signer}.crt", "-CAkey", f"{signer}.key"]
        openssl("x509", "-req", "-in", f"{name}.csr", *by, "-set_serial", "0x" + secrets.token_hex(8),
                "-days", str(days), "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=self.dir)
        (self.dir / f"{name}.csr").unlink()
        (self.dir / f"{name}.ext").unlink()

    def service_account(self, *, algorithm: str = "rsa2048") -> None:
        self.key("sa", algorithm=algorithm)
        openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.dir)

    # ---- whole PKIs -----------------------------------------------------------------------------------

    def apiserver_sans(self, *, without: tuple[str, ...] = ()) -> list[str]:
        dns = [self.node, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
               "kubernetes.default.svc.cluster.local", self.endpoint]
        ips = [self.service_ip, self.node_ip]
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in dict.fromkeys(ips)]
        return [s for s in sans if s.split(":", 1)[1] not in without]

    def cas_only(self) -> OpensslPki:
        for name in CAS:
            self.ca(name)
        self.service_account()
        return self

    def apiserver(self, *, ca: str = "ca", without_sans: tuple[str, ...] = ()) -> None:
        self.leaf("apiserver", ca, "/CN=kube-apiserver", server=True, client=False,
                  sans=self.apiserver_sans(without=without_sans))

    def with_leaves(self) -> OpensslPki:
        etcd_sans = [f"DNS:{self.node}", "DNS:localhost", f"IP:{self.node_ip}", "IP:127.0.0.1", "IP:0:0:0:0:0:0:0:1"]
        self.apiserver()
        self.leaf("apiserver-kubelet-client", "ca", "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client")
        self.leaf("front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client")
        self.leaf("etcd/server", "etcd/ca", f"/CN={self.node}", server=True, sans=list(dict.fromkeys(etcd_sans)))
        self.leaf("etcd/peer", "etcd/ca", f"/CN={self.node}", server=True, sans=list(dict.fromkeys(etcd_sans)))
        self.leaf("etcd/healthcheck-client", "etcd/ca", "/CN=kube-etcd-healthcheck-client")
        self.leaf("apiserver-etcd-client", "etcd/ca", "/CN=kube-apiserver-etcd-client")
        return self

    def bundle(self) -> dict[str, str]:
        """Every .crt/.key (and sa.pub) in the work dir, by kubeadm name."""
        found = [*self.dir.glob("*.crt"), *self.dir.glob("*.key"), *self.dir.glob("etcd/*"), self.dir / "sa.pub"]
        return {str(p.relative_to(self.dir)): p.read_text() for p in sorted(found) if p.is_file()}


def key_bodies(pems: list[str]) -> list[str]:
    """The base64 lines of every private key in `pems` (what must never appear in a message or a log line)."""
    lines: list[str] = []
    for pem in pems:
        inside = False
        for line in pem.splitlines():
            if line.startswith("-----BEGIN") and "PRIVATE KEY" in line:
                inside = True
            elif line.startswith("-----END"):
                inside = False
            elif inside and len(line) >= 16:
                lines.append(line)
    return lines


# ---- broken variants -------------------------------------------------------------------------------

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
    m.apiserver(without_sans=(m.endpoint,))


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
            "-days", "365", "-sha1", "-extfile", "fp.ext", "-out", "front-proxy-client.crt", cwd=m.dir)


def _encrypted_key(m: OpensslPki) -> None:
    openssl("pkey", "-in", "sa.key", "-aes256", "-passout", "pass:secret", "-out", "sa.enc", cwd=m.dir)
    (m.dir / "sa.enc").replace(m.dir / "sa.key")


# (how to break a full PKI made by `with_leaves`, the file named in the refusal, words of the reason: format
# them with endpoint=)
BAD_BUNDLES: list[tuple[Breaker, str, str]] = [
    (_expired_ca, "ca.crt", "has expired"),
    (_leaf_of_another_ca, "apiserver.crt", "not signed by ca.crt"),
    (_key_does_not_match, "apiserver.key", "does not match apiserver.crt"),
    (_ca_without_ca_flag, "ca.crt", "is not a CA certificate"),
    (_apiserver_without_endpoint, "apiserver.crt", "SANs do not cover '{endpoint}'"),
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
