#!/usr/bin/env bash
# The compose stack, run for real (on demand, not in CI; docs/operating/compose.md).
#
#   sudo deploy/compose-smoke.sh
#
# Builds nlpmesh:dev from the Dockerfile, brings docker-compose.yml up with docker-compose
# (1.29 or v2) against a podman socket as project "nlpmesh", waits for every health check,
# with one inference service per model and two replicas of the default model's
# (`up --scale inference-smollm2=2`), asks the finance question through the gateway twice (the
# second answer must be a prompt-cache hit), scrapes Prometheus (every replica's /metrics, found
# by DNS), asks the question of gemma3 and checks through Prometheus that inference-gemma3
# generated it, sends distinct short questions and checks through Prometheus that both replicas
# of the default model generated, and takes the stack down (also on failure).
#
# Needs root, podman (with runc), docker-compose, curl, python3; debootstrap when no
# base image is given. Made for a machine that reaches a Debian mirror and PyPI but no
# container registry:
#   - the base image is made with debootstrap from the Debian mirror apt uses, then
#     `podman import`ed (NLPMESH_BASE_IMAGE=python:3.11-slim skips that where a registry
#     is reachable);
#   - this host's extra CA certificates go into the build (deploy/ca-certificates/), so
#     pip works behind a TLS-inspecting proxy;
#   - torch's CPU build comes from the folder pip on this host finds it in (PIP_FIND_LINKS
#     or pip's find-links setting, mounted into the build), else from TORCH_INDEX_URL, else
#     from this host's pip index-url (PIP_INDEX_URL or pip's setting): the Dockerfile names none;
#   - redis:7-alpine, prom/prometheus, otel-collector and Jaeger are replaced or left out
#     through deploy/compose.smoke.yml (the script says so);
#   - podman runs health checks from systemd timers; without systemd this script runs
#     `podman healthcheck run` in a loop;
#   - the stack runs in a network namespace of its own (`ip netns`), so its published
#     ports (6379, 50051, 9151, 9090; the internal services publish none) are real but cannot
#     clash with what other users of the machine listen on; NLPMESH_SMOKE_NETNS=0 publishes
#     them on the host.
#
# Settings (environment): NLPMESH_SMOKE_DIR (work folder, default /var/tmp/nlpmesh-compose-smoke),
# NLPMESH_BASE_IMAGE, NLPMESH_DEBIAN_MIRROR, NLPMESH_TORCH_FIND_LINKS, TORCH_INDEX_URL,
# NLPMESH_EXTRA_CA_DIR (default /usr/local/share/ca-certificates), COMPOSE (default docker-compose),
# NLPMESH_SMOKE_HEALTH_INTERVAL_S (5), NLPMESH_SMOKE_HEALTH_TIMEOUT_S (900),
# NLPMESH_SMOKE_REBUILD=1 (build the images even if they exist), NLPMESH_SMOKE_NETNS (1),
# NLPMESH_SMOKE_INFERENCE_REPLICAS (2: replicas of the default model's inference service; 1 skips the
# replica check),
# NLPMESH_SMOKE_REPLICA_QUESTIONS (10: the distinct questions sent to show both replicas serve).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE_DIR="${NLPMESH_SMOKE_DIR:-/var/tmp/nlpmesh-compose-smoke}"
PROJECT=nlpmesh
COMPOSE="${COMPOSE:-docker-compose}"
IMAGE=localhost/nlpmesh:dev
INFRA_IMAGE=localhost/nlpmesh-smoke-infra:dev
BASE_IMAGE="${NLPMESH_BASE_IMAGE:-}"
DEBIAN_SUITE=bookworm  # its python3 is 3.11, the Python the pinned wheels are for
HEALTH_INTERVAL_S="${NLPMESH_SMOKE_HEALTH_INTERVAL_S:-5}"
HEALTH_TIMEOUT_S="${NLPMESH_SMOKE_HEALTH_TIMEOUT_S:-900}"
NETNS=""; [ "${NLPMESH_SMOKE_NETNS:-1}" = 1 ] && NETNS=nlpmesh-smoke
# One inference service per catalogue model (docker-compose.yml); the default model's is scaled.
SCALED=inference-smollm2
OTHER_MODEL=gemma3
HEALTHY_SERVICES=(redis template tokenizer cache embedding "$SCALED" "inference-$OTHER_MODEL" gateway edge)
INFERENCE_REPLICAS="${NLPMESH_SMOKE_INFERENCE_REPLICAS:-2}"
[[ "$INFERENCE_REPLICAS" =~ ^[1-4]$ ]] || { echo "NLPMESH_SMOKE_INFERENCE_REPLICAS: 1 to 4, not $INFERENCE_REPLICAS" >&2; exit 2; }
REPLICA_QUESTIONS="${NLPMESH_SMOKE_REPLICA_QUESTIONS:-10}"
[[ "$REPLICA_QUESTIONS" =~ ^[0-9]+$ ]] && ((REPLICA_QUESTIONS >= 2 && REPLICA_QUESTIONS <= 20)) \
  || { echo "NLPMESH_SMOKE_REPLICA_QUESTIONS: 2 to 20, not $REPLICA_QUESTIONS" >&2; exit 2; }
