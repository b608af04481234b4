#!/usr/bin/env bash
# Install, configure and start a single-node SLURM (munge + slurmctld + slurmd) on this Debian
# machine, so that tests/test_launch.py can submit launch/slurm_ray.sbatch for real.
#
# Run as root, from a fresh CI machine or again on one already set up: every step checks before it
# acts (packages, munge key, config, daemons), so a second run only verifies. Exits 0 once `sinfo`
# shows the node up (idle, or running jobs); otherwise prints diagnostics (daemon logs, sinfo,
# scontrol) and exits non-zero.
#
# Knobs (env): SLURM_PARTITION (default "ci"), SLURM_SETUP_TIMEOUT (seconds to wait, default 90).
# systemd is not PID 1 here (containers), so the daemons are started directly, not via systemctl.
set -euo pipefail

PARTITION="${SLURM_PARTITION:-ci}"
TIMEOUT="${SLURM_SETUP_TIMEOUT:-90}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
SPOOL=/var/spool/slurm
NODE="$(hostname -s)"

say() { echo "[setup_slurm] $*"; }

diagnose() {
  say "FAILED: $1"
  say "--- processes"; ps -eo pid,user,comm,args | grep -E "munged|slurmctld|slurmd" | grep -v grep || true
  say "--- munge self-test"; (munge -n | unmunge) 2>&1 | tail -n 5 || true
  say "--- sinfo"; sinfo -N -l 2>&1 || true
  say "--- scontrol show node"; scontrol show node "$NODE" 2>&1 || true
  for f in /var/log/munge/munged.log "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    say "--- tail $f"; tail -n 25 "$f" 2>&1 || true
  done
  say "--- $CONF"; cat "$CONF" 2>&1 || true
  exit 1
}

[ "$(id -u)" = 0 ] || { echo "setup_slurm.sh must run as root (it installs packages and starts daemons)" >&2; exit 1; }

# 1. Packages --------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || diagnose "apt-get update"
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || diagnose "apt-get install slurm-wlm munge"
fi
say "$(slurmctld -V)"

# 2. munge: key, runtime dirs, daemon as user munge ------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating munge key"
  if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  # A pid file left by a dead daemon (fresh container from an image) blocks a new munged.
  pgrep -u munge -x munged >/dev/null || rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  pgrep -u munge -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.5; done
  (munge -n | unmunge) >/dev/null 2>&1 || diagnose "munged does not answer"
fi
say "munge ok"

# slurmctld, slurmd and srun find each other by the node's name: make it resolvable.
if ! getent hosts "$NODE" >/dev/null; then
  say "adding '127.0.0.1 $NODE' to /etc/hosts"
  echo "127.0.0.1 $NODE" >> /etc/hosts
fi

# 3. slurm.conf for this node (hardware line from `slurmd -C`, so CPUs/memory match the machine) ----
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$SPOOL" "$SPOOL/ctld" "$SPOOL/d"
hw="$(slurmd -C | head -n 1)"               # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
hw="${hw/NodeName=* CPUs=/CPUs=}"           # keep the hardware fields, set the name ourselves
mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
hw="${hw/RealMemory=$mem/RealMemory=$(( mem * 9 / 10 ))}"   # headroom: RealMemory above the real one drains the node
new_conf="$(cat <<EOF
# Written by .ci/setup_slurm.sh: single-node SLURM for CI (no cgroups, no accounting daemon).
ClusterName=alignreg-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)"
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$CONF"
  changed=1
  say "wrote $CONF (node $NODE: $hw)"
fi

# 4. Daemons: (re)start only what is not running or runs an outdated config -------------------------
pid_of() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }
stop_pidfile() {  # stop a daemon this script started earlier, by the pid in its pid file
  local pid
  if pid="$(pid_of "$1")"; then
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$1"
}
if [ "$changed" = 1 ]; then
  stop_pidfile /run/slurmd.pid
  stop_pidfile /run/slurmctld.pid
fi
pid_of /run/slurmctld.pid >/dev/null || { say "starting slurmctld"; slurmctld || diagnose "slurmctld did not start"; }
pid_of /run/slurmd.pid >/dev/null || { say "starting slurmd"; slurmd || diagnose "slurmd did not start"; }

# 5. Wait for the node to be schedulable ---------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|drained*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || diagnose "node $NODE not up after ${TIMEOUT}s (state: '${state:-none}')"
  sleep 1
done
say "SLURM ready: node $NODE is $state in partition $PARTITION"
sinfo
