"""`systemctl` of the simulated machine: units under `<root>/{etc,run,lib,usr/lib}/systemd/system`, their state
under `<root>/run/simnode/systemd`. A root with this program at `<root>/usr/bin/systemctl` is a systemd host for
the simulated kubeadm (which looks `systemctl` up as real kubeadm does) and for the lifecycle service.

What it models, each after systemd's own behaviour (systemd/systemd src/systemctl/*, src/core/load-fragment.c):
unit files with drop-ins and `ExecStart=` resets, masking (a symlink to /dev/null), enable/disable through
`<target>.wants/` links, a daemon that keeps the definitions it loaded until `daemon-reload` (as real systemd
does: a changed file is not used by `restart` before a reload), and real processes for `ExecStart` commands whose
executable exists under the root (a second kubelet is a real second process). Exit codes and messages are
systemctl's: start/restart of a unit that does not exist exit 5, of a masked unit exit 1, `is-active` 3 when
not active, `status` 3 for an inactive unit and 4 for an unknown one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simnode.paths import NodeRoot, NodeRootError, resolve_root

# Unit search path in precedence order (systemd.unit(5), "System Unit Search Path"); Debian 12 ships
# packaged units in /lib/systemd/system (merged /usr: the same directory as /usr/lib/systemd/system).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
STATE_DIR = "/run/simnode/systemd"
LOG_DIR = "/var/log/simnode-systemd"
UNIT_ENV = "SIMNODE_UNIT"  # "<root>:<unit>": how a process started for a unit is recognised as ours
STOP_GRACE_S = 5.0
# Executables the simulated node stands in for elsewhere: cri-dockerd is modelled by the simulated kubelet's
# runtime (simnode/kubelet/sandbox.py reads the command line recorded here), so its unit runs no process.
SIMULATED_ELSEWHERE = ("/usr/bin/cri-dockerd",)
SYSTEMCTL_PATHS = ("/usr/bin/systemctl", "/bin/systemctl", "/usr/sbin/systemctl", "/sbin/systemctl")


class UnitError(Exception):
    """The unit cannot be loaded (systemd: "bad-setting")."""


@dataclass(frozen=True)
class Unit:
    """A loaded unit definition: what the daemon uses until the next daemon-reload."""

    name: str
    fragment: str  # real path of the unit file
    drop_ins: tuple[str, ...]
    description: str
    service_type: str
    exec_start: tuple[str, ...]  # raw command lines after resets (more than one is a load error for Type!=oneshot)
    environment: tuple[str, ...]  # raw Environment= values, in order
    environment_files: tuple[str, ...]
    wanted_by: tuple[str, ...]


def find_systemctl(root: NodeRoot) -> Path | None:
    """The machine's systemctl, as exec.LookPath("systemctl") would find it on a standard PATH."""
    for real in SYSTEMCTL_PATHS:
        path = root.path(real)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def unit_name(arg: str) -> str:
    return arg if "." in arg else f"{arg}.service"


