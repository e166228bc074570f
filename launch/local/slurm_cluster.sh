#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for testing launch/*.slurm: munge + slurmctld + slurmd.
#
#   launch/local/slurm_cluster.sh start [STATE_DIR]   # writes STATE_DIR/slurm.conf, starts the daemons
#   SLURM_CONF=STATE_DIR/slurm.conf sbatch --wait launch/train_prior.slurm ...
#   launch/local/slurm_cluster.sh stop [STATE_DIR]
#
# Needs Debian's slurm-wlm and munge (launch/local/install_system_deps.sh) and root.
set -euo pipefail
cmd=${1:?usage: slurm_cluster.sh start|stop [STATE_DIR]}
state=${2:-/tmp/dalle_dist_slurm}
conf="$state/slurm.conf"
host=$(hostname -s)

stop() {
  for pidfile in "$state"/slurmd.pid "$state"/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
}

case "$cmd" in
  start)
    command -v slurmctld >/dev/null || { echo "slurmctld not found: run launch/local/install_system_deps.sh" >&2; exit 1; }
    stop
    rm -rf "$state"; mkdir -p "$state"/{spool,ctld}
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS
    # Free ports, so a cluster left behind by a killed run (or a second one) never collides with this one.
    read -r ctld_port slurmd_port < <(python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$conf" <<CONF
ClusterName=dalledist
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    # munge: a key and a running daemon (slurm authenticates every RPC with it)
    if ! pgrep -x munged >/dev/null; then
      [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
      chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
      mkdir -p /run/munge /var/log/munge /var/lib/munge; chown munge:munge /run/munge /var/log/munge /var/lib/munge
      runuser -u munge -- munged --force
    fi
    SLURM_CONF="$conf" slurmctld
    SLURM_CONF="$conf" slurmd
    for _ in $(seq 60); do
      if SLURM_CONF="$conf" sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then
        echo "slurm up: SLURM_CONF=$conf"; exit 0
      fi
      sleep 1
    done
    echo "slurm did not come up; logs in $state" >&2
    tail -20 "$state"/slurmctld.log "$state"/slurmd.log >&2 || true
    exit 1
    ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
