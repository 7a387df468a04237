#!/usr/bin/env bash
# make demo: start the lifecycle service against a fresh temp root on the simulated node, install Kubernetes
# through it over MQTT while watching every state, then show the cluster with the real kubectl.
# `scripts/demo.sh stop` resets the demo cluster and stops the service it started.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services.sh env)"

STATE_FILE=${DEMO_STATE_FILE:-/tmp/lifecycle-demo.env}
CONFIG=simnode/lifecycle.toml
NODE=${DEMO_NODE:-demo}
LIFECYCLE=.venv/bin/lifecycle

stop_demo() {
  [ -f "$STATE_FILE" ] || { echo "no demo running"; return 0; }
  # shellcheck disable=SC1090
  . "$STATE_FILE"
  "$LIFECYCLE" reset --config "$CONFIG" --node "$DEMO_NODE" --timeout 120 || true
  kill "$DEMO_PID" 2>/dev/null || true
  rm -f "$STATE_FILE"
  echo "demo stopped; its root $DEMO_ROOT is left for inspection"
}

if [ "${1:-}" = "stop" ]; then
  stop_demo
  exit 0
fi
[ -f "$STATE_FILE" ] && stop_demo

# The image builder leaves its images in the same engine the service pulls into; untag this version's images
# so that the demo shows the pulls (byte progress) a fresh VM would make. The layers stay in the registry.
VERSION=$(sed -n 's/^version = "\(v[0-9.]*\)".*/\1/p' "$CONFIG" | head -n 1)
.venv/bin/python - "$VERSION" <<'PY' | xargs -r docker rmi >/dev/null 2>&1 || true
import sys, tomllib
cfg = tomllib.load(open("simnode/lifecycle.toml", "rb"))["kubernetes"]
version, repo = sys.argv[1], cfg["image_repository"]
tags = cfg["versions"][version]
names = [f"kube-apiserver:{version}", f"kube-controller-manager:{version}", f"kube-scheduler:{version}",
         f"kube-proxy:{version}", f"etcd:{tags['etcd']}", f"coredns:{tags['coredns']}", f"pause:{tags['pause']}"]
binaries = cfg["binaries_image"].replace("{repo}", repo).replace("{version}", version)
for key in ("cni", "critools", "cri_dockerd"):
    binaries = binaries.replace("{" + key + "}", tags.get(key, ""))
print("\n".join([binaries,
                 *(f"{repo}/{n}" for n in names), *cfg.get("addon_images", [])]))
PY

ROOT=$(mktemp -d /tmp/lifecycle-demo.XXXXXX)
mkdir -p "$ROOT/var/log"
# The machine as the simulated node sees it (/proc, tools on the PATH, CRI sockets): a Debian 12 VM with Docker
# Engine and cri-dockerd (simnode/host.py).
.venv/bin/python -c 'import sys; from pathlib import Path; from simnode.host import prepare_host; prepare_host(Path(sys.argv[1]))' "$ROOT"
"$LIFECYCLE" serve --config "$CONFIG" --root "$ROOT" --node "$NODE" >"$ROOT/var/log/lifecycle.log" 2>&1 &
PID=$!
printf 'DEMO_PID=%s\nDEMO_ROOT=%s\nDEMO_NODE=%s\n' "$PID" "$ROOT" "$NODE" >"$STATE_FILE"
echo "lifecycle service started (pid $PID, root $ROOT, node $NODE, log $ROOT/var/log/lifecycle.log)"
echo

if ! "$LIFECYCLE" install --watch --config "$CONFIG" --node "$NODE"; then
  echo
  echo "install failed; last service log lines:"
  tail -n 20 "$ROOT/var/log/lifecycle.log"
  exit 1
fi

echo
echo "\$ kubectl --kubeconfig $ROOT/etc/kubernetes/admin.conf get pods -A"
kubectl --kubeconfig "$ROOT/etc/kubernetes/admin.conf" get pods -A
echo
echo "The cluster keeps running. Try:"
echo "  .venv/bin/lifecycle status --config $CONFIG --node $NODE"
echo "  kubectl --kubeconfig $ROOT/etc/kubernetes/admin.conf get nodes"
echo "  scripts/demo.sh stop      # reset the cluster and stop the service"
