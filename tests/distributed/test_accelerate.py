"""parallel.engine=accelerate: Accelerate's DDP (and DeepSpeed plugin) on 2 CPU ranks, the real
`accelerate launch --config_file configs/accelerate/{ddp,deepspeed_zero2}.yaml` line of the README, and the
one-line refusals (FSDP on a CPU, conflicting precision, Accelerate's own compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, _free_port, run_torchrun
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.checkpoint import latest_checkpoint, read_metadata
from var_train.config import ParallelConfig
from var_train.errors import ConfigError
from var_train.parallel.accelerate_engine import accelerate_settings, settings_from_environment, settings_from_file
from var_train.preemption import EXIT_CODE_PREEMPTED

WORKER = Path(__file__).with_name("accelerate_worker.py")
CONFIGS = REPO_ROOT / "configs" / "accelerate"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _parallel(config: str | None = None, **overrides) -> ParallelConfig:
    path = str(CONFIGS / config) if config else None
    return ParallelConfig(**{"engine": "accelerate", "precision": "fp32", "accelerate_config": path, **overrides})


# -- the config, from a file or from `accelerate launch`'s environment (no processes) --------------
def test_shipped_configs_read_as_written():
    ddp, fsdp, zero2 = (settings_from_file(CONFIGS / name) for name in ("ddp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml"))
    assert (ddp.kind, ddp.mixed_precision) == ("ddp", "no")
    assert (fsdp.kind, fsdp.fsdp_version, fsdp.reshard_after_forward, fsdp.activation_checkpointing) == (
        "fsdp2", 2, True, False)
    assert (zero2.kind, zero2.zero_stage, zero2.offload_optimizer_device) == ("deepspeed", 2, "none")


def test_settings_from_the_launch_environment():
    assert settings_from_environment({}).kind == "ddp"
    fsdp = settings_from_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                      "FSDP_RESHARD_AFTER_FORWARD": "false", "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert (fsdp.kind, fsdp.fsdp_version, fsdp.reshard_after_forward, fsdp.mixed_precision) == ("fsdp2", 2, False, "bf16")
    zero3 = settings_from_environment({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert (zero3.kind, zero3.zero_stage) == ("deepspeed", 3)


def test_fsdp_on_a_cpu_is_refused_naming_the_native_engine():
    with pytest.raises(ConfigError, match=r"GPUs only.*parallel\.engine=fsdp2"):
        accelerate_settings(_parallel("fsdp2.yaml"), "cpu")
    with pytest.raises(ConfigError, match=r"parallel\.engine=fsdp2"):  # the same through the environment
        accelerate_settings(_parallel(), "cpu", environ={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert accelerate_settings(_parallel("fsdp2.yaml"), "cuda").kind == "fsdp2"  # a GPU would run it


def test_conflicting_or_duplicated_settings_are_refused(tmp_path):
    bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    with pytest.raises(ConfigError, match=r"mixed_precision=bf16 but parallel.precision is fp32"):
        accelerate_settings(_parallel(), "cpu", environ=bf16)
    assert accelerate_settings(_parallel(precision="bf16"), "cpu", environ=bf16).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"fp16 is not supported"):
        accelerate_settings(_parallel(), "cpu", environ={"ACCELERATE_MIXED_PRECISION": "fp16"})
    with pytest.raises(ConfigError, match=r"parallel\.compile=true"):
        accelerate_settings(_parallel(), "cpu", environ={"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})
    with pytest.raises(ConfigError, match=r"parallel\.activation_checkpointing=true"):
        accelerate_settings(_parallel(), "cuda", environ={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                                          "FSDP_ACTIVATION_CHECKPOINTING": "true"})
    with pytest.raises(ConfigError, match=r"no such file"):
        accelerate_settings(_parallel(accelerate_config=str(tmp_path / "missing.yaml")), "cpu")


# -- 2 ranks under torchrun --------------------------------------------------------------------
@pytest.mark.distributed
def test_accelerate_ddp_trains_like_the_native_ddp_engine_and_resumes_exactly():
    output = run_torchrun(WORKER, "ddp", nproc=2, timeout=300).stdout
    for check in ("OK accelerate ddp.yaml == native ddp (accumulation 2)", "distributed type DistributedType.MULTI_CPU",
                  "OK accelerate resumes accelerate (ddp.yaml) step 2 exactly",
                  "OK ddp resumes accelerate (ddp.yaml) step 2 exactly"):
        assert check in output, f"missing {check!r} in:\n{output}"


def test_deepspeed_through_accelerate_without_transformers_is_one_line(monkeypatch):
    # Accelerate 1.15's DeepSpeed plugin imports transformers unconditionally: without it the
    # engine must say so in one line (and point at the native deepspeed engine). A None entry in
    # sys.modules is how Python itself marks a module as not importable.
    monkeypatch.setitem(sys.modules, "transformers", None)
    advice = r"pip install 'var-train\[accelerate-deepspeed\]'.*parallel\.engine=deepspeed"
    with pytest.raises(ConfigError, match=advice):
        accelerate_settings(_parallel("deepspeed_zero2.yaml"), "cpu")


@pytest.mark.distributed
def test_deepspeed_through_accelerate():
    output = run_torchrun(WORKER, "deepspeed", nproc=2, timeout=400).stdout
    for check in ("OK accelerate deepspeed_zero2.yaml == native deepspeed (accumulation 2)",
                  "distributed type DistributedType.DEEPSPEED",
                  "OK accelerate resumes accelerate (deepspeed_zero2.yaml) step 2 exactly",
                  "OK deepspeed resumes accelerate (deepspeed_zero2.yaml) step 2 exactly"):
        assert check in output, f"missing {check!r} in:\n{output}"


# -- the trainer under `accelerate launch`, as the README shows it --------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate_data")
    return make_learnable_shards(root / "shards"), make_tiny_vae(root / "vae.safetensors")


def _train_args(data, run_dir: Path, *overrides: str) -> list[str]:
    shards, vae = data
    return ["-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml", f"data.train_shards={shards}",
            f"data.vae={vae}", f"run.output_dir={run_dir}", "optim.max_steps=8", "checkpoint.every_steps=4",
            *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def _accelerate_launch(config: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.distributed
@pytest.mark.parametrize("config, native, checkpoint_format", [
    ("ddp.yaml", ["parallel.engine=ddp"], "dcp"),
    # `accelerate launch` names the config's DeepSpeed fields in its environment, which Accelerate's
    # plugin would refuse next to the DeepSpeed config the engine builds from the recipe.
    ("deepspeed_zero2.yaml", ["parallel.engine=deepspeed", "parallel.zero_stage=2"], "deepspeed"),
], ids=["ddp", "deepspeed"])
def test_accelerate_launch_line_matches_the_native_engine_and_resumes_exactly(data, tmp_path, config, native,
                                                                              checkpoint_format):
    native_dir = tmp_path / "native"
    run_torchrun(*_train_args(data, native_dir, *native), nproc=2)

    run_dir = tmp_path / "accelerate"
    first = _accelerate_launch(config, _train_args(data, run_dir, "parallel.engine=accelerate",
                                                   "run.stop_after_steps=4"))
    assert first.returncode != 0 and f"exiting with {EXIT_CODE_PREEMPTED}" in first.stdout, first.stdout + first.stderr
    assert "engine accelerate" in first.stdout and "on 2 x cpu" in first.stdout, first.stdout  # world size 2
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    metadata = read_metadata(checkpoint)
    assert (metadata["step"], metadata["world_size"], metadata["engine"], metadata["checkpoint_format"]) == (
        4, 2, "accelerate", checkpoint_format), metadata
    second = _accelerate_launch(config, _train_args(data, run_dir, "parallel.engine=accelerate"))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step 4" in second.stdout, second.stdout

    expected, got = _losses(native_dir), _losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in range(1, 9):  # 1-4: through Accelerate == the native engine; 5-8: the resume is exact
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}: {got[step]} vs {expected[step]}"
    assert got[8] < got[1], got

    # The checkpoints are ordinary ones: verified, and exported on one process.
    verify = subprocess.run([sys.executable, "-m", "var_train.cli", "verify", str(run_dir)], cwd=REPO_ROOT,
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out = tmp_path / "var.safetensors"
    export = subprocess.run([sys.executable, "-m", "var_train.cli", "export", str(run_dir), "--out", str(out)],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert export.returncode == 0 and out.is_file(), export.stdout + export.stderr


def test_fsdp_accelerate_config_on_a_cpu_exits_2_with_one_line(data, tmp_path):
    proc = subprocess.run([sys.executable, *_train_args(data, tmp_path / "run", "parallel.engine=accelerate",
                                                        f"parallel.accelerate_config={CONFIGS / 'fsdp2.yaml'}")],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "parallel.engine=fsdp2" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
