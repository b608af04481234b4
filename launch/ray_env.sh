# Shared helpers of the launch scripts (sourced, not run): Ray auth, start-up wait, shutdown.
#
# We never call `ray stop`: it kills every Ray process of the user on the machine, including other
# clusters (other jobs, other people's tests). Each script starts `ray start --block` in the
# background and stops exactly those processes by pid; on SIGTERM `ray start --block` shuts down
# the Ray processes it started.

# Token auth with a token in the environment: every process we start (ray start, the trainer, the
# actors) inherits it, so nothing depends on ~/.ray/auth_token, which other clusters may rewrite.
# RAY_AUTH_MODE=disabled opts out; an exported RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is kept.
ray_auth_env() {
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    RAY_AUTH_TOKEN="$(python -c 'import secrets; print(secrets.token_hex(32))')" || return 1
    export RAY_AUTH_TOKEN
  fi
  # Our clusters end with the run: skip the 30 s node drain `ray start --block` does on SIGTERM.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
}

# ray_wait_healthy ADDRESS TIMEOUT_S HEAD_PID: wait until the GCS at ADDRESS answers; fail early if
# the process that starts the head has exited. One `ray health-check` waits up to ~40 s for a GCS that is
# not there: it runs in the background, so that the head's exit is seen within a second.
ray_wait_healthy() {
  local addr=$1 deadline=$(( $(date +%s) + $2 )) pid=$3 check
  while :; do
    ray health-check --address "$addr" >/dev/null 2>&1 &
    check=$!
    while kill -0 "$check" 2>/dev/null; do
      if ! kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$check" 2>/dev/null; wait "$check" 2>/dev/null
        echo "Ray head exited during start-up (see its output above)" >&2; return 1
      fi
      sleep 0.5
    done
    wait "$check" && return 0
    kill -0 "$pid" 2>/dev/null || { echo "Ray head exited during start-up (see its output above)" >&2; return 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { echo "Ray head not healthy at $addr after $2 s" >&2; return 1; }
    sleep 1
  done
}

# ray_wait_nodes WANT TIMEOUT_S NODE=PID...: wait until Ray counts WANT nodes alive (RAY_ADDRESS); fail
# at once, naming the node, when one of the processes that start them (`srun ... ray start --block`) exits.
ray_wait_nodes() {
  local want=$1 wait_s=$2 waiter np
  shift 2
  python - "$want" "$wait_s" <<'EOF' &
import sys, time
import ray
want, wait_s = int(sys.argv[1]), float(sys.argv[2])
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
deadline = time.time() + max(wait_s, 10.0)
while (alive := sum(n["Alive"] for n in ray.nodes())) < want and time.time() < deadline:
    time.sleep(2)
print(f"[slurm_ray] Ray nodes alive: {alive}/{want}; resources: {ray.cluster_resources()}", flush=True)
sys.exit(0 if alive >= want else 1)
EOF
  waiter=$!
  while kill -0 "$waiter" 2>/dev/null; do
    for np in "$@"; do
      if ! kill -0 "${np#*=}" 2>/dev/null; then
        kill -TERM "$waiter" 2>/dev/null
        wait "$waiter" 2>/dev/null
        echo "the Ray node on ${np%%=*} exited before the cluster was complete (its output is above)" >&2
        return 1
      fi
    done
    sleep 1
  done
  wait "$waiter"
}

# ray_stop_pids PID...: SIGTERM, wait up to 30 s, then SIGKILL what is left.
ray_stop_pids() {
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  local _
  for _ in $(seq 60); do
    kill -0 "$@" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL "$@" 2>/dev/null
  wait "$@" 2>/dev/null
  return 0
}

# free_port: an unused TCP port on this machine (for tests and local runs beside other clusters).
free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
