"""The binaries step against the real Docker Engine: the files `kubernetes.binaries` names copied out of an image
made with `docker import` (a Debian-like tree around them, as Docker Desktop's image is), each checked (links
followed inside the image, devices, sizes), recorded, and the copy container always removed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
from stepkit import (
    VERSION,
    Entry,
    binaries_entries,
    containers_from,
    file_capability,
    import_image,
    make_config,
    make_ctx,
    remove_images,
    with_k8s,
)

from lifecycle.adapters.docker import DockerEngine
from lifecycle.config import DEFAULT_BINARIES, Config
from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.step import BootCheck
from states.binaries import RECORD_NAME, Binaries, copy_labels, remove_leftover_copies

TOOLS = DEFAULT_BINARIES  # /usr/bin/{kubeadm,kubelet,kubectl,crictl}, /opt/cni/bin/{bridge,host-local,loopback,portmap}


@pytest.fixture
async def engine(docker_host: str) -> AsyncIterator[DockerEngine]:
    eng = DockerEngine(docker_host)
    yield eng
    await eng.close()


@pytest.fixture
def config(docker_host: str, tmp_path: Path) -> Iterator[Config]:
    repo = f"lifecycle-test-bin-{os.urandom(4).hex()}"  # local only: the images step is not under test here
    cfg = make_config(tmp_path / "root", docker_host=docker_host, repo=repo)
    yield cfg
    remove_images(docker_host, [cfg.kubernetes.binaries_image_for(VERSION)])


def _image(config: Config) -> str:
    return config.kubernetes.binaries_image_for(VERSION)


def _tools() -> dict[str, bytes]:
    return {path: b"#!/bin/sh\necho " + path.encode() + b"\n" + os.urandom(50_000) for path in TOOLS}


def _installed(root: Path) -> list[str]:
    """Every file under the node root but the service's own state, as absolute paths on the node."""
    return sorted("/" + str(p.relative_to(root)) for p in root.rglob("*")
                  if not p.is_dir() and not str(p.relative_to(root)).startswith("var/lib/lifecycle"))


async def test_image_name_is_the_template_filled_per_version(config: Config) -> None:
    assert _image(config).endswith(f"/kube-binaries:{VERSION}-cni-v1.6.0")


