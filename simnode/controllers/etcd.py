"""`etcd` stand-in: creates its data directory (`--data-dir`, re-rooted, mode 0700, with `member/`) and
waits for SIGTERM. The API simulator keeps its own data under /var/lib/etcd; nothing listens here.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from simnode.controllers.common import FlagError, parse_flags, run_until_signal, setup_logging
from simnode.paths import NodeRootError, resolve_root

log = logging.getLogger("etcd")


def main(argv: list[str]) -> int:
    try:
        flags = parse_flags("etcd", argv)
        root = resolve_root()
    except (FlagError, NodeRootError) as exc:
        print(f"etcd: {exc}", file=sys.stderr)
        return 1
    setup_logging(flags)
    data_dir = root.path(flags.get("data-dir") or "/var/lib/etcd")
    try:
        (data_dir / "member").mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)
    except OSError as exc:
        print(f"etcd: cannot create data dir {data_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    log.info("etcd %s serving (simulated) with data dir %s", flags.get("name", "default"), root.real(data_dir))

    async def wait_forever() -> None:
        await asyncio.Event().wait()

    return run_until_signal(wait_forever)
