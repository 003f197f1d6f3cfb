"""Slurm launchers, the fast path: syntax, the requeue protocol (fake scontrol/srun/trainer), signal
forwarding, the job environment, and the scaling sweep's per-depth overrides against the real
config loader. The same scripts run on a real Slurm in tests/slurm/."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.models.tiny import VAE_KW
from tests.training.learnable_shards import NUM_CLASSES, PATCH_NUMS, VOCAB_SIZE, make_learnable_shards, make_tiny_vae

SLURM = REPO_ROOT / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh"), *SLURM.glob("lib/*.sh")])


def _executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """PATH entries standing in for Slurm and the trainer; each call is logged to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # `scontrol show job` answers with $FAKE_JOB_STATE (RUNNING unless a test says otherwise).
    _executable(bin_dir / "scontrol", f'echo "scontrol $*" >> {log}\n'
                                      'if [[ "$1 $2" == "show job" ]]; then echo "JobId=$3 JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None"; fi\n')
    _executable(bin_dir / "srun", f'echo "srun $*" >> {log}\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit
    # The fake trainer exits with $FAKE_EXIT, or waits for SIGUSR1 and then exits 42 like the real one.
    _executable(bin_dir / "fake-var-train", f'''echo "trainer $* SRUN_CPUS_PER_TASK=${{SRUN_CPUS_PER_TASK:-}} OMP_NUM_THREADS=$OMP_NUM_THREADS PYTHONFAULTHANDLER=$PYTHONFAULTHANDLER MASTER_ADDR=${{MASTER_ADDR:-unset}}" >> {log}
if [[ "${{FAKE_WAIT_FOR_SIGNAL:-0}}" == 1 ]]; then
    trap 'echo "trainer got USR1" >> {log}; exit 42' USR1
    touch {tmp_path}/trainer-ready
    for _ in $(seq 300); do sleep 0.1; done
    exit 1
fi
exit "${{FAKE_EXIT:-0}}"
''')
    return bin_dir


def _env(fake_bin: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "VAR_TRAIN_ROOT": str(REPO_ROOT),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "RECIPE": "recipes/d16.yaml",
           "VAR_TRAIN": "fake-var-train"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_TASK"):
        env.pop(name, None)
    env.update(extra)
    return env


def _calls(fake_bin: Path) -> list[str]:
    log = fake_bin.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(SLURM)))
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_requeue_function_requeues_only_on_preempted_exit_code(fake_bin):
    def run(code: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f'source slurm/lib/requeue.sh; run_with_requeue fake-var-train; echo "rc=$?"'],
                              cwd=REPO_ROOT, env=_env(fake_bin, FAKE_EXIT=str(code)), capture_output=True, text=True)

    done = run(0)
    assert "rc=0" in done.stdout and not any(c.startswith("scontrol requeue") for c in _calls(fake_bin))
    failed = run(3)
    assert "rc=3" in failed.stdout and not any(c.startswith("scontrol requeue") for c in _calls(fake_bin))
    preempted = run(42)
    assert "rc=0" in preempted.stdout
    assert "scontrol requeue 4242" in _calls(fake_bin)


