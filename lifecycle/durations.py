"""How long each install step took on its last successful runs, so the engine can say "readiness: 48 s, usually
21 s". Leaves `<state dir>/durations.json` ({"format": 1, "steps": {step: [seconds, ...]}}, newest last), replaced
atomically after each recorded run; a file that cannot be read or validated is logged and ignored (history only).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from lifecycle.logging import get_logger

FORMAT_VERSION = 1
KEEP_RUNS = 10  # the median of the last ten runs follows a changed machine or registry within a few installs
SLOW_FACTOR = 2.0  # a step is slow once it took this many times its usual duration ...
SLOW_MIN_S = 10.0  # ... and at least this long: a step that usually takes 0.2 s is not "slow" at 0.5 s
_MAX_DURATION_S = 7 * 86400.0  # longer than any step deadline: such a number in the file is not a run's


class StepDurations:
    """The last `keep` successful durations per step, saved in `path`."""

    def __init__(self, path: Path, *, keep: int = KEEP_RUNS, slow_factor: float = SLOW_FACTOR,
                 slow_min_s: float = SLOW_MIN_S) -> None:
        self._path = path
        self._keep = keep
        self._slow_factor = slow_factor
        self._slow_min_s = slow_min_s
        self._log = get_logger("lifecycle.durations")
        self._runs: dict[str, list[float]] = self._load()

    def runs(self, step: str) -> list[float]:
        return list(self._runs.get(step, ()))

    def usual_s(self, step: str) -> float | None:
        """The median of the step's recorded runs; None before its first."""
        runs = self._runs.get(step)
        return round(statistics.median(runs), 1) if runs else None

    def all_usual_s(self) -> dict[str, float]:
        return {step: usual for step in self._runs if (usual := self.usual_s(step)) is not None}

    def slow_after_s(self, step: str) -> float | None:
        """How long the step may run before it counts as slow; None without history (nothing to compare with)."""
        runs = self._runs.get(step)
        return max(self._slow_factor * statistics.median(runs), self._slow_min_s) if runs else None

    def record(self, step: str, duration_s: float) -> None:
        """Add one successful run and save. A write that fails is logged: losing history never fails a step."""
        runs = [*self._runs.get(step, ()), round(max(0.0, duration_s), 3)][-self._keep:]
        self._runs[step] = runs
        try:
            self._save()
        except OSError as exc:
            self._log.warning("cannot save step durations", path=str(self._path), error=str(exc))

    def _save(self) -> None:
        # No fsync: a few hundred bytes of statistics, not worth a ~20 ms stall of the loop; the rename keeps a
        # crash from leaving half a file, and a power loss at worst leaves one that `_load` ignores.
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "steps": self._runs}, sort_keys=True))
        tmp.replace(self._path)

    def _load(self) -> dict[str, list[float]]:
        try:
            raw = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._log.warning("step durations unreadable; starting without history", path=str(self._path),
                              error=str(exc))
            return {}
        try:
            return self._validated(raw)
        except (TypeError, ValueError) as exc:
            self._log.warning("step durations invalid; starting without history", path=str(self._path),
                              error=str(exc))
            return {}

    def _validated(self, raw: Any) -> dict[str, list[float]]:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"expected an object with format {FORMAT_VERSION}")
        steps = raw.get("steps")
        if not isinstance(steps, dict):
            raise TypeError("'steps' must be an object")
        out: dict[str, list[float]] = {}
        for step, runs in steps.items():
            if not isinstance(runs, list) or not all(_is_duration(value) for value in runs):
                raise ValueError(f"{step!r}: expected a list of durations in seconds")
            if runs:
                out[str(step)] = [float(value) for value in runs][-self._keep:]
        return out


def _is_duration(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= _MAX_DURATION_S)
