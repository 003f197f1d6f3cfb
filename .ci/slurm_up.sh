#!/usr/bin/env bash
# Start a one-node Slurm (Debian's slurm-wlm + munge, daemons started by hand, no systemd) for the
# real-Slurm tests in tests/slurm/. Recipe: ../shared/slurm/one-node-slurm.md.
#
#   .ci/slurm_up.sh      # as root on Debian/Ubuntu; installs the packages when missing
#   .ci/slurm_down.sh    # stops the daemons this script started (by PID)
#
# Without root, or without Slurm and apt-get, it prints why and exits 0 (the tests under
# tests/slurm/ then skip with that reason); any other failure exits 1. What it started is
# recorded in $SLURM_CI_STATE for slurm_down.sh.
set -euo pipefail

STATE="${SLURM_CI_STATE:-/tmp/var-train-slurm-ci}"
mkdir -p "$STATE"
rm -f "$STATE/skip_reason" "$STATE/ready"

skip() { echo "[slurm_up] skipped: $*" >&2; echo "$*" > "$STATE/skip_reason"; exit 0; }

[[ "$(id -u)" -eq 0 ]] || skip "not root (the one-node Slurm daemons must run as root)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "no apt-get to install slurm-wlm and munge"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi

HOST="$(hostname -s)"
CPUS="${SLURM_CI_CPUS:-96}"   # declared, not real: see the node lines below
NODES="${HOST},${HOST}-2"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

# --- MUNGE -----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    su -s /bin/sh munge -c /usr/sbin/munged
    cat /run/munge/munged.pid > "$STATE/munged.pid"
fi
munge -n | unmunge | grep -q 'STATUS: *Success' || { echo "[slurm_up] munged does not answer" >&2; exit 1; }

# --- slurm.conf --------------------------------------------------------------------------------
mkdir -p /etc/slurm /var/spool/slurmctld "/var/spool/slurmd/${HOST}" "/var/spool/slurmd/${HOST}-2" /var/log/slurm /run/slurm
rm -f /etc/slurm/gres.conf
cat > /etc/slurm/slurm.conf <<CONF
# One-node Slurm for the CI tests of slurm/ (written by .ci/slurm_up.sh).
ClusterName=vartest
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire + 1 s (default 120 s): short for CI.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
KillWait=30
MinJobAge=600
InactiveLimit=0
Waittime=0
# Real preemption: jobs in 'urgent' requeue jobs in 'debug' (SIGTERM, then GraceTime s to finish).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Two nodes on this one machine (two slurmd, ports 6818/6819) so that multi-node jobs run for real,
# each declaring a GPU node's CPU count (config_overrides) so that the launchers' default
# resources (8 tasks x 12 CPUs per node) pass `sbatch --test-only`. GPUs: submit with --gpus-per-node=0.
SlurmdParameters=config_overrides
NodeName=${HOST} NodeHostname=${HOST} Port=6818 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
NodeName=${HOST}-2 NodeHostname=${HOST} Port=6819 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODES} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=${NODES} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF

# The second node's name must resolve (it is the rendezvous host of jobs that start on it).
if ! getent hosts "${HOST}-2" >/dev/null; then
    echo "127.0.0.1 ${HOST}-2  # var-train slurm CI" >> /etc/hosts
    touch "$STATE/hosts_entry"
fi

# --- daemons ---------------------------------------------------------------------------------
start_daemon() {   # start_daemon NAME PIDFILE COMMAND...: (re)start one daemon, record its pid
    local name="$1" pidfile="$2"
    shift 2
    if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "[slurm_up] ${name} already running (pid $(cat "$pidfile")): restarting it with this slurm.conf" >&2
        kill "$(cat "$pidfile")"
        sleep 1
    fi
    rm -f "$pidfile"
    "$@"
    for _ in $(seq 50); do [[ -s "$pidfile" ]] && break; sleep 0.1; done
    cat "$pidfile" > "$STATE/${name}.pid"
}
start_daemon slurmctld /run/slurm/slurmctld.pid slurmctld
start_daemon slurmd-1 "/run/slurm/slurmd-${HOST}.pid" slurmd -N "${HOST}"
start_daemon slurmd-2 "/run/slurm/slurmd-${HOST}-2.pid" slurmd -N "${HOST}-2"
up() { [[ "$(sinfo -h -N -p debug -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)')" -eq 2 ]]; }
for _ in $(seq 60); do
    up && break
    scontrol update nodename="$NODES" state=resume >/dev/null 2>&1 || true
    sleep 1
done
up || { echo "[slurm_up] the nodes did not come up: $(sinfo -N 2>&1 | tr '\n' ' ')" >&2; exit 1; }
touch "$STATE/ready"
echo "[slurm_up] one-node Slurm up on ${HOST} (${CPUS} CPUs): $(sinfo -h -o '%P %a %t' | tr '\n' ' ')" >&2
