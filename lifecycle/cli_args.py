"""The `lifecycle` command line: its parser and exit codes. Kept apart from the clients in `lifecycle.cli`, so that
`lifecycle serve` parses its flags without importing aiomqtt before it starts the kubelet (lifecycle.__main__).
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the service refused the request, or the install/reset being watched failed
EXIT_USAGE = 2  # bad flags or config file
EXIT_UNREACHABLE = 3  # no broker, or no reply within --timeout
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting

MERGE_DEFAULT = Path("$KUBECONFIG")  # --merge without FILE: resolved as kubectl would (lifecycle.kubemerge)

EPILOG = f"""exit codes:
  {EXIT_OK}    success (for --watch: the install reached running / the reset reached idle)
  {EXIT_FAILED}    the service refused the request, or the watched install/reset failed (cause printed)
  {EXIT_USAGE}    bad command line or config file
  {EXIT_UNREACHABLE}    broker unreachable, or no reply within --timeout (is the service running?)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); `watch` exits {EXIT_OK} when interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lifecycle", description="Bring a single-node Kubernetes cluster up and down, driven over MQTT.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the service", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", type=Path, required=True, help="TOML config file")
    serve.add_argument("--root", type=Path, help="node root (overrides node.root)")
    serve.add_argument("--node", help="node name (overrides node.name)")
    serve.add_argument("--broker", help="mqtt://host[:port] or mqtts://host[:port] (overrides mqtt.broker)")

    def client(name: str, help_text: str, *, output: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", type=Path, help="read broker, TLS settings, prefix and node name from this file")
        p.add_argument("--broker", help="mqtt://host[:port] or mqtts://host[:port] (default mqtt://127.0.0.1:1883)")
        p.add_argument("--node", help="node name (default: from --config, else docker-desktop)")
        p.add_argument("--prefix", help="topic prefix (default: from --config, else lifecycle)")
        p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                       help="seconds to wait for the broker and the reply (default 10); a watch gives up after "
                            "max(S, 60) s without an event")
        if output:
            p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
        return p

    def wait_flags(p: argparse.ArgumentParser, what: str, *, wait_by_default: bool) -> None:
        """--watch and --no-wait on every command that starts a job, whatever its default (a user who typed
        `start --watch` after `install --watch` must not get a usage error)."""
        follow, accepted = f"follow the {what} until it ends", f"return once the {what} is accepted"
        group = p.add_mutually_exclusive_group()
        group.add_argument("--watch", dest="watch", action="store_true",
                           help=follow + (" (the default)" if wait_by_default else ""))
        group.add_argument("--no-wait", dest="watch", action="store_false",
                           help=accepted + ("" if wait_by_default else " (the default)"))
        p.set_defaults(watch=wait_by_default)

    install = client("install", "install (or resume) Kubernetes")
    install.add_argument("--version", dest="kubernetes_version", help="Kubernetes version, e.g. v1.31.4")
    wait_flags(install, "install", wait_by_default=False)
    install.add_argument("--pki", dest="pki_dir", type=Path, metavar="DIR",
                         help="send the PKI in DIR (kubeadm's file names: ca.crt, ca.key, front-proxy-ca.*, etcd/ca.*, "
                              "sa.key, sa.pub, optionally leaf pairs); the service checks it before using it")
    upgrade = client("upgrade", "upgrade the running cluster in place to a configured version (one minor at a time)")
    upgrade.add_argument("--version", dest="kubernetes_version", required=True,
                         help="the Kubernetes version to upgrade to, e.g. v1.32.1")
    wait_flags(upgrade, "upgrade", wait_by_default=False)
    client("status", "print the current state")
    client("watch", "print events until interrupted")
    reset = client("reset", "stop the kubelet, kubeadm reset, remove generated files (images are kept)")
    wait_flags(reset, "reset", wait_by_default=True)
    client("cancel", "stop a running install (state failed, code cancelled; install resumes it)")
    stop = client("stop", "stop the kubelet and every pod, keep everything else (state stopped; start resumes)")
    wait_flags(stop, "stop", wait_by_default=True)
    start = client("start", "bring a stopped cluster back to running (no pull, no kubeadm)")
    wait_flags(start, "start", wait_by_default=True)
    renew = client("renew-certs", "re-issue leaf certificates and kubeconfigs from the same CAs (no reset)")
    wait_flags(renew, "renewal", wait_by_default=True)
    kubeconfig = client("kubeconfig", "fetch the admin kubeconfig (it holds the admin key)", output=False)
    where = kubeconfig.add_mutually_exclusive_group()
    where.add_argument("-o", "--output-file", dest="kubeconfig_file", type=Path, metavar="FILE",
                       help="write it to FILE (mode 0600) instead of printing it")
    where.add_argument("--merge", nargs="?", const=MERGE_DEFAULT, type=Path, metavar="FILE",
                       help="add or replace its cluster, user and context in FILE (default: the first existing file "
                            "of $KUBECONFIG, else ~/.kube/config), keeping the rest; the previous file is kept as "
                            "FILE.lifecycle-backup")
    kubeconfig.add_argument("--use", action="store_true",
                            help="with --merge: make its context the current one (a file without one gets it anyway)")
    kubeconfig.set_defaults(output="text")
    diagnose = client("diagnose", "collect logs, state, config (credentials removed) and cluster status for a bug "
                      "report into a .tar.gz", output=False)
    diagnose.add_argument("-o", "--output-file", dest="bundle_file", type=Path, metavar="FILE", required=True,
                          help="write the bundle to FILE (mode 0600)")
    diagnose.set_defaults(output="text")
    forward = client("forward", "open a host port for each LoadBalancer Service port the node exposes, forwarding "
                     "to the node (runs until interrupted)", output=False)
    forward.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                         help="host address the ports listen on (default 127.0.0.1; 0.0.0.0 opens them to the network)")
    forward.set_defaults(output="text")
    sub.add_parser("graph", help="print the state graph as a Mermaid diagram")
    return parser
