"""Test helpers for the certs/images/binaries steps: a real StepContext in a tmp root, and tiny images made with
`docker import` (exact tar contents: symlinks and odd names included) and pushed under unique names.

Import with `from stepkit import ...` (tests/integration is on sys.path while its tests run).
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import structlog

from lifecycle.adapters.docker import DockerEngine
from lifecycle.adapters.process import SubprocessRunner
from lifecycle.config import AddonsConfig, Config, DockerConfig, KubernetesConfig, PkiConfig, VersionImages
from lifecycle.paths import HostPaths
from lifecycle.ports import ContainerEngine, Ports
from lifecycle.step import ClusterParams, StepContext

VERSION = "v1.31.4"
TAGS = VersionImages(etcd="3.5.15-0", coredns="v1.11.3", pause="3.10", cni="v1.6.0")


@dataclass
class ProgressLog:
    """Every ctx.progress call, in order."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(
        self, message: str, *, current: float | None = None, total: float | None = None, unit: str | None = None
    ) -> None:
        self.calls.append({"message": message, "current": current, "total": total, "unit": unit, "t": time.monotonic()})

    def messages(self) -> list[str]:
        return [c["message"] for c in self.calls]


def make_config(root: Path, *, docker_host: str = "unix:///nonexistent", repo: str = "127.0.0.1:5000/none",
                **k8s: Any) -> Config:
    # The kubelet of a step test talks to the engine directly: no cri-dockerd whose sandbox image needs setting
    # (tests/integration/test_host_units.py covers a machine with one).
    k8s.setdefault("cri_socket", "unix:///var/run/docker.sock")
    kubernetes = KubernetesConfig(
        version=VERSION, image_repository=repo, binaries_image="{repo}/kube-binaries:{version}-cni-{cni}",
        versions={VERSION: TAGS}, node_ip="127.0.0.1", endpoint_name="localhost", **k8s,
    )
    # The storage addon's images under the test's repository, as simnode/lifecycle.toml names them.
    addons = AddonsConfig(storage_provisioner_image="{repo}/rancher/local-path-provisioner:v0.0.37",
                          storage_helper_image="{repo}/library/busybox:1.37.0",
                          manifests_dir=Path(__file__).resolve().parents[2] / "deploy/addons")
    return Config(node_name="node-a", root=root, kubernetes=kubernetes, pki=PkiConfig(),
                  docker=DockerConfig(host=docker_host, pull_concurrency=3), addons=addons)


class LocalEngine:
    """The local Docker Engine for steps that only ask it questions (the certs step asks for its cgroup driver):
    a fresh client per call, so a test need not close anything."""

    async def cgroup_driver(self) -> str:
        engine = DockerEngine(os.environ.get("DOCKER_HOST") or "unix:///tmp/lifecycle-services/docker/docker.sock")
        try:
            return await engine.cgroup_driver()
        finally:
            await engine.close()


def make_ctx(config: Config, *, docker: ContainerEngine | None = None, api_port: int = 16443,
             deadline_s: float = 120.0) -> tuple[StepContext, ProgressLog]:
    progress = ProgressLog()
    ports = Ports(docker=cast(ContainerEngine, docker or LocalEngine()), commands=SubprocessRunner(),
                  kubelet=cast(Any, None), kube=cast(Any, None))
    ctx = StepContext(
        config=config, paths=HostPaths(config.root),
        cluster=ClusterParams(kubernetes_version=VERSION, api_port=api_port, kubelet_healthz_port=20248),
        ports=ports, request_id="test", deadline=time.monotonic() + deadline_s,
        log=structlog.get_logger("test"), progress=progress,
    )
    return ctx, progress


def with_pki(config: Config, **changes: Any) -> Config:
    return replace(config, pki=replace(config.pki, **changes))


def with_k8s(config: Config, **changes: Any) -> Config:
    return replace(config, kubernetes=replace(config.kubernetes, **changes))


