# Shared by the sbatch scripts (source it): run a job step, forward Slurm's warning signal to it,
# and requeue the job when the step reports that it checkpointed and stopped early.
#
# The exit-code protocol (var_train/preemption.py):
#   0   finished                      -> the job ends
#   42  preempted: SIGUSR1/SIGTERM    -> checkpoint saved; `scontrol requeue` this job, and the
#       arrived, a checkpoint was        requeued job resumes from it (checkpoint.resume=auto)
#       saved, the process exited
#   43  too many non-finite steps     -> not requeued (it would fail again)
#   any other code                    -> a failure; not requeued, the job fails with that code
#
# The batch script asks Slurm for the warning with `#SBATCH --signal=B:USR1@120`: SIGUSR1 reaches
# this shell 120 s before the time limit, and `run_with_requeue` passes it on to the step (srun
# forwards it to every task), which gives the trainer time to write its checkpoint.

EXIT_CODE_PREEMPTED="${EXIT_CODE_PREEMPTED:-42}"   # must equal var_train.preemption.EXIT_CODE_PREEMPTED
MAX_REQUEUES="${MAX_REQUEUES:-50}"                 # a guard against a job that is preempted forever

# requeue_if_preempted EXIT_CODE: requeue this job when EXIT_CODE says "preempted"; returns 0 when
# the job was requeued, otherwise EXIT_CODE itself.
requeue_if_preempted() {
    local code="$1"
    if [[ "$code" -ne "$EXIT_CODE_PREEMPTED" ]]; then
        return "$code"
    fi
    local restarts="${SLURM_RESTART_COUNT:-0}"
    if [[ "$restarts" -ge "$MAX_REQUEUES" ]]; then
        echo "[requeue] preempted again but already requeued ${restarts} times (MAX_REQUEUES=${MAX_REQUEUES}); giving up" >&2
        return "$code"
    fi
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "[requeue] exit code ${code} (preempted) outside Slurm: rerun the same command to resume" >&2
        return "$code"
    fi
    echo "[requeue] step exited with ${code} (checkpoint saved): scontrol requeue ${SLURM_JOB_ID}" >&2
    scontrol requeue "$SLURM_JOB_ID"
}

# run_with_requeue CMD [ARGS...]: run CMD in the background, forward SIGUSR1/SIGTERM to it, wait
# for it, then apply requeue_if_preempted to its exit code.
run_with_requeue() {
    "$@" &
    local pid=$!
    local code
    trap 'echo "[requeue] got SIGUSR1: forwarding to step ${pid}" >&2; kill -USR1 "${pid}" 2>/dev/null || true' USR1
    trap 'echo "[requeue] got SIGTERM: forwarding to step ${pid}" >&2; kill -TERM "${pid}" 2>/dev/null || true' TERM
    # A trapped signal makes `wait` return early while the step still runs: wait again. Bash keeps
    # the status of a finished background job, so the last `wait` returns the step's exit code.
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true
    done
    code=0
    wait "$pid" || code=$?
    trap - USR1 TERM
    requeue_if_preempted "$code"
}

# master_addr: the first host of the allocation (every rank rendezvouses there).
master_addr() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm allocation}" | head -n 1
}
