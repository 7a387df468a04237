"""Hostile variants of the simulated node's binaries image, for the fault tests (issue 8): each is the binaries
image `simnode.images` built for a version (its layers reused from the registry as they are) with one or more
layers on top written here entry by entry (gzip tars: whiteouts, duplicate names, `../` names, devices, FIFOs,
hard links, special bits, xattrs) and pushed with the registry's HTTP API v2, so the engine sees them as written.
Leaves one tag per variant in the registry (`<registry>/<repo>:<kind>-<version>`); nothing in the engine.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from simnode import versions as v

DEFAULT_REGISTRY = "127.0.0.1:5000"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TARGET = "/usr/bin/kubelet"  # the member made hostile; the service copies it (kubernetes.binaries)
HOSTILE_BYTES = b"#!/bin/sh\necho hostile kubelet\n"
CAP_NET_ADMIN = 12
# Over the `binary_max_bytes` the fault tests configure (OVERSIZE_LIMIT_BYTES) and small once gzipped (zeros).
OVERSIZE_LIMIT_BYTES = 4 * 1024 * 1024
OVERSIZE_BYTES = 2 * OVERSIZE_LIMIT_BYTES
HTTP_TIMEOUT_S = 60.0


class HostileBuildError(Exception):
    """The registry refused a request; the message names the URL and its answer."""


@dataclass(frozen=True)
class Member:
    """One tar entry, written as given (no name cleaning): kind is file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    size_bytes: int | None = None  # this many zero bytes instead of `data`
    mode: int = 0o755
    link: str = ""  # symlink text, or the hard link's target entry name
    device: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Variant:
    """A hostile image: the layers put on top of the binaries image, and what the service is expected to say.
    `step` is the state that fails (`images` where the engine refuses the layer at pull), `member` the path the
    error names, `reason` a piece of its message."""

    kind: str
    layers: tuple[tuple[Member, ...], ...]
    step: str
    code: str
    member: str
    reason: str
    about: str = ""  # why the variant is hostile, where the name does not say it

    def ref(self, registry: str, repo: str, version: str) -> str:
        return f"{registry}/{repo}:{self.kind}-{version}"


def _capability(bit: int) -> bytes:
    """A `security.capability` value (VFS_CAP_REVISION_2) granting one capability, as setcap writes it."""
    return (0x02000001).to_bytes(4, "little") + (1 << bit).to_bytes(4, "little") + bytes(12)


def _one(*members: Member) -> tuple[tuple[Member, ...], ...]:
    """One layer on top of the binaries image, holding `members` in this order."""
    return (members,)


def _kubelet(**changes: Any) -> Member:
    return Member("usr/bin/kubelet", data=HOSTILE_BYTES, **changes)


