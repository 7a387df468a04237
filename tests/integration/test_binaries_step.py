"""The binaries step against the real Docker Engine: files copied out of an image made with `docker import`,
checked entry by entry (links, odd names, sizes), recorded, and the copy container always removed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from stepkit import (
    VERSION,
    Entry,
    binaries_entries,
    containers_from,
    import_image,
    make_config,
    make_ctx,
    remove_images,
    with_k8s,
)

from lifecycle.adapters.docker import DockerEngine
from lifecycle.config import Config
from lifecycle.errors import PermanentError
from states.binaries import RECORD_NAME, Binaries

TOOLS = ("kubeadm", "kubelet", "kubectl", "crictl")


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
    return {name: b"#!/bin/sh\necho " + name.encode() + b"\n" + os.urandom(50_000) for name in TOOLS}


async def test_copies_the_tools_records_them_and_removes_the_container(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    tools = _tools()
    image_id = import_image(docker_host, _image(config), binaries_entries(tools))
    ctx, progress = make_ctx(config, docker=engine)
    step = Binaries()

    assert not await step.is_done(ctx)
    await step.run(ctx)

    for name, data in tools.items():
        path = ctx.paths.binary(name)
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o755
    record = json.loads((ctx.paths.state_dir / RECORD_NAME).read_text())
    assert record["image_id"] == image_id
    assert record["files"]["kubelet"]["sha256"] == hashlib.sha256(tools["kubelet"]).hexdigest()
    assert containers_from(docker_host, _image(config)) == []
    assert sorted(p.name for p in ctx.paths.bin_dir.iterdir()) == sorted(TOOLS), "no temp files left"
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

    ctx.paths.binary("kubectl").write_bytes(b"tampered")
    assert not await step.is_done(ctx)
    await step.run(ctx)
    assert await step.is_done(ctx)

    import_image(docker_host, _image(config), binaries_entries(_tools()))  # same tag, new image id
    assert not await step.is_done(ctx)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (Entry("usr/bin/kubelet-link", link="kubelet"), "usr/bin/kubelet-link"),
        (Entry("usr/bin/evil", b"x"), "usr/bin/evil"),
    ],
    ids=["symlink", "unexpected-name"],
)
async def test_bad_entries_are_rejected_and_nothing_is_installed(
    config: Config, engine: DockerEngine, docker_host: str, extra: Entry, named: str
) -> None:
    import_image(docker_host, _image(config), [*binaries_entries(_tools()), extra])
    ctx, _ = make_ctx(config, docker=engine)

    with pytest.raises(PermanentError) as info:
        await Binaries().run(ctx)

    assert info.value.code == "bad_image"
    assert named.removeprefix("usr/") in info.value.message  # the archive of /usr/bin names it bin/...
    assert list(ctx.paths.bin_dir.iterdir()) == [], "no binary and no temp file"
    assert not (ctx.paths.state_dir / RECORD_NAME).exists()
    assert containers_from(docker_host, _image(config)) == []


async def test_a_symlinked_tool_is_rejected(config: Config, engine: DockerEngine, docker_host: str) -> None:
    tools = _tools()
    del tools["kubectl"]
    entries = [*binaries_entries(tools), Entry("usr/bin/kubectl", link="/bin/sh")]
    import_image(docker_host, _image(config), entries)
    ctx, _ = make_ctx(config, docker=engine)
    with pytest.raises(PermanentError, match=r"'bin/kubectl' rejected: link to '/bin/sh'"):
        await Binaries().run(ctx)


async def test_oversized_and_missing_files_are_rejected(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    import_image(docker_host, _image(config), binaries_entries(_tools()))
    small = with_k8s(config, binary_max_bytes=10_000)
    ctx, _ = make_ctx(small, docker=engine)
    with pytest.raises(PermanentError, match=r"over the limit of 10000 \(kubernetes.binary_max_bytes\)"):
        await Binaries().run(ctx)

    tools = _tools()
    del tools["crictl"]
    import_image(docker_host, _image(config), binaries_entries(tools))
    ctx, _ = make_ctx(config, docker=engine)
    with pytest.raises(PermanentError, match="lacks crictl"):
        await Binaries().run(ctx)
    assert list(ctx.paths.bin_dir.iterdir()) == []
    assert containers_from(docker_host, _image(config)) == []


async def test_missing_image_fails_permanently(config: Config, engine: DockerEngine) -> None:
    ctx, _ = make_ctx(config, docker=engine)
    with pytest.raises(PermanentError) as info:
        await Binaries().run(ctx)
    assert info.value.code == "image_missing"
    assert _image(config) in info.value.message


async def test_cancelled_copy_removes_container_and_temp_files(
    config: Config, engine: DockerEngine, docker_host: str
) -> None:
    entries = binaries_entries(_tools())
    assert entries[2].name == "usr/bin/kubeadm"
    entries[2] = Entry("usr/bin/kubeadm", size_bytes=40 * 1024 * 1024)  # first in the tar: big and slow
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
    assert list(ctx.paths.bin_dir.iterdir()) == []


async def test_bad_binaries_config_is_rejected(config: Config, engine: DockerEngine) -> None:
    ctx, _ = make_ctx(with_k8s(config, binaries=("kubelet", "../etc/passwd")), docker=engine)
    with pytest.raises(PermanentError, match=r"kubernetes.binaries: '../etc/passwd'"):
        await Binaries().run(ctx)
