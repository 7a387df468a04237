"""bench_binaries: copying the executables out of the binaries image, at realistic size.

Measures wall time and peak memory growth (VmHWM after minus VmHWM before, each run in a fresh child process)
of copying kubeadm, kubelet, kubectl, crictl (/usr/bin) and /pad (150 MB, what real binaries weigh) out of
the simulated binaries image of v1.31.4 under `127.0.0.1:5000/bench/` (built at pad scale 1.0 first if needed).
Baseline: aiodocker's `get_archive` (buffers the whole tar; dockerd gzips it, aiohttp inflates it) + tarfile
`extractall`, then sha256 and fsync per file. Ours: the binaries step itself (`states.binaries.Binaries.run`:
archive streamed with `Accept-Encoding: identity` into `lifecycle.tarstream`, checked, hashed, fsynced).
Run: `.venv/bin/python bench/bench_binaries.py [--runs N]`. Leaves the image; temp dirs are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from benchlib import (
    REPO_ROOT,
    Row,
    machine_note,
    mb,
    median,
    print_result,
    print_table,
    proc_status_bytes,
    ratio_line,
    run_child,
)

from simnode.versions import BINARIES_IMAGE, binaries_image

NAMESPACE = "bench"
VERSION = "v1.31.4"
IMAGE = binaries_image(f"127.0.0.1:5000/{NAMESPACE}", VERSION)
TOOLS = ("kubeadm", "kubelet", "kubectl", "crictl")
SOURCES = (*(f"/usr/bin/{t}" for t in TOOLS), "/pad")  # as the step's `kubernetes.binaries`: one archive each
DEFAULT_DOCKER_HOST = "unix:///tmp/lifecycle-services/docker/docker.sock"
VARIANTS = ("baseline", "ours")
CHILD_TIMEOUT_S = 120.0


# ---- the two variants, each run in a child process --------------------------------------------------------


async def copy_ours(docker_host: str, dest: Path) -> dict[str, str]:
    """The binaries step's own `run`, with a real StepContext over the real Docker Engine adapter."""
    import structlog

    from lifecycle.adapters.docker import DockerEngine
    from lifecycle.config import Config, KubernetesConfig
    from lifecycle.paths import HostPaths
    from lifecycle.ports import Ports
    from lifecycle.step import ClusterParams, StepContext
    from states.binaries import RECORD_NAME, Binaries

    def progress(message: str, *, current: float | None = None, total: float | None = None,
                 unit: str | None = None) -> None:
        return None

    config = Config(node_name="bench", root=dest, kubernetes=KubernetesConfig(binaries_image=IMAGE, binaries=SOURCES))
    engine = DockerEngine(docker_host)
    unused = cast(Any, None)
    ctx = StepContext(
        config=config, paths=HostPaths(dest), cluster=ClusterParams(VERSION, api_port=0, kubelet_healthz_port=0),
        ports=Ports(docker=engine, commands=unused, kubelet=unused, kube=unused), request_id="bench",
        deadline=asyncio.get_running_loop().time() + CHILD_TIMEOUT_S, log=structlog.get_logger("bench"),
        progress=progress,
    )
    try:
        await Binaries().run(ctx)
    finally:
        await engine.close()
    record = json.loads((ctx.paths.state_dir / RECORD_NAME).read_text())  # what the step recorded it installed
    return {name: str(entry["sha256"]) for name, entry in record["files"].items()}


async def copy_baseline(docker_host: str, dest: Path) -> dict[str, str]:
    """The obvious aiodocker code: get_archive per file, extractall, then hash and fsync what was written."""
    import aiodocker

    docker = aiodocker.Docker(url=docker_host)
    try:
        container = await docker.containers.create({"Image": IMAGE, "Cmd": ["/never-started"]})
        try:
            for path in SOURCES:
                archive = await container.get_archive(path)
                target_dir = dest / path.lstrip("/").rpartition("/")[0]
                target_dir.mkdir(parents=True, exist_ok=True)
                with archive:
                    await asyncio.to_thread(archive.extractall, target_dir, filter="data")
        finally:
            await container.delete(force=True)
    finally:
        await docker.close()
    files = {path: dest / path.lstrip("/") for path in SOURCES}
    return await asyncio.to_thread(_hash_and_sync, files)


