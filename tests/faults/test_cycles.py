"""Five install→reset cycles against one `lifecycle serve` process: its descriptors and threads do not grow after
the first cycle, every reset ends `idle` with nothing of the node left running. The figures are printed
(`pytest -s` shows them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from faultlib import Node, _wait_state, make_node, payload, processes_under, wait_until

__all__ = ["make_node"]  # the fixture, used by name

CYCLES = 5
SETTLE_S = 20  # aiohttp keeps an idle connection (to the Docker Engine for one) open for 15 s


def _figures(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    children = sum(1 for entry in Path("/proc").iterdir() if entry.name.isdigit() and _parent(entry) == pid)
    return {"fds": len(list(Path(f"/proc/{pid}/fd").iterdir())), "threads": int(status["Threads"]),
            "children": children, "rss_kib": int(status["VmRSS"].split()[0])}


def _parent(entry: Path) -> int:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _settled(pid: int, *, fds_at_most: int | None, threads_at_most: int | None) -> dict[str, int]:
    """The figures once idle connections and worker threads have gone, waiting up to SETTLE_S for the counts to
    fall to the bounds (as tests/e2e/test_kube_credentials.py does for descriptors)."""
    deadline = time.monotonic() + SETTLE_S
    figures = _figures(pid)
    while time.monotonic() < deadline and (
        (fds_at_most is not None and figures["fds"] > fds_at_most)
        or (threads_at_most is not None and figures["threads"] > threads_at_most)
    ):
        time.sleep(0.2)
        figures = _figures(pid)
    return figures


def test_install_reset_cycles_leak_no_descriptor_thread_or_process(make_node: Callable[..., Node]) -> None:
    node = make_node()
    node.start_service()
    assert node.service is not None
    pid = node.service.pid
    events = node.subscribe("events")
    rows: list[dict[str, int]] = []
    for cycle in range(1, CYCLES + 1):
        install = f"install-{cycle}"
        assert payload(node.request({"id": install, "action": "install"}, correlation=install))["ok"] is True
        last = _wait_state(events, "running", timeout_s=180, request_id=install)
        assert last["data"]["to"] == "running", node.log_path.read_text()[-3000:]

        reset = f"reset-{cycle}"
        assert payload(node.request({"id": reset, "action": "reset"}, correlation=reset))["ok"] is True
        idle = _wait_state(events, "idle", timeout_s=120, request_id=reset)
        assert idle["data"]["to"] == "idle", node.log_path.read_text()[-3000:]
        wait_until(lambda: not processes_under(node.root), timeout_s=10,
                   what=f"processes left under the root after reset {cycle}: {processes_under(node.root)}")

        first = rows[0] if rows else None
        rows.append(_settled(pid, fds_at_most=first and first["fds"], threads_at_most=first and first["threads"]))
        print(f"after reset {cycle}: {rows[-1]}")

    assert all(row["fds"] <= rows[0]["fds"] for row in rows[1:]), rows
    assert all(row["threads"] <= rows[0]["threads"] for row in rows[1:]), rows
    assert all(row["children"] == 0 for row in rows), rows
