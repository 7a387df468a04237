"""DockerEngine against the real Docker Engine and the local registry: pull progress and errors, registry
digests, containers created but never started, and a streamed (not buffered) archive."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import AsyncIterator

import pytest
from conftest import free_port
from stepkit import Entry, containers_from, docker, import_image, push_image, remove_images, unique_repo

from lifecycle.adapters.docker import ARCHIVE_CHUNK_BYTES, DockerEngine, split_ref
from lifecycle.ports import EngineError, PullProgress


@pytest.fixture
async def engine(docker_host: str) -> AsyncIterator[DockerEngine]:
    eng = DockerEngine(docker_host)
    yield eng
    await eng.close()


def test_split_ref_handles_registry_ports_and_digests() -> None:
    assert split_ref("127.0.0.1:5000/a/b:v1") == ("127.0.0.1:5000/a/b", "v1")
    assert split_ref("127.0.0.1:5000/a/b") == ("127.0.0.1:5000/a/b", "latest")
    assert split_ref("r/a@sha256:ab") == ("r/a", "@sha256:ab")


async def test_pull_reports_layer_bytes_and_returns_the_local_id(
    engine: DockerEngine, docker_host: str, registry: str
) -> None:
    ref = f"{unique_repo(registry, 'pull')}/blob:v1"
    payload = os.urandom(3_000_000)  # incompressible: the layer is at least this big
    digest = push_image(docker_host, ref, [Entry("blob", payload, mode=0o644)])
    try:
        assert await engine.image_id(ref) is None
        seen: list[PullProgress] = []
        image_id = await engine.pull(ref, on_progress=seen.append)

        assert image_id.startswith("sha256:")
        assert await engine.image_id(ref) == image_id
        final = seen[-1]
        assert final.current_bytes == final.total_bytes and final.current_bytes >= len(payload)
        currents = [p.current_bytes for p in seen if p.status == "Downloading"]
        assert currents and currents == sorted(currents), "download bytes only grow"
        assert any(0 < c < final.current_bytes for c in currents), "intermediate progress was reported"
        assert f"{ref.rsplit(':', 1)[0]}@{digest}" in await engine.repo_digests(ref)
        assert await engine.registry_digest(ref) == digest
    finally:
        remove_images(docker_host, [ref])


async def test_pull_of_a_missing_tag_is_not_found(engine: DockerEngine, registry: str) -> None:
    ref = f"{unique_repo(registry, 'missing')}/nothing:v0"
    with pytest.raises(EngineError) as info:
        await engine.pull(ref, on_progress=lambda _: None)
    assert info.value.not_found
    assert "nothing" in info.value.message
    assert await engine.registry_digest(ref) is None


async def test_pull_from_an_unreachable_registry_is_not_a_not_found(engine: DockerEngine) -> None:
    ref = f"127.0.0.1:{free_port()}/lifecycle-test/none:v1"
    with pytest.raises(EngineError) as info:
        await engine.pull(ref, on_progress=lambda _: None)
    assert not info.value.not_found
    assert "connection refused" in info.value.message
    assert await engine.registry_digest(ref) is None  # cannot say, rather than an error


async def test_unreachable_engine_raises_engine_error() -> None:
    eng = DockerEngine("unix:///nonexistent/docker.sock")
    try:
        with pytest.raises(EngineError, match="Cannot connect"):
            await eng.image_id("anything:v1")
    finally:
        await eng.close()


async def test_cgroup_driver_is_what_docker_info_says(engine: DockerEngine, docker_host: str) -> None:
    assert await engine.cgroup_driver() == docker(docker_host, "info", "--format", "{{.CgroupDriver}}")
    unreachable = DockerEngine("unix:///nonexistent/docker.sock")
    try:
        with pytest.raises(EngineError, match="cgroup driver"):
            await unreachable.cgroup_driver()
    finally:
        await unreachable.close()


async def test_container_is_created_without_cmd_never_started_and_removed(
    engine: DockerEngine, docker_host: str
) -> None:
    ref = f"lifecycle-test-nocmd-{os.urandom(4).hex()}:v1"
    import_image(docker_host, ref, [Entry("usr"), Entry("usr/bin"), Entry("usr/bin/tool", b"x")])
    try:
        cid = await engine.create_container(ref)
        state = docker(docker_host, "inspect", "--format", "{{.State.Status}}", cid)
        assert state == "created"
        await engine.remove_container(cid)
        assert containers_from(docker_host, ref) == []
        await engine.remove_container(cid)  # already gone: not an error
        with pytest.raises(EngineError) as info:
            await engine.create_container(f"{ref}-absent")
        assert info.value.not_found
    finally:
        remove_images(docker_host, [ref])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_archive_of_50mb_streams_in_small_chunks(engine: DockerEngine, docker_host: str) -> None:
    ref = f"lifecycle-test-big-{os.urandom(4).hex()}:v1"
    size_bytes = 50 * 1024 * 1024
    import_image(docker_host, ref, [Entry("usr"), Entry("usr/bin"), Entry("usr/bin/big", size_bytes=size_bytes)])
    cid = await engine.create_container(ref)
    try:
        baseline = _rss_bytes()
        peak = baseline
        chunks = total = biggest = 0
        async for chunk in engine.archive(cid, "/usr/bin"):
            chunks += 1
            total += len(chunk)
            biggest = max(biggest, len(chunk))
            peak = max(peak, _rss_bytes())
        assert total > size_bytes  # the tar of the file, headers included, uncompressed
        assert biggest <= ARCHIVE_CHUNK_BYTES
        assert chunks >= size_bytes // ARCHIVE_CHUNK_BYTES
        assert peak - baseline < 20 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB while streaming"
    finally:
        await engine.remove_container(cid)
        remove_images(docker_host, [ref])


async def test_archive_of_a_missing_path_is_not_found(engine: DockerEngine, docker_host: str) -> None:
    ref = f"lifecycle-test-nopath-{os.urandom(4).hex()}:v1"
    import_image(docker_host, ref, [Entry("etc"), Entry("etc/x", b"x", mode=0o644)])
    cid = await engine.create_container(ref)
    try:
        with pytest.raises(EngineError) as info:
            async for _ in engine.archive(cid, "/usr/bin"):
                pass
        assert info.value.not_found
    finally:
        await engine.remove_container(cid)
        remove_images(docker_host, [ref])


async def test_leaving_an_archive_stream_early_lets_the_container_go(engine: DockerEngine, docker_host: str) -> None:
    ref = f"lifecycle-test-early-{os.urandom(4).hex()}:v1"
    import_image(docker_host, ref, [Entry("usr"), Entry("usr/bin"), Entry("usr/bin/big", size_bytes=30 << 20)])
    cid = await engine.create_container(ref)
    try:
        stream = engine.archive(cid, "/usr/bin")
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        # An unclosed stream keeps dockerd copying, and the removal would wait for it.
        async with asyncio.timeout(10):
            await engine.remove_container(cid)
        assert containers_from(docker_host, ref) == []
    finally:
        remove_images(docker_host, [ref])


def _delete_first_layer(registry: str, name: str, tag: str) -> None:
    """Through the registry API (delete is enabled): the manifest stays, its first layer blob is gone."""
    request = urllib.request.Request(f"http://{registry}/v2/{name}/manifests/{tag}",
                                     headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        layer = json.load(resp)["layers"][0]["digest"]
    delete = urllib.request.Request(f"http://{registry}/v2/{name}/blobs/{layer}", method="DELETE")
    with urllib.request.urlopen(delete, timeout=10) as resp:
        assert resp.status == 202


async def test_an_error_inside_the_200_pull_stream_raises(
    engine: DockerEngine, docker_host: str, registry: str
) -> None:
    """The registry loses a layer: dockerd answers 200 and reports the error as a message in the stream."""
    repo = f"{unique_repo(registry, 'blobgone')}/img"
    push_image(docker_host, f"{repo}:v1", [Entry("blob", os.urandom(100_000), mode=0o644)])
    _delete_first_layer(registry, repo.split("/", 1)[1], "v1")
    statuses: list[str] = []
    with pytest.raises(EngineError) as info:
        await engine.pull(f"{repo}:v1", on_progress=lambda p: statuses.append(p.status))
    assert "unknown blob" in info.value.message and not info.value.not_found
    assert "Pulling fs layer" in statuses, "the stream had started: this error came inside it"
    assert await engine.image_id(f"{repo}:v1") is None
