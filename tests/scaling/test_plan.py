"""`var-train scaling plan`: every planned job of the paper's 12 depths is valid for W in
{1, 8, 64, 256}, checked by loading its overrides the way training does; the d16 row is
recipes/d16.yaml's hyperparameters; the table follows REFERENCE.md's rules written out here."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from var_train.config import load_config
from var_train.dry_run import memory_per_gpu, meta_model
from var_train.models import PAPER_DEPTHS, size_rule
from var_train.parallel import grad_accumulation_steps
from var_train.scaling.plan import plan_job, plan_sweep

RECIPE = str(REPO_ROOT / "recipes" / "d16.yaml")

# REFERENCE.md's table of the released models, written out by hand (the oracle of the rule table).
RELEASED = {  # depth: (width, heads, params, drop-path, peak LR, batch, epochs, alng, wpe, wd_end)
    16: (1024, 16, 310_283_520, 0.0667, 3.0e-4, 768, 200, 1e-3, 0.1, None),
    20: (1280, 20, 600_917_136, 0.0833, 3.0e-4, 768, 250, 1e-3, 0.1, None),
    24: (1536, 24, 1_033_399_360, 0.1, 2.4e-4, 768, 350, 1e-4, 0.01, None),
    30: (1920, 30, 2_010_020_356, 0.125, 3.2e-4, 1024, 350, 1e-5, 0.01, 0.08),
}


@pytest.mark.parametrize("depth", sorted(RELEASED))
def test_size_rule_and_recipe_match_the_released_models(depth):
    width, heads, params, drop_path, peak_lr, batch, epochs, alng, wpe, wd_end = RELEASED[depth]
    rule = size_rule(depth)
    assert (rule.embed_dim, rule.num_heads, rule.global_batch_size, rule.epochs) == (width, heads, batch, epochs)
    assert rule.drop_path_rate == pytest.approx(drop_path, abs=5e-5)
    assert rule.peak_lr == pytest.approx(peak_lr) and rule.alng == alng and rule.wpe == wpe
    assert rule.weight_decay == 0.05 and rule.weight_decay_end == wd_end
    # The recipes are pinned to their rows.
    cfg = load_config(REPO_ROOT / "recipes" / f"d{depth}.yaml")
    assert cfg.model.depth == depth and cfg.model.embed_dim in (None, width) and cfg.model.num_heads in (None, heads)
    assert cfg.model.drop_path_rate in (None, pytest.approx(rule.drop_path_rate))
    assert cfg.model.alng == alng and cfg.optim.wpe == wpe and cfg.optim.global_batch_size == batch
    assert cfg.optim.base_lr * cfg.optim.global_batch_size / 256 == pytest.approx(peak_lr)
    assert cfg.optim.epochs == epochs and cfg.optim.weight_decay_end == wd_end
    model = meta_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert (model.embed_dim, model.num_heads) == (width, heads)


@pytest.mark.parametrize("world_size", [1, 8, 64, 256])
def test_every_planned_job_is_valid(world_size):
    gpu_memory = 80.0
    jobs = plan_sweep(RECIPE, world_size, gpu_memory_gib=gpu_memory, runs="runs/sweep",
                      overrides=["data.train_shards=/data/tokens"])
    assert [job.depth for job in jobs] == list(PAPER_DEPTHS) == [6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27, 30]
    for job in jobs:
        assert job.valid, job.problem
        cfg = load_config(RECIPE, job.overrides)  # exactly what train.sbatch passes to `var-train train`
        depth = job.depth
        assert cfg.model.depth == depth and cfg.run.output_dir == f"runs/sweep/d{depth}"
        assert cfg.data.train_shards == "/data/tokens" and cfg.logging.wandb_group == "scaling"
        # Exact batch split, as the engine checks it at start.
        o = cfg.optim
        assert o.micro_batch_size * grad_accumulation_steps(o, world_size) * world_size == o.global_batch_size
        assert job.accumulation == grad_accumulation_steps(o, world_size)
        # Memory by the dry run's estimate, from the loaded config.
        model = meta_model(cfg)
        assert memory_per_gpu(cfg, model, world_size)["total"] <= gpu_memory * 2**30
        assert cfg.parallel.activation_checkpointing == job.activation_checkpointing
        # Hyperparameters of the paper for this size (REFERENCE.md, written out).
        assert model.embed_dim == 64 * depth and model.num_heads == depth
        assert cfg.model.drop_path_rate == pytest.approx(0.1 * depth / 24)
        assert o.base_lr == (8e-5 if depth >= 24 else 1e-4) and o.wpe == (0.01 if depth >= 24 else 0.1)
        assert o.global_batch_size == (1024 if depth >= 30 else 768)
        assert cfg.model.alng == (1e-5 if depth >= 30 else 1e-4 if depth >= 24 else 1e-3)
        # Nodes and compute: steps x batch x FLOPs per image (ImageNet: 1,281,167 images).
        assert job.nodes == max(1, world_size // 8)
        per_epoch = (1_281_167 // (world_size * o.micro_batch_size)) / job.accumulation  # steps run across epochs
        assert job.steps == round(o.epochs * per_epoch)
        flops = job.steps * o.global_batch_size * model.train_flops_per_image()
        assert job.pflop_days == pytest.approx(flops / 8.64e19)  # 1 PFLOP-day = 1e15 x 86,400 FLOPs
    d16 = next(job for job in jobs if job.depth == 16)
    planned, recipe = load_config(RECIPE, d16.overrides), load_config(RECIPE)
    hyperparameters = {"model": ("depth", "alng"),
                       "optim": ("base_lr", "wpe", "global_batch_size", "epochs", "weight_decay", "weight_decay_end",
                                 "betas", "clip_grad_norm", "hold_fraction", "warmup_epochs")}
    for section, keys in hyperparameters.items():
        for key in keys:
            assert getattr(getattr(planned, section), key) == getattr(getattr(recipe, section), key), key


def test_activation_checkpointing_only_when_needed():
    roomy = {job.depth: job for job in plan_sweep(RECIPE, 8, gpu_memory_gib=80)}
    tight = {job.depth: job for job in plan_sweep(RECIPE, 8, gpu_memory_gib=16)}
    assert not any(job.activation_checkpointing for job in roomy.values())
    assert tight[16].micro_batch_size < roomy[16].micro_batch_size
    for job in tight.values():
        assert job.memory_gib <= 16 * 0.9
    # A GPU between "micro-batch 1 without AC" and "micro-batch 1 with AC": AC must come on.
    cfg = load_config(RECIPE, size_rule(30).overrides() + ["optim.micro_batch_size=1"])
    model = meta_model(cfg)
    without = memory_per_gpu(cfg, model, 8)["total"] / 2**30
    cfg.parallel.activation_checkpointing = True
    with_ac = memory_per_gpu(cfg, model, 8)["total"] / 2**30
    assert with_ac < without
    job = plan_sweep(RECIPE, 8, depths=(30,), gpu_memory_gib=(with_ac + without) / 2 / 0.9)[0]
    assert job.valid and job.activation_checkpointing and job.memory_gib <= (with_ac + without) / 2


def test_impossible_jobs_are_reported():
    jobs = {job.depth: job for job in plan_sweep(RECIPE, 512, depths=(16, 30))}
    assert not jobs[16].valid and "not divisible by world size 512" in jobs[16].problem
    assert jobs[30].valid  # 1024 = 2 x 512
    tiny = plan_sweep(RECIPE, 1, depths=(30,), gpu_memory_gib=4)[0]
    assert not tiny.valid and "does not fit in 4 GiB" in tiny.problem


def test_cli_prints_sbatch_lines_that_load(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import sys; from var_train.cli.scaling import *; import argparse;"
                           "p = argparse.ArgumentParser(); add_arguments(p); sys.exit(run(p.parse_args(sys.argv[1:])))",
                           "plan", "--recipe", "recipes/d16.yaml", "--world-size", "64", "--print",
                           "--runs", "runs/sw", "data.vae=/v.pth"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 12
    for line in lines:
        words = shlex.split(line)
        assert words[:3] == ["sbatch", "--nodes", "8"] and "--export" in words
        overrides = words[words.index(str(REPO_ROOT / "slurm" / "train.sbatch")) + 1:]
        cfg = load_config(REPO_ROOT / "recipes/d16.yaml", overrides)
        assert cfg.data.vae == "/v.pth" and cfg.logging.wandb_group == "sw"
    # recipes/d16.yaml leaves data.train_shards empty: the lines would stop at start, and it is said
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "data.train_shards not set" in warnings[0] and "data.vae" not in warnings[0], \
        proc.stderr
    as_json = subprocess.run([sys.executable, "-m", "var_train.cli", "scaling", "plan", "--recipe", "recipes/d16.yaml",
                              "--world-size", "3", "--json", "--depths", "16", "30"],
                             cwd=REPO_ROOT, capture_output=True, text=True)
    assert as_json.returncode == 2 and "error: 1 of 2 jobs" in as_json.stderr  # 1024 is not divisible by 3
    plan = json.loads(as_json.stdout)
    assert plan[0]["depth"] == 16 and plan[0]["micro_batch_size"] * plan[0]["accumulation"] * 3 == 768
    assert plan[1]["problem"]


def test_scaling_demo_holds_out_one_image_in_seven_per_class(tmp_path):
    from PIL import Image

    from var_train.cli.scaling_demo import split_train_val

    images = tmp_path / "images"
    for label in range(3):
        (images / str(label)).mkdir(parents=True)
        for i in range(15):
            Image.new("RGB", (4, 4), (i, label, 0)).save(images / str(label) / f"{label}{i:02d}.png")
    train, val = split_train_val(images, tmp_path / "split")
    for label in range(3):
        held_out = sorted(p.name for p in (val / str(label)).iterdir())
        kept = sorted(p.name for p in (train / str(label)).iterdir())
        assert held_out == [f"{label}00.png", f"{label}07.png", f"{label}14.png"]
        assert len(kept) == 12 and not set(kept) & set(held_out)


def test_submit_checks_the_data_before_any_job_is_queued(tmp_path):
    # Twelve jobs that would each fail at start after waiting in the queue: one line now instead.
    proc = subprocess.run([sys.executable, "-m", "var_train.cli", "scaling", "plan", "--recipe", "recipes/d16.yaml",
                           "--world-size", "64", "--submit", f"data.train_shards={tmp_path / 'no_shards'}",
                           f"data.vae={tmp_path / 'vae.pth'}"], cwd=REPO_ROOT, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"data.train_shards not found: {tmp_path / 'no_shards'}" in errors[0]
    assert "sbatch" not in proc.stdout + proc.stderr


def test_overrides_typed_after_depths_go_to_every_job(tmp_path, capsys):
    """nargs="+" of --depths took `data.train_shards=...` as a depth ("invalid int value"): the
    overrides go to every job wherever they are typed, in the order typed."""
    from var_train.cli import main

    shards, vae = f"data.train_shards={tmp_path / 'shards'}", "data.vae=/v.pth"
    common = ["scaling", "plan", "--recipe", RECIPE, "--world-size", "2", "--gpu-memory", "16", "--json"]
    plans = []
    for argv in ([*common, "--depths", "6", "16", "30", shards, vae],  # the walkthrough's order
                 [*common, shards, vae, "--depths", "6", "16", "30"],
                 [*common, shards, "--depths", "6", "16", "30", vae]):
        assert main(argv) == 2  # d30 does not fit in 16 GiB: planned, reported, exit 2
        out, err = capsys.readouterr()
        assert "invalid int value" not in err and "1 of 3 jobs" in err, err
        plans.append(json.loads(out))
    assert plans[0] == plans[1] == plans[2]
    assert [job["depth"] for job in plans[0]] == [6, 16, 30]
    for job in plans[0][:2]:  # the valid jobs carry both overrides, last (they win), in the order typed
        assert job["overrides"][-2:] == [shards, vae]


def test_demo_depths_pass_their_overrides_on_and_bad_depths_are_one_line(capsys):
    from var_train.cli import SUBCOMMAND_MODULES
    from var_train.command_line import build_parser

    parser = build_parser("var-train", SUBCOMMAND_MODULES, "")
    args = parser.parse_args(["scaling", "demo", "optim.epochs=2", "--depths", "1", "2", "logging.log_every=5", "3",
                              "--seed", "1"])
    assert args.depths == [1, 2, 3] and args.overrides == ["optim.epochs=2", "logging.log_every=5"]
    assert parser.parse_args(["scaling", "demo"]).overrides == []
    for bad, said in ((["six"], "invalid whole number value: 'six'"), (["0"], "must be 1 or more, got 0"),
                      (["a.b=1"], "expected at least one value before a.b=1")):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["scaling", "plan", "--recipe", RECIPE, "--world-size", "2", "--depths", *bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: argument --depths: ") and said in err, err
        assert len(err.strip().splitlines()) == 1


def test_plan_table_prints_parameter_counts_readably_at_any_size():
    from var_train.scaling.plan import PlannedJob, format_table

    def job(depth, params, problem=None):
        return PlannedJob(depth=depth, params=params, flops_per_image=1e9, world_size=2, nodes=1, gpus_per_node=8,
                          global_batch_size=64, micro_batch_size=32, accumulation=1, activation_checkpointing=False,
                          memory_gib=1.0, dataset_images=1000, epochs=1, steps=15, pflop_days=1e-5, days=1e-3,
                          run_dir="runs/d", problem=problem)

    lines = format_table([job(6, 31_234), job(16, 310_283_520), job(30, 2_010_020_356, "too big")]).splitlines()
    assert lines[1].split()[:2] == ["d6", "31.2k"]  # was "0M"
    assert lines[2].split()[:2] == ["d16", "310.3M"]
    assert lines[3].split()[:2] == ["d30", "2.0B"]


def test_too_few_images_for_one_step_make_an_invalid_job_not_a_crash():
    """64 GPUs x 12 images is d16's global batch of 768: 700 images cannot make one step, and
    training would refuse the job at start, so the plan says so per job."""
    job = plan_job(RECIPE, 16, 64, dataset_images=700)
    assert not job.valid and "one epoch has 0 micro-batches per rank" in job.problem
    assert "(700 images over 64 GPUs)" in job.problem
    assert plan_job(RECIPE, 16, 64, dataset_images=768).valid