def _hash_and_sync(files: dict[str, Path]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for name, path in files.items():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            os.fsync(f.fileno())  # the step fsyncs what it installs: same durability on both sides
        hashes[name] = digest.hexdigest()
    return hashes


def child(variant: str, docker_host: str) -> int:
    # Imports and the loop are set up before the first reading: only the copy itself counts.
    import aiodocker  # noqa: F401

    import lifecycle.adapters.docker  # noqa: F401
    import states.binaries  # noqa: F401

    copy = copy_ours if variant == "ours" else copy_baseline
    with tempfile.TemporaryDirectory(prefix=f"bench-binaries-{variant}-") as tmp:
        hwm_before = proc_status_bytes("VmHWM")
        start_s = time.perf_counter()
        hashes = asyncio.run(copy(docker_host, Path(tmp)))
        wall_s = time.perf_counter() - start_s
        hwm_after = proc_status_bytes("VmHWM")
        size_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file() and p.suffix != ".json")
    print_result({"variant": variant, "wall_s": wall_s, "peak_growth_bytes": hwm_after - hwm_before,
                  "peak_bytes": hwm_after, "size_bytes": size_bytes, "sha256": hashes})
    return 0


# ---- the parent: image, runs, table -----------------------------------------------------------------------


def ensure_image(docker_host: str) -> None:
    """Build and push the bench image at realistic size unless it is up to date (seconds when it is)."""
    argv = [sys.executable, "-m", "simnode.images", "--only", BINARIES_IMAGE, "--pad-scale", "1.0",
            "--namespace", NAMESPACE, "--versions", VERSION, "--docker-host", docker_host]
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench_binaries: building {IMAGE} failed: {proc.stderr.strip()[-2000:]}")


def measure(docker_host: str, runs: int) -> dict[str, list[dict[str, Any]]]:
    def one(variant: str) -> dict[str, Any]:
        argv = [sys.executable, __file__, "--child", variant, "--docker-host", docker_host]
        return run_child(argv, timeout_s=CHILD_TIMEOUT_S)

    one("ours")  # not counted: warms the page cache over the image's layer files for both variants
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(runs):
        for variant in VARIANTS:
            results[variant].append(one(variant))
    return results


def report(results: dict[str, list[dict[str, Any]]], runs: int) -> None:
    base, ours = results["baseline"], results["ours"]
    if any(r["sha256"] != base[0]["sha256"] for r in base + ours):
        raise SystemExit("bench_binaries: the variants copied different bytes")
    size_bytes = base[0]["size_bytes"]
    rows = []
    for label, rs in (("baseline: get_archive + extractall", base), ("ours: streamed, identity, tarstream", ours)):
        wall_s = median([r["wall_s"] for r in rs])
        rows.append(Row(label, (
            f"{wall_s:.2f}", f"{min(r['wall_s'] for r in rs):.2f}", f"{size_bytes / wall_s / 1e6:.0f}",
            mb(median([r["peak_growth_bytes"] for r in rs])), mb(median([r["peak_bytes"] for r in rs])),
        )))
    print_table(
        f"binaries: copy {len(SOURCES)} files ({mb(size_bytes)}) out of {IMAGE}; median of {runs} runs",
        ("variant", "wall s", "min s", "MB/s", "peak RSS growth", "peak RSS"), rows,
    )
    print(ratio_line("wall time, baseline/ours (>1: ours faster)",
                     baseline=median([r["wall_s"] for r in base]), ours=median([r["wall_s"] for r in ours])))
    print(ratio_line("peak RSS growth, baseline/ours (>1: ours leaner)",
                     baseline=median([r["peak_growth_bytes"] for r in base]),
                     ours=max(1.0, median([r["peak_growth_bytes"] for r in ours]))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measured runs per variant (after one warm-up copy)")
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST", DEFAULT_DOCKER_HOST))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.docker_host)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print(f"bench_binaries on {machine_note()}")
    ensure_image(args.docker_host)
    report(measure(args.docker_host, args.runs), args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
