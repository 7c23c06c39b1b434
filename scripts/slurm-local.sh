#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try the cluster path of the DAG (README: "SLURM").
#
#   bash scripts/slurm-local.sh start    # install slurm-wlm + munge if missing (root), start munged, slurmctld, slurmd
#   bash scripts/slurm-local.sh status   # the daemons this script started, and sinfo
#   bash scripts/slurm-local.sh stop     # stop only the daemons this script started (by pid file)
#
# The node is this host (its short host name), SelectType=select/cons_tres, no accounting database
# (so Snakemake's status checks use squeue: --slurm-status-command squeue). State, logs and pid files
# live in $T2EVAL_SLURM_DIR (default /tmp/t2eval-slurm). The config is written to
# $T2EVAL_SLURM_DIR/slurm.conf and, when /etc/slurm/slurm.conf is absent or was written by this script,
# to /etc/slurm/slurm.conf too, so sbatch/squeue/sinfo find it without SLURM_CONF.
# Idempotent: `start` on a running cluster changes nothing.
set -euo pipefail

DIR=${T2EVAL_SLURM_DIR:-/tmp/t2eval-slurm}
MARK="# written by t2eval scripts/slurm-local.sh"
HOST=$(hostname -s)
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf

die() { echo "slurm-local: $*" >&2; exit 1; }
alive() {  # the pid in file $1 runs (a zombie does not count)
  [ -f "$1" ] || return 1
  local pid; pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

install_if_missing() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "slurm-wlm/munge are not installed and installing them needs root: apt-get install slurm-wlm munge"
  command -v apt-get >/dev/null || die "no apt-get here: install slurm-wlm and munge with your package manager"
  echo "slurm-local: installing slurm-wlm and munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # leave ~1 GiB to the system; slurmd refuses to start if RealMemory exceeds what it sees
  mem_mb=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))
  mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log"
  cat > "$CONF" <<EOF
$MARK
ClusterName=t2eval-local
SlurmctldHost=$HOST
SlurmUser=$(id -un)
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [ -w /etc/slurm ] || { [ "$(id -u)" -eq 0 ] && mkdir -p /etc/slurm; }; then
    if [ ! -f "$ETC_CONF" ] || head -n1 "$ETC_CONF" | grep -qF "$MARK"; then
      cp "$CONF" "$ETC_CONF"
    else
      echo "slurm-local: $ETC_CONF exists and is not ours; use SLURM_CONF=$CONF" >&2
    fi
  fi
}

start_munge() {
  local p
  for p in $(pgrep -x munged); do  # a live munged (started by anyone) serves us; zombies don't count
    grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null || return 0
  done
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    [ "$(id -u)" -eq 0 ] || die "no munge key at $key (create it as root: mungekey --create)"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key" --force >/dev/null
    else dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; fi
    chown munge:munge "$key" 2>/dev/null || true
    chmod 0400 "$key"
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if [ "$(id -u)" -eq 0 ] && id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged --force" || munged --force
  else
    munged --force
  fi
  # munged daemonises: take the daemon's own pid file, not the launcher's pid
  wait_for 10 test -s /run/munge/munged.pid || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$DIR/munged.pid"
}

wait_for() {  # wait_for <seconds> <command...>
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}

cmd_start() {
  install_if_missing
  mkdir -p "$DIR"
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
    echo "slurm-local: already running (node $HOST)"; return 0
  fi
  write_conf
  start_munge
  export SLURM_CONF="$CONF"
  alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  wait_for 30 scontrol ping || die "slurmctld did not answer (see $DIR/log/slurmctld.log)"
  alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
  # a node that was down in an earlier run comes back
  wait_for 30 sh -c "sinfo -h -n $HOST -o %T | grep -Eq 'idle|mix|alloc'" || {
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for 20 sh -c "sinfo -h -n $HOST -o %T | grep -Eq 'idle|mix|alloc'" \
      || die "node $HOST is not idle: $(sinfo -h -n "$HOST" -o '%T %E') (see $DIR/log/slurmd.log)"
  }
  echo "slurm-local: running — node $HOST ($(nproc) CPUs), partition local; config $CONF"
}

cmd_stop() {
  local stopped=0
  for d in slurmd slurmctld munged; do
    if alive "$DIR/$d.pid"; then
      kill "$(cat "$DIR/$d.pid")" && stopped=$((stopped + 1))
      # slurmctld can take several seconds to drain its agents; SIGKILL after 20 s
      for _ in $(seq 40); do alive "$DIR/$d.pid" || break; sleep 0.5; done
      alive "$DIR/$d.pid" && kill -9 "$(cat "$DIR/$d.pid")" 2>/dev/null
    fi
    rm -f "$DIR/$d.pid"
  done
  echo "slurm-local: stopped $stopped daemon(s) started by this script"
}

cmd_status() {
  local rc=0
  for d in munged slurmctld slurmd; do
    if alive "$DIR/$d.pid"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: not running"; rc=3; fi
  done
  if [ $rc -eq 0 ]; then SLURM_CONF="$CONF" sinfo; fi
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