def variants() -> list[Variant]:
    """The 20 hostile images, each aimed at /usr/bin/kubelet (or another configured member)."""
    secret = Member("etc/lifecycle-secret", data=b"not a kubelet\n", mode=0o600)
    return [
        Variant("abs-symlink-out", _one(Member("usr/bin/kubelet", "symlink", link="/etc/shadow")),
                "binaries", "bad_image", TARGET, "(-> /etc/shadow) is not in the binaries image",
                "absolute symlink to a host file: resolved inside the image, where there is none"),
        Variant("rel-symlink-out", _one(Member("usr/bin/kubelet", "symlink", link="../../../../../etc/shadow")),
                "binaries", "bad_image", TARGET, "points outside the image"),
        Variant("symlink-loop", _one(Member("usr/bin/kubelet", "symlink", link="kubelet-a"),
                                    Member("usr/bin/kubelet-a", "symlink", link="kubelet")),
                "binaries", "bad_image", TARGET, "symlink"),
        Variant("dotdot-name", _one(Member("../" * 12 + "usr/bin/kubelet", data=HOSTILE_BYTES)),
                "binaries", "bad_image", "/usr/bin/kubelet", "'..",
                "a `../` name: written inside the layer at pull (the kubelet replaced), looked for outside it at save"),
        Variant("hard-link", _one(secret, Member("usr/bin/kubelet", "hardlink", link="etc/lifecycle-secret")),
                "binaries", "bad_image", TARGET, "a hard link to /etc/lifecycle-secret"),
        Variant("symlink-to-hard-link",
                _one(secret, Member("usr/bin/kubelet", "symlink", link="kubelet-real"),
                    Member("usr/bin/kubelet-real", "hardlink", link="etc/lifecycle-secret")),
                "binaries", "bad_image", TARGET, "a hard link to /etc/lifecycle-secret"),
        Variant("char-device", _one(Member("usr/bin/kubelet", "char", device=(1, 3))),
                "binaries", "bad_image", TARGET, "not a regular file"),
        Variant("block-device", _one(Member("usr/bin/kubelet", "block", device=(7, 0))),
                "binaries", "bad_image", TARGET, "not a regular file"),
        Variant("fifo", _one(Member("usr/bin/kubelet", "fifo", mode=0o644)),
                "binaries", "bad_image", TARGET, "not a regular file"),
        Variant("directory", _one(Member("usr/bin/kubelet", "dir"), Member("usr/bin/kubelet/kubelet", data=b"x")),
                "binaries", "bad_image", TARGET, "not a regular file"),
        Variant("setuid", _one(_kubelet(mode=0o4755)), "binaries", "bad_image", TARGET, "mode 4755 has setuid"),
        Variant("setgid", _one(_kubelet(mode=0o2755)), "binaries", "bad_image", TARGET, "mode 2755 has setgid"),
        Variant("sticky", _one(_kubelet(mode=0o1755)), "binaries", "bad_image", TARGET, "mode 1755 has sticky"),
        Variant("file-capability", _one(_kubelet(xattrs=(("security.capability", _capability(CAP_NET_ADMIN)),))),
                "binaries", "bad_image", TARGET, "security.capability"),
        Variant("user-xattr", _one(_kubelet(xattrs=(("user.lifecycle.hostile", b"1"),))),
                "binaries", "bad_image", TARGET, "user.lifecycle.hostile"),
        Variant("whiteout", _one(Member("usr/bin/.wh.kubelet", data=b"", mode=0o644)),
                "binaries", "bad_image", TARGET, "is not in the binaries image"),
        Variant("opaque-whiteout", _one(Member("usr/bin", "dir"), Member("usr/bin/.wh..wh..opq", mode=0o644),
                                       Member("usr/bin/sh", data=b"#!/bin/sh\n")),
                "binaries", "bad_image", "/usr/bin/kubeadm", "is not in the binaries image",
                "usr/bin emptied by an opaque whiteout: the first member copied, kubeadm, is missing"),
        Variant("symlink-then-file", _one(Member("usr/bin/kubelet", "symlink", link="/etc/hostname"),
                                         _kubelet()),
                "images", "bad_image", "", "duplicates of file paths not supported",
                "a symlink, then a regular file of the same name in one layer: the engine refuses the layer at pull "
                "(without naming it)"),
        Variant("oversized", _one(Member("usr/bin/kubelet", size_bytes=OVERSIZE_BYTES)),
                "binaries", "bad_image", TARGET, "(kubernetes.binary_max_bytes)",
                f"with kubernetes.binary_max_bytes = {OVERSIZE_LIMIT_BYTES}, as the fault tests set it"),
        Variant("missing-member", _one(Member("opt/cni/bin/.wh.portmap", mode=0o644)),
                "binaries", "bad_image", "/opt/cni/bin/portmap", "is not in the binaries image",
                "a CNI plugin the config names is whited out"),
    ]