# one /metrics per container: gateway, template, tokenizer, cache, embedding, inference-gemma3, edge, each default-model replica
METRICS_TARGETS=$((7 + INFERENCE_REPLICAS))
QUESTION="What are the applications of real-time AI in the financial industry?"  # cli/main.py DEMO_QUESTION
STARTED=$SECONDS

say() { printf '[smoke %4ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

# run_logged NAME LOG COMMAND...: runs a long step with its output in LOG, printing its
# latest line every 20 s; fails with the log's tail if the step fails.
run_logged() {
  local name=$1 log=$2; shift 2
  say "$name: started (log: $log)"
  "$@" >"$log" 2>&1 &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2; waited=$((waited + 2))
    if ((waited % 20 == 0)); then
      say "$name: running ${waited}s: $(tail -n 1 "$log" | cut -c1-150)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 30 "$log" | sed 's/^/    /'
    fail "$name (see $log)"
  fi
  say "$name: done in ${waited}s"
}

# Runs a command where the stack's ports are published: nsenter, not `ip netns exec`, which
# remounts /sys and so hides the cgroup mounts runc needs. An array, not a function, so that
# a command started in the background is this shell's own child (its pid is $!).
IN_NS=(); [ -n "$NETNS" ] && IN_NS=(nsenter "--net=/run/netns/$NETNS")
in_ns() { "${IN_NS[@]}" "$@"; }

compose() {
  "$COMPOSE" -p "$PROJECT" -f "$REPO/docker-compose.yml" -f "$REPO/deploy/compose.smoke.yml" "$@"
}

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || fail "run as root (rootful podman, debootstrap)"
for tool in podman runc iptables ip nsenter curl python3 "$COMPOSE"; do  # netavark, podman's network, runs iptables
  command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install podman runc iptables docker-compose curl python3)"
done
mkdir -p "$SMOKE_DIR/logs"
say "work folder $SMOKE_DIR; $(podman --version); $("$COMPOSE" version --short 2>/dev/null || "$COMPOSE" version | head -n1) as $COMPOSE"

# runc: crun fails on this kernel's cgroup mode. podman's default limits (open files 1048576,
# processes) are refused here ("error setting rlimit ... operation not permitted"): open files
# and processes at 20000 at most (found by trial: 20000 works, 50000 processes does not).
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=20000; ((NOFILE > 20000)) && NOFILE=20000
NPROC=$(ulimit -Hu); [ "$NPROC" = unlimited ] && NPROC=20000; ((NPROC > 20000)) && NPROC=20000
cat >"$SMOKE_DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$SMOKE_DIR/containers.conf"
say "podman settings: $CONTAINERS_CONF (runtime runc, nofile $NOFILE, nproc $NPROC)"

