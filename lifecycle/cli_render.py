"""How the `lifecycle` client commands print replies, events and failures: text for people, JSON lines for
scripts (`-o json`). Pull progress is one line per image, redrawn in place on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from lifecycle.config import STEP_NAMES

BAR_WIDTH = 24
MESSAGE_WIDTH = 56  # bars of one pull line up below each other (image references are mostly shorter)
_INSTALL_STATES = STEP_NAMES
_UPGRADE_STATES = ("upgrade_images", "upgrade_binaries", "upgrade_plan", "upgrade_apply", "upgrade_kubelet",
                   "upgrade_readiness")  # lifecycle.machine.UPGRADE_STATES (the CLI does not import the machine)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def progress_text(data: dict[str, Any]) -> str:
    message, current, total, unit = data.get("message", ""), data.get("current"), data.get("total"), data.get("unit")
    if unit == "bytes" and isinstance(current, int | float):
        if isinstance(total, int | float) and total > 0:
            share = min(1.0, current / total)
            filled = int(share * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            return f"{message:<{MESSAGE_WIDTH}} [{bar}] {share:4.0%} {_size(current)}/{_size(total)}"
        return f"{message} {_size(current)}"
    if isinstance(current, int | float) and isinstance(total, int | float):
        return f"{message} ({current:g}/{total:g})"
    return str(message)


class ProgressBoard:
    """Lines keyed by item; on a terminal an update rewrites its own line, otherwise it prints a new one."""

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self._stream = stream
        self._tty = tty
        self._keys: list[str] = []

    def reset(self) -> None:
        self._keys = []

    def update(self, key: str, text: str) -> None:
        if not self._tty or key not in self._keys:
            self._keys.append(key)
            self._stream.write(f"{text}\n")
        else:
            up = len(self._keys) - self._keys.index(key)
            self._stream.write(f"\x1b[{up}A\r\x1b[2K{text}\x1b[{up}B\r")
        self._stream.flush()


def exposure_text(kind: str, data: dict[str, Any]) -> str:
    """One line per `lifecycle.exposure.*` event (docs/protocol.md, exposures)."""
    what = f"{data.get('namespace')}/{data.get('service')} port {data.get('port')}/{data.get('protocol')}"
    conflict = data.get("conflict")
    if kind == "added":
        target = f"node {data.get('node_ip')}:{data.get('node_port')}"
        return f"  exposed {what} -> {target}" + (f" (not forwarded: {conflict})" if conflict else "")
    if kind == "removed":
        return f"  no longer exposed: {what}"
    if kind == "skipped":
        return f"  not exposed: {what}: {data.get('reason')}"
    return f"  conflict on {what}: {conflict}" if conflict else f"  conflict resolved: {what} is forwarded"


class Renderer:
    def __init__(self, *, json_output: bool, stream: TextIO, err: TextIO | None = None) -> None:
        self._json = json_output
        self._out = stream
        self._err = err or sys.stderr
        self._board = ProgressBoard(stream, tty=stream.isatty() and not json_output)
        self._last_error: dict[str, Any] | None = None
        self._started_s = time.monotonic()

    def _line(self, text: str) -> None:
        self._board.reset()
        self._out.write(f"{text}\n")
        self._out.flush()

    def error(self, text: str) -> None:
        self._err.write(f"lifecycle: {text}\n")
        self._err.flush()

    def reply(self, reply: dict[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(reply))
            return
        error = reply.get("error")
        if not reply.get("ok"):
            self.error(f"refused ({error.get('code') if error else '?'}): {error.get('message') if error else ''}")
            return
        if "status" in reply:
            self.status(reply["status"])
            return
        note = reply.get("note") or "accepted"
        self._line(f"{note}: request {reply.get('request_id')} (state {reply.get('state')})")

    def status(self, status: dict[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(status))
            return
        version = f" ({status['kubernetes_version']})" if status.get("kubernetes_version") else ""
        step = f" step {status['step']}/{status['steps']}" if status.get("step") else ""
        request = f", request {status['request_id']}" if status.get("request_id") else ""
        usual = status.get("usual_s") or {}
        state = status.get("state")
        usually = f", usually {usual[state]:g} s" if state in _INSTALL_STATES and state in usual else ""
        self._line(f"node {status.get('node')}: {state}{step}{version} since {status.get('since')}"
                   f"{usually}{request}")
        slow = status.get("slow")
        if slow:
            self._line(f"  slow: {slow.get('state')} had run {slow.get('elapsed_s', 0):.0f} s, usually "
                       f"{slow.get('usual_s', 0):g} s (median of its last {slow.get('runs')} runs)")
        if usual and state not in _INSTALL_STATES:
            listed = ", ".join(f"{name} {usual[name]:g} s" for name in _INSTALL_STATES if name in usual)
            self._line(f"  steps usually take: {listed}")
        if status.get("error"):
            self._print_error(status["error"])
        certs = status.get("certs")
        if certs:
            renew = f", renewed automatically from {certs['renew_at']}" if certs.get("renew_at") else ""
            self._line(f"  certificates: the first expires {certs.get('earliest_expiry')} ({certs.get('file')}){renew}")
        for item in status.get("config_drift") or []:
            self._line(f"  waits for a reset: {item.get('key')} = {json.dumps(item.get('configured'))} "
                       f"(the cluster runs on {json.dumps(item.get('installed'))})")

    def event(self, event: dict[str, Any]) -> None:
        if self._json:
            self._line(json.dumps(event))
            return
        kind, data = event.get("type"), event.get("data") or {}
        if kind == "lifecycle.state.changed":
            left, entered = data.get("from"), data.get("to")
            stepped = (*_INSTALL_STATES, *_UPGRADE_STATES)
            if left in stepped or left in ("resetting", "renewing"):
                self._line(f"  {left} took {data.get('duration_s', 0):.2f} s")
            step = f"[{data['step']}/{data['steps']}] " if data.get("step") and entered in stepped else ""
            self._line(f"{step}{entered}")
        elif kind == "lifecycle.step.progress":
            self._board.update(f"{data.get('state')}|{data.get('message')}", f"    {progress_text(data)}")
        elif kind == "lifecycle.step.retrying":
            err = data.get("error") or {}
            self._line(f"    retrying {data.get('state')} in {data.get('delay_s', 0):g} s "
                       f"(attempt {data.get('attempt')} of {1 + int(data.get('retries') or 0)}): {err.get('message')}")
        elif kind == "lifecycle.step.slow":
            self._line(f"    slower than usual: {data.get('message')}")
        elif kind == "lifecycle.step.failed":
            self._last_error = data.get("error")
        elif kind == "lifecycle.certs.expiring":
            days_left = float(data.get("days_left") or 0)
            self._line(f"  {data.get('file')} expires {data.get('not_after')} ({days_left:.2f} days left)")
        elif kind == "lifecycle.certs.renewed":
            self._line(f"  renewed {len(data.get('files') or [])} certificate and kubeconfig files")
        elif kind is not None and kind.startswith("lifecycle.exposure."):
            self._line(exposure_text(kind.rsplit(".", 1)[1], data))
        else:
            self._line(f"{kind}: {json.dumps(data)}")

    def done(self, goal: str) -> None:
        if not self._json:
            self._line(f"done: {goal} after {time.monotonic() - self._started_s:.1f} s")

    def failure(self, data: dict[str, Any]) -> None:
        """The watched job ended somewhere other than its goal; say why."""
        if self._json:
            return
        if data.get("to") == "failed" and self._last_error is not None:
            self.error(f"failed in {data.get('from')}")
            self._print_error(self._last_error, stream=self._err)
        elif data.get("to") == "resetting":
            self.error("the install was interrupted by a reset")
        elif data.get("from") == "renewing" and self._last_error is not None:
            self.error("the renewal failed before changing anything")
            self._print_error(self._last_error, stream=self._err)
        else:
            self.error(f"ended in state {data.get('to')}")

    def _print_error(self, error: dict[str, Any], *, stream: TextIO | None = None) -> None:
        out = stream or self._out
        out.write(f"  error {error.get('code')}: {error.get('message')}\n")
        tail = (error.get("details") or {}).get("output_tail") or []
        message = str(error.get("message") or "")
        if tail and not all(line in message for line in tail):  # CommandError messages already end with it
            out.write("  output:\n" + "".join(f"    {line}\n" for line in tail))
        out.flush()
