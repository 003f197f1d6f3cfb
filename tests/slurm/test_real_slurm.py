"""The sbatch launchers on a real Slurm (22.05, two slurmd on this machine): preemption of every
kind requeues or resumes and ends on the uninterrupted run's losses; extraction and evaluation
run end to end and resume after a requeue; every sbatch line of the docs is accepted as written.

`slurm/train.sbatch` runs unchanged, with resources overridden on the sbatch line (no GPUs, one
CPU per task). The training runs use data.num_workers=1 and W&B offline, so Slurm's SIGTERM also
reaches a DataLoader worker and W&B's service process, as on a real cluster.

The jobs are submitted together where they can share the node (the node declares more CPUs than
the machine has, so this is about overlapping waits, not about speed), then the real-preemption
case runs alone, since it needs the node for a higher-priority job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.data.extract_helpers import random_images, write_image_folder
from tests.evaluation.helpers import blob_images, seeded_classifier
from tests.models.tiny import tiny_models
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.checkpoint import latest_checkpoint, read_metadata
from var_train.models.checkpoint_io import save_model

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("slurm_cluster")]

HOST = os.uname().nodename.split(".")[0]
MAX_STEPS = 32  # 4 epochs of the 128 learnable records at global batch 16
INTERRUPT_AT = 2  # signal once this step is logged: 30 steps of margin for the signal to land
SMALL = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
TRAIN_OVERRIDES = [f"optim.max_steps={MAX_STEPS}", "checkpoint.every_steps=1000", "data.num_workers=1",
                   "logging.wandb_mode=offline"]
TIMEOUT = 420


# -- Slurm helpers -------------------------------------------------------------------------------
def job_environment(tmp: Path) -> dict[str, str]:
    """What the submitting shell has: the project's executables first on PATH (jobs inherit it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", WANDB_MODE="offline",
               WANDB_DIR=str(tmp), PYTHONPATH=str(REPO_ROOT))
    return env


def sbatch(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def in_queue(job_id: str) -> bool:
    """Pending, running or still completing (its processes not all gone)."""
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}  # a redone step: the last


@dataclass
class Run:
    """One training run through slurm/train.sbatch, and what the test does to it."""
    name: str
    sbatch_args: list[str]
    run_dir: Path
    log: Path
    interrupt: str | None = None  # "usr1", "scancel", "preempt" or None
    overrides: list[str] = field(default_factory=list)
    after: "Run | None" = None     # submitted once this run's preemption is over
    jobs: list[str] = field(default_factory=list)
    interrupted_at: int | None = None
    resubmitted: bool = False

    def submit(self, env: dict[str, str]) -> None:
        self.jobs.append(sbatch([*self.sbatch_args, f"--output={self.log}", str(REPO_ROOT / "slurm/train.sbatch"),
                                 "recipes/tiny.yaml", *self.overrides], env))

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def preemption_over(self) -> bool:
        return self.interrupted_at is not None and len(self.jobs) > 1 and not in_queue(self.jobs[1])


def drive(runs: list[Run], other_jobs: list[str], env: dict[str, str], deadline: float) -> None:
    """Submit each run (when its `after` allows), interrupt it once it has logged INTERRUPT_AT as its
    `interrupt` says, resubmit a cancelled one; return when every job has left the queue."""
    while time.time() < deadline:
        for run in runs:
            if not run.jobs:
                if run.after is None or run.after.preemption_over():
                    run.submit(env)
                continue
            current = run.jobs[-1]
            if run.interrupt and run.interrupted_at is None and max(losses(run.run_dir), default=0) >= INTERRUPT_AT:
                run.interrupted_at = max(losses(run.run_dir))
                if run.interrupt == "usr1":  # what `--signal=B:USR1@120` does at the time limit
                    subprocess.run(["scancel", "--signal=USR1", "--batch", current], check=True)
                elif run.interrupt == "scancel":
                    subprocess.run(["scancel", current], check=True)
                elif run.interrupt == "preempt":  # a job of the higher-priority partition needs the node
                    run.jobs.append(sbatch(["-p", "urgent", "--exclusive", "-w", HOST, "-n", "1", "--time=2",
                                            f"--output={run.log.parent / 'urgent-%j.out'}", "--wrap", "sleep 1"],
                                           env))
            if run.interrupt == "scancel" and run.interrupted_at is not None and not run.resubmitted \
                    and not in_queue(current):
                run.resubmitted = True
                run.submit(env)  # the same command again
        waiting = [r for r in runs if not r.jobs or (r.interrupt == "scancel" and not r.resubmitted)]
        if not waiting and not any(in_queue(j) for j in [*other_jobs, *(j for r in runs for j in r.jobs)]):
            return
        time.sleep(0.25)
    pytest.fail("Slurm jobs still running at the deadline:\n" + "\n".join(
        f"{r.name}: {[job(j).get('JobState') for j in r.jobs]}\n{r.output()[-3000:]}" for r in runs))


