"""The images step against the real Docker Engine and registry: pulls what is missing (several at once, with byte
progress), skips what matches the registry digest, re-pulls a moved tag, trusts local copies offline, and fails
permanently for a missing image."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port
from stepkit import (
    VERSION,
    Entry,
    docker,
    make_config,
    make_ctx,
    push_image,
    remove_images,
    rootfs_tar,
    unique_repo,
    with_k8s,
)

from lifecycle.adapters.docker import DockerEngine
from lifecycle.config import Config
from lifecycle.errors import PermanentError, TemporaryError
from lifecycle.ports import PullProgress
from lifecycle.step import BootCheck
from simnode.hostile import Member, Registry, Variant, build_variant
from states.images import EVIDENCE_NAME, Images, wanted_images


class CountingEngine(DockerEngine):
    """The real adapter, counting pulls and how many run at the same time."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.pulled: list[str] = []
        self.running = 0
        self.max_running = 0

    async def pull(self, ref: str, *, on_progress: Callable[[PullProgress], None]) -> str:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(0.2)  # make overlap observable even for tiny images
            return await super().pull(ref, on_progress=on_progress)
        finally:
            self.running -= 1
            self.pulled.append(ref)


@pytest.fixture(scope="module")
def registry_images(docker_host: str, registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    """A config whose ten images (binaries, seven components, two addons) are in the registry and local.

    Every test leaves them so: local and equal to the registry's.
    """
    repo = unique_repo(registry, "images")
    config = make_config(tmp_path_factory.mktemp("root"), docker_host=docker_host, repo=repo)
    refs = _refs(config)

    def publish(ref: str) -> None:  # distinct content per image: no layer is shared, every pull downloads
        push_image(docker_host, ref, [Entry("pad", os.urandom(200_000), mode=0o644)], keep_local=True)

    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(publish, refs))
    yield config
    remove_images(docker_host, refs)


@pytest.fixture
def published(registry_images: Config, docker_host: str) -> Config:
    """The registry images, none of them in the local engine."""
    remove_images(docker_host, _refs(registry_images))
    return registry_images


def _refs(config: Config) -> list[str]:
    k8s = config.kubernetes
    addons = config.addons.images(k8s.image_repository).values()
    return list(dict.fromkeys([k8s.binaries_image_for(VERSION), *k8s.images_for(VERSION).values(), *addons,
                               *k8s.addon_images]))


async def test_pulls_every_missing_image_concurrently_with_byte_progress(published: Config, docker_host: str) -> None:
    engine = CountingEngine(docker_host)
    ctx, progress = make_ctx(published, docker=engine)
    step = Images()
    try:
        refs = wanted_images(ctx)
        assert len(refs) == 10
        assert not await step.is_done(ctx)
        await step.run(ctx)

        assert sorted(engine.pulled) == sorted(refs)
        assert 1 < engine.max_running <= published.docker.pull_concurrency
        for ref in refs:
            lines = [c for c in progress.calls if c["message"] == f"pulling {ref}"]
            assert lines and all(c["unit"] == "bytes" for c in lines)
            assert lines[-1]["current"] == lines[-1]["total"] >= 200_000, f"final line of {ref}"
        assert await step.is_done(ctx)
    finally:
        await engine.close()


async def test_images_with_the_registry_digest_are_skipped(registry_images: Config, docker_host: str) -> None:
    engine = CountingEngine(docker_host)
    ctx, progress = make_ctx(registry_images, docker=engine)
    try:
        assert await Images().is_done(ctx)
        await Images().run(ctx)

        assert engine.pulled == []
        skipped = [m for m in progress.messages() if m.startswith("skipped ")]
        assert len(skipped) == 10
        assert all("registry's digest" in m for m in skipped)
    finally:
        await engine.close()


class NoRegistryEngine(DockerEngine):
    """The real adapter, refusing to ask the registry anything."""

    async def registry_digest(self, ref: str) -> str | None:
        raise AssertionError(f"the registry was asked about {ref}")


async def test_boot_evidence_is_the_local_image_ids_and_never_asks_the_registry(
    registry_images: Config, docker_host: str,
) -> None:
    """Issue 10 part 3: at boot each image is looked up in the engine by the id recorded when the step last held."""
    engine = NoRegistryEngine(docker_host)
    ctx, _ = make_ctx(registry_images, docker=engine)
    step = Images()
    try:
        assert await step.boot_check(ctx) == BootCheck.UNKNOWN  # nothing recorded: the full check decides
        await step.record_boot_evidence(ctx)  # the engine does this each time the full check holds
        assert await step.boot_check(ctx) == BootCheck.HOLDS
        evidence = ctx.paths.state_dir / EVIDENCE_NAME
        recorded = json.loads(evidence.read_text())
        recorded["images"][wanted_images(ctx)[2]] = "sha256:" + "0" * 64  # the engine holds another image now
        evidence.write_text(json.dumps(recorded))
        assert await step.boot_check(ctx) == BootCheck.UNKNOWN
    finally:
        await engine.close()