def layer_tar(members: Iterable[Member]) -> bytes:
    """An uncompressed layer tar holding `members` exactly (names not cleaned, duplicates kept)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode, info.mtime = m.mode, 0
            # tarfile writes PAX values as UTF-8 with surrogateescape: raw bytes survive unchanged
            info.pax_headers = {f"SCHILY.xattr.{k}": val.decode("utf-8", "surrogateescape") for k, val in m.xattrs}
            data: io.BytesIO | None = None
            if m.kind == "file":
                body = m.data if m.size_bytes is None else bytes(m.size_bytes)
                info.size, data = len(body), io.BytesIO(body)
            elif m.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif m.kind in ("symlink", "hardlink"):
                info.type, info.linkname = (tarfile.SYMTYPE if m.kind == "symlink" else tarfile.LNKTYPE), m.link
            elif m.kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if m.kind == "char" else tarfile.BLKTYPE
                info.devmajor, info.devminor = m.device
            elif m.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                raise ValueError(f"member {m.name!r}: unknown kind {m.kind!r}")
            tar.addfile(info, data)
    return out.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """The few calls of the registry HTTP API v2 a push needs (no auth: the local registry)."""

    def __init__(self, host: str) -> None:
        self.base = f"http://{host}/v2"

    def _call(self, method: str, url: str, *, data: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as exc:
            if method == "HEAD" and exc.code == 404:
                return 404, {}, b""
            raise HostileBuildError(f"{method} {url}: {exc.code} {exc.read()[:300]!r}") from exc
        except OSError as exc:
            raise HostileBuildError(f"{method} {url}: {exc}") from exc

    def manifest(self, repository: str, tag: str) -> dict[str, Any]:
        _, _, body = self._call("GET", f"{self.base}/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_V2})
        manifest: dict[str, Any] = json.loads(body)
        if manifest.get("mediaType") != MANIFEST_V2:
            raise HostileBuildError(f"{repository}:{tag}: not a Docker v2 manifest ({manifest.get('mediaType')})")
        return manifest

    def blob(self, repository: str, digest: str) -> bytes:
        return self._call("GET", f"{self.base}/{repository}/blobs/{digest}")[2]

    def has_blob(self, repository: str, digest: str) -> bool:
        return self._call("HEAD", f"{self.base}/{repository}/blobs/{digest}")[0] == 200

    def mount(self, repository: str, digest: str, source: str) -> None:
        if repository == source or self.has_blob(repository, digest):
            return
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        status = self._call("POST", f"{self.base}/{repository}/blobs/uploads/?{query}")[0]
        if status != 201:  # the registry opened an upload instead: it cannot mount, so the test cannot build
            raise HostileBuildError(f"mounting {digest} from {source} into {repository}: answered {status}")

    def put_blob(self, repository: str, data: bytes) -> str:
        digest = _digest(data)
        if self.has_blob(repository, digest):
            return digest
        _, headers, _ = self._call("POST", f"{self.base}/{repository}/blobs/uploads/")
        location = headers.get("Location", "")
        if location.startswith("/"):
            location = self.base.removesuffix("/v2") + location
        sep = "&" if "?" in location else "?"
        self._call("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", data=data,
                   headers={"Content-Type": "application/octet-stream"})
        return digest

    def put_manifest(self, repository: str, tag: str, manifest: dict[str, Any]) -> str:
        body = json.dumps(manifest, indent=3).encode()
        self._call("PUT", f"{self.base}/{repository}/manifests/{tag}", data=body,
                   headers={"Content-Type": MANIFEST_V2})
        return _digest(body)


def build_variant(registry: Registry, base_ref: str, ref: str, variant: Variant) -> str:
    """Push `ref`: the layers of `base_ref` (mounted, not copied) plus the variant's; returns the manifest digest."""
    _, base_repository, base_tag = _split(base_ref)
    _, repository, tag = _split(ref)
    base = registry.manifest(base_repository, base_tag)
    config: dict[str, Any] = json.loads(registry.blob(base_repository, base["config"]["digest"]))
    layers = list(base["layers"])
    for layer in layers:
        registry.mount(repository, layer["digest"], base_repository)
    for members in variant.layers:
        raw = layer_tar(members)
        packed = gzip.compress(raw, mtime=0)
        digest = registry.put_blob(repository, packed)
        layers.append({"mediaType": LAYER_GZIP, "size": len(packed), "digest": digest})
        config["rootfs"]["diff_ids"].append(_digest(raw))
        config.setdefault("history", []).append({"created": "1970-01-01T00:00:00Z",
                                                 "created_by": f"simnode.hostile {variant.kind}"})
    labels = config.setdefault("config", {}).get("Labels") or {}
    config["config"]["Labels"] = {**labels, "simnode.hostile": variant.kind}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = registry.put_blob(repository, config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_V2,
                "config": {"mediaType": CONFIG_V1, "size": len(config_bytes), "digest": config_digest},
                "layers": layers}
    return registry.put_manifest(repository, tag, manifest)


def _split(ref: str) -> tuple[str, str, str]:
    host, _, rest = ref.partition("/")
    repository, _, tag = rest.rpartition(":")
    return host, repository, tag


def build_all(*, registry: str, repo: str, version: str, namespace: str = "",
              kinds: Iterable[str] = ()) -> list[tuple[Variant, str]]:
    """Push every variant (or those of `kinds`) on the binaries image of `version` under <registry>/<namespace>;
    returns (variant, ref) pairs."""
    wanted = set(kinds)
    base_ref = v.binaries_image(f"{registry}/{namespace}" if namespace else registry, version)
    client = Registry(registry)
    built: list[tuple[Variant, str]] = []
    for variant in variants():
        if wanted and variant.kind not in wanted:
            continue
        ref = variant.ref(registry, repo, version)
        build_variant(client, base_ref, ref, variant)
        built.append((variant, ref))
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simnode.hostile", description=__doc__)
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="host:port of the registry")
    parser.add_argument("--repo", default="simnode-hostile/desktop-kubernetes",
                        help="repository (under the registry) the variants are pushed to")
    parser.add_argument("--namespace", default="", help="where simnode.images pushed the base image")
    parser.add_argument("--version", default="v1.31.4", choices=sorted(v.VERSIONS))
    parser.add_argument("--only", default="", help="comma-separated kinds")
    parser.add_argument("--list", action="store_true", help="print the variants without building")
    args = parser.parse_args(argv)
    kinds = [k for k in args.only.split(",") if k]
    known = {variant.kind for variant in variants()}
    if set(kinds) - known:
        print(f"simnode.hostile: unknown kinds {sorted(set(kinds) - known)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    if args.list:
        pairs = [(x, x.ref(args.registry, args.repo, args.version)) for x in variants() if not kinds or x.kind in kinds]
    else:
        try:
            pairs = build_all(registry=args.registry, repo=args.repo, version=args.version,
                              namespace=args.namespace, kinds=kinds)
        except HostileBuildError as exc:
            print(f"simnode.hostile: {exc}", file=sys.stderr)
            return 1
    for variant, ref in pairs:
        print(f"{variant.kind} {ref} {variant.step}/{variant.code}: {variant.member} {variant.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
