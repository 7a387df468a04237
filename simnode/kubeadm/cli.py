"""Command line of the kubeadm stand-in: init (and `init phase ...`), reset, version, upgrade plan/apply.

Flags follow kubeadm's syntax (`--x=y`, `--x y`, `-f`); output goes to stdout as phases run, errors to
stderr with exit code 1 (or a fault's exit code).
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from simnode.kubeadm.errors import KubeadmError
from simnode.launch import build_version
from simnode.paths import NodeRoot, NodeRootError, resolve_root

if TYPE_CHECKING:
    from simnode.kubeadm.config import Config

# Each command imports what it needs when it runs: `kubeadm version` stays quick (no yaml/cryptography).

VALUE_FLAGS = {"config", "rootfs", "v", "skip-phases", "ignore-preflight-errors", "cert-dir", "output",
               "certificate-key", "cri-socket"}
BOOL_FLAGS = {"force", "yes", "upload-certs", "help", "skip-token-print", "skip-certificate-key-print"}
SHORT = {"o": "output", "v": "v", "f": "force", "y": "yes", "h": "help"}
USAGE = """Usage:
  kubeadm init [--config FILE] [--skip-phases a,b] [--ignore-preflight-errors x,y] [--upload-certs]
  kubeadm init phase <phase> [<sub-phase>|all] [--config FILE]
  kubeadm reset [-f] [--cert-dir DIR] [--cri-socket unix:///path] [--config FILE]
  kubeadm version [-o short|json|yaml]
  kubeadm upgrade plan [VERSION]
  kubeadm upgrade apply VERSION [-y] [-f] [--config FILE]
Global flags: --rootfs DIR (node root, else $SIMNODE_ROOT), -v N"""


@dataclass
class Args:
    positional: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    given: list[tuple[str, str]] = field(default_factory=list)  # (flag name, token as typed), in argv order


def parse_args(argv: list[str]) -> Args:
    args = Args()
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            args.positional.extend(argv[i:])
            break
        if not token.startswith("-") or token == "-":
            args.positional.append(token)
            continue
        name, eq, value = token.lstrip("-").partition("=")
        if not token.startswith("--"):
            if name not in SHORT:
                raise KubeadmError(f"unknown shorthand flag: {name!r} in {token}")
            name = SHORT[name]
        args.given.append((name, token.partition("=")[0]))
        if name in BOOL_FLAGS:
            if eq and value.lower() not in ("true", "false"):
                raise KubeadmError(f'invalid argument "{value}" for "--{name}" flag: expected true or false')
            if not eq or value.lower() == "true":
                args.flags.add(name)
            continue
        if name not in VALUE_FLAGS:
            raise KubeadmError(f"unknown flag: --{name}")
        if not eq:
            if i >= len(argv):
                raise KubeadmError(f"flag needs an argument: --{name}")
            value, i = argv[i], i + 1
        args.values[name] = value
    return args


def _out(line: str) -> None:
    print(line, flush=True)


def _ask(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _config_path(args: Args, root: NodeRoot) -> Path | None:
    raw = args.values.get("config")
    if not raw:
        return None
    path = Path(raw)
    # The file is the caller's (like real kubeadm's --config); a real path of the node is re-rooted.
    if not path.exists() and root.path(path).exists():
        return root.path(path)
    return path


def _load(args: Args, root: NodeRoot, versions: tuple[str, ...]) -> Config:
    from simnode.kubeadm.configload import load_config

    cfg = load_config(_config_path(args, root), allowed_versions=versions, default_version=versions[0])
    if not cfg.init.cri_socket:
        from simnode.kubeadm.crisocket import detect_cri_socket

        # kubeadm cmd/kubeadm/app/util/config/initconfiguration.go (SetNodeRegistrationDynamicDefaults): a config
        # without nodeRegistration.criSocket gets the one detected on the host, or fails where several answer.
        cfg.init.cri_socket = detect_cri_socket(root)
    for warning in cfg.warnings:
        print(warning, file=sys.stderr, flush=True)
    return cfg


def cmd_init(args: Args, root: NodeRoot) -> int:
    from simnode.kubeadm.phases import (
        BY_NAME,
        InitPlan,
        all_phases,
        apply_skips,
        bound_phase_names,
        phase_group_help,
        prepare,
        select_single,
    )
    from simnode.kubeadm.runner import run_plan

    rest = args.positional[1:]
    full = not rest
    if rest and rest[0] != "phase":
        raise KubeadmError(f'unknown command "{rest[0]}" for "kubeadm init"')
    if not full:
        version = build_version()
        if len(rest) < 2 or rest[1] not in bound_phase_names(version):
            # kubeadm cmd/kubeadm/app/cmd/phases/workflow/runner.go (BindToCommand): `phase` is a cobra command
            # without Run, and hidden phases get no subcommand. cobra (command.go, ExecuteC/execute) then parses
            # the flags of `phase` itself (only the global ones exist there): any other flag is "unknown flag",
            # exit 1 (kubeadm's CheckErr); otherwise `phase` is not runnable, so cobra prints its help and
            # exits 0 without running anything (an unknown or hidden phase name is not an error).
            _refuse_local_flags(args)
            _out(phase_group_help(version))
            return 0
        if not BY_NAME[rest[1]].inherits_flags:
            _refuse_local_flags(args)
        selection = select_single(rest[1], rest[2] if len(rest) > 2 else None)
    cfg = _load(args, root, (build_version(),))
    if args.values.get("certificate-key"):
        cfg.init.certificate_key = args.values["certificate-key"]
    if full:
        selection = apply_skips(all_phases(), cfg.init.skip_phases + _split(args.values.get("skip-phases")))
    plan = InitPlan(cfg=cfg, root=root, selection=selection, full_init=full, upload_certs="upload-certs" in args.flags,
                    print_certificate_key="skip-certificate-key-print" not in args.flags,
                    ignore_preflight={e.lower() for e in _split(args.values.get("ignore-preflight-errors"))})
    if full:
        _out(f"[init] Using Kubernetes version: {cfg.cluster.kubernetes_version}")
    prepare(plan)
    asyncio.run(run_plan(plan, _out))
    return 0


# Flags every kubeadm command has (cmd/kubeadm/app/cmd/cmd.go: --rootfs on the root's persistent flags; klog's -v
# through the global flag set; cobra's own --help).
GLOBAL_FLAGS = {"rootfs", "v", "help"}


def _refuse_local_flags(args: Args) -> None:
    """pflag's error for the first flag that the command being run does not define."""
    for name, token in args.given:
        if name not in GLOBAL_FLAGS:
            if token.startswith("--"):
                raise KubeadmError(f"unknown flag: --{name}")
            raise KubeadmError(f"unknown shorthand flag: {token.lstrip('-')!r} in {token}")


def cmd_version(args: Args) -> int:
    version = build_version()
    info = {"clientVersion": {"major": version.lstrip("v").split(".")[0], "minor": version.split(".")[1],
                              "gitVersion": version, "gitTreeState": "clean", "platform": "linux/amd64"}}
    output = args.values.get("output", "")
    if output == "short":
        _out(version)
    elif output == "json":
        _out(json.dumps(info, indent=2))
    elif output == "yaml":
        import yaml

        _out(yaml.safe_dump(info, sort_keys=True).rstrip())
    elif output == "":
        _out(f"kubeadm version: &version.Info{{Major:\"{info['clientVersion']['major']}\", "
             f"Minor:\"{info['clientVersion']['minor']}\", GitVersion:\"{version}\", GitTreeState:\"clean\", "
             'Platform:"linux/amd64"}')
    else:
        raise KubeadmError(f'invalid output format: {output}; valid values are "short", "json" and "yaml"')
    return 0


def cmd_reset(args: Args, root: NodeRoot) -> int:
    from simnode.kubeadm.reset import reset

    reset(root, cert_dir=args.values.get("cert-dir"), force="force" in args.flags, ask=_ask, out=_out,
          cri_socket=args.values.get("cri-socket"), config=_config_path(args, root))
    return 0


def cmd_upgrade(args: Args, root: NodeRoot) -> int:
    rest = args.positional[1:]
    if not rest or rest[0] not in ("apply", "plan"):
        raise KubeadmError('only "kubeadm upgrade plan [VERSION]" and "kubeadm upgrade apply VERSION" are supported '
                           "by the simulated node")
    from simnode.kubeadm.upgrade import upgrade_apply, upgrade_plan  # imports aiohttp: only when upgrading
    from simnode.kubeclient import ApiError

    version = build_version()
    if rest[0] == "plan":
        if len(rest) > 2:
            raise KubeadmError('"kubeadm upgrade plan" takes at most one version argument')
        try:
            asyncio.run(upgrade_plan(root, rest[1] if len(rest) == 2 else None, version, out=_out))
        except ApiError as exc:
            raise KubeadmError(f"[upgrade] FATAL: {exc}") from exc
        return 0
    if len(rest) != 2:
        raise KubeadmError('"kubeadm upgrade apply" requires exactly one version argument, e.g. v1.32.1')
    config = _load(args, root, (rest[1] if rest[1].startswith("v") else f"v{rest[1]}",)) \
        if args.values.get("config") else None
    try:
        asyncio.run(upgrade_apply(root, rest[1], version, yes="yes" in args.flags, config=config, ask=_ask,
                                  out=_out, force="force" in args.flags))
    except ApiError as exc:
        raise KubeadmError(f"[upgrade] FATAL: {exc}") from exc
    return 0


def dispatch(args: Args) -> int:
    command = args.positional[0]
    if command == "version":
        return cmd_version(args)
    handlers = {"init": cmd_init, "reset": cmd_reset, "upgrade": cmd_upgrade}
    if command not in handlers:
        raise KubeadmError(f'unknown command "{command}" for "kubeadm"\n{USAGE}')
    root = resolve_root(rootfs=args.values.get("rootfs"))
    return handlers[command](args, root)


def main(argv: list[str]) -> int:
    verbosity = 0
    try:
        args = parse_args(argv)
        verbosity = int(args.values.get("v", "0")) if args.values.get("v", "0").isdigit() else 0
        if "help" in args.flags or not args.positional:
            print(USAGE, file=sys.stdout if args.positional or "help" in args.flags else sys.stderr)
            return 0 if "help" in args.flags else 1
        return dispatch(args)
    except KubeadmError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        if verbosity >= 5:
            traceback.print_exc()
        else:
            print("To see the stack trace of this error execute with --v=5 or higher", file=sys.stderr, flush=True)
        return exc.exit_code
    except NodeRootError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
