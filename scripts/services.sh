#!/usr/bin/env bash
# Local services for tests and the demo: Docker Engine (vfs, no network), a registry, a Mosquitto broker.
# usage: scripts/services.sh up|down|status|env
#   up     install missing Debian packages, then start what does not answer yet (reuses what does)
#   down   stop the daemons whose pid files live under $S (leaves data in place)
#   status one line per service; exit 3 when any is down
#   env    `export ...` lines for eval: DOCKER_HOST and friends
# State, configs, logs and data live under S=${LIFECYCLE_SERVICES_DIR:-/tmp/lifecycle-services}.
# The registry address and MQTT port can be moved (LIFECYCLE_REGISTRY, LIFECYCLE_MQTT_PORT) so a second
# set can be tried next to the usual one.
set -euo pipefail

S=${LIFECYCLE_SERVICES_DIR:-/tmp/lifecycle-services}
REGISTRY=${LIFECYCLE_REGISTRY:-127.0.0.1:5000}
MQTT_HOST=127.0.0.1
MQTT_PORT=${LIFECYCLE_MQTT_PORT:-1883}
DOCKER_SOCK=$S/docker/docker.sock
START_TIMEOUT_S=${LIFECYCLE_SERVICES_TIMEOUT_S:-60}
# prometheus: only for its `promtool check metrics` (the metrics tests); its daemon is never started (policy-rc.d
# below); ~96 MB installed without recommends, ~12 s.
PACKAGES=(docker.io docker-registry mosquitto mosquitto-clients openssl curl ca-certificates systemd prometheus)

log() { echo "services: $*" >&2; }
die() { log "$*"; exit 1; }