def test_requeue_gives_up_after_max_requeues(fake_bin):
    proc = subprocess.run(["bash", "-c", "source slurm/lib/requeue.sh; run_with_requeue fake-var-train; echo rc=$?"],
                          cwd=REPO_ROOT, env=_env(fake_bin, FAKE_EXIT="42", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3"),
                          capture_output=True, text=True)
    assert "rc=42" in proc.stdout and not any(c.startswith("scontrol requeue") for c in _calls(fake_bin))


@pytest.mark.parametrize("trainer_exit, requeued", [(42, True), (0, False), (43, False)])
def test_train_sbatch_end_to_end(fake_bin, trainer_exit, requeued):
    proc = subprocess.run(["bash", str(SLURM / "train.sbatch"), "run.output_dir=runs/x", "optim.epochs=1"],
                          cwd=REPO_ROOT, env=_env(fake_bin, FAKE_EXIT=str(trainer_exit), SLURM_CPUS_PER_TASK="12"),
                          capture_output=True, text=True)
    calls = _calls(fake_bin)
    # The job environment: srun gets the CPUs per task (Slurm >= 22.05), tracebacks of hung ranks,
    # and no rendezvous from the batch shell (each task derives its own from its step).
    assert ("trainer train --recipe recipes/d16.yaml run.output_dir=runs/x optim.epochs=1 SRUN_CPUS_PER_TASK=12 "
            "OMP_NUM_THREADS=12 PYTHONFAULTHANDLER=1 MASTER_ADDR=unset") in calls, calls
    assert any(c.startswith("srun --kill-on-bad-exit=0 fake-var-train train") for c in calls)
    assert ("scontrol requeue 4242" in calls) == requeued
    assert proc.returncode == (0 if requeued else trainer_exit), proc.stderr


def test_train_sbatch_takes_the_recipe_as_first_argument(fake_bin):
    """The README's form: `sbatch --nodes 2 slurm/train.sbatch recipes/d16.yaml overrides...`."""
    env = _env(fake_bin)
    del env["RECIPE"]
    proc = subprocess.run(["bash", str(SLURM / "train.sbatch"), "recipes/tiny.yaml", "optim.epochs=1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert any(c.startswith("trainer train --recipe recipes/tiny.yaml optim.epochs=1 ") for c in _calls(fake_bin))

    missing = subprocess.run(["bash", str(SLURM / "train.sbatch"), "optim.epochs=1"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no recipe"), missing.stderr
    wrong = subprocess.run(["bash", str(SLURM / "train.sbatch"), "recipes/nope.yaml"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "recipes/nope.yaml not found" in wrong.stderr


@pytest.mark.parametrize("script, variable", [("train.sbatch", "VAR_TRAIN"), ("eval.sbatch", "VAR_TRAIN"),
                                              ("extract.sbatch", "VAR_PREP")])
def test_a_job_submitted_without_the_environment_says_so(fake_bin, script, variable):
    """sbatch passes on the submitting shell's PATH: without the venv, one line instead of srun's
    "execve(): var-train: No such file or directory" from every task."""
    env = _env(fake_bin, PATH=f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin", VAR="var.pth", VAE="vae.pth",
               OUT="out", INPUT="images")
    env.pop(variable, None)
    proc = subprocess.run(["bash", str(SLURM / script), "recipes/tiny.yaml"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    program = "var-prep" if variable == "VAR_PREP" else "var-train"
    assert proc.returncode == 2 and f"error: {program} not found on PATH" in proc.stderr, proc.stderr
    assert "source .venv/bin/activate" in proc.stderr and f"{variable}=" in proc.stderr
    assert not any(call.startswith("srun") for call in _calls(fake_bin))


@pytest.mark.parametrize("state", ["CANCELLED", "PREEMPTED", "PENDING"])
def test_a_job_slurm_already_stopped_is_not_requeued(fake_bin, state):
    """scancel must stay a cancel; preemption and an outside requeue are requeued by Slurm itself."""
    proc = subprocess.run(["bash", "-c", "source slurm/lib/requeue.sh; run_with_requeue fake-var-train; echo rc=$?"],
                          cwd=REPO_ROOT, env=_env(fake_bin, FAKE_EXIT="42", FAKE_JOB_STATE=state),
                          capture_output=True, text=True)
    assert "rc=42" in proc.stdout and f"the job is {state}: left to Slurm" in proc.stderr
    assert not any(c.startswith("scontrol requeue") for c in _calls(fake_bin))


@pytest.mark.parametrize("signalled, step_exit, requeued", [(True, 143, True), (True, 0, False), (False, 1, False)])
def test_resumable_steps_are_requeued_when_a_signal_stopped_them(fake_bin, tmp_path, signalled, step_exit, requeued):
    """Extraction and evaluation keep finished work: stopped by Slurm's signal, the job is requeued."""
    step = _executable(tmp_path / "step", f"trap 'exit {step_exit}' USR1; touch {tmp_path}/ready; "
                                          f"for _ in $(seq 20); do sleep 0.1; done; exit {step_exit}\n")
    proc = subprocess.Popen(["bash", "-c", f"source slurm/lib/requeue.sh; run_resumable {step}; echo rc=$?"],
                            cwd=REPO_ROOT, env=_env(fake_bin), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if signalled:
        proc.send_signal(signal.SIGUSR1)  # forwarded to the step, which exits with `step_exit`
    out, err = proc.communicate(timeout=30)
    assert ("scontrol requeue 4242" in _calls(fake_bin)) == requeued, err
    assert ("rc=0" if requeued else f"rc={step_exit}") in out


def test_train_sbatch_forwards_slurm_warning_signal(fake_bin, tmp_path):
    """Slurm's `--signal=B:USR1@120` reaches the batch shell; the trainer must get it and the
    resulting exit 42 must requeue the job."""
    proc = subprocess.Popen(["bash", str(SLURM / "train.sbatch")], cwd=REPO_ROOT,
                            env=_env(fake_bin, FAKE_WAIT_FOR_SIGNAL="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "trainer-ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "fake trainer never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=30)
    calls = _calls(fake_bin)
    assert "trainer got USR1" in calls, stderr
    assert "scontrol requeue 4242" in calls
    assert proc.returncode == 0


def test_shell_exit_code_matches_trainer_constant():
    from var_train.preemption import EXIT_CODE_PREEMPTED

    out = subprocess.run(["bash", "-c", "source slurm/lib/requeue.sh; echo $EXIT_CODE_PREEMPTED"], cwd=REPO_ROOT,
                         env={k: v for k, v in os.environ.items() if k != "EXIT_CODE_PREEMPTED"},
                         capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == EXIT_CODE_PREEMPTED


def test_scaling_sweep_overrides_load_with_the_paper_hyperparameters(tmp_path):
    """sweep_scaling.sh is a thin wrapper over `var-train scaling plan`: its jobs load with the real
    config loader, with the paper's per-depth hyperparameters and an exact batch split
    (tests/scaling/test_plan.py checks the plan itself)."""
    import sys

    from var_train.config import load_config

    var_train = f"{sys.executable} -m var_train.cli"
    env = {**os.environ, "RECIPE": "recipes/d16.yaml", "RUNS": "runs/scaling", "WORLD_SIZE": "64", "VAR_TRAIN": var_train}
    proc = subprocess.run(["bash", str(SLURM / "sweep_scaling.sh"), "data.train_shards=/data/tokens"], cwd=REPO_ROOT,
                          env={**env, "DRY_RUN": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 12
    depths = []
    for line in lines:
        words = shlex.split(line)
        assert words[0] == "sbatch" and words[words.index("--export") + 1].startswith("ALL,RECIPE=recipes/d16.yaml")
        assert words[words.index("--nodes") + 1] == "8"
        overrides = words[words.index(str(SLURM / "train.sbatch")) + 1:]
        cfg = load_config(REPO_ROOT / "recipes/d16.yaml", overrides)
        depth = cfg.model.depth
        depths.append(depth)
        assert cfg.run.output_dir == f"runs/scaling/d{depth}"
        assert cfg.data.train_shards == "/data/tokens"
        assert cfg.model.drop_path_rate == pytest.approx(0.1 * depth / 24)
        assert cfg.model.embed_dim == 64 * depth and cfg.model.num_heads == depth
        assert cfg.optim.base_lr == (8e-5 if depth >= 24 else 1e-4)
        assert cfg.optim.wpe == (0.01 if depth >= 24 else 0.1)
        assert cfg.optim.global_batch_size == (1024 if depth == 30 else 768)
        assert cfg.optim.global_batch_size % (cfg.optim.micro_batch_size * 64) == 0
    assert depths == [6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27, 30]
    # Without DRY_RUN each job is handed to sbatch (here a fake one that logs its arguments), once
    # the data have passed training's start-up checks: real (tiny) shards and VAE, a model to match.
    fake = tmp_path / "bin"
    fake.mkdir()
    _executable(fake / "sbatch", f'echo "$*" >> {tmp_path}/sbatch.log\necho "Submitted batch job $RANDOM"\n')
    shards = make_learnable_shards(tmp_path / "shards", num_records=1024)  # one d30 step: 64 GPUs x 16 images
    vae = make_tiny_vae(tmp_path / "vae.safetensors")
    data = [f"data.train_shards={shards}", f"data.vae={vae}", f"model.vocab_size={VOCAB_SIZE}",
            f"model.z_channels={VAE_KW['z_channels']}", f"model.num_classes={NUM_CLASSES}",
            f"model.patch_nums=[{','.join(map(str, PATCH_NUMS))}]"]
    refused = subprocess.run(["bash", str(SLURM / "sweep_scaling.sh"), *data, "model.num_classes=1000"],
                             cwd=REPO_ROOT, env={**env, "DEPTHS": "6 30", "SBATCH": str(fake / "sbatch")},
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "num_classes: shards 10, model 1000" in refused.stderr, refused.stderr
    assert not (tmp_path / "sbatch.log").exists()  # nothing queued
    submitted = subprocess.run(["bash", str(SLURM / "sweep_scaling.sh"), *data],
                               cwd=REPO_ROOT, env={**env, "DEPTHS": "6 30", "SBATCH": str(fake / "sbatch")},
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert len(calls) == 2 and "model.depth=6" in calls[0] and "model.depth=30" in calls[1]


def test_the_log_folder_exists_in_every_checkout():
    """Slurm opens `#SBATCH --output=logs/%x-%j.out` before the script runs: without the folder the
    job fails with no message at all (ExitCode 0:53), so the repository keeps it."""
    for script in SLURM.glob("*.sbatch"):
        assert "#SBATCH --output=logs/%x-%j.out" in script.read_text(), script
    assert (REPO_ROOT / "logs").is_dir()
    ignored = subprocess.run(["git", "check-ignore", "-q", "logs/.gitignore"], cwd=REPO_ROOT)
    assert ignored.returncode == 1, "logs/.gitignore is ignored by git: the folder would be missing in a clone"