HEALTH_LOOP_PID=""
SERVICE_PID=""
SOCKET="$SMOKE_DIR/podman.sock"
STACK_UP=0
cleanup() {
  local code=$?
  set +e
  [ -n "$HEALTH_LOOP_PID" ] && kill "$HEALTH_LOOP_PID" 2>/dev/null
  if ((STACK_UP)); then
    if ((code != 0)); then
      say "the stack's last log lines, for the failure above:"
      compose logs --no-color --tail 15 2>&1 | sed 's/^/    /' | tail -n 120
    fi
    say "taking the stack down (docker-compose down -v)"
    compose down -v --remove-orphans 2>&1 | sed 's/^/    /'
    local left
    left=$(podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}')
    [ -z "$left" ] && say "stack down: no container of project $PROJECT is left" || say "left behind: $left"
  fi
  if [ -n "$SERVICE_PID" ]; then
    kill "$SERVICE_PID" 2>/dev/null
    (sleep 10; kill -9 "$SERVICE_PID" 2>/dev/null) &
    local killer=$!
    wait "$SERVICE_PID" 2>/dev/null
    kill "$killer" 2>/dev/null
    # whatever still listens on this run's own socket was started by this run
    for pid in $(in_ns ss -xlpn 2>/dev/null | grep -F "$SOCKET" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
      say "still listening on $SOCKET, stopping it: $(ps -o pid=,ppid=,lstart=,args= -p "$pid")"; kill "$pid" 2>/dev/null
    done
  fi
  [ -n "$NETNS" ] && ip netns del "$NETNS" 2>/dev/null
  ((code == 0)) && say "PASSED in $((SECONDS - STARTED)) s" || say "exit $code after $((SECONDS - STARTED)) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the base image
debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -z "$uri" ] && uri=$(awk '$1 == "deb" && $2 !~ /^\[/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "$uri"
}
if [ -z "$BASE_IMAGE" ]; then
  BASE_IMAGE=localhost/nlpmesh-base:$DEBIAN_SUITE
  if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE exists (made by an earlier run; podman rmi it to remake it)"
  else
    command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap), or set NLPMESH_BASE_IMAGE"
    MIRROR="${NLPMESH_DEBIAN_MIRROR:-$(debian_mirror)}"
    [ -n "$MIRROR" ] || fail "apt's sources name no Debian mirror: set NLPMESH_DEBIAN_MIRROR, or NLPMESH_BASE_IMAGE"
    ROOTFS="$SMOKE_DIR/rootfs"
    rm -rf "$ROOTFS"
    say "no container registry is used: making the base image with debootstrap ($DEBIAN_SUITE from $MIRROR)"
    run_logged debootstrap "$SMOKE_DIR/logs/debootstrap.log" \
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$DEBIAN_SUITE" "$ROOTFS" "$MIRROR"
    # python and pip on PATH, as in python:3.11-slim: a venv, so pip may install into it (PEP 668).
    chroot "$ROOTFS" python3 -m venv /opt/python
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    say "importing the root file system as $BASE_IMAGE"
    tar -C "$ROOTFS" -c . | podman import \
      --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["python"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$ROOTFS"
    base_python=$(podman run --rm --network none "$BASE_IMAGE" python --version) || fail "the base image does not run python"
    say "base image: $base_python, $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes"
  fi
else
  say "base image $BASE_IMAGE (NLPMESH_BASE_IMAGE)"
fi

# ---------------------------------------------------------------- the images
EXTRA_CA_DIR="${NLPMESH_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
rm -f "$REPO"/deploy/ca-certificates/*.crt
shopt -s nullglob
extra_cas=("$EXTRA_CA_DIR"/*.crt)
shopt -u nullglob
if ((${#extra_cas[@]})); then
  cp "${extra_cas[@]}" "$REPO/deploy/ca-certificates/"
  say "extra CA certificates into the build: ${extra_cas[*]##*/} (from $EXTRA_CA_DIR)"
else
  say "no extra CA certificates in $EXTRA_CA_DIR"
fi

