"""bench_requests: CPU time of refusing hostile requests (issue 8, defects 10, 11, 14), in-process, no broker.

Measures `parse_request` then, for `pki`, the bundle's shape check (`parse_bundle`, where PEM blocks are found),
per request: a garbage bundle of 15 x 16 KiB files repeating `-----BEGIN A-----` (goal: under 50 ms of CPU),
JSON nested 10000 deep, an integer of 5000 digits. Baseline for the bundle: the regex the PEM scan used before
(a lazy `BEGIN ... END \\1` that rescans to the end at every BEGIN), on the same files.
Run: `.venv/bin/python bench/bench_requests.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from typing import Any

from benchlib import Row, machine_note, median, print_table, ratio_line

from lifecycle.pki_bundle import KNOWN_FILES, parse_bundle, pem_blocks
from lifecycle.protocol import BadRequestError, parse_request

OLD_PEM_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
GOAL_CPU_S = 0.050


def garbage_pki(file_bytes: int = 16 * 1024) -> dict[str, str]:
    line = "-----BEGIN A-----\n"
    return {name: (line * (file_bytes // len(line) + 1))[:file_bytes] for name in KNOWN_FILES[:15]}


def cpu_s(fn: Callable[[], Any], *, runs: int) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        start_s = time.process_time()
        fn()
        out.append(time.process_time() - start_s)
    return out


def refuse(payload: bytes) -> None:
    try:
        request = parse_request(payload)
    except BadRequestError:
        return
    if request.pki is not None:
        _, problems = parse_bundle(request.pki)
        assert problems, "the garbage bundle must be refused"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    pki = garbage_pki()
    requests = {
        "garbage pki 15 x 16 KiB": json.dumps({"id": "p", "action": "install", "pki": pki}).encode(),
        "nested 10000 deep": b"[" * 10000,
        "integer of 5000 digits": b'{"id": "i", "action": "status", "n": ' + b"7" * 5000 + b"}",
    }
    rows = []
    figures: dict[str, float] = {}
    for label, payload in requests.items():
        figures[label] = median(cpu_s(lambda payload=payload: refuse(payload), runs=args.runs))
        rows.append(Row(label, (f"{len(payload) / 1024:.0f} KiB", f"{figures[label] * 1000:.2f} ms")))
    ours = median(cpu_s(lambda: [pem_blocks(text) for text in pki.values()], runs=args.runs))
    old = median(cpu_s(lambda: [list(OLD_PEM_BLOCK_RE.finditer(text)) for text in pki.values()], runs=1))
    rows.append(Row("PEM scan only, ours", ("240 KiB", f"{ours * 1000:.2f} ms")))
    rows.append(Row("PEM scan only, old regex", ("240 KiB", f"{old * 1000:.2f} ms")))
    print(machine_note())
    print_table("CPU per refused request (median)", ("request", "size", "CPU"), rows)
    print(ratio_line("PEM scan of the garbage bundle, old regex / ours", baseline=old, ours=ours))
    verdict = "meets" if figures["garbage pki 15 x 16 KiB"] < GOAL_CPU_S else "MISSES"
    print(f"goal   garbage pki request under {GOAL_CPU_S * 1000:.0f} ms of CPU: {verdict}")


if __name__ == "__main__":
    main()
