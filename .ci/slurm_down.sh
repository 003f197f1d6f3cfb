#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started, by the PIDs it recorded (never by name).
set -uo pipefail
STATE="${SLURM_CI_STATE:-/tmp/var-train-slurm-ci}"
for daemon in slurmd-1 slurmd-2 slurmctld munged; do
    pidfile="$STATE/${daemon}.pid"
    [[ -s "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "[slurm_down] stopped ${daemon} (pid ${pid})" >&2
    fi
    rm -f "$pidfile"
done
if [[ -f "$STATE/hosts_entry" ]]; then   # /etc/hosts may be a bind mount: rewrite it in place
    grep -v '# var-train slurm CI$' /etc/hosts > "$STATE/hosts" && cat "$STATE/hosts" > /etc/hosts
    rm -f "$STATE/hosts_entry" "$STATE/hosts"
fi
rm -f "$STATE/ready"