async def test_a_tag_moved_in_the_registry_is_pulled_again(registry_images: Config, docker_host: str) -> None:
    engine = CountingEngine(docker_host)
    ctx, _ = make_ctx(registry_images, docker=engine)
    moved = registry_images.kubernetes.images_for(VERSION)["etcd"]
    old_id = await engine.image_id(moved)
    try:
        assert old_id
        # Publish new content under the same tag, then point the local tag back at the old image.
        push_image(docker_host, moved, [Entry("pad", os.urandom(1000), mode=0o644)], keep_local=True)
        new_id = await engine.image_id(moved)
        docker(docker_host, "tag", old_id, moved)

        assert not await Images().is_done(ctx)
        await Images().run(ctx)

        assert engine.pulled == [moved]
        assert await engine.image_id(moved) == new_id
        assert await Images().is_done(ctx)
    finally:
        await engine.close()
        remove_images(docker_host, [old_id] if old_id else [])  # untagged by the pull


async def test_offline_registry_keeps_local_copies(docker_host: str, tmp_path: Path) -> None:
    repo = f"127.0.0.1:{free_port()}/lifecycle-test-offline"  # nothing listens there
    config = make_config(tmp_path, docker_host=docker_host, repo=repo)
    engine = CountingEngine(docker_host)
    ctx, progress = make_ctx(config, docker=engine)
    refs = wanted_images(ctx)
    source = f"lifecycle-test-offline-src-{os.urandom(4).hex()}:v1"
    docker(docker_host, "import", "-", source, stdin=_tiny_tar())
    for ref in refs:
        docker(docker_host, "tag", source, ref)
    try:
        assert await Images().is_done(ctx)
        await Images().run(ctx)
        assert engine.pulled == []
        assert all("registry not reachable" in m for m in progress.messages())
        docker(docker_host, "rmi", refs[0])
        assert not await Images().is_done(ctx)
        with pytest.raises(TemporaryError) as info:
            await Images().run(ctx)
        assert info.value.code == "pull_failed"
        assert refs[0] in info.value.message
    finally:
        await engine.close()
        remove_images(docker_host, [source, *refs])


async def test_missing_image_fails_permanently_naming_it(registry_images: Config, docker_host: str) -> None:
    repo = registry_images.kubernetes.image_repository
    config = with_k8s(registry_images, addon_images=(*registry_images.kubernetes.addon_images, f"{repo}/absent:v9"))
    engine = DockerEngine(docker_host)
    ctx, _ = make_ctx(config, docker=engine)
    try:
        with pytest.raises(PermanentError) as info:
            await Images().run(ctx)
        assert info.value.code == "image_not_found"
        assert f"{repo}/absent:v9" in info.value.message
    finally:
        await engine.close()


async def test_an_engine_that_does_not_answer_is_engine_unavailable_naming_its_socket(tmp_path: Path) -> None:
    """Issue 8 defect 8: not the registry's fault, so not `pull_failed`."""
    host = f"unix://{tmp_path}/no-docker.sock"  # nothing there: the engine is down
    config = make_config(tmp_path, docker_host=host, repo="127.0.0.1:5000/lifecycle-test-no-engine")
    engine = DockerEngine(host)
    ctx, _ = make_ctx(config, docker=engine)
    try:
        with pytest.raises(TemporaryError) as info:
            await Images().run(ctx)
        assert info.value.code == "engine_unavailable"
        assert host in info.value.message and info.value.details["docker_host"] == host
    finally:
        await engine.close()


def _tiny_tar() -> bytes:
    return rootfs_tar([Entry("marker", b"offline", mode=0o644)])


async def test_a_layer_the_engine_refuses_is_bad_image_and_not_retried(
    registry_images: Config, docker_host: str, registry: str
) -> None:
    """Issue 8, hostile images: a layer holding one name twice (a symlink, then a file) is refused by the engine at
    pull; that was `pull_failed`, retried, though pulling again gets the same bytes."""
    base = registry_images.kubernetes.images_for(VERSION)["pause"]
    ref = f"{registry_images.kubernetes.image_repository}/duplicate:v1"
    layer = (Member("kubelet", "symlink", link="/etc/hostname"), Member("kubelet", data=b"hostile"))
    build_variant(Registry(registry), base, ref, Variant("duplicate", (layer,), "images", "bad_image", "", ""))
    config = with_k8s(registry_images, addon_images=(*registry_images.kubernetes.addon_images, ref))
    engine = DockerEngine(docker_host)
    ctx, _ = make_ctx(config, docker=engine)
    try:
        with pytest.raises(PermanentError) as info:
            await Images().run(ctx)
        assert info.value.code == "bad_image"
        assert ref in info.value.message and "duplicates of file paths not supported" in info.value.message
    finally:
        await engine.close()
        remove_images(docker_host, [ref])