install_missing() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; run as root or install them"
  log "installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d exit 101: the packages must not start their own daemons on our ports.
  local policy=/usr/sbin/policy-rc.d had_policy=0
  [ -e "$policy" ] && had_policy=1
  if [ $had_policy -eq 0 ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || { [ $had_policy -eq 1 ] || rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
  [ $had_policy -eq 1 ] || rm -f "$policy"
}

docker_ok() { timeout 5 docker -H "unix://$DOCKER_SOCK" version >/dev/null 2>&1; }
registry_ok() { curl -fsS --max-time 3 "http://$REGISTRY/v2/" >/dev/null 2>&1; }
mqtt_ok() {
  # Retained message round trip on a unique topic, then clear it so the broker keeps nothing.
  local topic="services-check/$$-$RANDOM" got
  timeout 5 mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -t "$topic" -m ping -r -q 1 2>/dev/null || return 1
  got=$(timeout 5 mosquitto_sub -h "$MQTT_HOST" -p "$MQTT_PORT" -t "$topic" -C 1 -W 3 2>/dev/null) || got=
  timeout 5 mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -t "$topic" -r -n -q 1 2>/dev/null || true
  [ "$got" = ping ]
}

# A pid file whose process is gone would make dockerd refuse to start.
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

fail_with_log() {  # fail_with_log MESSAGE LOG
  log "$1; last lines of $2:"
  tail -n 30 "$2" >&2 || true
  exit 1
}

wait_for() {  # wait_for NAME CHECK LOG PIDFILE: until CHECK passes, the daemon exits, or the deadline
  local name=$1 check=$2 logfile=$3 pidfile=$4 deadline=$((SECONDS + START_TIMEOUT_S))
  until "$check"; do
    pid_alive "$pidfile" || fail_with_log "$name exited before answering" "$logfile"
    [ $SECONDS -lt $deadline ] || fail_with_log "$name did not answer within ${START_TIMEOUT_S}s" "$logfile"
    sleep 0.5
  done
}

start_detached() {  # start_detached LOG PIDFILE CMD...
  local logfile=$1 pidfile=$2
  shift 2
  setsid nohup "$@" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

up_docker() {
  if docker_ok; then log "docker: reusing the engine on $DOCKER_SOCK"; return 0; fi
  mkdir -p "$S/docker/data" "$S/docker/exec"
  local watch=$S/docker/dockerd.launch.pid
  if pid_alive "$S/docker/docker.pid"; then
    log "docker: dockerd $(cat "$S/docker/docker.pid") is running but not answering yet; waiting"
    watch=$S/docker/docker.pid
  else
    rm -f "$S/docker/docker.pid"
    log "docker: starting dockerd on $DOCKER_SOCK"
    # dockerd writes its own pid file; ours goes next to it and is not used for stopping.
    start_detached "$S/docker/dockerd.log" "$S/docker/dockerd.launch.pid" \
      dockerd --storage-driver=vfs --iptables=false --bridge=none --host "unix://$DOCKER_SOCK" \
      --data-root "$S/docker/data" --exec-root "$S/docker/exec" --pidfile "$S/docker/docker.pid" \
      --insecure-registry "$REGISTRY"
  fi
  wait_for docker docker_ok "$S/docker/dockerd.log" "$watch"
}

up_registry() {
  if registry_ok; then log "registry: reusing http://$REGISTRY"; return 0; fi
  mkdir -p "$S/registry/data"
  cat >"$S/registry/config.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $S/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
  log "registry: starting on $REGISTRY"
  start_detached "$S/registry/registry.log" "$S/registry/registry.pid" docker-registry serve "$S/registry/config.yml"
  wait_for registry registry_ok "$S/registry/registry.log" "$S/registry/registry.pid"
}

up_mosquitto() {
  if mqtt_ok; then log "mosquitto: reusing $MQTT_HOST:$MQTT_PORT"; return 0; fi
  mkdir -p "$S/mosquitto"
  cat >"$S/mosquitto/mosquitto.conf" <<EOF
listener $MQTT_PORT $MQTT_HOST
allow_anonymous true
persistence true
persistence_location $S/mosquitto/
# As deploy/mosquitto/lifecycle.conf: PUBACKs and deliveries without Nagle's delay, 100 QoS 1 in flight.
set_tcp_nodelay true
max_inflight_messages 100
EOF
  # Started as root, mosquitto drops to its own user, which must be able to write the persistence file.
  if id mosquitto >/dev/null 2>&1; then chown mosquitto "$S/mosquitto"; fi
  log "mosquitto: starting on $MQTT_HOST:$MQTT_PORT"
  start_detached "$S/mosquitto/log" "$S/mosquitto/mosquitto.pid" mosquitto -c "$S/mosquitto/mosquitto.conf"
  wait_for mosquitto mqtt_ok "$S/mosquitto/log" "$S/mosquitto/mosquitto.pid"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local name=$1 pidfile=$2 pid i
  if ! pid_alive "$pidfile"; then log "$name: not running from $pidfile"; rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  kill "$pid"
  for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && die "$name: pid $pid did not stop within 30s"
  rm -f "$pidfile"
  log "$name: stopped pid $pid"
}

status() {
  local rc=0
  if docker_ok; then echo "docker     up    unix://$DOCKER_SOCK"; else echo "docker     down  unix://$DOCKER_SOCK"; rc=3; fi
  if registry_ok; then echo "registry   up    $REGISTRY"; else echo "registry   down  $REGISTRY"; rc=3; fi
  if mqtt_ok; then echo "mosquitto  up    $MQTT_HOST:$MQTT_PORT"; else echo "mosquitto  down  $MQTT_HOST:$MQTT_PORT"; rc=3; fi
  return $rc
}

case "${1:-}" in
  up)
    install_missing
    mkdir -p "$S"
    up_docker
    up_registry
    up_mosquitto
    ;;
  down)
    stop_pidfile mosquitto "$S/mosquitto/mosquitto.pid"
    stop_pidfile registry "$S/registry/registry.pid"
    stop_pidfile docker "$S/docker/docker.pid"
    rm -f "$S/docker/dockerd.launch.pid"
    ;;
  status) status ;;
  env)
    echo "export LIFECYCLE_SERVICES_DIR=$S"
    echo "export DOCKER_HOST=unix://$DOCKER_SOCK"
    echo "export DOCKER_BUILDKIT=0"
    echo "export LIFECYCLE_REGISTRY=$REGISTRY"
    echo "export LIFECYCLE_MQTT_HOST=$MQTT_HOST"
    echo "export LIFECYCLE_MQTT_PORT=$MQTT_PORT"
    ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
