"""Shared helpers for the benchmarks: timing, medians, peak memory from /proc, child runs, and the printed table.
Writes nothing to disk; the benchmarks print their figures on stdout."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "  # marks the one line a child prints for its parent


@dataclass(frozen=True)
class Row:
    label: str
    cells: tuple[str, ...]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any], *, runs: int) -> list[float]:
    """Wall seconds of `runs` calls of `fn`."""
    out: list[float] = []
    for _ in range(runs):
        start_s = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start_s)
    return out


def proc_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmHWM: peak resident set, VmRSS: current), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def machine_note() -> str:
    """CPU count and load, printed with every table: the figures depend on what else runs."""
    load_1m, load_5m, _ = os.getloadavg()
    python = sys.version.split()[0]
    return f"{os.cpu_count()} CPUs, load average {load_1m:.2f} (1 min) {load_5m:.2f} (5 min), Python {python}"


def run_child(argv: Sequence[str], *, timeout_s: float) -> dict[str, Any]:
    """Run a benchmark child (a fresh process, so its peak memory is its own) and return its result line."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    if not isinstance(result, dict):
        raise TypeError(f"{' '.join(argv)}: the result line is not a JSON object")
    return result


def print_result(result: dict[str, Any]) -> None:
    """What a child prints for `run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Row]) -> None:
    widths = [max(len(headers[0]), *(len(r.label) for r in rows))]
    for i, header in enumerate(headers[1:]):
        widths.append(max(len(header), *(len(r.cells[i]) for r in rows)))
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [row.label.ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row.cells, widths[1:], strict=True)]
        print("  ".join(cells))


def ratio_line(what: str, *, baseline: float, ours: float, higher_is_better: bool = False) -> str:
    """`what: 6.1x faster than the baseline` style line; ratio = baseline/ours (or ours/baseline)."""
    ratio = ours / baseline if higher_is_better else baseline / ours
    return f"ratio  {what}: {ratio:.2f}x (baseline {baseline:.4g}, ours {ours:.4g})"


def mb(size_bytes: float) -> str:
    return f"{size_bytes / 1e6:.1f} MB"