def parse_unit_text(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; comments and backslash continuations as systemd reads them."""
    out: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            out.append((section, key.strip(), value.strip()))
    return out


def _is_masked(path: Path) -> bool:
    if path.is_symlink():
        return str(path.readlink()) == "/dev/null"
    return path.is_file() and path.stat().st_size == 0


def load_from_disk(root: NodeRoot, name: str) -> Unit | str | None:
    """The unit as its files say now: a Unit, "masked", or None when no file defines it."""
    for real in UNIT_DIRS[:2]:
        if _is_masked(root.path(f"{real}/{name}")):
            return "masked"
    fragment = next((f"{d}/{name}" for d in UNIT_DIRS if root.path(f"{d}/{name}").is_file()), None)
    if fragment is None:
        return None
    # Drop-ins: every <dir>/<name>.d/*.conf, a file name in a higher-precedence directory hiding the same name
    # below it, applied in file-name order (systemd.unit(5), "drop-in" directories).
    drop_ins: dict[str, str] = {}
    for directory in reversed(UNIT_DIRS):
        d = root.path(f"{directory}/{name}.d")
        if d.is_dir():
            for conf in d.glob("*.conf"):
                drop_ins[conf.name] = f"{directory}/{name}.d/{conf.name}"
    files = [fragment, *(drop_ins[k] for k in sorted(drop_ins))]
    description, service_type = name, "simple"
    exec_start: list[str] = []
    environment: list[str] = []
    environment_files: list[str] = []
    wanted_by: list[str] = []
    for real in files:
        for section, key, value in parse_unit_text(root.path(real).read_text()):
            if section == "Unit" and key == "Description":
                description = value
            elif section == "Service" and key == "Type":
                service_type = value
            elif section == "Service" and key == "ExecStart":
                # An empty assignment resets the list (systemd.service(5), ExecStart=).
                exec_start = [] if not value else [*exec_start, value]
            elif section == "Service" and key == "Environment":
                environment = [] if not value else [*environment, value]
            elif section == "Service" and key == "EnvironmentFile":
                environment_files = [] if not value else [*environment_files, value]
            elif section == "Install" and key == "WantedBy":
                wanted_by += value.split()
    return Unit(name=name, fragment=fragment, drop_ins=tuple(drop_ins[k] for k in sorted(drop_ins)),
                description=description, service_type=service_type, exec_start=tuple(exec_start),
                environment=tuple(environment), environment_files=tuple(environment_files),
                wanted_by=tuple(wanted_by))


def _as_record(unit: Unit | str | None) -> Any:
    return asdict(unit) if isinstance(unit, Unit) else unit


def _from_record(record: Any) -> Unit | str | None:
    if isinstance(record, dict):
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
        return Unit(**fields)
    return record if record == "masked" else None


class Systemd:
    """The daemon's memory (loaded definitions, unit states) kept in files under `<root>/run/simnode/systemd`."""

    def __init__(self, root: NodeRoot, err: Any = sys.stderr, out: Any = sys.stdout) -> None:
        self.root = root
        self.state_dir = root.path(STATE_DIR)
        self.err = err
        self.out = out

    # ---- persistence ---------------------------------------------------------------------------------------
    def _read(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.state_dir / name).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, name: str, data: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        Path(tmp).replace(self.state_dir / name)

    def daemon_reload(self) -> None:
        names: set[str] = set(self._read("loaded.json"))
        for directory in UNIT_DIRS:
            d = self.root.path(directory)
            if d.is_dir():
                names.update(p.name for p in d.iterdir() if not p.is_dir() and "." in p.name)
        self._write("loaded.json", {n: _as_record(load_from_disk(self.root, n)) for n in sorted(names)})

    def loaded(self, name: str, *, warn: bool = True) -> Unit | str | None:
        """The definition the daemon uses: the one from the last reload, else loaded now (on demand)."""
        snapshot = self._read("loaded.json")
        on_disk = load_from_disk(self.root, name)
        if name not in snapshot:
            return on_disk
        unit = _from_record(snapshot[name])
        if unit != on_disk and warn:
            print(f"Warning: The unit file, source configuration file or drop-ins of {name} changed on disk. "
                  "Run 'systemctl daemon-reload' to reload units.", file=self.err)
        return unit

    def state(self, name: str) -> dict[str, Any]:
        return self._read("units.json").get(name) or {}

    def _set_state(self, name: str, record: dict[str, Any] | None) -> None:
        units = self._read("units.json")
        if record is None:
            units.pop(name, None)
        else:
            units[name] = record
        self._write("units.json", units)

    # ---- state -----------------------------------------------------------------------------------------------
    def active_state(self, name: str) -> str:
        record = self.state(name)
        if not record.get("active"):
            return "failed" if record.get("failed") else "inactive"
        pid = record.get("pid")
        if pid is None or self._is_ours(int(pid), name):
            return "active"
        return "failed"  # the process died; Restart= is not simulated (no daemon watches it)

    def _is_ours(self, pid: int, name: str) -> bool:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return False
        return f"{UNIT_ENV}={self.root.root}:{name}".encode() in environ

    def enabled_state(self, name: str) -> str:
        unit = load_from_disk(self.root, name)
        if unit == "masked":
            return "masked"
        if not isinstance(unit, Unit):
            return "not-found"
        if not unit.wanted_by:
            return "static"
        wants = [self.root.path(f"/etc/systemd/system/{t}.wants/{name}") for t in unit.wanted_by]
        return "enabled" if any(w.is_symlink() or w.exists() for w in wants) else "disabled"

    # ---- jobs ------------------------------------------------------------------------------------------------
    def start(self, name: str, verb: str = "start") -> int:
        unit = self.loaded(name)
        if unit is None:
            print(f"Failed to {verb} {name}: Unit {name} not found.", file=self.err)
            return 5
        if unit == "masked":
            print(f"Failed to {verb} {name}: Unit {name} is masked.", file=self.err)
            return 1
        assert isinstance(unit, Unit)
        if self.active_state(name) == "active":
            return 0
        # systemd refuses a service with several ExecStart= unless Type=oneshot (src/core/service.c,
        # service_verify): the reason a drop-in must reset ExecStart= before setting its own.
        if len(unit.exec_start) != 1 and unit.service_type != "oneshot":
            why = "has more than one ExecStart= setting" if unit.exec_start else "lacks ExecStart= setting"
            print(f"Failed to {verb} {name}: Unit {name} has a bad unit file setting.\n"
                  f"See system logs and 'systemctl status {name}' for details. ({name}: Service {why}.)",
                  file=self.err)
            return 1
        argv = self.command(unit)
        record: dict[str, Any] = {"active": True, "pid": None, "argv": argv, "since": time.time()}
        if argv[0] not in SIMULATED_ELSEWHERE:
            exe = self.root.path(argv[0])
            if not (exe.is_file() and os.access(exe, os.X_OK)):
                self._set_state(name, {"active": False, "failed": True, "argv": argv, "since": time.time()})
                print(f"Job for {name} failed because the control process exited with error code.\n"
                      f'See "systemctl status {name}" and "journalctl -xeu {name}" for details.', file=self.err)
                return 1
            record["pid"] = self._spawn(name, exe, argv, unit)
        self._set_state(name, record)
        return 0

    def stop(self, name: str) -> int:
        unit = self.loaded(name, warn=False)
        if unit is None and not self.state(name):
            print(f"Failed to stop {name}: Unit {name} not loaded.", file=self.err)
            return 5
        record = self.state(name)
        pid = record.get("pid")
        if record.get("active") and pid is not None and self._is_ours(int(pid), name):
            _signal_group(int(pid), signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and self._is_ours(int(pid), name):
                time.sleep(0.05)
            if self._is_ours(int(pid), name):
                _signal_group(int(pid), signal.SIGKILL)
        if record:
            self._set_state(name, {**record, "active": False, "pid": None, "failed": False})
        return 0

    def command(self, unit: Unit) -> list[str]:
        """ExecStart with Environment=/EnvironmentFile= expanded as systemd does (systemd.service(5), "Command
        lines"): `$VAR` alone is split into words, `${VAR}` stays one word; prefixes like `-` are dropped."""
        env = self.environment(unit)
        line = unit.exec_start[0].lstrip("-@:+!")
        argv: list[str] = []
        for word in shlex.split(line):
            if word.startswith("$") and not word.startswith("${") and word[1:].isidentifier():
                argv += env.get(word[1:], "").split()
                continue
            for key, value in env.items():
                word = word.replace(f"${{{key}}}", value)
            argv.append(word)
        return argv

    def environment(self, unit: Unit) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in unit.environment:
            for assignment in shlex.split(value):
                key, _, val = assignment.partition("=")
                env[key] = val
        for spec in unit.environment_files:
            optional = spec.startswith("-")
            path = self.root.path(spec.lstrip("-"))
            try:
                text = path.read_text()
            except OSError:
                if optional:
                    continue
                raise UnitError(f"Failed to load environment files: {spec}") from None
            for line in text.splitlines():
                line = line.strip()
                if not line or line[0] in "#;" or "=" not in line:
                    continue
                key, _, val = line.partition("=")
                val = val.strip()
                env[key.strip()] = " ".join(shlex.split(val)) if val[:1] in ("'", '"') else val
        return env

    def _spawn(self, name: str, exe: Path, argv: list[str], unit: Unit) -> int:
        log_path = self.root.path(f"{LOG_DIR}/{name}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # systemd starts services with a clean environment: PATH and the unit's own variables only.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.environment(unit),
               "SIMNODE_ROOT": str(self.root.root), UNIT_ENV: f"{self.root.root}:{name}"}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([str(exe), *argv[1:]], env=env, cwd=str(self.root.root), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return proc.pid

    # ---- unit files ------------------------------------------------------------------------------------------
    def mask(self, name: str) -> int:
        link = self.root.path(f"/etc/systemd/system/{name}")
        if link.exists() and not _is_masked(link):
            print(f"Failed to mask unit: File /etc/systemd/system/{name} already exists.", file=self.err)
            return 1
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/dev/null")
            print(f"Created symlink /etc/systemd/system/{name} → /dev/null.", file=self.err)
        self.daemon_reload()  # systemctl mask/unmask/enable/disable reload the daemon themselves
        return 0

    def unmask(self, name: str) -> int:
        link = self.root.path(f"/etc/systemd/system/{name}")
        if _is_masked(link):
            link.unlink()
            print(f'Removed "/etc/systemd/system/{name}".', file=self.err)
        self.daemon_reload()
        return 0

    def enable(self, name: str) -> int:
        unit = load_from_disk(self.root, name)
        if unit == "masked":
            print(f"Failed to enable unit: Unit file /etc/systemd/system/{name} is masked.", file=self.err)
            return 1
        if not isinstance(unit, Unit):
            print(f"Failed to enable unit: Unit file {name} does not exist.", file=self.err)
            return 1
        for target in unit.wanted_by:
            link = self.root.path(f"/etc/systemd/system/{target}.wants/{name}")
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(unit.fragment)
                print(f"Created symlink /etc/systemd/system/{target}.wants/{name} → {unit.fragment}.", file=self.err)
        self.daemon_reload()
        return 0

    def disable(self, name: str) -> int:
        wants = self.root.path("/etc/systemd/system")
        for link in wants.glob(f"*.wants/{name}") if wants.is_dir() else []:
            link.unlink()
            print(f'Removed "{self.root.real(link)}".', file=self.err)
        self.daemon_reload()
        return 0

    def status(self, name: str) -> int:
        unit = self.loaded(name)
        state = self.active_state(name)
        if unit is None and not self.state(name):
            print(f"Unit {name} could not be found.", file=self.err)
            return 4
        dot = "●" if state == "active" else "○"
        if unit == "masked" or unit is None:
            print(f"{dot} {name}\n     Loaded: masked (Reason: Unit {name} is masked.)", file=self.out)
        else:
            assert isinstance(unit, Unit)
            print(f"{dot} {name} - {unit.description}\n     Loaded: loaded ({unit.fragment}; "
                  f"{self.enabled_state(name)}; preset: enabled)", file=self.out)
            if unit.drop_ins:
                print(f"    Drop-In: {' '.join(unit.drop_ins)}", file=self.out)
        record = self.state(name)
        since = time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("since") or time.time()))
        words = {"active": f"active (running) since {since}", "failed": f"failed (Result: exit-code) since {since}"}
        print(f"     Active: {words.get(state, 'inactive (dead)')}", file=self.out)
        if state == "active" and record.get("pid"):
            print(f"   Main PID: {record['pid']} ({Path(record['argv'][0]).name})", file=self.out)
        return 0 if state == "active" else 3


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def boot(root: NodeRoot, units: tuple[str, ...]) -> None:
    """The machine as booted: the daemon loaded every unit and started `units` (kept if already recorded)."""
    sd = Systemd(root, err=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as this call
    try:
        if not sd.state_dir.joinpath("loaded.json").exists():
            sd.daemon_reload()
        for name in units:
            if not sd.state(name) and isinstance(sd.loaded(name), Unit):
                sd.start(name)
    finally:
        sd.err.close()


USAGE = ("usage: systemctl [--now] [-q] status|start|stop|restart|is-active|is-enabled|enable|disable|mask|unmask"
         "|daemon-reload [UNIT...]")


def main(argv: list[str]) -> int:
    try:
        root = resolve_root()
    except NodeRootError as exc:
        print(f"systemctl: {exc}", file=sys.stderr)
        return 1
    options = [a for a in argv if a.startswith("-")]
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        print(USAGE, file=sys.stderr)
        return 1
    verb, names = words[0], [unit_name(w) for w in words[1:]]
    quiet = "-q" in options or "--quiet" in options
    sd = Systemd(root, out=open(os.devnull, "w") if quiet else sys.stdout)  # noqa: SIM115 - process lifetime
    try:
        return _run(sd, verb, names, now="--now" in options)
    except UnitError as exc:
        print(str(exc), file=sys.stderr)
        return 1


def _run(sd: Systemd, verb: str, names: list[str], *, now: bool) -> int:
    if verb == "daemon-reload":
        sd.daemon_reload()
        return 0
    if not names:
        print(f"Too few arguments.\n{USAGE}", file=sys.stderr)
        return 1
    code = 0
    for name in names:
        if verb == "start":
            code = max(code, sd.start(name))
        elif verb == "restart":
            if isinstance(sd.loaded(name, warn=False), Unit):
                sd.stop(name)
            code = max(code, sd.start(name, "restart"))
        elif verb == "stop":
            code = max(code, sd.stop(name))
        elif verb == "is-active":
            state = sd.active_state(name)
            print(state, file=sd.out)
            code = max(code, 0 if state == "active" else 3)
        elif verb == "is-enabled":
            state = sd.enabled_state(name)
            if state == "not-found":
                print(f"Failed to get unit file state for {name}: No such file or directory", file=sys.stderr)
                code = max(code, 1)
            else:
                print(state, file=sd.out)
                code = max(code, 0 if state in ("enabled", "static") else 1)
        elif verb in ("mask", "unmask", "enable", "disable"):
            code = max(code, getattr(sd, verb)(name))
            if now and verb in ("mask", "disable"):
                code = max(code, sd.stop(name) if sd.state(name) else 0)
            elif now and verb == "enable":
                code = max(code, sd.start(name))
        elif verb == "status":
            code = max(code, sd.status(name))
        else:
            print(f"Unknown command verb {verb}.", file=sys.stderr)
            return 1
    return code
