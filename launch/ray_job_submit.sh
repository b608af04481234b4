#!/usr/bin/env bash
# Submit an alignreg run to a running Ray cluster as a Ray job.
#
#   launch/ray_job_submit.sh [options] CONFIG [key=value ...]
#
# The repository (minus .git, .venv, runs, caches) is uploaded as the job's working_dir, and the
# job runs `python -m alignreg rl CONFIG orchestration=ray ray.address=auto key=value ...` on the
# head node with the cluster's Python (which needs alignreg's dependencies installed). Inside a
# Ray job, ray.address=auto is the cluster that runs the job.
#
# Options:
#   --address URL        the cluster's dashboard (job server) address (default
#                        $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --submission-id ID   job id (default: Ray picks one)
#   --no-wait            return after submitting (default: follow the logs until the job ends)
#   --env KEY=VALUE      environment variable for the job (repeatable; PYTHONUNBUFFERED=1 is set)
#   --exclude PATTERN    extra working_dir exclude, gitignore syntax (repeatable)
#   --working-dir DIR    directory to upload (default: the repository root)
#   --stop-wait S        seconds `ray job stop` waits after its SIGTERM before SIGKILL (default 600,
#                        $ALIGNREG_JOB_STOP_WAIT_S; Ray's own default, 3 s, is too short for the
#                        trainer to finish its step and write the checkpoint)
#   --dry-run            print the `ray job submit` command (shell-quoted) and exit
# CONFIG is a path under the working dir: relative to it, or absolute (it is mapped to the same file in
# the uploaded copy).
# Environment: ALIGNREG_ORCHESTRATION ray (default) | local | "" (keep the config's), as in
# launch/slurm_ray.sbatch. Clusters with token auth need the token here too (RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN, or ~/.ray/auth_token).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
WORKDIR="$ROOT"
SUBMISSION_ID=""
NO_WAIT=0
DRY_RUN=0
STOP_WAIT="${ALIGNREG_JOB_STOP_WAIT_S:-600}"
ENV_VARS=(PYTHONUNBUFFERED=1)
EXCLUDES=(.git .venv runs "__pycache__" "*.egg-info" .pytest_cache MUJOCO_LOG.TXT)
while [ $# -gt 0 ]; do
  case "$1" in
    --address|--submission-id|--env|--exclude|--working-dir|--stop-wait)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; usage; } ;;
  esac
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --submission-id) SUBMISSION_ID="$2"; shift 2 ;;
    --no-wait) NO_WAIT=1; shift ;;
    --env) [[ "$2" == *=* ]] || { echo "error: --env expects KEY=VALUE, got '$2'" >&2; exit 2; }
           ENV_VARS+=("$2"); shift 2 ;;
    --exclude) EXCLUDES+=("$2"); shift 2 ;;
    --working-dir) WORKDIR="$(cd "$2" && pwd)" || { echo "error: --working-dir $2 is not a directory" >&2; exit 2; }
                   shift 2 ;;
    --stop-wait) STOP_WAIT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "error: missing CONFIG" >&2; usage; }
CONFIG="$1"; shift
[[ "$STOP_WAIT" =~ ^[0-9]+$ ]] || { echo "error: --stop-wait expects whole seconds, got '$STOP_WAIT'" >&2; exit 2; }
if [[ "$CONFIG" == /* ]]; then  # the job runs in a copy of WORKDIR: name the file relative to it
  [ -f "$CONFIG" ] || { echo "error: $CONFIG is not a file" >&2; exit 2; }
  ABS="$(cd "$(dirname "$CONFIG")" && pwd -P)/$(basename "$CONFIG")"
  WD="$(cd "$WORKDIR" && pwd -P)"
  [[ "$ABS" == "$WD"/* ]] || { echo "error: $CONFIG is outside the working dir $WORKDIR, which is all the job gets: copy it under there or pass --working-dir" >&2; exit 2; }
  CONFIG="${ABS#"$WD"/}"
fi
[ -f "$WORKDIR/$CONFIG" ] || { echo "error: $CONFIG is not a file under $WORKDIR (the job runs there)" >&2; exit 2; }

case "${ALIGNREG_ORCHESTRATION-ray}" in
  ray) ORCH_ARGS=(orchestration=ray ray.address=auto) ;;
  local) ORCH_ARGS=(orchestration=local) ;;
  "") ORCH_ARGS=() ;;
  *) echo "error: ALIGNREG_ORCHESTRATION=$ALIGNREG_ORCHESTRATION; valid: ray, local, or empty" >&2; exit 2 ;;
esac

# Ray's job supervisor reads the stop wait from its environment, which is the job's runtime env; a
# --env RAY_JOB_STOP_WAIT_TIME_S=... comes later and wins.
ENV_VARS=("RAY_JOB_STOP_WAIT_TIME_S=$STOP_WAIT" "${ENV_VARS[@]}")
# The runtime env as JSON, built by Python so that any path or value is quoted correctly.
PY="$(command -v python3 || command -v python)"
RUNTIME_ENV="$("$PY" - "$WORKDIR" "${#EXCLUDES[@]}" ${EXCLUDES[@]+"${EXCLUDES[@]}"} ${ENV_VARS[@]+"${ENV_VARS[@]}"} <<'EOF'
import json, sys
workdir, n = sys.argv[1], int(sys.argv[2])
excludes, env = sys.argv[3:3 + n], sys.argv[3 + n:]
print(json.dumps({"working_dir": workdir, "excludes": excludes,
                  "env_vars": dict(kv.split("=", 1) for kv in env)}))
EOF
)"

CMD=(ray job submit --address "$ADDRESS" --runtime-env-json "$RUNTIME_ENV")
[ -n "$SUBMISSION_ID" ] && CMD+=(--submission-id "$SUBMISSION_ID")
[ "$NO_WAIT" = 1 ] && CMD+=(--no-wait)
CMD+=(-- python -m alignreg rl "$CONFIG" ${ORCH_ARGS[@]+"${ORCH_ARGS[@]}"} "$@")

if [ "$DRY_RUN" = 1 ]; then
  "$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${CMD[@]}"
  exit 0
fi
command -v ray >/dev/null || { echo "error: ray not found; install it: pip install 'alignreg[ray]'" >&2; exit 1; }
exec "${CMD[@]}"
