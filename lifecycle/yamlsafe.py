"""YAML read with libyaml's parser (PyYAML's `CSafeLoader`) where PyYAML was built with it, as the PyPI wheels
and Debian's python3-yaml are: the types of `yaml.safe_load`, the same `yaml.YAMLError`s, and about a tenth of
the CPU. The kubeconfigs and manifests are parsed in threads, and a thread running Python holds the GIL that
the event loop needs for every event it publishes (issue 11: a kubeconfig took ~4 ms of pure-Python parsing)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str | bytes) -> Any:
    """One YAML document, as `yaml.safe_load`."""
    return yaml.load(text, Loader=_LOADER)  # a safe loader: libyaml's, or PyYAML's own


def load_all(text: str | bytes) -> Iterator[Any]:
    """Every document, as `yaml.safe_load_all`."""
    return yaml.load_all(text, Loader=_LOADER)  # a safe loader: libyaml's, or PyYAML's own
