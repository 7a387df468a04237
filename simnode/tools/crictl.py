"""`crictl` stand-in: `--version`, `version` and `images`, answered from the Docker Engine on the runtime socket.

Writes nothing. The endpoint comes from `--runtime-endpoint`/`-r`, else $CONTAINER_RUNTIME_ENDPOINT, else
`runtime-endpoint` in the node's /etc/crictl.yaml, else $DOCKER_HOST when it is a unix socket.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from typing import Any

import yaml

from simnode.launch import build_version
from simnode.paths import NodeRootError, resolve_root

TIMEOUT_S = 10.0


class CrictlError(Exception):
    """A clear, user-facing failure."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_S)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_S)
        sock.connect(self._socket_path)
        self.sock = sock


def cri_version() -> str:
    """cri-tools releases follow the Kubernetes minor: v1.31.x ships crictl v1.31.0."""
    major, minor = build_version().lstrip("v").split(".")[:2]
    return f"v{major}.{minor}.0"


def engine_get(endpoint: str, path: str) -> Any:
    if not endpoint.startswith("unix://"):
        raise CrictlError(f"runtime endpoint {endpoint!r}: only unix:///path sockets are supported")
    socket_path = endpoint.removeprefix("unix://")
    conn = _UnixConnection(socket_path)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        raise CrictlError(f"cannot connect to the runtime at {endpoint}: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise CrictlError(f"runtime at {endpoint}: GET {path} answered {resp.status}: {body.decode(errors='replace')}")
    return json.loads(body)


def default_endpoint() -> str:
    env = os.environ.get("CONTAINER_RUNTIME_ENDPOINT")
    if env:
        return env
    try:
        config = resolve_root().path("/etc/crictl.yaml")
        if config.is_file():
            data = yaml.safe_load(config.read_text()) or {}
            if isinstance(data, dict) and data.get("runtime-endpoint"):
                return str(data["runtime-endpoint"])
    except (NodeRootError, yaml.YAMLError, OSError):
        pass  # no node root or no usable config: fall through to the engine of this shell
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host.startswith("unix://"):
        return docker_host
    raise CrictlError(
        "no runtime endpoint: pass --runtime-endpoint unix:///path/to.sock or set CONTAINER_RUNTIME_ENDPOINT"
    )


def human_size(size_bytes: float) -> str:
    """Like crictl (go-units HumanSize): decimal units, 4 significant digits."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while size_bytes >= 1000 and i < len(units) - 1:
        size_bytes /= 1000
        i += 1
    return f"{size_bytes:.4g}{units[i]}"


def image_rows(images: list[dict[str, Any]], ref_filter: str | None) -> list[tuple[str, str, str, str]]:
    rows = []
    for image in images:
        image_id = str(image.get("Id", "")).removeprefix("sha256:")[:13]
        size = human_size(float(image.get("Size", 0)))
        for repo_tag in image.get("RepoTags") or ["<none>:<none>"]:
            repo, _, tag = repo_tag.rpartition(":")
            if ref_filter and ref_filter not in (repo, repo_tag):
                continue
            rows.append((repo, tag, image_id, size))
    return sorted(rows)


def cmd_images(endpoint: str, args: list[str]) -> int:
    quiet = any(a in ("-q", "--quiet") for a in args)
    positional = [a for a in args if not a.startswith("-")]
    unknown = [a for a in args if a.startswith("-") and a not in ("-q", "--quiet")]
    if unknown or len(positional) > 1:
        raise CrictlError(f"images: unsupported arguments {unknown or positional[1:]}; use [-q] [REPOSITORY[:TAG]]")
    images = engine_get(endpoint, "/images/json")
    rows = image_rows(images, positional[0] if positional else None)
    if quiet:
        ids = {str(i["Id"]) for i in images for r in rows if str(i["Id"]).removeprefix("sha256:")[:13] == r[2]}
        print("\n".join(sorted(ids)))
        return 0
    table = [("IMAGE", "TAG", "IMAGE ID", "SIZE"), *rows]
    widths = [max(len(r[c]) for r in table) for c in range(3)]
    for r in table:
        print("   ".join(r[c].ljust(widths[c]) for c in range(3)) + "   " + r[3])
    return 0


def cmd_version(endpoint: str) -> int:
    engine = engine_get(endpoint, "/version")
    print(f"Version:  0.1.0\nRuntimeName:  docker\nRuntimeVersion:  {engine.get('Version', 'unknown')}")
    print(f"RuntimeApiVersion:  {engine.get('ApiVersion', 'unknown')}")
    return 0


def parse_global(argv: list[str]) -> tuple[str | None, list[str]]:
    endpoint, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-r", "--runtime-endpoint", "-i", "--image-endpoint") and i + 1 < len(argv):
            endpoint = endpoint if arg in ("-i", "--image-endpoint") and endpoint else argv[i + 1]
            i += 2
            continue
        if arg.startswith(("--runtime-endpoint=", "--image-endpoint=")):
            endpoint = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return endpoint, rest


def main(argv: list[str]) -> int:
    if argv[:1] in (["--version"], ["-v"]):
        print(f"crictl version {cri_version()}")
        return 0
    endpoint, rest = parse_global(argv)
    command, args = (rest[0], rest[1:]) if rest else ("", [])
    try:
        if command == "images" or command == "image":
            return cmd_images(endpoint or default_endpoint(), args)
        if command == "version":
            return cmd_version(endpoint or default_endpoint())
    except CrictlError as exc:
        print(f"crictl (simnode): {exc}", file=sys.stderr)
        return 1
    print(f"crictl (simnode): unsupported command {command!r}; supported: --version, version, images", file=sys.stderr)
    return 1
