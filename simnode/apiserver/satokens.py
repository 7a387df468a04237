"""Service-account tokens: the TokenRequest API issues JWTs signed with --service-account-signing-key-file,
bearer tokens are verified against --service-account-key-file and against the objects they are bound to.

Follows kubernetes/kubernetes pkg/serviceaccount/jwt.go (signing, RS256 for RSA keys and ES256 for P-256
keys), pkg/serviceaccount/claims.go (the `kubernetes.io` private claims, bound-object checks) and
pkg/registry/core/serviceaccount/storage/token.go (TokenRequest: defaults, the 10-minute minimum).
Nothing on disk; keys are read once at start.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

SA_PREFIX = "system:serviceaccount:"
DEFAULT_EXPIRATION_S = 3600
MIN_EXPIRATION_S = 600  # token.go: "may not specify a duration less than 10 minutes"
MAX_EXPIRATION_S = 2**32  # validation caps it at 2^32 seconds


class TokenError(Exception):
    """A bearer token that does not authenticate (the server answers 401 and logs the reason)."""


@dataclass(frozen=True)
class TokenSubject:
    namespace: str
    name: str
    uid: str
    pod_name: str = ""
    pod_uid: str = ""

    @property
    def user(self) -> str:
        return f"{SA_PREFIX}{self.namespace}:{self.name}"


def sa_groups(namespace: str) -> tuple[str, ...]:
    """pkg/serviceaccount/util.go MakeGroupNames, plus system:authenticated (added by the authenticator union)."""
    return ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated")


def split_sa_user(user: str) -> tuple[str, str] | None:
    """("ns", "name") for "system:serviceaccount:ns:name" (serviceaccount.SplitUsername), else None."""
    if not user.startswith(SA_PREFIX):
        return None
    namespace, sep, name = user[len(SA_PREFIX):].partition(":")
    if not sep or not namespace or not name or ":" in name:
        return None
    return namespace, name


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """Signs and verifies tokens with the service-account key pair; either half may be absent."""

    def __init__(self, *, signing_key_file: Path | None, public_key_files: list[Path], issuer: str,
                 audiences: list[str]) -> None:
        self.issuer = issuer
        self.audiences = audiences or [issuer]  # --api-audiences defaults to the issuer
        self._signing: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None
        if signing_key_file is not None:
            key = serialization.load_pem_private_key(signing_key_file.read_bytes(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError(f"{signing_key_file}: only RSA and ECDSA service-account keys are supported")
            self._signing = key
        self._public: list[rsa.RSAPublicKey | ec.EllipticCurvePublicKey] = []
        for path in public_key_files:
            data = path.read_bytes()
            try:
                pub: Any = serialization.load_pem_public_key(data)
            except ValueError:  # a private key file is accepted too (keyutil.ParsePublicKeysPEM)
                pub = serialization.load_pem_private_key(data, password=None).public_key()
            if isinstance(pub, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                self._public.append(pub)
        if self._signing is not None:
            self._public.append(self._signing.public_key())

    @property
    def can_issue(self) -> bool:
        return self._signing is not None

    def issue(self, subject: TokenSubject, *, audiences: list[str], expiration_s: int) -> tuple[str, int]:
        """(token, expiry as unix seconds)."""
        assert self._signing is not None
        now = int(time.time())
        exp = now + expiration_s
        k8s: dict[str, Any] = {"namespace": subject.namespace,
                               "serviceaccount": {"name": subject.name, "uid": subject.uid}}
        if subject.pod_name:
            k8s["pod"] = {"name": subject.pod_name, "uid": subject.pod_uid}
        claims = {"aud": audiences or self.audiences, "exp": exp, "iat": now, "nbf": now, "iss": self.issuer,
                  "jti": str(uuid.uuid4()), "sub": subject.user, "kubernetes.io": k8s}
        alg = "RS256" if isinstance(self._signing, rsa.RSAPrivateKey) else "ES256"
        header = {"alg": alg, "kid": self._key_id()}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
        if isinstance(self._signing, rsa.RSAPrivateKey):
            sig = self._signing.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            r, s = decode_dss_signature(self._signing.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS ES256: r || s, 32 bytes each
        return f"{signing_input.decode()}.{_b64(sig)}", exp

    def _key_id(self) -> str:
        # jwt.go keyIDFromPublicKey: base64url(sha256(DER of the public key)).
        assert self._signing is not None
        der = self._signing.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashes.Hash(hashes.SHA256())
        digest.update(der)
        return _b64(digest.finalize())

    def verify(self, token: str) -> TokenSubject:
        """The subject of a valid token of ours; TokenError otherwise (signature, issuer, audience, expiry)."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("not a JWT")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            sig = _unb64(parts[2])
        except (ValueError, binascii.Error) as exc:
            raise TokenError(f"malformed JWT: {exc}") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenError("malformed JWT")
        if claims.get("iss") != self.issuer:
            raise TokenError(f"issuer {claims.get('iss')!r} is not {self.issuer!r}")
        signing_input = f"{parts[0]}.{parts[1]}".encode()
        if not any(self._signature_ok(key, header.get("alg"), signing_input, sig) for key in self._public):
            raise TokenError("invalid signature")  # jwt.go: "square/go-jose: error in cryptographic primitive"
        now = time.time()
        if not isinstance(claims.get("exp"), int) or now > claims["exp"]:
            raise TokenError("service account token has expired")
        if isinstance(claims.get("nbf"), int) and now < claims["nbf"] - 60:
            raise TokenError("service account token is not valid yet")
        aud = claims.get("aud")
        token_auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not set(token_auds) & set(self.audiences):
            raise TokenError("token audiences do not match the server's")
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict) or not isinstance(k8s.get("serviceaccount"), dict):
            raise TokenError("token has no kubernetes.io service-account claims")
        sa, pod = k8s["serviceaccount"], k8s.get("pod") or {}
        return TokenSubject(namespace=str(k8s.get("namespace", "")), name=str(sa.get("name", "")),
                            uid=str(sa.get("uid", "")), pod_name=str(pod.get("name", "")),
                            pod_uid=str(pod.get("uid", "")))

    @staticmethod
    def _signature_ok(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, alg: object, data: bytes,
                      sig: bytes) -> bool:
        try:
            if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
                key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
                return True
            if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey) and len(sig) == 64:
                der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
                key.verify(der, data, ec.ECDSA(hashes.SHA256()))
                return True
        except InvalidSignature:
            return False
        return False