# pip_setting NAME: this host's pip configuration (global.NAME), empty when unset. The build names no
# index or mirror of its own: torch comes from where this host's pip finds packages.
pip_setting() { (pip config get "global.$1" || python3 -m pip config get "global.$1") 2>/dev/null || true; }
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
torch_source=""
find_links="${NLPMESH_TORCH_FIND_LINKS:-${PIP_FIND_LINKS:-$(pip_setting find-links)}}"
for folder in $find_links; do
  folder="${folder#file://}"
  if compgen -G "$folder/torch-2.13.0+cpu-cp311-*.whl" >/dev/null; then
    build_args+=(--volume "$folder:/torch-wheels:ro" --build-arg TORCH_FIND_LINKS=/torch-wheels)
    torch_source="the CPU wheel in $folder (this host's pip find-links), mounted into the build"
    break
  fi
done
if [ -z "$torch_source" ]; then
  torch_index="${TORCH_INDEX_URL:-${PIP_INDEX_URL:-$(pip_setting index-url)}}"
  [ -n "$torch_index" ] || fail "no torch-2.13.0+cpu wheel in pip's find-links ($find_links) and no index: set TORCH_INDEX_URL (or pip's index-url)"
  build_args+=(--build-arg "TORCH_INDEX_URL=$torch_index")
  torch_source="the index $torch_index (TORCH_INDEX_URL, else this host's pip index-url)"
fi
say "torch 2.13.0 CPU build from $torch_source"

build_image() {  # build_image NAME IMAGE DOCKERFILE
  if podman image exists "$2" && [ "${NLPMESH_SMOKE_REBUILD:-0}" != 1 ]; then
    say "image $2 exists (NLPMESH_SMOKE_REBUILD=1 to build it again)"
    return
  fi
  run_logged "build $2" "$SMOKE_DIR/logs/build-$1.log" \
    podman build --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC" "${build_args[@]}" -t "$2" -f "$3" "$REPO"
}
build_image nlpmesh "$IMAGE" "$REPO/Dockerfile"
say "image $IMAGE: $(podman run --rm --network none "$IMAGE" python -c 'import torch, transformers, grpc; print(f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}")')"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
build_image infra "$INFRA_IMAGE" "$REPO/deploy/compose-smoke.Dockerfile"
say "replaced through deploy/compose.smoke.yml: redis:7-alpine and prom/prometheus by $INFRA_IMAGE" \
    "($(podman run --rm --network none "$INFRA_IMAGE" sh -c 'redis-server --version | cut -d" " -f1-3; prometheus --version 2>&1 | head -n1' | tr '\n' ' '))"
say "left out through deploy/compose.smoke.yml: otel-collector and jaeger (no image here); the services export no spans"

# ---------------------------------------------------------------- secrets, in the work folder
export NLPMESH_SMOKE_DIR="$SMOKE_DIR" NLPMESH_CERTS_DIR="$SMOKE_DIR/certs"
rm -rf "$SMOKE_DIR/certs" "$SMOKE_DIR/redis" "$SMOKE_DIR/keys"
mkdir -p "$SMOKE_DIR/keys"
in_image() { podman run --rm --network none -v "$SMOKE_DIR:/smoke" "$IMAGE" "$@"; }
in_image nlpmesh certs init --dir /smoke/certs | sed 's/^/    /'
in_image nlpmesh redis-acl --out /smoke/redis | sed 's/^/    /'
NLPMESH_API_KEY=$(in_image nlpmesh keys create --file /smoke/keys/keys.toml --tenant smoke | grep '^nlpm_' | tail -n 1)
[ -n "$NLPMESH_API_KEY" ] || fail "nlpmesh keys create printed no key"
export NLPMESH_API_KEY
set -a; . "$SMOKE_DIR/redis/redis.env"; set +a
say "certificates, Redis users and an API key for tenant smoke in $SMOKE_DIR"

# ---------------------------------------------------------------- the podman socket
if [ -n "$NETNS" ]; then
  ip netns del "$NETNS" 2>/dev/null || true
  ip netns add "$NETNS"
  in_ns ip link set lo up
  say "the stack runs in network namespace $NETNS: its published ports clash with nothing on the host (NLPMESH_SMOKE_NETNS=0 to publish on the host)"