async def test_copies_the_named_files_out_of_a_debian_like_image_and_ignores_the_rest(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    tools = _tools()
    image_id = import_image(docker_host, _image(config), binaries_entries(tools))
    ctx, progress = make_ctx(config, docker=engine)
    step = Binaries()

    assert not await step.is_done(ctx)
    await step.run(ctx)

    for path, data in tools.items():
        installed = ctx.paths.under(path)
        assert installed.read_bytes() == data
        assert installed.stat().st_mode & 0o7777 == 0o755
    assert _installed(ctx.paths.root) == sorted(TOOLS), "only the named files, no temp files, nothing else"
    record = json.loads((ctx.paths.state_dir / RECORD_NAME).read_text())
    assert record["image_id"] == image_id
    assert record["files"]["/usr/bin/kubelet"]["sha256"] == hashlib.sha256(tools["/usr/bin/kubelet"]).hexdigest()
    assert containers_from(docker_host, _image(config)) == []
    final = progress.calls[-1]
    assert final["unit"] == "bytes" and final["current"] == final["total"] == sum(map(len, tools.values()))
    assert await step.is_done(ctx)


async def test_a_changed_file_or_a_new_image_is_not_done(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    import_image(docker_host, _image(config), binaries_entries(_tools()))
    ctx, _ = make_ctx(config, docker=engine)
    step = Binaries()
    await step.run(ctx)

    ctx.paths.under("/opt/cni/bin/portmap").write_bytes(b"tampered")
    assert not await step.is_done(ctx)
    await step.run(ctx)
    assert await step.is_done(ctx)

    import_image(docker_host, _image(config), binaries_entries(_tools()))  # same tag, new image id
    assert not await step.is_done(ctx)


async def test_boot_evidence_is_size_and_mtime_and_the_hashes_still_decide(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    """Issue 10 part 3: at boot a stat per file and an engine lookup stand in for the hashes; what they cannot see
    (the same size and mtime over other bytes) is left to the full check, which the engine runs in the background."""
    import_image(docker_host, _image(config), binaries_entries(_tools()))
    ctx, _ = make_ctx(config, docker=engine)
    step = Binaries()
    await step.run(ctx)
    assert await step.boot_check(ctx) == BootCheck.UNKNOWN  # nothing recorded yet: the full check decides
    await step.record_boot_evidence(ctx)  # the engine does this each time the full check holds
    assert await step.boot_check(ctx) == BootCheck.VERIFY_LATER

    kubelet = ctx.paths.under("/usr/bin/kubelet")
    before = kubelet.stat()
    kubelet.write_bytes(b"X" * before.st_size)  # damaged, same size, mtime put back
    os.utime(kubelet, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert await step.boot_check(ctx) == BootCheck.VERIFY_LATER
    assert not await step.is_done(ctx)  # the background check finds it

    os.utime(kubelet)  # a new mtime: the evidence no longer holds
    assert await step.boot_check(ctx) == BootCheck.UNKNOWN
    await step.run(ctx)
    await step.record_boot_evidence(ctx)
    import_image(docker_host, _image(config), binaries_entries(_tools()))  # same tag, new image id
    assert await step.boot_check(ctx) == BootCheck.UNKNOWN


async def test_symlinks_are_followed_inside_the_image(config: Config, engine: DockerEngine, docker_host: str) -> None:
    tools = _tools()
    kubectl, crictl = tools.pop("/usr/bin/kubectl"), tools.pop("/usr/bin/crictl")
    entries = [
        *binaries_entries(tools),
        Entry("usr/bin/kubectl", link="kubectl-1.31"), Entry("usr/bin/kubectl-1.31", kubectl),  # relative
        Entry("usr/local"), Entry("usr/local/bin"), Entry("usr/local/bin/crictl", crictl),
        Entry("usr/bin/crictl", link="/bin/../usr/local/bin/crictl"),  # absolute, through the /bin link
    ]
    import_image(docker_host, _image(config), entries)
    ctx, _ = make_ctx(config, docker=engine)
    await Binaries().run(ctx)

    assert ctx.paths.under("/usr/bin/kubectl").read_bytes() == kubectl
    assert not ctx.paths.under("/usr/bin/kubectl").is_symlink()
    assert ctx.paths.under("/usr/bin/crictl").read_bytes() == crictl
    assert _installed(ctx.paths.root) == sorted(TOOLS), "the link targets are not installed under their own names"


@pytest.mark.parametrize(
    ("replacement", "why"),
    [
        ([Entry("usr/bin/kubectl", link="../../../../etc/shadow")],
         "symlink to '../../../../etc/shadow' points outside"),
        ([Entry("usr/bin/kubectl", link="kubectl2"), Entry("usr/bin/kubectl2", link="kubectl")],
         "symlink loop"),
        ([Entry("usr/bin/kubectl", device=(1, 3))], "not a regular file (device, fifo or directory)"),
        ([Entry("usr/bin/kubectl")], "not a regular file (device, fifo or directory)"),
        ([Entry("usr/bin/kubectl", b"\x7fELF kubectl", mode=0o4755)], "mode 4755 has setuid"),
        ([Entry("usr/bin/kubectl", b"\x7fELF kubectl", mode=0o2755)], "mode 2755 has setgid"),
        ([Entry("usr/bin/kubectl", b"\x7fELF kubectl", mode=0o1755)], "mode 1755 has sticky"),
        ([Entry("usr/bin/kubectl", b"\x7fELF kubectl", xattrs=(("security.capability", file_capability(12)),))],
         "extended attributes security.capability"),
        ([Entry("etc/secret", b"not a kubectl", mode=0o600), Entry("usr/bin/kubectl", hardlink="etc/secret")],
         "a hard link to /etc/secret in the image's layers"),
        ([Entry("etc/secret", b"not a kubectl", mode=0o600), Entry("usr/bin/kubectl", link="kubectl-real"),
          Entry("usr/bin/kubectl-real", hardlink="etc/secret")],
         "/usr/bin/kubectl (-> /usr/bin/kubectl-real) in the binaries image: a hard link to /etc/secret"),
        ([Entry("etc/secret", b"not a kubectl", mode=0o600), Entry("usr/bin/kubectl", link="/bin/kubectl-real"),
          Entry("usr/bin/kubectl-real", hardlink="etc/secret")],  # reached through the image's bin -> usr/bin
         "/usr/bin/kubectl (-> /bin/kubectl-real) in the binaries image: a hard link to /etc/secret"),
        # dockerd's archive drops xattrs other than security.capability: only the layers show this one
        ([Entry("usr/bin/kubectl", b"\x7fELF kubectl", xattrs=(("user.hostile", b"1"),))],
         "extended attributes user.hostile in the image's layers"),
    ],
    ids=["link-escapes", "link-loop", "device", "directory", "setuid", "setgid", "sticky", "file-capability",
         "hard-link", "symlink-to-hard-link", "hard-link-through-a-linked-dir", "user-xattr"],
)
async def test_a_hostile_named_file_is_refused_and_nothing_is_installed(
    config: Config, engine: DockerEngine, docker_host: str, replacement: list[Entry], why: str
) -> None:
    tools = _tools()
    del tools["/usr/bin/kubectl"]
    import_image(docker_host, _image(config), [*binaries_entries(tools), *replacement])
    ctx, _ = make_ctx(config, docker=engine)

    with pytest.raises(PermanentError) as info:
        await Binaries().run(ctx)

    assert info.value.code == "bad_image"
    assert info.value.message.startswith("/usr/bin/kubectl")
    assert why in info.value.message
    assert _installed(ctx.paths.root) == [], "no binary and no temp file"
    assert not (ctx.paths.state_dir / RECORD_NAME).exists()
    assert containers_from(docker_host, _image(config)) == []


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        # kubectl itself, under a name that stays inside the layer: `docker save` works, the layer scan refuses it
        ("usr/bin/../bin/kubectl", "a layer entry 'usr/bin/../bin/kubectl' with a '..' component"),
        # written inside the layer at import, looked for outside it by `docker save`: missing there ...
        ("../" * 12 + "usr/lib/lifecycle-absent", "open /usr/lib/lifecycle-absent: no such file or directory"),
        # ... or a host file with other bytes
        ("../" * 12 + "etc/passwd", 'file integrity checksum failed for "' + "../" * 12 + 'etc/passwd"'),
    ],
    ids=["inside", "outside-missing", "outside-present"],
)
async def test_a_dotdot_entry_name_in_the_layers_refuses_the_image(
    config: Config, engine: DockerEngine, docker_host: str, entry: str, why: str
) -> None:
    """Issue 8, hostile images: a `../` name was retried as an engine failure (engine_failed) or, inside the layer,
    installed; the image is at fault."""
    tools = _tools()
    kubectl = tools.pop("/usr/bin/kubectl") if entry.endswith("/kubectl") else b""
    import_image(docker_host, _image(config), [*binaries_entries(tools), Entry(entry, kubectl or b"hostile")])
    ctx, _ = make_ctx(config, docker=engine)

    with pytest.raises(PermanentError) as info:
        await Binaries().run(ctx)

    assert info.value.code == "bad_image"
    assert why in info.value.message
    assert _installed(ctx.paths.root) == [], "no binary and no temp file"
    assert containers_from(docker_host, _image(config)) == []


async def test_oversized_and_missing_files_are_rejected(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    import_image(docker_host, _image(config), binaries_entries(_tools()))
    small = with_k8s(config, binary_max_bytes=10_000)
    ctx, _ = make_ctx(small, docker=engine)
    with pytest.raises(PermanentError, match=r"over the limit of 10000 \(kubernetes.binary_max_bytes\)"):
        await Binaries().run(ctx)

    tools = _tools()
    del tools["/opt/cni/bin/portmap"]
    import_image(docker_host, _image(config), binaries_entries(tools))
    ctx, _ = make_ctx(config, docker=engine)
    with pytest.raises(PermanentError, match="/opt/cni/bin/portmap is not in the binaries image") as info:
        await Binaries().run(ctx)
    assert info.value.details["missing"] == ["/opt/cni/bin/portmap"]
    assert _installed(ctx.paths.root) == []
    assert containers_from(docker_host, _image(config)) == []


async def test_an_engine_that_does_not_answer_is_engine_unavailable_naming_its_socket(tmp_path: Path) -> None:
    """Issue 8 defect 8, for binaries as for images (tests/faults/test_registry_and_engine_down.py cuts the engine
    mid-copy): an engine that does not answer is `engine_unavailable` naming the socket, not `engine_failed`."""
    host = f"unix://{tmp_path}/no-docker.sock"  # nothing there: the engine is down
    config = make_config(tmp_path / "root", docker_host=host, repo="lifecycle-test-bin-no-engine")
    engine = DockerEngine(host)
    ctx, _ = make_ctx(config, docker=engine)
    try:
        with pytest.raises(TemporaryError) as info:
            await Binaries().run(ctx)
        assert (info.value.code, info.value.retryable) == ("engine_unavailable", True)
        assert host in info.value.message and info.value.details["docker_host"] == host
    finally:
        await engine.close()


async def test_missing_image_fails_permanently(config: Config, engine: DockerEngine) -> None:
    ctx, _ = make_ctx(config, docker=engine)
    with pytest.raises(PermanentError) as info:
        await Binaries().run(ctx)
    assert info.value.code == "image_missing"
    assert _image(config) in info.value.message


async def test_cancelled_copy_removes_container_and_temp_files(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    tools = _tools()
    del tools["/usr/bin/kubeadm"]
    entries = [*binaries_entries(tools), Entry("usr/bin/kubeadm", size_bytes=40 * 1024 * 1024)]  # first: big, slow
    import_image(docker_host, _image(config), entries)
    ctx, progress = make_ctx(config, docker=engine)

    task = asyncio.create_task(Binaries().run(ctx), name="test-binaries-run")
    while not any(c["message"].startswith("extracting") for c in progress.calls):
        await asyncio.sleep(0.01)
        assert not task.done(), task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert containers_from(docker_host, _image(config)) == []
    assert _installed(ctx.paths.root) == []


@pytest.mark.parametrize("path", ["../etc/passwd", "kubelet", "/usr/bin/../../etc/passwd", "/usr//bin/kubelet"])
async def test_bad_binaries_config_is_rejected(config: Config, engine: DockerEngine, path: str) -> None:
    ctx, _ = make_ctx(with_k8s(config, binaries=("/usr/bin/kubelet", path)), docker=engine)
    with pytest.raises(PermanentError, match=r"kubernetes.binaries: .* is not an absolute normalised path") as info:
        await Binaries().run(ctx)
    assert info.value.code == "invalid_config"


async def test_copy_containers_a_crash_left_are_removed_before_the_next_copy_and_at_start(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    import_image(docker_host, _image(config), binaries_entries(_tools()))
    labels = copy_labels(config.node_name)
    other_node = await engine.create_container(_image(config), labels=copy_labels("another-node"))
    try:
        await engine.create_container(_image(config), labels=labels)  # as a SIGKILL mid-copy leaves it
        ctx, progress = make_ctx(config, docker=engine)
        await Binaries().run(ctx)
        assert "removed 1 copy container(s) an earlier attempt left" in progress.messages()
        assert containers_from(docker_host, _image(config)) == [other_node[:12]], "only this node's are removed"

        await engine.create_container(_image(config), labels=labels)
        await remove_leftover_copies(config, make_ctx(config, docker=engine)[0].ports)
        assert containers_from(docker_host, _image(config)) == [other_node[:12]]
    finally:
        await engine.remove_container(other_node)


class _LateAnswer(DockerEngine):
    """dockerd has created the container, its answer is still on the way (on vfs it copies the image's files
    first: seconds): the moment a step cancelled by a reset or a cancel must not lose the container."""

    def __init__(self, docker_host: str) -> None:
        super().__init__(docker_host)
        self.created = asyncio.Event()

    async def create_container(self, image: str, *, labels: Mapping[str, str] | None = None) -> str:
        container = await super().create_container(image, labels=labels)
        self.created.set()
        await asyncio.sleep(1.0)
        return container


async def test_cancelled_while_the_engine_creates_the_copy_container_leaves_none(
    config: Config, docker_host: str
) -> None:
    import_image(docker_host, _image(config), binaries_entries(_tools()))
    engine = _LateAnswer(docker_host)
    try:
        ctx, _ = make_ctx(config, docker=engine)
        run = asyncio.create_task(Binaries().run(ctx))
        await asyncio.wait_for(engine.created.wait(), timeout=30)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert containers_from(docker_host, _image(config)) == []
    finally:
        for container in containers_from(docker_host, _image(config)):
            await engine.remove_container(container)
        await engine.close()
