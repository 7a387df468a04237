"""The Kubernetes client is imported once, in a thread: a second caller that comes while the import runs (the
boot's preload, then the readiness step's first connect) waits for it off the loop instead of going on with a
half-imported package, whose `from kubernetes_asyncio import client` would then wait on the event loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from lifecycle.adapters.kube import KubernetesApiFactory

    async def main() -> None:
        factory = KubernetesApiFactory()
        first = asyncio.create_task(factory.preload())
        while "kubernetes_asyncio.client" not in sys.modules:  # the first import has begun
            await asyncio.sleep(0.001)
        await factory.preload()
        whole = "kubernetes_asyncio.watch" in sys.modules and hasattr(sys.modules["kubernetes_asyncio.client"],
                                                                      "V1Pod")
        print("whole" if whole else "half")
        await first

    asyncio.run(main())
""")


def test_a_second_preload_returns_only_once_the_first_import_is_whole() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "whole", done.stderr