fi
rm -f "$SOCKET"
"${IN_NS[@]}" podman system service --time=0 "unix://$SOCKET" >"$SMOKE_DIR/logs/podman-service.log" 2>&1 &
SERVICE_PID=$!
export DOCKER_HOST="unix://$SOCKET"
for _ in $(seq 50); do
  curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null || fail "podman system service did not answer on $SOCKET"
say "podman system service on $SOCKET (DOCKER_HOST for $COMPOSE)"

# ---------------------------------------------------------------- up
health_status() {  # prints "<service> <status>" for each container of the project
  podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.ID}}' \
    | xargs -r podman inspect 2>/dev/null | python3 -c '
import json, sys
for c in json.load(sys.stdin):
    labels = c.get("Config", {}).get("Labels") or {}
    health = c["State"].get("Health") or c["State"].get("Healthcheck") or {}
    print(labels.get("com.docker.compose.service", c["Name"]), health.get("Status") or c["State"]["Status"], c["Name"].lstrip("/"))'
}
expected_containers() {  # expected_containers SERVICE: how many containers it runs
  if [ "$1" = "$SCALED" ]; then echo "$INFERENCE_REPLICAS"; else echo 1; fi
}
container_addresses() {  # "<address> <container name>" for each container of the project
  podman ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.ID}}' \
    | xargs -r podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}} {{.Name}}' 2>/dev/null
}
health_loop() {  # podman's health checks need systemd timers: run them here instead
  while :; do
    for id in $(podman ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.ID}}'); do
      timeout 30 podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
    sleep "$HEALTH_INTERVAL_S"
  done
}
health_loop &
HEALTH_LOOP_PID=$!
say "health checks: podman healthcheck run on every container each ${HEALTH_INTERVAL_S}s (no systemd here)"

compose config -q || fail "$COMPOSE rejects docker-compose.yml with deploy/compose.smoke.yml"
say "$COMPOSE config -q: docker-compose.yml and deploy/compose.smoke.yml are valid"
STACK_UP=1
compose down -v --remove-orphans >/dev/null 2>&1 || true  # a stack left by an interrupted run
run_logged "$COMPOSE -p $PROJECT up -d --no-build --scale $SCALED=$INFERENCE_REPLICAS (waits for the dependencies' health)" \
  "$SMOKE_DIR/logs/compose-up.log" compose up -d --no-build --scale "$SCALED=$INFERENCE_REPLICAS"
sed 's/^/    /' "$SMOKE_DIR/logs/compose-up.log"

say "waiting for every health check (${HEALTH_TIMEOUT_S}s at most)"
deadline=$((SECONDS + HEALTH_TIMEOUT_S))
while :; do
  states=$(health_status)
  missing=0
  for service in "${HEALTHY_SERVICES[@]}"; do
    (($(grep -c "^$service healthy " <<<"$states") == $(expected_containers "$service"))) || missing=1
  done
  ((missing == 0)) && break
  ((SECONDS > deadline)) && fail "not every service became healthy: $(tr '\n' ' ' <<<"$states")"
  grep -q ' unhealthy ' <<<"$states" && fail "a service is unhealthy: $(tr '\n' ' ' <<<"$states")"
  say "health: $(sort <<<"$states" | cut -d' ' -f1,2 | tr '\n' ' ')"
  sleep 10
done
say "every health check passes ($INFERENCE_REPLICAS inference replicas):"
sort <<<"$states" | awk '{printf "    %-12s %-8s %s\n", $1, $2, $3}'

