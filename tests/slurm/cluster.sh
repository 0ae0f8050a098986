#!/usr/bin/env bash
# A real single-node SLURM cluster for the tests: munge, slurmctld and slurmd from Debian's slurm-wlm,
# with a generated slurm.conf under $1 (default /tmp/lmms-quant-slurm).  `cluster.sh start DIR` starts the
# daemons and waits until the node is idle (exit 0) or says why it could not (exit 1); `cluster.sh stop DIR`
# stops them.  Needs root (as CI and the sessions run); .ci/run installs the packages with apt.
set -euo pipefail
cmd=${1:-start}
dir=${2:-/tmp/lmms-quant-slurm}
host=$(hostname -s)
case "$cmd" in
start)
    for bin in munged slurmctld slurmd sinfo; do command -v "$bin" >/dev/null || { echo "slurm: $bin not installed (apt-get install slurmctld slurmd slurm-client munge)"; exit 1; }; done
    mkdir -p "$dir"/{spool,state,log,run} /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force || /usr/sbin/munged --force
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$dir/slurm.conf" <<CONF
ClusterName=lmmsquant
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    export SLURM_CONF="$dir/slurm.conf"
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -f "$SLURM_CONF"
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -f "$SLURM_CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then echo "slurm: up ($SLURM_CONF)"; exit 0; fi
        sleep 1
    done
    echo "slurm: the node did not come up; slurmctld log:"; tail -5 "$dir/log/slurmctld.log" 2>/dev/null; tail -5 "$dir/log/slurmd.log" 2>/dev/null
    exit 1
    ;;
stop)
    export SLURM_CONF="$dir/slurm.conf"
    scancel --full --user "$(id -un)" 2>/dev/null || true   # no job step outlives the cluster
    for _ in $(seq 1 20); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x slurmstepd || true
    ;;
esac
