"""Kubeconfig documents for the `kubeconfig --merge` tests, and `kubectl config view` as the independent reader."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def kubeconfig(name: str, *, server: str, current: bool = True, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": name, "user": {"token": f"token-{name}"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        **top,
    }
    if current:
        doc["current-context"] = name
    return doc


def two_contexts() -> dict[str, Any]:
    """A user's file: two other clusters, preferences, an extension and a key nobody knows."""
    a, b = kubeconfig("prod", server="https://prod:6443"), kubeconfig("kind-dev", server="https://127.0.0.1:40000")
    return {**a, "clusters": a["clusters"] + b["clusters"], "users": a["users"] + b["users"],
            "contexts": a["contexts"] + b["contexts"], "preferences": {"colors": True},
            "extensions": [{"name": "x", "extension": {"k": "v"}}], "x-unknown": [1, 2]}


def kubectl_view(path: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(["kubectl", "--kubeconfig", str(path), "config", "view", "-o", "json", *extra],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    view: dict[str, Any] = json.loads(proc.stdout)
    return view


def names(doc: dict[str, Any], section: str) -> list[str]:
    return [e["name"] for e in doc.get(section) or []]