# ---------------------------------------------------------------- the finance question, twice
ask() {  # ask CACHE_MODE [nlpmesh ask options]: through the gateway's published port, over TLS, with the API key
  in_ns podman run --rm --network host -e NLPMESH_API_KEY -v "$SMOKE_DIR/certs:/certs:ro" "$IMAGE" \
    nlpmesh ask --addr 127.0.0.1:50051 --tls-dir /certs --template finance_question \
    --var "question=$QUESTION" --cache "$@"
}
show() {  # the answer's first line, then nlpmesh ask's timing table
  local answer=${1%%$'\n'cache_hit=*}
  printf '    answer (%d characters): %.100s...\n' "${#answer}" "$(head -n 1 <<<"$answer")"
  sed -n '/^cache_hit=/,$p' <<<"$1" | sed 's/^/    /'
}
say "asking the finance question through the gateway (127.0.0.1:50051, TLS, API key), cache refresh: generated"
# The first call after start may overrun a hop's budget on a loaded machine (cold Jinja, TLS
# handshakes): DEADLINE_EXCEEDED naming the hop, by design. Asked again, at most three times.
for attempt in 1 2 3; do
  first=$(ask refresh) && break
  grep -q 'DEADLINE_EXCEEDED' <<<"$first" && ((attempt < 3)) || fail "the first ask failed: $first"
  say "attempt $attempt: $(tail -n 1 <<<"$first"); asking again"
done
show "$first"
grep -q '^cache_hit=False ' <<<"$first" || fail "the first answer was not generated"
sleep 1  # the answer is stored after it was sent, off the caller's path
say "asking the same question again: it must be a prompt-cache hit"
second=$(ask use) || fail "the second ask failed: $second"
show "$second"
grep -q '^cache_hit=True ' <<<"$second" || fail "the second answer was not a cache hit"
[ "${first%%$'\n'cache_hit=*}" = "${second%%$'\n'cache_hit=*}" ] || fail "the cached answer differs from the generated one"
say "second answer: cache_hit=True, the same text as the first"

# ---------------------------------------------------------------- Prometheus
prom() { in_ns curl -sf --get "http://127.0.0.1:9090/api/v1/$1" ${2:+--data-urlencode "query=$2"}; }
say "scraping Prometheus (127.0.0.1:9090): the targets, then the requests and cache hits it recorded"
deadline=$((SECONDS + 120))
until [ "$(prom query 'count(up{job="nlpmesh"} == 1)' 2>/dev/null \
           | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' 2>/dev/null)" = "$METRICS_TARGETS" ]; do
  ((SECONDS > deadline)) && fail "Prometheus does not see the $METRICS_TARGETS /metrics targets up: $(prom targets | head -c 2000)"
  sleep 3
done
ADDRESSES="$SMOKE_DIR/addresses.txt"  # container address -> name, to show which container a target is
container_addresses >"$ADDRESSES"
prom targets | python3 -c '
import json, sys
names = dict(line.split() for line in open(sys.argv[1]) if len(line.split()) == 2)
targets = json.load(sys.stdin)["data"]["activeTargets"]
for t in sorted(targets, key=lambda t: (t["labels"].get("compose_service", ""), t["labels"]["instance"])):
    instance = t["labels"]["instance"]
    print("    target %-10s %-19s %-22s %-5s last scrape %.1f ms" % (t["labels"].get("compose_service", "?"), instance,
          names.get(instance.rsplit(":", 1)[0], "?"), t["health"], t["lastScrapeDuration"] * 1000))' "$ADDRESSES"
deadline=$((SECONDS + 60))
until prom query 'sum(nlpmesh_cache_hits_total)' | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if r and float(r[0]["value"][1]) >= 1 else 1)' 2>/dev/null; do
  ((SECONDS > deadline)) && fail "Prometheus recorded no prompt-cache hit within 60 s"
  sleep 3
done
for query in 'sum by (tier) (nlpmesh_cache_hits_total)' \
             'sum by (service, method, code) (nlpmesh_rpc_handled_total{service="gateway"})' \
             'sum by (service) (nlpmesh_rpc_handled_total)'; do
  echo "    $query"
  prom query "$query" | python3 -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    labels = ", ".join("%s=%s" % kv for kv in sorted(r["metric"].items()))
    print("      {%s} %s" % (labels, r["value"][1]))'
done
say "Prometheus scraped all $METRICS_TARGETS /metrics targets (every replica, found by DNS) and recorded the cache hit"

