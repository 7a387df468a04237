"""diagnose: what a bug report needs, as one `.tar.gz`, for the `diagnose` request (read-only, any state).

Holds the service's recent log lines (kept in memory: the service logs to stderr or the journal), the kubelet log
tail, the status with the last step error (kubeadm's output tail), the saved state and the last events, the config,
`docker info`, versions, node/pod status and cluster events (when the API answers), disk and memory. Every part
goes through `redact` (PEM private keys, bootstrap tokens, JWTs, password/token fields) before it is packed, a
JSON one as data (`redact_json`: it stays JSON); key files are never read. The bundle travels in numbered
chunks with the sha256 of the whole (`chunk`, `reassemble`). Writes nothing on the node.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lifecycle import __version__
from lifecycle.bus import Subscription
from lifecycle.config import Config
from lifecycle.paths import HostPaths
from lifecycle.ports import Ports
from lifecycle.protocol import Event, Reply, Request, Status, scrub

# Raw bytes per reply message: base64 makes 4/3 of it, so a message stays under 256 KiB with its JSON around it.
CHUNK_BYTES = 190 * 1024
DIAGNOSE_EXPIRY_S = 60  # MQTT 5 message expiry of each chunk, as for the kubeconfig reply: nobody waits longer
KUBELET_LOG_TAIL_BYTES = 512 * 1024  # over kubelet.log.1 and kubelet.log together
STATE_FILE_MAX_BYTES = 1024 * 1024
ENGINE_TIMEOUT_S = 10.0
API_TIMEOUT_S = 15.0
KEPT_EVENTS = 300
REDACTED = "[redacted]"

# kubeadm: cmd/kubeadm/app/apis/bootstraptoken/v1/utils.go, BootstrapTokenPattern `\A([a-z0-9]{6})\.([a-z0-9]{16})\z`
_BOOTSTRAP_TOKEN_RE = re.compile(r"(?<![a-z0-9])[a-z0-9]{6}\.[a-z0-9]{16}(?![a-z0-9])")
# A JWT (service-account tokens): base64url header, payload, signature; a header always starts `{"` -> `eyJ`.
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*")
# A field whose name says it is secret (JSON, YAML, env, --flag=value), its value up to a delimiter; the key may be
# quoted, also as escaped JSON inside JSON (a log line quoting a document). The pattern starts with the secret word
# itself (what comes before it in the name stays as it is): a leading `[\w.-]*` would backtrack over every long
# word of a log, and a regex holds the GIL, so a slow one stalls the service's loop even from a thread.
_SECRET_WORDS = r"password|passwd|token|secret|key[-_]data"  # in a name, what marks its value as secret
_SECRET_FIELD_RE = re.compile(
    rf"""(?i)((?:{_SECRET_WORDS})[A-Za-z0-9_.-]{{0,64}}(?:\\?["'])?[ \t]*[:=][ \t]*)"""
    r"""(\\?"(?:[^"\\\n]|\\.){0,4096}?\\?"|'[^'\n]{0,4096}'|[^\s,}\]]{1,4096})"""
)


def _field(match: re.Match[str]) -> str:
    value = match.group(2)
    quote = '\\"' if value.startswith('\\"') else '"' if value.startswith('"') else ""
    return f"{match.group(1)}{quote}{REDACTED}{quote}"


def _redact_line(line: str) -> str:
    # The field first: kubeadm's "Using token: <token>" would otherwise become "token: [redacted]" and then have
    # the field's value, "[redacted", redacted again ("[redacted]]").
    line = _SECRET_FIELD_RE.sub(_field, line)
    line = _JWT_RE.sub(REDACTED, line)
    return _BOOTSTRAP_TOKEN_RE.sub(REDACTED, line)


def redact(text: str) -> str:
    """`text` without PEM private keys, bootstrap tokens, JWTs or the values of password/token/secret fields.

    Line by line after the PEM blocks are gone: a regex call holds the GIL, and many short calls let the event
    loop run between them while this works in a thread."""
    return "\n".join(_redact_line(line) for line in scrub(text).split("\n"))


_SECRET_NAME_RE = re.compile(f"(?i){_SECRET_WORDS}")  # a JSON member's key that names a secret


def redact_json(value: Any) -> Any:
    """JSON data without secrets, still JSON: the value of a key that names a secret is replaced (null, booleans
    and "" kept: they say there is none; objects and arrays searched), every string redacted as text (`redact`).
    Text redaction of a JSON document's text cannot keep it JSON: an unquoted value (`"password_file": null`)
    became `[redacted]`, and a field inside a string (kubeadm's "Using token: ...") lost its closing quote."""
    if isinstance(value, dict):
        return {key: REDACTED if _SECRET_NAME_RE.search(str(key)) and _holds_a_value(item) else redact_json(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value


def _holds_a_value(item: Any) -> bool:
    return isinstance(item, int | float | str) and not isinstance(item, bool) and item != ""


def _redacted_member(name: str, text: str) -> str:
    """A member as it goes into the bundle: a JSON one redacted as data (it stays JSON), any other as text."""
    if name.endswith(".json"):
        try:
            return _json(redact_json(json.loads(text)))
        except ValueError:  # a state file that is not JSON (torn, or not ours): as text
            pass
    return redact(text)


# ---- chunks ---------------------------------------------------------------------------------------------


def chunk(bundle: bytes, *, chunk_bytes: int = CHUNK_BYTES) -> tuple[dict[str, Any], ...]:
    """The bundle as reply chunks: {index, count, total_bytes, sha256 (of the whole), data (base64)}."""
    digest = hashlib.sha256(bundle).hexdigest()
    count = max(1, -(-len(bundle) // chunk_bytes))
    return tuple({"index": i, "count": count, "total_bytes": len(bundle), "sha256": digest,
                  "data": base64.b64encode(bundle[i * chunk_bytes:(i + 1) * chunk_bytes]).decode("ascii")}
                 for i in range(count))


def reassemble(chunks: Iterable[Mapping[str, Any]]) -> bytes:
    """The bundle from its chunks (any order); ValueError when one is missing, doubled or the checksum differs."""
    by_index: dict[int, Mapping[str, Any]] = {}
    for part in chunks:
        index = part.get("index")
        if not isinstance(index, int) or index in by_index:
            raise ValueError(f"chunk index {index!r} is invalid or repeated")
        by_index[index] = part
    if not by_index:
        raise ValueError("no chunk")
    first = next(iter(by_index.values()))
    count, total, digest = first.get("count"), first.get("total_bytes"), first.get("sha256")
    if any((p.get("count"), p.get("total_bytes"), p.get("sha256")) != (count, total, digest)
           for p in by_index.values()):
        raise ValueError("chunks disagree on count, size or checksum: they are of different bundles")
    if not isinstance(count, int) or sorted(by_index) != list(range(count)):
        raise ValueError(f"got chunks {sorted(by_index)} of {count}")
    bundle = b"".join(base64.b64decode(str(by_index[i].get("data", "")), validate=True) for i in range(count))
    if len(bundle) != total or hashlib.sha256(bundle).hexdigest() != digest:
        raise ValueError(f"the reassembled bundle ({len(bundle)} bytes) does not match its sha256 {digest}")
    return bundle


def missing_chunks(chunks: Mapping[int, Mapping[str, Any]]) -> int:
    """How many chunks are still to come (-1 before the first)."""
    if not chunks:
        return -1
    count = next(iter(chunks.values())).get("count")
    return (count - len(chunks)) if isinstance(count, int) else -1


# ---- the last events ------------------------------------------------------------------------------------


class RecentEvents:
    """The last events the bus carried (status and exposures left out), for the bundle."""

    def __init__(self, subscription: Subscription, *, keep: int = KEPT_EVENTS) -> None:
        self._sub = subscription
        self.events: deque[Event] = deque(maxlen=keep)

    async def run(self) -> None:
        while True:
            await self._sub.wait()
            while len(self._sub):
                item = self._sub.pop()
                if isinstance(item, Event):
                    self.events.append(item)


# ---- collection -----------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n"


def config_json(config: Config) -> dict[str, Any]:
    """The config as data, the MQTT password replaced (file paths stay paths: their content is never read)."""
    raw: dict[str, Any] = dataclasses.asdict(config)
    if raw["mqtt"].get("password") is not None:
        raw["mqtt"]["password"] = REDACTED
    return raw


def _tail(paths: Sequence[Path], limit_bytes: int) -> tuple[str, list[str]]:
    """The last `limit_bytes` of the concatenation of `paths` (oldest first) and the names found."""
    pieces: list[bytes] = []
    found: list[str] = []
    left = limit_bytes
    for path in reversed(paths):  # newest first, until the budget is spent
        if left <= 0:
            break
        try:
            with path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - left))
                data = file.read(left)
        except FileNotFoundError:
            continue
        pieces.insert(0, data)
        found.insert(0, path.name)
        left -= len(data)
    return b"".join(pieces).decode("utf-8", errors="replace"), found


def _host_parts(paths: HostPaths, parts: dict[str, str], notes: list[str]) -> None:
    """The files of the node (run in a thread): kubelet log tail, saved state, disk and memory."""
    log_dir = paths.log_dir
    rotated = sorted(log_dir.glob("kubelet.log.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    kubelet_logs = [*rotated, log_dir / "kubelet.log"]  # oldest first: .2, .1, then the live file
    text, found = _tail(kubelet_logs, KUBELET_LOG_TAIL_BYTES)
    parts["kubelet.log"] = text
    notes.append(f"kubelet.log: last {len(text.encode())} bytes of {', '.join(found) or 'no kubelet log'} "
                 f"under {log_dir}")
    state_dir = paths.state_dir
    for path in sorted(state_dir.rglob("*")) if state_dir.is_dir() else []:
        rel = path.relative_to(state_dir)
        if not path.is_file() or path.suffix not in (".json", ".yaml", ".yml", ".txt", ".log"):
            continue
        if path.stat().st_size > STATE_FILE_MAX_BYTES:
            notes.append(f"state/{rel}: left out, larger than {STATE_FILE_MAX_BYTES} bytes")
            continue
        parts[f"state/{rel}"] = path.read_text(encoding="utf-8", errors="replace")
    host: dict[str, Any] = {}
    try:
        fs = os.statvfs(paths.root)
        host["disk"] = {"path": str(paths.root), "total_bytes": fs.f_blocks * fs.f_frsize,
                        "free_bytes": fs.f_bavail * fs.f_frsize, "files_free": fs.f_favail}
    except OSError as exc:
        host["disk"] = {"error": str(exc)}
    try:
        host["meminfo"] = paths.under("/proc/meminfo").read_text(errors="replace")
    except OSError as exc:
        host["meminfo"] = f"unreadable: {exc}"
    parts["host.json"] = _json(host)


async def _engine_part(ports: Ports, parts: dict[str, str], notes: list[str]) -> None:
    try:
        async with asyncio.timeout(ENGINE_TIMEOUT_S):
            parts["docker-info.json"] = _json(await ports.docker.info())
    except Exception as exc:  # whatever the engine does, the rest of the bundle is still wanted
        notes.append(f"docker-info.json: skipped, the engine did not answer: {type(exc).__name__}: {exc}")


async def _cluster_parts(config: Config, paths: HostPaths, ports: Ports, parts: dict[str, str],
                         notes: list[str]) -> None:
    if not paths.admin_conf.is_file():
        notes.append("cluster/: skipped, there is no admin kubeconfig (no cluster installed)")
        return
    try:
        async with asyncio.timeout(API_TIMEOUT_S), ports.kube.connect(paths.admin_conf) as api:
            node = await api.get("v1", "Node", config.node_name, None)
            parts["cluster/node.json"] = _json(node.get("status") if node else f"no node {config.node_name}")
            pods = await api.list_pods("kube-system")
            parts["cluster/pods-kube-system.json"] = _json([
                {"name": (p.get("metadata") or {}).get("name"), "status": p.get("status")} for p in pods])
            events = await api.list_events()
            events.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
            parts["cluster/events.json"] = _json(events[-200:])
    except Exception as exc:  # an API that does not answer is a finding, not a reason to send nothing
        notes.append(f"cluster/: incomplete, the API did not answer: {type(exc).__name__}: {exc}")


def _tar_gz(parts: Mapping[str, str], *, prefix: str, mtime: float) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in parts.items():
            data = _redacted_member(name, text).encode("utf-8")
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(mtime)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def collect(*, config: Config, paths: HostPaths, ports: Ports, status: Status, events: Iterable[Event],
                  log_lines: Iterable[str], source: str) -> bytes:
    """The bundle (`.tar.gz` bytes): every member redacted; MANIFEST.json says what was left out and why."""
    now = time.time()
    notes: list[str] = ["service.log: the last lines the service logged (kept in memory since its start; "
                        "the full log is on its stderr / in the journal)"]
    parts: dict[str, str] = {
        "status.json": _json(status.to_json()),  # the last step error: its command and output tail (kubeadm's)
        "events.json": _json([e.to_cloudevent(source) for e in events]),
        "config.json": _json(config_json(config)),
        "versions.json": _json({"lifecycle": __version__, "python": sys.version, "platform": platform.platform(),
                                "kubernetes_version": status.kubernetes_version}),
        "service.log": "\n".join(log_lines) + "\n",
    }
    await asyncio.to_thread(_host_parts, paths, parts, notes)
    await _engine_part(ports, parts, notes)
    await _cluster_parts(config, paths, ports, parts, notes)
    parts["MANIFEST.json"] = _json({"node": config.node_name, "created_s": now, "members": sorted(parts),
                                    "notes": notes})
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return await asyncio.to_thread(_tar_gz, parts, prefix=f"diagnose-{config.node_name}-{stamp}", mtime=now)


async def diagnose_reply(request: Request, *, config: Config, paths: HostPaths, ports: Ports, status: Status,
                         events: Iterable[Event], log_lines: Iterable[str], source: str) -> Reply:
    bundle = await collect(config=config, paths=paths, ports=ports, status=status, events=list(events),
                           log_lines=list(log_lines), source=source)
    chunks = await asyncio.to_thread(chunk, bundle)
    return Reply(id=request.id, ok=True, state=status.state, request_id=status.request_id,
                 note=f"diagnostics bundle: {len(bundle)} bytes in {len(chunks)} chunk(s)",
                 chunks=chunks, message_expiry_s=DIAGNOSE_EXPIRY_S)
