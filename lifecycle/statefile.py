"""The node's saved state, `<state dir>/state.json` (read and written by lifecycle.store), holding one of the
graph's states: opened by the service, and first by `lifecycle serve` itself to decide whether a boot starts the
kubelet before anything else (lifecycle.__main__)."""

from __future__ import annotations

from lifecycle.machine import State
from lifecycle.paths import HostPaths
from lifecycle.store import Store


def state_file(paths: HostPaths) -> Store:
    return Store(paths.state_dir / "state.json", known_states={s.value for s in State})
