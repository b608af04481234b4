#!/usr/bin/env bash
# One machine: start a private Ray head, run alignreg on it, stop the head.
#
#   launch/local.sh CONFIG [key=value ...]
#
# The head gets free ports and its own temp dir, so it runs beside other Ray clusters on the same
# machine (`ray stop` is never called: it would stop them all). Environment:
#   ALIGNREG_ORCHESTRATION   ray (default): orchestration=ray ray.address=auto on a fresh head;
#                            local: no Ray at all, one process; "": keep the config's value
#   ALIGNREG_VENV            virtualenv to use (default <repo>/.venv; "" = use PATH as is)
#   ALIGNREG_NUM_CPUS, ALIGNREG_NUM_GPUS   resources the head advertises (default: Ray detects)
#   ALIGNREG_RAY_START_ARGS  extra `ray start` arguments
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: launch/local.sh CONFIG [key=value ...]" >&2; exit 2; }
CONFIG="$1"; shift
VENV="${ALIGNREG_VENV-$ROOT/.venv}"
[ -z "$VENV" ] || export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# shellcheck source=launch/ray_env.sh
. "$ROOT/launch/ray_env.sh"

case "${ALIGNREG_ORCHESTRATION-ray}" in
  ray) ORCH_ARGS=(orchestration=ray ray.address=auto); START_RAY=1 ;;
  local) exec alignreg rl "$CONFIG" orchestration=local "$@" ;;
  "") ORCH_ARGS=(); START_RAY=1 ;;
  *) echo "error: ALIGNREG_ORCHESTRATION=$ALIGNREG_ORCHESTRATION; valid: ray, local, or empty" >&2; exit 2 ;;
esac

command -v ray >/dev/null || { echo "error: ray not found; install it: pip install 'alignreg[ray]'" >&2; exit 1; }
ray_auth_env || exit 1
RES_ARGS=()
[ -n "${ALIGNREG_NUM_CPUS:-}" ] && RES_ARGS+=(--num-cpus="$ALIGNREG_NUM_CPUS")
[ -n "${ALIGNREG_NUM_GPUS:-}" ] && RES_ARGS+=(--num-gpus="$ALIGNREG_NUM_GPUS")
read -r -a EXTRA <<<"${ALIGNREG_RAY_START_ARGS:-}"
PORT="$(free_port)"
TMP="$(mktemp -d /tmp/ray_local_XXXXXX)"   # short path: Ray's unix sockets live under it
export RAY_ADDRESS="127.0.0.1:$PORT"         # ray.address=auto resolves to this head
env -u RAY_ADDRESS ray start --head --block --node-ip-address=127.0.0.1 --port="$PORT" \
  --dashboard-port="$(free_port)" --ray-client-server-port="$(free_port)" \
  --dashboard-agent-listen-port="$(free_port)" --temp-dir="$TMP" --disable-usage-stats \
  ${RES_ARGS[@]+"${RES_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} > "$TMP/ray_start.log" 2>&1 &
HEAD_PID=$!
TRAINER_PID=""
RC=1
cleanup() {  # keep Ray's logs when the run failed
  ray_stop_pids "$HEAD_PID"
  if [ "$RC" = 0 ]; then rm -rf "$TMP"; else echo "[local] Ray logs kept in $TMP" >&2; fi
}
trap cleanup EXIT
on_term() {  # the trainer checkpoints and exits; before it started, just stop
  if [ -n "$TRAINER_PID" ]; then kill -TERM "$TRAINER_PID" 2>/dev/null; else exit 143; fi
}
trap on_term TERM INT
if ! ray_wait_healthy "$RAY_ADDRESS" 120 "$HEAD_PID"; then
  cat "$TMP/ray_start.log" >&2
  exit 1
fi
echo "[local] Ray head at $RAY_ADDRESS (logs: $TMP)"

alignreg rl "$CONFIG" ${ORCH_ARGS[@]+"${ORCH_ARGS[@]}"} "$@" &
TRAINER_PID=$!
while :; do
  wait "$TRAINER_PID"; RC=$?
  kill -0 "$TRAINER_PID" 2>/dev/null || break
done
wait "$TRAINER_PID" 2>/dev/null; RC2=$?  # its own status, if a trap cut the last wait short (127: already collected)
[ "$RC2" -ne 127 ] && RC=$RC2
exit "$RC"
