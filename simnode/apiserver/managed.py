"""Field ownership: `metadata.managedFields` (FieldsV1) for updates, and server-side apply with conflicts.

A field path is a tuple of FieldsV1 elements: `f:spec`, `k:{"name":"nginx"}` (list item by key),
`v:"x"` (set member). A set of paths encodes to the FieldsV1 trie; `.` marks a list item itself.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from simnode.apiserver.errors import ApiError
from simnode.apiserver.schema import ListSpec, item_key, list_spec

Path = tuple[str, ...]
_MISSING = object()
# Fields the server owns or that identify the object: never part of a field set.
_TOP_EXCLUDED = {"apiVersion", "kind"}
_META_EXCLUDED = {
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "managedFields", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds",
}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_element(key: tuple[tuple[str, Any], ...]) -> str:
    return "k:" + json.dumps(dict(sorted(key)), separators=(",", ":"))


def _names(path: Path) -> tuple[str, ...]:
    return tuple(e[2:] for e in path if e.startswith("f:"))


def _walk(value: Any, path: Path, out: set[Path]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _walk(v, (*path, "f:" + k), out)
        return
    spec = list_spec(_names(path))
    if isinstance(value, list) and value and spec.kind == "map":
        keys = [item_key(spec, item) for item in value]
        if all(keys) and len(set(keys)) == len(keys):
            for item, key in zip(value, keys, strict=True):
                assert key is not None
                item_path = (*path, _key_element(key))
                out.add(item_path)
                for k, v in item.items():
                    _walk(v, (*item_path, "f:" + k), out)
            return
    if isinstance(value, list) and value and spec.kind == "set":
        for x in value:
            out.add((*path, "v:" + json.dumps(x, separators=(",", ":"))))
        return
    out.add(path)


def scoped(obj: Any, subresource: str) -> dict[str, Any]:
    """The part of an object a writer of `subresource` ("" or "status") can own."""
    if not isinstance(obj, dict):
        return {}
    if subresource == "status":
        return {"status": obj["status"]} if isinstance(obj.get("status"), dict) else {}
    out = {k: v for k, v in obj.items() if k not in _TOP_EXCLUDED and k != "status"}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        out["metadata"] = {k: v for k, v in meta.items() if k not in _META_EXCLUDED}
    return out


def fieldset(obj: Any, subresource: str = "") -> set[Path]:
    out: set[Path] = set()
    for k, v in scoped(obj, subresource).items():
        _walk(v, ("f:" + k,), out)
    return out


def encode(paths: set[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for p in paths:
        node = root
        for elem in p:
            node = node.setdefault(elem, {})
        node.setdefault(".", None)
    return _finish(root)


def _finish(node: dict[str, Any]) -> dict[str, Any]:
    children = {k: _finish(v) for k, v in node.items() if k != "."}
    if "." in node and children:
        return {".": {}, **dict(sorted(children.items()))}
    return dict(sorted(children.items()))


def decode(trie: Any, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not isinstance(trie, dict):
        return out
    for k, v in trie.items():
        if k == ".":
            continue
        p = (*prefix, k)
        if not v or "." in v:
            out.add(p)
        out |= decode(v, p)
    return out


def value_at(obj: Any, path: Path) -> Any:
    """The value at a field path, or _MISSING."""
    cur = obj
    names: tuple[str, ...] = ()
    for elem in path:
        if elem.startswith("f:"):
            if not isinstance(cur, dict) or elem[2:] not in cur:
                return _MISSING
            cur = cur[elem[2:]]
            names = (*names, elem[2:])
        elif isinstance(cur, list):
            idx = _find_item(cur, list_spec(names), elem)
            if idx is None:
                return _MISSING
            cur = cur[idx]
        else:
            return _MISSING
    return cur


def _find_item(items: list[Any], spec: ListSpec, elem: str) -> int | None:
    for i, item in enumerate(items):
        if elem.startswith("k:"):
            key = item_key(spec, item)
            if key is not None and _key_element(key) == elem:
                return i
        elif elem.startswith("v:") and "v:" + json.dumps(item, separators=(",", ":")) == elem:
            return i
    return None


def remove_path(obj: Any, path: Path) -> None:
    parent = value_at(obj, path[:-1]) if len(path) > 1 else obj
    last = path[-1]
    if last.startswith("f:") and isinstance(parent, dict):
        parent.pop(last[2:], None)
    elif isinstance(parent, list):
        idx = _find_item(parent, list_spec(_names(path[:-1])), last)
        if idx is not None:
            parent.pop(idx)


def path_string(path: Path) -> str:
    out = ""
    for elem in path:
        if elem.startswith("f:"):
            out += "." + elem[2:]
        elif elem.startswith("k:"):
            key = json.loads(elem[2:])
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in key.items()) + "]"
        else:
            out += "[=" + elem[2:] + "]"
    return out


@dataclass
class Manager:
    name: str
    operation: str  # "Apply" or "Update"
    subresource: str
    api_version: str
    time: str
    fields: set[Path] = field(default_factory=set)

    def same(self, name: str, operation: str, subresource: str) -> bool:
        return (self.name, self.operation, self.subresource) == (name, operation, subresource)

    def entry(self) -> dict[str, Any]:
        e: dict[str, Any] = {
            "manager": self.name,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode(self.fields),
        }
        if self.subresource:
            e["subresource"] = self.subresource
        return e


def load_managers(obj: Any) -> list[Manager]:
    entries = (obj or {}).get("metadata", {}).get("managedFields") or []
    out = []
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("manager", ""), str):
            out.append(
                Manager(
                    e.get("manager", ""), e.get("operation", "Update"), e.get("subresource", ""),
                    e.get("apiVersion", ""), e.get("time", ""), decode(e.get("fieldsV1")),
                )
            )
    return out


def store_managers(obj: dict[str, Any], managers: list[Manager]) -> None:
    entries = [m.entry() for m in managers if m.fields]
    if entries:
        obj["metadata"]["managedFields"] = entries
    else:
        obj["metadata"].pop("managedFields", None)


def _mine(managers: list[Manager], name: str, op: str, sub: str, api_version: str) -> Manager:
    for m in managers:
        if m.same(name, op, sub):
            return m
    m = Manager(name, op, sub, api_version, now_rfc3339())
    managers.append(m)
    return m


def record_update(
    old: dict[str, Any] | None, new: dict[str, Any], manager: str, subresource: str, api_version: str
) -> None:
    """Give `manager` the fields this non-apply write set or changed; others lose them (no conflicts)."""
    managers = load_managers(old) if old is not None else []
    old_set = fieldset(old, subresource) if old is not None else set()
    new_set = fieldset(new, subresource)
    changed = {p for p in new_set if p not in old_set or value_at(old, p) != value_at(new, p)}
    removed = old_set - new_set
    if changed or removed:
        for m in managers:
            if not m.same(manager, "Update", subresource):
                m.fields -= changed | removed
        mine = _mine(managers, manager, "Update", subresource, api_version)
        mine.fields = (mine.fields | changed) - removed
        mine.time = now_rfc3339()
        mine.api_version = api_version
    store_managers(new, managers)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _merge(live: Any, cfg: Any, names: tuple[str, ...]) -> Any:
    if isinstance(live, dict) and isinstance(cfg, dict):
        out = dict(live)
        for k, v in cfg.items():
            out[k] = _merge(live[k], v, (*names, k)) if k in live else copy.deepcopy(v)
        return out
    spec = list_spec(names)
    if isinstance(live, list) and isinstance(cfg, list) and spec.kind != "atomic":
        out_list = copy.deepcopy(live)
        for item in cfg:
            if spec.kind == "set":
                if item not in out_list:
                    out_list.append(copy.deepcopy(item))
                continue
            key = item_key(spec, item)
            idx = next((i for i, x in enumerate(out_list) if key and item_key(spec, x) == key), None)
            if idx is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[idx] = _merge(out_list[idx], item, names)
        return out_list
    return copy.deepcopy(cfg)


def _conflict_error(conflicts: dict[str, list[Path]], api_version: str) -> ApiError:
    count = sum(len(v) for v in conflicts.values())
    lines, causes = [], []
    for name, paths in conflicts.items():
        shown = sorted(path_string(p) for p in paths)
        who = f'conflict with "{name}" using {api_version}'
        if count == 1:
            lines.append(f"{who}: {shown[0]}")
        else:
            lines.append(f'conflicts with "{name}" using {api_version}:\n' + "\n".join(f"- {s}" for s in shown))
        causes += [{"reason": "FieldManagerConflict", "message": who, "field": s} for s in shown]
    noun = "conflict" if count == 1 else "conflicts"
    message = f"Apply failed with {count} {noun}: " + "\n".join(lines)
    return ApiError(409, "Conflict", message, details={"causes": causes})


def apply(
    live: dict[str, Any] | None,
    cfg: dict[str, Any],
    *,
    manager: str,
    force: bool,
    subresource: str,
    api_version: str,
) -> dict[str, Any]:
    """Merge an applied configuration into the live object (or {}), tracking ownership.

    Raises a 409 naming field and manager when another manager owns a field with a different value,
    unless `force`. Fields this manager applied before and no longer applies are removed when no one
    else owns them.
    """
    cfg = _drop_nulls(cfg)
    part = scoped(cfg, subresource)
    applied = fieldset(cfg, subresource)
    managers = load_managers(live)
    mine = _mine(managers, manager, "Apply", subresource, api_version)
    conflicts: dict[str, list[Path]] = {}
    for m in managers:
        if m is mine:
            continue
        for p in applied & m.fields:
            have, want = value_at(live, p), value_at(cfg, p)
            if have is not _MISSING and have != want and not p[-1].startswith(("k:", "v:")):
                conflicts.setdefault(m.name, []).append(p)
    if conflicts and not force:
        raise _conflict_error(conflicts, api_version)
    for m in managers:
        if m is not mine:
            m.fields -= {p for paths in conflicts.values() for p in paths}

    if subresource != "status":
        part["metadata"] = {**part.get("metadata", {}), **{
            k: v for k, v in cfg.get("metadata", {}).items() if k in ("name", "namespace")
        }}
    merged = _merge(live if live is not None else {}, part, ())
    others: set[Path] = set().union(*(m.fields for m in managers if m is not mine))
    for p in sorted(mine.fields - applied, key=len, reverse=True):
        if any(o[: len(p)] == p for o in others):
            continue
        remove_path(merged, p)
    mine.fields = applied
    mine.time = now_rfc3339()
    mine.api_version = api_version
    store_managers(merged, managers)
    return dict(merged)