# ---- images ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar entry: a regular file (data), a directory (data None, link None), a symlink (link), a hard link
    (hardlink: the image path it links to, without the leading slash) or a character device (device=(major, minor)).
    `xattrs` become PAX records (SCHILY.xattr.<name>), as tar writers store extended attributes."""

    name: str
    data: bytes | None = None
    link: str | None = None
    mode: int = 0o755
    size_bytes: int | None = None  # stream this many zero bytes instead of `data`
    device: tuple[int, int] | None = None
    hardlink: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


def file_capability(bit: int) -> bytes:
    """A `security.capability` value (VFS_CAP_REVISION_2) granting capability number `bit`, as setcap writes."""
    return struct.pack("<IIIII", 0x02000001, 1 << bit, 0, 0, 0)


def rootfs_tar(entries: Iterable[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            # tarfile writes PAX values as UTF-8 with surrogateescape: raw bytes survive unchanged
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs}
            if e.hardlink is not None:
                info.type, info.linkname = tarfile.LNKTYPE, e.hardlink
                tar.addfile(info)
            elif e.device is not None:
                info.type, (info.devmajor, info.devminor) = tarfile.CHRTYPE, e.device
                tar.addfile(info)
            elif e.link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, e.link
                tar.addfile(info)
            elif e.data is None and e.size_bytes is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = e.data if e.data is not None else bytes(e.size_bytes or 0)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def docker(docker_host: str, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
    env = {**os.environ, "DOCKER_HOST": docker_host}
    proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, env=env, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode().strip()


def import_image(docker_host: str, ref: str, entries: Iterable[Entry]) -> str:
    """A local image whose filesystem is exactly `entries` (no CMD); returns its id."""
    return docker(docker_host, "import", "-", ref, stdin=rootfs_tar(entries))


def push_image(docker_host: str, ref: str, entries: Iterable[Entry], *, keep_local: bool = False) -> str:
    """Imports and pushes `ref`; returns the registry digest. Removes the local copy unless `keep_local`."""
    import_image(docker_host, ref, entries)
    docker(docker_host, "push", ref)
    digests = docker(docker_host, "image", "inspect", "--format", "{{range .RepoDigests}}{{.}} {{end}}", ref)
    if not keep_local:
        docker(docker_host, "rmi", "-f", ref)
    return digests.split()[0].split("@", 1)[1]


def unique_repo(registry: str, label: str) -> str:
    return f"{registry}/lifecycle-test-{label}-{uuid.uuid4().hex[:8]}"


def remove_images(docker_host: str, refs: Iterable[str]) -> None:
    refs = list(refs)
    if refs:
        docker(docker_host, "rmi", "-f", *refs, check=False)


def binaries_entries(contents: dict[str, bytes]) -> list[Entry]:
    """`contents` (absolute path in the image -> bytes) amid a Debian-like tree, as Docker Desktop's binaries image
    is: merged-/usr links, other programs and alternatives links in /usr/bin, the whole CNI release in /opt/cni/bin,
    /etc, libraries."""
    dirs = {"etc", "etc/alternatives", "usr", "usr/bin", "usr/sbin", "usr/lib", "usr/share", "usr/share/doc", "opt",
            "opt/cni", "opt/cni/bin", "usr/lib/x86_64-linux-gnu"}
    dirs |= {str(Path(p.lstrip("/")).parent) for p in contents}
    entries = [Entry(d) for d in sorted(dirs)]
    entries += [
        Entry("bin", link="usr/bin"), Entry("sbin", link="usr/sbin"), Entry("lib", link="usr/lib"),
        Entry("etc/os-release", link="../usr/lib/os-release"), Entry("usr/lib/os-release", b"ID=debian\n", mode=0o644),
        Entry("etc/debian_version", b"12.8\n", mode=0o644),
        Entry("usr/bin/sh", link="dash"), Entry("usr/bin/pager", link="/etc/alternatives/pager"),
        Entry("etc/alternatives/pager", link="/usr/bin/less"),  # dangling, as on a slim image
        Entry("usr/lib/x86_64-linux-gnu/libc.so.6", b"\x7fELF", mode=0o644),
        Entry("opt/cni/bin/LICENSE", b"Apache-2.0\n", mode=0o644),
        *[Entry(f"usr/bin/{n}", b"#!/bin/sh\n") for n in ("bash", "dash", "cat", "ls", "dpkg", "apt", "less")],
        *[Entry(f"opt/cni/bin/{n}", b"\x7fELF " + n.encode()) for n in ("dhcp", "macvlan", "ptp", "tuning")],
    ]
    return entries + [Entry(p.lstrip("/"), data) for p, data in contents.items()]


def containers_from(docker_host: str, image_ref: str) -> list[str]:
    out = docker(docker_host, "ps", "-a", "-q", "--filter", f"ancestor={image_ref}")
    return out.split()
