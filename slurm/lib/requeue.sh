# Shared by the sbatch scripts (source it): the job's environment, running a job step with Slurm's
# signals forwarded to it, and requeueing the job when the step stopped early with its work saved.
#
# The exit-code protocol (var_train/preemption.py):
#   0   finished                      -> the job ends
#   42  preempted: SIGUSR1/SIGTERM    -> checkpoint saved; `scontrol requeue` this job, and the
#       arrived, a checkpoint was        requeued job resumes from it (checkpoint.resume=auto)
#       saved, the process exited
#   43  too many non-finite steps     -> not requeued (it would fail again)
#   any other code                    -> a failure; not requeued, the job fails with that code
#
# The batch scripts ask Slurm for the warning with `#SBATCH --signal=B:USR1@120`: SIGUSR1 reaches
# this shell 120 s before the time limit, and the run_* functions pass it on to the step (srun
# forwards it to every task). A preemption or `scancel` sends SIGTERM to the shell and to every
# process of the step; only the trainer acts on it (its DataLoader workers ignore it).

EXIT_CODE_PREEMPTED="${EXIT_CODE_PREEMPTED:-42}"   # must equal var_train.preemption.EXIT_CODE_PREEMPTED
MAX_REQUEUES="${MAX_REQUEUES:-50}"                 # a guard against a job that is preempted forever

# job_environment: what every task of a step needs, exported from the batch shell (srun passes
# the environment on). The ranks, MASTER_ADDR and MASTER_PORT are NOT set here: every task derives
# them from its own step (var_train/parallel/launch_env.py), so the batch shell's SLURM_NTASKS
# can never leak into a process started without srun.
job_environment() {
    # Slurm >= 22.05: srun no longer inherits the job's --cpus-per-task; without this each task
    # of the step is bound to a single CPU (and its DataLoader workers with it).
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # As torchtitan's launcher: a hung or crashed rank prints every thread's Python stack, NCCL
    # reports problems (not every call). Network choices (NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
    # FI_PROVIDER=efa, ...) depend on the cluster: set them in your environment, see slurm/README.md.
    export PYTHONFAULTHANDLER="${PYTHONFAULTHANDLER:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
}

# require_command COMMAND NAME: exit 2 with a hint when COMMAND (its first word: `var-train`, or
# `python -m var_train.cli`) is not on this node's PATH. sbatch starts the job with the environment
# of the submitting shell, so an environment that was not activated fails here, in one line, and
# not in srun's bare "execve(): var-train: No such file or directory" from every task.
require_command() {
    local program="${1%% *}"
    if ! command -v "$program" >/dev/null 2>&1; then
        echo "error: ${program} not found on PATH on $(hostname): activate var_train's environment" \
             "(source .venv/bin/activate) before sbatch, or set $2=/path/to/${program}" >&2
        exit 2
    fi
}

# requeue_if_preempted EXIT_CODE: requeue this job when EXIT_CODE says "preempted"; returns 0 when
# the job was requeued, otherwise EXIT_CODE itself (or scontrol's code when the requeue failed,
# e.g. for a job that was cancelled: rerun the same command to resume).
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
    # Only a job that is still running is ours to requeue (the time-limit warning, a signal sent by
    # hand). A preempted job is requeued by Slurm itself (PreemptMode=REQUEUE), an outside
    # `scontrol requeue` has done it already, and a cancelled job must stay cancelled.
    local state
    state="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)"
    state="${state#JobState=}"
    if [[ -n "$state" && "$state" != RUNNING ]]; then
        echo "[requeue] step exited with ${code} (work saved); the job is ${state}: left to Slurm" \
             "(after scancel, submit the same command again to resume)" >&2
        return "$code"
    fi
    echo "[requeue] step exited with ${code} (work saved): scontrol requeue ${SLURM_JOB_ID}" >&2
    scontrol requeue "$SLURM_JOB_ID"
}

# run_step CMD [ARGS...]: run CMD in the background, forward SIGUSR1/SIGTERM to it, wait for it.
# Sets STEP_EXIT (its exit code) and STOP_SIGNAL (USR1 or TERM when one arrived, else empty).
run_step() {
    STOP_SIGNAL=""
    "$@" &
    local pid=$!
    trap 'STOP_SIGNAL=USR1; echo "[requeue] got SIGUSR1: forwarding to step ${pid}" >&2; kill -USR1 "${pid}" 2>/dev/null || true' USR1
    trap 'STOP_SIGNAL=TERM; echo "[requeue] got SIGTERM: forwarding to step ${pid}" >&2; kill -TERM "${pid}" 2>/dev/null || true' TERM
    # A trapped signal makes `wait` return early while the step still runs: wait again. Bash keeps
    # the status of a finished background job, so the last `wait` returns the step's exit code.
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true
    done
    STEP_EXIT=0
    wait "$pid" || STEP_EXIT=$?
    trap - USR1 TERM
}

# run_with_requeue CMD [ARGS...]: for a step that checkpoints and exits 42 on a signal (training).
run_with_requeue() {
    run_step "$@"
    requeue_if_preempted "$STEP_EXIT"
}

# run_resumable CMD [ARGS...]: for a step that keeps its finished work and skips it when started
# again (extraction, evaluation): stopped by a signal, it counts as preempted and is requeued.
run_resumable() {
    run_step "$@"
    local code="$STEP_EXIT"
    if [[ -n "$STOP_SIGNAL" && "$code" -ne 0 ]]; then
        echo "[requeue] step stopped by SIG${STOP_SIGNAL} (exit ${code}); its finished work is kept" >&2
        code="$EXIT_CODE_PREEMPTED"
    fi
    requeue_if_preempted "$code"
}
