"""PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch."""

from __future__ import annotations

import copy
from typing import Any

from simnode.apiserver.errors import ApiError, bad_request
from simnode.apiserver.schema import list_spec

_DELETE = object()  # a map patched with {"$patch": "delete"}


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# -- JSON patch --


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise bad_request(f"invalid JSON pointer {path!r}")
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit():
        raise _unprocessable(f"invalid array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not for_add):
        raise _unprocessable(f"array index {i} out of bounds")
    return i


def _unprocessable(message: str) -> ApiError:
    return ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {message}")


def _parent(doc: Any, tokens: list[str]) -> Any:
    cur = doc
    for t in tokens[:-1]:
        if isinstance(cur, dict) and t in cur:
            cur = cur[t]
        elif isinstance(cur, list):
            cur = cur[_index(cur, t, for_add=False)]
        else:
            raise _unprocessable(f"path /{'/'.join(tokens)}: {t!r} not found")
    return cur


def _get(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        return doc
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _unprocessable(f"path /{'/'.join(tokens)} not found")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_add=False)]
    raise _unprocessable(f"path /{'/'.join(tokens)} not found")


def _remove(doc: Any, tokens: list[str]) -> Any:
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, for_add=False))
    raise _unprocessable(f"unable to remove nonexistent key: /{'/'.join(tokens)}")


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise _unprocessable(f"cannot add at /{'/'.join(tokens)}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise bad_request("json patch: expected a JSON array of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op:
            raise bad_request(f"json patch: invalid operation {op!r}")
        kind, tokens = op["op"], _pointer(op.get("path"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise bad_request(f"json patch: operation {kind} needs a value")
        if kind == "add":
            doc = _add(doc, tokens, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, tokens)
        elif kind == "replace":
            _get(doc, tokens)  # must exist
            if tokens:
                _remove(doc, tokens)
            doc = _add(doc, tokens, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_get(doc, source))
            doc = _add(doc, tokens, value)
        elif kind == "test":
            if _get(doc, tokens) != op["value"]:
                raise _unprocessable(f"testing value /{'/'.join(tokens)} failed")
        else:
            raise bad_request(f"json patch: unknown operation {kind!r}")
    return doc


# -- strategic merge patch --


def _is_directive(key: str) -> bool:
    return key in ("$patch", "$retainKeys") or key.startswith(("$setElementOrder/", "$deleteFromPrimitiveList/"))


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not _is_directive(k) and v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "delete")]
    return copy.deepcopy(value)


def strategic_merge(orig: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip(patch)
    if directive == "delete":
        return _DELETE
    result: dict[str, Any] = copy.deepcopy(orig) if isinstance(orig, dict) else {}
    orders: dict[str, list[Any]] = {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/"):
            orders[k.split("/", 1)[1]] = v if isinstance(v, list) else []
        elif k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            drop = v if isinstance(v, list) else []
            result[field] = [x for x in result.get(field) or [] if x not in drop]
        elif k in ("$patch", "$retainKeys"):
            continue
        elif v is None:
            result.pop(k, None)
        elif isinstance(v, list):
            result[k] = _merge_list(result.get(k), v, (*path, k))
        else:
            merged = strategic_merge(result.get(k), v, (*path, k))
            if merged is _DELETE:
                result.pop(k, None)
            else:
                result[k] = merged
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    for field, order in orders.items():
        if isinstance(result.get(field), list):
            result[field] = _reorder(result[field], order, list_spec((*path, field)).smp_key)
    return result


def _reorder(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    def ident(x: Any) -> Any:
        return x.get(key) if key is not None and isinstance(x, dict) else x

    wanted = [ident(o) for o in order]
    ranked = [x for w in wanted for x in items if ident(x) == w]
    rest = [x for x in items if ident(x) not in wanted]
    return ranked + rest


def _merge_list(orig: Any, patch: list[Any], path: tuple[str, ...]) -> list[Any]:
    spec = list_spec(path)
    current = copy.deepcopy(orig) if isinstance(orig, list) else []
    if spec.kind == "set":
        return current + [copy.deepcopy(x) for x in patch if x not in current]
    key = spec.smp_key
    if key is None:
        return [_strip(x) for x in patch]
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return [_strip(x) for x in patch if not (isinstance(x, dict) and "$patch" in x)]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise bad_request(f"strategic merge patch: item of {'.'.join(path)} lacks its merge key {key!r}")
        matches = [i for i, x in enumerate(current) if isinstance(x, dict) and x.get(key) == item[key]]
        if item.get("$patch") == "delete":
            current = [x for i, x in enumerate(current) if i not in matches]
        elif matches:
            current[matches[0]] = strategic_merge(current[matches[0]], item, path)
        else:
            current.append(_strip(item))
    return current
