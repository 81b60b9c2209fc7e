#!/usr/bin/env bash
# A single-node SLURM on localhost for the tests (Debian's slurm-wlm and munge; run as root).
#
#   .ci/slurm.sh install        apt-get install slurm-wlm munge (when missing)
#   .ci/slurm.sh start [DIR]    start munged, slurmctld and slurmd with everything under DIR
#                               (default: a new temporary folder); prints SLURM_CONF=DIR/slurm.conf
#   .ci/slurm.sh stop DIR       stop the daemons started in DIR (by their pid files), remove DIR
#
# Nothing in /etc is changed: every SLURM command finds the config through SLURM_CONF.
# Facts this follows: ../shared/notes/slurm-single-node.md (task/affinity so a 1-CPU job sees
# one CPU; DependencyParameters=kill_invalid_depend so dependents of a failed job are cancelled
# instead of pending forever; no accounting, so no sacct).
set -euo pipefail

die() { echo "slurm.sh: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "expected $what within ${seconds} s, got nothing (logs in $DIR)"
        sleep 0.2
    done
}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "expected to run as root to apt-get install slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' postinst scripts try to start the daemons through systemd; without
    # systemd (containers) that fails harmlessly. Our daemons never use /etc.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start() {
    [[ $(id -u) == 0 ]] || die "expected root (SlurmUser=root), got uid $(id -u)"
    command -v slurmctld >/dev/null || die "expected slurmctld on PATH, got none (.ci/slurm.sh install)"
    DIR=${1:-$(mktemp -d /tmp/slurm-test.XXXXXX)}
    mkdir -p "$DIR"/{state,spool,log,run,munge}
    DIR=$(cd "$DIR" && pwd)
    chmod 700 "$DIR" "$DIR/munge"
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    local socket="$DIR/munge/munge.socket"
    munged --force --socket="$socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed"
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=mnisttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DependencyParameters=kill_invalid_depend
ReturnToService=2
KillWait=10
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$DIR/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    wait_for 30 "scontrol ping to say UP" bash -c 'scontrol ping | grep -q UP'
    slurmd -f "$SLURM_CONF" -N localhost
    wait_for 30 "the node to be idle" bash -c '[[ $(sinfo -h -n localhost -o %t) == idle ]]'
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    DIR=${1:?usage: slurm.sh stop DIR}
    [[ -f $DIR/slurm.conf ]] || die "expected a SLURM started by slurm.sh in $DIR, got no slurm.conf"
    export SLURM_CONF="$DIR/slurm.conf"
    scancel --full --quiet --user=root 2>/dev/null || true
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -f $DIR/run/$name.pid ]] || continue
        pid=$(cat "$DIR/run/$name.pid")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
}

case ${1:-} in
install) install ;;
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
*) die "usage: slurm.sh install|start [DIR]|stop DIR" ;;
esac
