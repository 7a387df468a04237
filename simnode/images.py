"""Builds the simulated node's images with the local Docker Engine (`FROM scratch`) and pushes them.

Per Kubernetes version: the binaries image, tagged as Docker Desktop tags it
(`<repo>/desktop-kubernetes:kubernetes-<v>-cni-<v>-critools-<v>-cri-dockerd-<v>-1-debian`): a Debian-like tree with
the tools as zipapps in /usr/bin and CNI plugin stand-ins in /opt/cni/bin among many other files and links;
and the component images. The addon images once, and the tests' HTTP server image (simnode/httpimage.py).
Each image carries `/pad`, deterministic incompressible bytes
sized like the real image times a scale. Leaves images in the engine and tags in the registry; temp contexts
are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiodocker
import aiohttp

from simnode import versions as v
from simnode.httpimage import ImageToolError, http_echo_tree
from simnode.zipapp import PACKAGE_DIR, build_zipapp

DEFAULT_REGISTRY = "127.0.0.1:5000"
DEFAULT_DOCKER_HOST = "unix:///tmp/lifecycle-services/docker/docker.sock"
INPUTS_LABEL = "simnode.inputs-sha256"
MIN_PAD_BYTES = 8 * 1024
PAD_BLOCK_BYTES = 1 << 20
PARALLEL_BUILDS = 3
BUILD_ATTEMPTS = 3
# Bump when the way an image is assembled changes, so old images stop counting as up to date.
RECIPE_VERSION = "2"


class ImageBuildError(Exception):
    """Building or pushing an image failed; the message names the image and the engine's error."""


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines one image."""

    name: str  # key of REALISTIC_SIZES_BYTES
    ref: str  # full reference, <repo>/<name>:<tag>
    pad_size_bytes: int
    files: dict[str, bytes] = field(default_factory=dict)  # path in the image (no leading /) -> content, mode 0755
    plain: dict[str, bytes] = field(default_factory=dict)  # likewise, mode 0644
    links: dict[str, str] = field(default_factory=dict)  # path in the image -> symlink target
    cmd: tuple[str, ...] = ()

    def dockerfile(self, inputs_sha256: str = "") -> str:
        # Metadata first: on the vfs driver every step after a COPY copies the whole filesystem again.
        label = f"LABEL simnode.image={json.dumps(self.name)}"
        lines = ["FROM scratch", f"{label} {INPUTS_LABEL}={json.dumps(inputs_sha256)}" if inputs_sha256 else label]
        if self.cmd:
            lines.append(f"CMD {json.dumps(list(self.cmd))}")
        lines.append("COPY pad /pad")
        if self.files or self.plain or self.links:
            lines.append("COPY rootfs/ /")  # symlinks inside a copied directory stay symlinks
        return "\n".join(lines) + "\n"

    def pad_seed(self) -> str:
        # Name, tag and size: each version gets its own bytes, so an upgrade pulls new layers as on a real node.
        tag = self.ref.rpartition(":")[2]
        return f"{self.name}:{tag}:{self.pad_size_bytes}"

    def inputs_sha256(self) -> str:
        doc = {
            "recipe": RECIPE_VERSION,
            "ref": self.ref,
            "dockerfile": self.dockerfile(),
            "pad": {"seed": self.pad_seed(), "size_bytes": self.pad_size_bytes},
            "files": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(self.files.items())},
            "plain": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(self.plain.items())},
            "links": dict(sorted(self.links.items())),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ImageResult:
    ref: str
    action: str  # "built, pushed" | "pushed" | "up to date"
    compressed_size_bytes: int

    def line(self) -> str:
        return f"{self.ref:<60} {self.action:<14} {self.compressed_size_bytes / 1e6:10.3f} MB"


class PadReader:
    """File-like source of `size_bytes` pseudo-random bytes; the same seed always gives the same bytes.

    Generated in fixed 1 MiB blocks, each seeded by (seed, index), so the bytes do not depend on how the
    reader is read. Random bytes do not compress, so the registry's layer size follows the pad size.
    """

    def __init__(self, seed: str, size_bytes: int) -> None:
        self._seed = seed
        self._remaining = size_bytes
        self._block_index = 0
        self._block = b""
        self._offset = 0  # read position in the current block; slicing a moving tail would copy it per read

    def read(self, n: int = -1) -> bytes:
        want = self._remaining if n < 0 else min(n, self._remaining)
        parts: list[bytes] = []
        while want > 0:
            if self._offset == len(self._block):
                self._block = random.Random(f"{self._seed}:{self._block_index}").randbytes(PAD_BLOCK_BYTES)
                self._block_index += 1
                self._offset = 0
            part = self._block[self._offset : self._offset + want]
            self._offset += len(part)
            want -= len(part)
            parts.append(part)
        out = b"".join(parts)
        self._remaining -= len(out)
        return out


def pad_size_bytes(name: str, pad_scale: float) -> int:
    return max(MIN_PAD_BYTES, int(v.REALISTIC_SIZES_BYTES[name] * pad_scale))


def plan_images(
    repo: str, versions: Iterable[str], pad_scale: float, *, package_dir: Path = PACKAGE_DIR
) -> list[ImageSpec]:
    """The images to build, without duplicates (coredns and pause share tags across versions)."""
    specs: dict[str, ImageSpec] = {}
    for version in versions:
        tools = build_zipapp(v.VERSIONS[version].kubernetes, package_dir=package_dir)
        ref = v.binaries_image(repo, version)
        files, plain, links = binaries_tree(v.VERSIONS[version], tools)
        specs[ref] = ImageSpec(
            name=v.BINARIES_IMAGE,
            ref=ref,
            pad_size_bytes=pad_size_bytes(v.BINARIES_IMAGE, pad_scale),
            files=files,
            plain=plain,
            links=links,
            cmd=("/usr/bin/kubelet",),  # never run; lets the service create a container to copy from
        )
        for name, ref in v.component_images(repo, version).items():
            specs.setdefault(ref, ImageSpec(name=name, ref=ref, pad_size_bytes=pad_size_bytes(name, pad_scale)))
    for name, ref in v.addon_images(repo).items():
        specs.setdefault(ref, ImageSpec(name=name, ref=ref, pad_size_bytes=pad_size_bytes(name, pad_scale)))
    try:
        files, plain, cmd = http_echo_tree()
    except (ImageToolError, OSError, subprocess.CalledProcessError) as exc:
        raise ImageBuildError(f"{v.http_echo_image(repo)}: {exc}") from exc
    ref = v.http_echo_image(repo)
    specs[ref] = ImageSpec(name=v.HTTP_ECHO_IMAGE, ref=ref, pad_size_bytes=pad_size_bytes(v.HTTP_ECHO_IMAGE, pad_scale),
                           files=files, plain=plain, cmd=cmd)
    return list(specs.values())


# Around what the service extracts, the real binaries image is a Debian 12 system: /bin, /sbin and /lib are
# links into /usr (merged /usr), /usr/bin holds hundreds of programs and alternatives links, /opt/cni/bin holds
# the whole containernetworking/plugins release tarball (with its LICENSE and README.md). A sample of each.
DEBIAN_PROGRAMS = (
    "apt", "apt-get", "bash", "cat", "chmod", "chown", "cp", "dash", "date", "dpkg", "env", "find", "grep", "gzip",
    "head", "id", "ln", "ls", "mkdir", "mv", "readlink", "rm", "sed", "sort", "tail", "tar", "uname", "xargs",
    "conntrack", "ebtables", "ethtool", "socat", "nsenter", "mount", "umount",
)
DEBIAN_LINKS = {
    "bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64",
    "usr/bin/sh": "dash", "usr/bin/rbash": "bash", "usr/bin/gunzip": "gzip", "usr/bin/pager": "/etc/alternatives/pager",
    "etc/alternatives/pager": "/usr/bin/more", "usr/sbin/iptables": "/etc/alternatives/iptables",
    "etc/alternatives/iptables": "/usr/sbin/iptables-nft", "etc/os-release": "../usr/lib/os-release",
    "usr/lib64/ld-linux-x86-64.so.2": "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
}
DEBIAN_OS_RELEASE = b"""PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
"""


def _stand_in(kind: str, name: str, version: str) -> bytes:
    return f"#!/bin/sh\n# simnode stand-in for {kind} {name} {version}; never run by the simulated node\n" \
           f"echo '{name} {version}'\n".encode()


def cni_plugin_stand_in(name: str, version: str) -> bytes:
    # Answers the CNI VERSION command as the reference plugins do (containernetworking/cni pkg/skel), so that
    # `CNI_COMMAND=VERSION /opt/cni/bin/bridge` works on a node the service installed.
    return (
        f"#!/bin/sh\n# simnode stand-in for the CNI reference plugin {name} {version} (containernetworking/plugins)\n"
        'if [ "$CNI_COMMAND" = VERSION ]; then\n'
        '  echo \'{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}\'\n'
        "  exit 0\nfi\n"
        f"echo 'CNI {name} plugin {version}' >&2\nexit 1\n"
    ).encode()


def binaries_tree(ver: v.VersionImages, tools: bytes) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, str]]:
    """(executables, plain files, symlinks) of the binaries image: the tools and plugins amid a Debian tree."""
    files = {f"usr/bin/{tool}": tools for tool in v.BINARIES}
    files["usr/bin/cri-dockerd"] = _stand_in("cri-dockerd", "cri-dockerd", ver.cri_dockerd)
    files.update({f"usr/bin/{p}": _stand_in("Debian's", p, "12") for p in DEBIAN_PROGRAMS})
    files["usr/sbin/iptables-nft"] = _stand_in("Debian's", "iptables-nft", "1.8.9")
    files["usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"] = b"\x7fELF stand-in\n"
    files.update({f"opt/cni/bin/{p}": cni_plugin_stand_in(p, ver.cni) for p in v.CNI_PLUGINS})
    plain = {
        "usr/lib/os-release": DEBIAN_OS_RELEASE,
        "etc/debian_version": b"12.8\n",
        "etc/hostname": b"desktop-kubernetes\n",
        "opt/cni/bin/LICENSE": b"Apache License, Version 2.0 (stand-in)\n",
        "opt/cni/bin/README.md": b"# containernetworking/plugins (stand-in)\n",
        "usr/share/doc/cri-dockerd/copyright": b"Mirantis cri-dockerd (stand-in)\n",
        "usr/share/doc/kubernetes/VERSION": f"{ver.kubernetes}\n".encode(),
    }
    return files, plain, dict(DEBIAN_LINKS)


def write_context(spec: ImageSpec, out: IO[bytes], inputs_sha256: str) -> None:
    """The build context as an uncompressed tar: Dockerfile, pad, rootfs/ (files 0755 or 0644, symlinks)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, size: int, src: Any, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, mode, 0
            tar.addfile(info, src)

        dockerfile = spec.dockerfile(inputs_sha256).encode()
        add("Dockerfile", len(dockerfile), io.BytesIO(dockerfile))
        add("pad", spec.pad_size_bytes, PadReader(spec.pad_seed(), spec.pad_size_bytes))
        for path, data in sorted(spec.files.items()):
            add(f"rootfs/{path}", len(data), io.BytesIO(data), 0o755)
        for path, data in sorted(spec.plain.items()):
            add(f"rootfs/{path}", len(data), io.BytesIO(data), 0o644)
        for path, target in sorted(spec.links.items()):
            info = tarfile.TarInfo(f"rootfs/{path}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 0
            tar.addfile(info)


class _ChunkedFile:
    """Hands aiodocker 1 MiB chunks instead of its default 8 KiB ones."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def read(self, _n: int = -1) -> bytes:
        return self._f.read(PAD_BLOCK_BYTES)


def split_ref(ref: str) -> tuple[str, str, str]:
    """"host:port/path/name:tag" -> (host:port, path/name, tag)."""
    host, _, rest = ref.partition("/")
    repository, _, tag = rest.rpartition(":")
    if not host or not repository or not tag or "/" in tag:
        raise ValueError(f"image reference {ref!r} is not <registry>/<name>:<tag>")
    return host, repository, tag


MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


async def registry_manifest(session: aiohttp.ClientSession, ref: str) -> tuple[str, dict[str, Any]] | None:
    """(digest, manifest) the registry serves for `ref`, or None when it has no such tag."""
    host, repository, tag = split_ref(ref)
    url = f"http://{host}/v2/{repository}/manifests/{tag}"
    try:
        async with session.get(url, headers={"Accept": MANIFEST_V2}) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise ImageBuildError(f"registry {host}: GET {url} answered {resp.status}: {await resp.text()}")
            manifest: dict[str, Any] = json.loads(await resp.read())
            return resp.headers.get("Docker-Content-Digest", ""), manifest
    except aiohttp.ClientError as exc:
        raise ImageBuildError(f"cannot reach the registry at {host}: {exc}") from exc


def compressed_size_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(layer["size"]) for layer in manifest.get("layers", []))


async def _build(docker: aiodocker.Docker, spec: ImageSpec, inputs: str) -> None:
    for attempt in range(1, BUILD_ATTEMPTS + 1):
        try:
            await _build_once(docker, spec, inputs)
        except ImageBuildError as exc:
            # The classic builder's cache probe lists parentless images, then loads each one: an image that
            # someone removes in between (tests do, all the time) fails the build though nothing is wrong.
            if "unable to find image" not in str(exc) or attempt == BUILD_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * attempt)
        else:
            return


async def _build_once(docker: aiodocker.Docker, spec: ImageSpec, inputs: str) -> None:
    with tempfile.TemporaryFile(prefix="simnode-context-") as ctx:
        await asyncio.to_thread(write_context, spec, ctx, inputs)
        ctx.seek(0)
        try:
            stream = docker.images.build(
                fileobj=_ChunkedFile(ctx), encoding="identity", tag=spec.ref, rm=True, forcerm=True,
                stream=True,
            )
            async for chunk in stream:
                # The engine answers 200 and reports a failed step inside the stream.
                if "error" in chunk or "errorDetail" in chunk:
                    raise ImageBuildError(f"building {spec.ref} failed: {chunk.get('error', chunk)}")
        except aiodocker.DockerError as exc:
            raise ImageBuildError(f"building {spec.ref} failed: {exc}") from exc


async def _push(docker: aiodocker.Docker, ref: str) -> None:
    host, repository, tag = split_ref(ref)
    try:
        async for chunk in docker.images.push(f"{host}/{repository}", tag=tag, stream=True):
            if "error" in chunk or "errorDetail" in chunk:
                raise ImageBuildError(f"pushing {ref} failed: {chunk.get('error', chunk)}")
    except aiodocker.DockerError as exc:
        raise ImageBuildError(f"pushing {ref} failed: {exc}") from exc


async def _local_image(docker: aiodocker.Docker, ref: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = await docker.images.inspect(ref)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise ImageBuildError(f"inspecting {ref} failed: {exc}") from exc
    return info


async def _drop_if_dangling(docker: aiodocker.Docker, image_id: str) -> None:
    """Remove the image a rebuild replaced, unless something still uses it (vfs keeps full copies)."""
    try:
        info = await docker.images.inspect(image_id)
        if not info.get("RepoTags"):
            await docker.images.delete(image_id, noprune=False)
    except aiodocker.DockerError:
        pass  # in use by a container or already gone: keeping it is harmless


async def ensure_image(
    docker: aiodocker.Docker, session: aiohttp.ClientSession, spec: ImageSpec, replaced: list[str] | None = None
) -> ImageResult:
    """Build unless the local image has the inputs label, push unless the registry serves its digest.

    The id of an image a rebuild replaced goes to `replaced`, for removal once no build runs any more.
    """
    inputs = spec.inputs_sha256()
    actions: list[str] = []
    local = await _local_image(docker, spec.ref)
    if local is None or (local.get("Config") or {}).get("Labels", {}).get(INPUTS_LABEL) != inputs:
        await _build(docker, spec, inputs)
        actions.append("built")
        if local is not None and replaced is not None:
            replaced.append(local["Id"])
        local = await _local_image(docker, spec.ref)
        if local is None:
            raise ImageBuildError(f"building {spec.ref} reported success but the engine has no such image")
    host, repository, _tag = split_ref(spec.ref)
    served = await registry_manifest(session, spec.ref)
    if served is None or f"{host}/{repository}@{served[0]}" not in (local.get("RepoDigests") or []):
        await _push(docker, spec.ref)
        actions.append("pushed")
        served = await registry_manifest(session, spec.ref)
        if served is None:
            raise ImageBuildError(f"pushing {spec.ref} reported success but the registry does not serve it")
    return ImageResult(spec.ref, ", ".join(actions) or "up to date", compressed_size_bytes(served[1]))


@dataclass(frozen=True)
class BuildRequest:
    registry: str = DEFAULT_REGISTRY
    versions: tuple[str, ...] = tuple(v.VERSIONS)
    pad_scale: float = 1.0
    docker_host: str | None = None
    namespace: str = ""  # optional path under the registry (tests use a unique one)
    only: tuple[str, ...] = ()  # image names (keys of REALISTIC_SIZES_BYTES) to limit the run to
    package_dir: Path = PACKAGE_DIR  # the simnode sources packed into the tools (a frozen copy in tests)

    @property
    def repo(self) -> str:
        return f"{self.registry}/{self.namespace}" if self.namespace else self.registry

    def validate(self) -> None:
        """Reject bad input before anything is built."""
        if not self.registry or "/" in self.registry or "://" in self.registry:
            raise ValueError(f"registry {self.registry!r}: expected host:port such as {DEFAULT_REGISTRY}")
        unknown = [ver for ver in self.versions if ver not in v.VERSIONS]
        if unknown or not self.versions:
            raise ValueError(f"unknown Kubernetes versions {unknown or '(none given)'}; known: {sorted(v.VERSIONS)}")
        if not math.isfinite(self.pad_scale) or not 0 < self.pad_scale <= 10:
            raise ValueError(f"pad scale {self.pad_scale!r}: expected a number in (0, 10]")
        bad_names = [name for name in self.only if name not in v.REALISTIC_SIZES_BYTES]
        if bad_names:
            raise ValueError(f"unknown image names {bad_names}; known: {sorted(v.REALISTIC_SIZES_BYTES)}")
        ns = self.namespace
        if ns and (ns != ns.lower() or ns.startswith("/") or ns.endswith("/") or any(c.isspace() for c in ns)):
            raise ValueError(f"namespace {ns!r}: expected a lowercase repository path like 'test/abc'")


def docker_url(docker_host: str | None) -> str:
    return docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _lock_path(registry: str) -> Path:
    return Path(tempfile.gettempdir()) / f"simnode-images-{registry.replace(':', '_')}.lock"


async def build_images(req: BuildRequest, *, log: IO[str] | None = sys.stdout) -> list[ImageResult]:
    """Build and push every image of `req`; one line per image on `log`. Raises ImageBuildError."""
    req.validate()
    planned = plan_images(req.repo, req.versions, req.pad_scale, package_dir=req.package_dir)
    specs = [s for s in planned if not req.only or s.name in req.only]
    url = docker_url(req.docker_host)
    # Two builders at once (parallel test runs) would race on the same tags; take turns per registry.
    lock = await asyncio.to_thread(open, _lock_path(req.registry), "a")
    with lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        docker = aiodocker.Docker(url=url)
        try:
            try:
                await docker.version()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                raise ImageBuildError(f"cannot reach the Docker Engine at {url}: {exc}") from exc
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                return await _ensure_all(docker, session, specs, log)
        finally:
            await docker.close()


async def _ensure_all(
    docker: aiodocker.Docker, session: aiohttp.ClientSession, specs: list[ImageSpec], log: IO[str] | None
) -> list[ImageResult]:
    # Each build step waits mostly on the engine's layer commits; a few at once keep both cores busy.
    gate = asyncio.Semaphore(PARALLEL_BUILDS)
    replaced: list[str] = []

    async def one(spec: ImageSpec) -> ImageResult:
        async with gate:
            result = await ensure_image(docker, session, spec, replaced)
        if log is not None:
            print(result.line(), file=log, flush=True)
        return result

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(spec), name=f"image {spec.ref}") for spec in specs]
    except ExceptionGroup as group_error:
        errors = group_error.exceptions
        if all(isinstance(e, ImageBuildError) for e in errors):
            raise ImageBuildError("; ".join(str(e) for e in errors)) from group_error
        raise
    for image_id in replaced:
        await _drop_if_dangling(docker, image_id)
    return [task.result() for task in tasks]


def build_images_sync(req: BuildRequest, *, log: IO[str] | None = sys.stdout) -> list[ImageResult]:
    return asyncio.run(build_images(req, log=log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simnode.images", description=__doc__)
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="host:port of the registry to push to")
    parser.add_argument("--namespace", default="", help="repository path under the registry (default: none)")
    parser.add_argument("--versions", default=",".join(v.VERSIONS), help="comma-separated Kubernetes versions")
    parser.add_argument("--pad-scale", type=float, default=1.0, help="padding as a share of real image sizes")
    parser.add_argument("--docker-host", default=None, help=f"default $DOCKER_HOST or {DEFAULT_DOCKER_HOST}")
    parser.add_argument("--only", default="", help="comma-separated image names to limit the run to")
    args = parser.parse_args(argv)
    req = BuildRequest(
        registry=args.registry,
        versions=tuple(x.strip() for x in args.versions.split(",") if x.strip()),
        pad_scale=args.pad_scale,
        docker_host=args.docker_host,
        namespace=args.namespace,
        only=tuple(x.strip() for x in args.only.split(",") if x.strip()),
    )
    try:
        req.validate()
    except ValueError as exc:
        print(f"simnode.images: {exc}", file=sys.stderr)
        return 2
    try:
        results = build_images_sync(req)
    except ImageBuildError as exc:
        print(f"simnode.images: {exc}", file=sys.stderr)
        return 1
    total = sum(r.compressed_size_bytes for r in results)
    print(f"{len(results)} images in {req.repo}, {total / 1e6:.3f} MB compressed in the registry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
