"""The tiny HTTP server image for tests (`<repo>/simnode/http-echo:1`): a real program, run by the simulated
kubelet from its image in the Docker Engine, that answers every request with its pod's name.

The image is the host's own Python interpreter (`/usr/bin/python3`, with the shared libraries `ldd` names and
only the standard-library modules the server imports) plus `/app/server.py`; no base image is needed, so it
builds offline. The server listens on `$PORT` (default 8080) on every address and answers `GET` with
`$POD_NAME` (the downward API, when the pod sets it) or the hostname, and a newline.
"""

from __future__ import annotations

import ast
import functools
import subprocess
from pathlib import Path

PYTHON = Path("/usr/bin/python3")
SERVER = b'''import os, socket
port = int(os.environ.get("PORT", "8080"))
name = os.environ.get("POD_NAME") or socket.gethostname()
body = (name + "\\n").encode()
head = b"HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(64)
print("http-echo: serving %s on port %d" % (name, port), flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(5)
        try:
            conn.recv(65536)
            conn.sendall(head + body)
        except OSError:
            pass
'''
# What the server imports (and the interpreter needs at start-up with -S): their files are copied.
IMPORTS = "import os, socket, encodings.utf_8, encodings.latin_1, encodings.ascii"


class ImageToolError(Exception):
    """The host lacks what the image is made of."""


@functools.cache
def http_echo_tree() -> tuple[dict[str, bytes], dict[str, bytes], tuple[str, ...]]:
    """(executables, plain files, command) of the image, read from this host."""
    if not PYTHON.exists():
        raise ImageToolError(f"{PYTHON} is missing: the http-echo test image is built from the host's Python")
    exe = PYTHON.resolve()
    probe = f"import sys; {IMPORTS}; print(repr([m.__file__ for m in list(sys.modules.values()) " \
            f"if getattr(m, '__file__', None)]))"
    out = subprocess.run([str(exe), "-S", "-c", probe], capture_output=True, text=True, check=True)
    files = {str(exe).lstrip("/"): exe.read_bytes()}
    plain = {f.lstrip("/"): Path(f).read_bytes() for f in ast.literal_eval(out.stdout.splitlines()[-1])}
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts and parts[0].startswith("/") else ""
        if lib.startswith("/"):
            # Both the name the binary asks for (often under /lib64 or /lib) and the resolved file.
            files[lib.lstrip("/")] = Path(lib).resolve().read_bytes()
    plain["app/server.py"] = SERVER
    plain[f"usr/lib/{exe.name}/lib-dynload/.keep"] = b""  # else Python warns it lacks <exec_prefix>
    return files, plain, (str(exe), "-S", "-u", "/app/server.py")