# ---------------------------------------------------------------- the other model
# The gateway routes by `model`: the question asked of gemma3 is generated by its own service.
OTHER_GENERATIONS="sum(nlpmesh_rpc_handled_total{service=\"inference\",compose_service=\"inference-$OTHER_MODEL\",method=~\".*Generate\"})"
say "asking the finance question of $OTHER_MODEL (nlpmesh ask --model $OTHER_MODEL), cache refresh"
other=$(ask refresh --model "$OTHER_MODEL") || fail "asking $OTHER_MODEL failed: $other"
show "$other"
deadline=$((SECONDS + 60))
until prom query "$OTHER_GENERATIONS" | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if r and float(r[0]["value"][1]) >= 1 else 1)' 2>/dev/null; do
  ((SECONDS > deadline)) && fail "Prometheus counts no generation on inference-$OTHER_MODEL within 60 s"
  sleep 3
done
say "inference-$OTHER_MODEL generated the answer: the gateway routed the request by its model"

# ---------------------------------------------------------------- both inference replicas serve
# Generations per inference replica, as Prometheus last scraped them: "<instance> <count>" lines.
GENERATIONS="sum by (instance) (nlpmesh_rpc_handled_total{service=\"inference\",compose_service=\"$SCALED\",method=~\".*Generate\"})"
generations() {
  prom query "$GENERATIONS" | python3 -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    print(r["metric"]["instance"], int(float(r["value"][1])))'
}
# until_generations TOTAL: waits (60 s at most) until Prometheus counts TOTAL generations over all replicas.
until_generations() {
  local deadline=$((SECONDS + 60))
  until (($(generations | awk '{n += $2} END {print n + 0}') >= $1)); do
    ((SECONDS > deadline)) && fail "Prometheus did not count $1 generations within 60 s: $(generations | tr '\n' ' ')"
    sleep 2
  done
}
# per_replica BEFORE_FILE: the generations each replica did since BEFORE_FILE, one line each, named.
per_replica() {
  generations | python3 -c '
import sys
before = dict(line.split() for line in open(sys.argv[1]))
names = dict(line.split() for line in open(sys.argv[2]) if len(line.split()) == 2)
for line in sorted(sys.stdin):
    instance, count = line.split()
    print(names.get(instance.rsplit(":", 1)[0], "?"), instance, int(count) - int(before.get(instance, 0)))' "$1" "$ADDRESSES"
}
# replica_asks MODE COUNT: COUNT distinct short questions through the gateway (cache bypassed, 8 new
# tokens each), one after another. MODE "shared": user messages only, so the chat template puts the
# model's default system prompt first and every prompt has the same first prefix block; "distinct":
# each with a system message naming its own subject in its first words, so each prompt has a first
# block of its own. One line per question; DEADLINE_EXCEEDED (a loaded machine) is asked again, 3 tries.
replica_asks() {
  in_ns podman run --rm -i --network host -e NLPMESH_API_KEY -v "$SMOKE_DIR/certs:/certs:ro" "$IMAGE" \
    python - "$1" "$2" <<'PY'
import os, sys, time
from pathlib import Path
import grpc
from cli.ask import ask
from cli.connect import GatewayAccess
from nlpmesh.gateway.v1 import gateway_pb2

SUBJECTS = ["astronomy", "botany", "chemistry", "geology", "music", "cooking", "sailing", "chess",
            "poetry", "medicine", "weather", "history", "painting", "football", "economics",
            "architecture", "photography", "gardening", "mathematics", "linguistics"]
mode, count = sys.argv[1], int(sys.argv[2])
access = GatewayAccess("127.0.0.1:50051", ca_file=Path("/certs/ca.crt"), api_key=os.environ["NLPMESH_API_KEY"])
for i, subject in enumerate(SUBJECTS[:count]):
    request = gateway_pb2.GenerateRequest(cache_mode=2, sampling=gateway_pb2.SamplingParams(max_new_tokens=8))
    if mode == "distinct":
        request.chat.messages.add(role="system", content=f"{subject.capitalize()} tutor: answer questions about {subject} in one short sentence.")
    request.chat.messages.add(role="user", content=f"Name one fact about {subject}.")
    for attempt in range(3):
        started = time.perf_counter()
        try:
            result = ask(access, request, out=open(os.devnull, "w"), timeout_s=120)
            break
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED or attempt == 2:
                sys.exit(f"question {i + 1} ({subject}): {error.code().name}: {error.details()}")
            print(f"    question {i + 1:2d} ({subject}): DEADLINE_EXCEEDED, asking again", flush=True)
    usage = result.final.usage
    print(f"    question {i + 1:2d} {subject:<12} prompt {usage.prompt_tokens:3d} tokens, {usage.completion_tokens} generated, "
          f"cache_hit={result.final.cache_hit}, {1000 * (time.perf_counter() - started):.0f} ms", flush=True)
PY
}
if ((INFERENCE_REPLICAS > 1)); then
  container_addresses >"$ADDRESSES"
  until_generations 1
  generations >"$SMOKE_DIR/generations-0.txt"
  total=$(awk '{n += $2} END {print n + 0}' "$SMOKE_DIR/generations-0.txt")
  say "generations per inference replica so far (Prometheus: $GENERATIONS):"
  per_replica /dev/null | sed 's/^/    /'

  # The gateway routes generations by prefix (NLPMESH_GATEWAY_INFERENCE_ROUTING=prefix, the
  # default): the key is the tenant and the prompt's first 16 tokens. Prompts that share them
  # go to one replica, whose local prefix-KV tier then holds that block: shown first.
  say "4 short questions as user messages only: the model's default system prompt comes first in each, so all share their first prefix block"
  replica_asks shared 4 || fail "the shared-prefix questions failed"
  until_generations $((total + 4))
  per_replica "$SMOKE_DIR/generations-0.txt" >"$SMOKE_DIR/shared.txt"
  sed 's/^/    generations since: /' "$SMOKE_DIR/shared.txt"
  if (($(awk '$3 > 0' "$SMOKE_DIR/shared.txt" | wc -l) == 1)); then
    say "all 4 went to one replica: prefix-affine routing keeps a shared first block on one replica (by design)"
  else
    say "the 4 were spread over replicas (bounded load or a replica's full report sent some along the ring)"
  fi

  generations >"$SMOKE_DIR/generations-1.txt"
  total=$(awk '{n += $2} END {print n + 0}' "$SMOKE_DIR/generations-1.txt")
  say "$REPLICA_QUESTIONS short questions, each with a system message of its own subject: distinct first prefix blocks"
  replica_asks distinct "$REPLICA_QUESTIONS" || fail "the distinct-prefix questions failed"
  until_generations $((total + REPLICA_QUESTIONS))
  per_replica "$SMOKE_DIR/generations-1.txt" >"$SMOKE_DIR/distinct.txt"
  sed 's/^/    generations since: /' "$SMOKE_DIR/distinct.txt"
  serving=$(awk '$3 > 0' "$SMOKE_DIR/distinct.txt" | wc -l)
  ((serving == INFERENCE_REPLICAS)) \
    || fail "$serving of $INFERENCE_REPLICAS inference replicas generated for $REPLICA_QUESTIONS prompts with distinct first blocks"
  say "every $SCALED replica ($INFERENCE_REPLICAS) generated: the gateway reaches each one through dns:///$SCALED:50055"

  states=$(health_status)
  up=$(prom query "up{job=\"nlpmesh\",compose_service=\"$SCALED\"}" | python3 -c '
import json, sys
print(" ".join("%s=%s" % (r["metric"]["instance"], r["value"][1]) for r in json.load(sys.stdin)["data"]["result"]))')
  say "$SCALED replicas now: $(grep "^$SCALED " <<<"$states" | awk '{print $3, $2}' | tr '\n' ' ')| Prometheus up: $up"
  (($(grep -c "^$SCALED healthy " <<<"$states") == INFERENCE_REPLICAS)) || fail "not every $SCALED replica is healthy: $states"
  (($(grep -o '=1' <<<"$up" | wc -l) == INFERENCE_REPLICAS)) || fail "Prometheus does not scrape every inference replica up: $up"
else
  say "one inference replica (NLPMESH_SMOKE_INFERENCE_REPLICAS=1): no replica check"
fi
