"""`lifecycle kubeconfig --merge`: put the fetched admin kubeconfig's cluster, user and context into the host's
kubeconfig. Leaves the merged file (mode 0600, replaced atomically) and `<file>.lifecycle-backup`, the previous
bytes. A file that is not a kubeconfig is refused and left as it was, with no backup.

The rules follow kubectl (kubernetes client-go, `tools/clientcmd`): the target file is `loader.go`
`GetDefaultFilename` (the first existing file of `$KUBECONFIG`, else its first one, else `~/.kube/config`), an empty
file is an empty config (`loader.go` `Load`), names in `clusters`/`users`/`contexts` are unique
(`api/v1/conversion.go`), and a writer holds `<file>.lock`, created exclusively (`loader.go` `lockFile`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lifecycle import yamlsafe
from lifecycle.atomicfile import replace_file

BACKUP_SUFFIX = ".lifecycle-backup"  # one backup, the bytes before the last merge
SECTIONS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))


class KubeconfigMergeError(Exception):
    """The target is not a kubeconfig, or the fetched one lacks what the merge needs; nothing was written."""


@dataclass(frozen=True)
class MergeResult:
    text: str
    context: str
    replaced: tuple[str, ...]  # "cluster docker-desktop", ... for entries that existed before
    switched: bool  # current-context was set to `context`
    backup: Path | None = None  # where the previous bytes went (None: there was no file)


def default_target(environ: Mapping[str, str], *, home: Path) -> Path:
    """Where kubectl writes a new entry: client-go loader.go `GetDefaultFilename`."""
    paths = [Path(p) for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    for path in paths:
        if path.exists():
            return path
    return paths[0] if paths else home / ".kube" / "config"


def _load(text: str, *, what: str) -> dict[str, Any]:
    """A kubeconfig document as a dict, checked the way client-go decodes one; KubeconfigMergeError naming why not."""
    try:
        doc = yamlsafe.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise KubeconfigMergeError(f"{what} is not YAML{where}") from None
    if doc is None:
        return {}  # loader.go: an empty file is an empty config
    if not isinstance(doc, dict):
        raise KubeconfigMergeError(f"{what} is not a kubeconfig: a YAML {type(doc).__name__}, not a mapping")
    # kubectl writes kind/apiVersion but reads files without them; present, they must be these.
    if doc.get("kind", "Config") != "Config":
        raise KubeconfigMergeError(f"{what} is not a kubeconfig: kind is {doc.get('kind')!r}, not 'Config'")
    if doc.get("apiVersion", "v1") != "v1":
        raise KubeconfigMergeError(f"{what} is not a kubeconfig: apiVersion is {doc.get('apiVersion')!r}, not 'v1'")
    current = doc.get("current-context")
    if current is not None and not isinstance(current, str):
        raise KubeconfigMergeError(f"{what} is not a kubeconfig: current-context is not a string")
    for section, body in SECTIONS:
        entries = doc.get(section)
        if entries is None:
            continue  # kubectl writes `clusters: null` for none
        if not isinstance(entries, list):
            raise KubeconfigMergeError(f"{what} is not a kubeconfig: {section} is not a list")
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise KubeconfigMergeError(f"{what} is not a kubeconfig: {section}[{i}] is not a mapping with a name")
            if not isinstance(entry.get(body, {}), dict):
                raise KubeconfigMergeError(f"{what} is not a kubeconfig: {section}[{i}].{body} is not a mapping")
            if entry["name"] in seen:  # api/v1/conversion.go: "duplicate name ... in list"
                raise KubeconfigMergeError(f"{what} is not a kubeconfig: {section} has {entry['name']!r} twice")
            seen.add(entry["name"])
    return doc


def _named(doc: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if entry["name"] == name:
            return dict(entry)
    raise KubeconfigMergeError(f"the fetched kubeconfig has no {section} entry named {name!r}")


def merge_kubeconfig(existing: str, fetched: str, *, use: bool) -> MergeResult:
    """`existing` with the fetched config's current context, and the cluster and user it names, added or replaced.

    Every other entry and top-level key (preferences, extensions, unknown ones) is kept, in its order.
    current-context is switched with `use`, or when `existing` has none: a file without a current context is
    one nothing uses yet, and then the new context is what `kubectl` should talk to. YAML comments are not kept
    (kubectl drops them too)."""
    doc = _load(existing, what="the target file")
    new = _load(fetched, what="the fetched kubeconfig")
    context_name = new.get("current-context")
    if not context_name:
        raise KubeconfigMergeError("the fetched kubeconfig has no current-context")
    context = _named(new, "contexts", context_name)
    refs = context.get("context") or {}
    wanted = {"contexts": context, "clusters": _named(new, "clusters", str(refs.get("cluster"))),
              "users": _named(new, "users", str(refs.get("user")))}
    replaced: list[str] = []
    doc.setdefault("apiVersion", "v1")
    doc.setdefault("kind", "Config")
    for section, body in SECTIONS:
        entries = list(doc.get(section) or [])
        entry = wanted[section]
        at = next((i for i, e in enumerate(entries) if e["name"] == entry["name"]), None)
        if at is None:
            entries.append(entry)
        else:
            entries[at] = entry  # ours: replaced whole, as the service issued it
            replaced.append(f"{body} {entry['name']}")
        doc[section] = entries
    switched = use or not doc.get("current-context")
    if switched:
        doc["current-context"] = context_name
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return MergeResult(text=text, context=context_name, replaced=tuple(replaced), switched=switched)


def merge_into_file(path: Path, fetched: str, *, use: bool) -> MergeResult:
    """Merge into `path` (created with its directory, 0700, if missing); KubeconfigMergeError or OSError if not."""
    if path.is_symlink():
        path = path.resolve()  # replace the file the link points at, keep the link
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    try:
        lock_fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise KubeconfigMergeError(f"{lock} exists: another kubectl or lifecycle is writing {path} "
                                   "(remove the lock if no one is)") from None
    try:
        os.close(lock_fd)
        try:
            before: bytes | None = path.read_bytes()
        except FileNotFoundError:
            before = None
        try:
            existing = (before or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise KubeconfigMergeError("the target file is not a kubeconfig: not UTF-8 text") from None
        result = merge_kubeconfig(existing, fetched, use=use)  # refuses before anything is written
        backup = None
        if before is not None:
            backup = path.with_name(path.name + BACKUP_SUFFIX)
            _write_atomically(backup, before)
        _write_atomically(path, result.text.encode())
        return replace(result, backup=backup)
    finally:
        lock.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    """`replace_file` (mode 0600), then an fsync of the directory, so the rename itself survives a crash."""
    replace_file(path, data)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