# -- the runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """Everything at once where it can share the nodes: the real preemption takes node 1 (a
    higher-priority job preempts whatever runs there), the others run on node 2, and the 2-node
    scancel run starts once the preemption is over."""
    tmp = tmp_path_factory.mktemp("slurm")
    env = job_environment(tmp)
    shards, vae = make_learnable_shards(tmp / "shards", num_records=128), make_tiny_vae(tmp / "vae.safetensors")
    common = [f"data.train_shards={shards}", f"data.vae={vae}", *TRAIN_OVERRIDES]

    def run(name: str, sbatch_args: list[str], interrupt: str | None, after: Run | None = None) -> Run:
        return Run(name, [f"--job-name=var-train-{name}", *sbatch_args, *SMALL], tmp / name, tmp / f"{name}.out",
                   interrupt, overrides=[*common, f"run.output_dir={tmp / name}"], after=after)

    node1, node2 = ["--nodes=1", "--ntasks-per-node=2", "-w", HOST], ["--nodes=1", "--ntasks-per-node=2", "-w", f"{HOST}-2"]
    preempted = run("preempt", node1, "preempt")
    runs = [preempted, run("uninterrupted", node2, None), run("usr1", node2, "usr1"),
            run("scancel", ["--nodes=2", "--ntasks-per-node=1"], "scancel", after=preempted)]

    images = tmp / "images"
    write_image_folder(images, random_images(24, 64, 64, seed=3), [i % 4 for i in range(24)])
    extract_log = tmp / "extract.out"
    extract_env = {**env, "INPUT": str(images), "VAE": str(vae), "OUT": str(tmp / "tokens")}
    eval_inputs = prepare_eval(tmp)
    started = time.time()
    extract_job = sbatch([*node2, *SMALL, f"--output={extract_log}", str(REPO_ROOT / "slurm/extract.sbatch"),
                          "--resolution", "64", "--patch-nums", "1,2,3,4", "--shard-size", "8", "--num-workers", "1"],
                         extract_env)
    eval_log, eval_job = submit_eval(tmp, eval_inputs, env, node2)
    drive(runs, [extract_job, eval_job], env, time.time() + TIMEOUT)
    return {"runs": {r.name: r for r in runs}, "extract": (extract_job, extract_log, tmp / "tokens"),
            "eval": (eval_job, eval_log, tmp / "eval"), "seconds": time.time() - started}


def prepare_eval(tmp: Path) -> dict[str, Path]:
    """Tiny VAR + VAE, a seeded classifier as the feature extractor and its reference statistics."""
    from PIL import Image

    from var_train.cli import main as var_train

    vae, var = tiny_models(seed=0)
    paths = {"vae": save_model(vae, tmp / "eval_vae.safetensors"), "var": save_model(var, tmp / "var.safetensors"),
             "classifier": seeded_classifier(4).save(tmp / "classifier.safetensors"), "stats": tmp / "stats.npz"}
    folder = tmp / "real" / "all"
    folder.mkdir(parents=True)
    for i, image in enumerate(blob_images(24, seed=7, size=64).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    assert var_train(["fid-stats", "--images", str(tmp / "real"), "--feature-extractor", str(paths["classifier"]),
                      "--out", str(paths["stats"]), "--quiet"]) == 0
    return paths


def submit_eval(tmp: Path, paths: dict[str, Path], env: dict[str, str], where: list[str]) -> tuple[Path, str]:
    log = tmp / "eval.out"
    eval_env = {**env, "VAR": str(paths["var"]), "VAE": str(paths["vae"]), "OUT": str(tmp / "eval")}
    job_id = sbatch([*where, *SMALL, f"--output={log}", str(REPO_ROOT / "slurm/eval.sbatch"),
                     "--reference", str(paths["stats"]), "--feature-extractor", str(paths["classifier"]),
                     "--per-class", "2", "--batch-size", "8", "--top-k", "20", "--top-p", "0.9", "--seed", "5",
                     "--quiet"], eval_env)
    return log, job_id


def assert_same_losses(run: Run, expected: dict[int, float]) -> None:
    got = losses(run.run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), run.output()[-3000:]
    for step in range(1, MAX_STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"{run.name} step {step}: {got[step]} vs {expected[step]}"


@pytest.fixture(scope="module")
def expected(cluster_runs) -> dict[int, float]:
    base = cluster_runs["runs"]["uninterrupted"]
    assert job(base.jobs[0])["JobState"] == "COMPLETED", base.output()[-3000:]
    curve = losses(base.run_dir)
    assert sorted(curve) == list(range(1, MAX_STEPS + 1)) and curve[MAX_STEPS] < curve[1] - 0.1
    assert "on 2 x cpu" in base.output()  # the world size every rank saw
    return curve


# -- the tests -----------------------------------------------------------------------------------
def test_time_limit_warning_requeues_and_resumes(cluster_runs, expected):
    run = cluster_runs["runs"]["usr1"]
    out, state = run.output(), job(run.jobs[0])
    assert "[requeue] got SIGUSR1" in out and "exit code 42" in out, out[-3000:]
    assert f"scontrol requeue {run.jobs[0]}" in out
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "1", state
    saved = re.search(r"checkpoint saved at step (\d+)", out)
    assert saved and f"resumed from step {saved.group(1)}" in out
    assert "killed by signal" not in out and "Traceback" not in out, out[-3000:]
    assert_same_losses(run, expected)


def test_real_preemption_requeues_and_resumes(cluster_runs, expected):
    run = cluster_runs["runs"]["preempt"]
    out, state = run.output(), job(run.jobs[0])
    assert job(run.jobs[1])["JobState"] == "COMPLETED"  # the higher-priority job ran
    assert "got SIGTERM" in out or "exit code 42" in out, out[-3000:]
    assert int(state["Restarts"]) >= 1 and state["JobState"] == "COMPLETED", state
    saved = re.search(r"checkpoint saved at step (\d+)", out)
    assert saved and f"resumed from step {saved.group(1)}" in out, out[-3000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-3000:]
    assert_same_losses(run, expected)


def test_scancel_then_the_same_command_resumes(cluster_runs, expected):
    run = cluster_runs["runs"]["scancel"]
    cancelled, again = job(run.jobs[0]), job(run.jobs[1])
    assert cancelled["JobState"] == "CANCELLED" and cancelled["Restarts"] == "0", cancelled  # stays cancelled
    assert again["JobState"] == "COMPLETED" and again["ExitCode"] == "0:0", again
    out = run.output()
    assert "left to Slurm" in out and "scontrol requeue" not in out, out[-3000:]
    assert "on 2 nodes" in out and "on 2 x cpu" in out  # 2 nodes x 1 task: one world of 2
    saved = re.search(r"checkpoint saved at step (\d+)", out)
    assert saved and f"resumed from step {saved.group(1)}" in out, out[-3000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-3000:]
    assert_same_losses(run, expected)


def test_extract_sbatch_end_to_end(cluster_runs):
    job_id, log, out = cluster_runs["extract"]
    state = job(job_id)
    assert state["JobState"] == "COMPLETED", log.read_text()[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_records"] == 24 and sum(s["num_records"] for s in manifest["shards"]) == 24


def test_eval_sbatch_end_to_end(cluster_runs):
    job_id, log, out = cluster_runs["eval"]
    state = job(job_id)
    assert state["JobState"] == "COMPLETED", log.read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["num_samples"] == 20, results
    assert all(isinstance(results[name], float) for name in ("fid", "inception_score", "precision", "recall"))


def test_added_time_is_reported(cluster_runs):
    print(f"\nreal-Slurm scenarios took {cluster_runs['seconds']:.0f} s")
    assert cluster_runs["seconds"] < TIMEOUT


def test_launch_env_in_the_batch_shell_and_in_a_two_node_step(tmp_path):
    """The batch shell (SLURM_NTASKS=2, no step) is a world of one, so a command run there without
    srun never waits for ranks; inside `srun` over 2 nodes both tasks agree on the rendezvous."""
    probe = ("python -c 'from var_train.parallel.launch_env import launch_env; e = launch_env(); "
             "print(\"ENV\", e.launcher, e.rank, e.world_size, e.local_rank, e.node_rank, e.master_addr, e.master_port)'")
    log = tmp_path / "probe.out"
    job_id = sbatch(["--nodes=2", "--ntasks-per-node=1", *SMALL, f"--output={log}", "--wrap",
                     f"{probe}; srun {probe}"], job_environment(tmp_path))
    deadline = time.time() + 180
    while in_queue(job_id) and time.time() < deadline:
        time.sleep(0.5)
    assert job(job_id)["JobState"] == "COMPLETED", log.read_text()
    rows = sorted(line.split()[1:] for line in log.read_text().splitlines() if line.startswith("ENV "))
    assert rows[0][:5] == ["single", "0", "1", "0", "0"], rows
    step = [row for row in rows if row[0] == "srun"]
    assert [row[1:5] for row in step] == [["0", "2", "0", "0"], ["1", "2", "0", "1"]], rows
    assert {row[5] for row in step} == {HOST} and len({row[6] for row in step}) == 1
    assert 10000 <= int(step[0][6]) < int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
