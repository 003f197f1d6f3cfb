"""Tokenizer training: learning, dead-code restarts, DDP consistency, resume (in process and after a
real SIGTERM), the LR schedule in metrics.jsonl, export, extra losses, fine-tuning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.cli import main as var_prep
from data_prep.demo_data import write_demo_data
from tests.conftest import REPO_ROOT, run_torchrun
from var_train.checkpoint import complete_checkpoints, latest_checkpoint
from var_train.errors import MismatchError
from var_train.models import VQVAE, MultiScaleQuantizer
from var_train.models.checkpoint_io import load_vae, read_checkpoint
from var_train.preemption import EXIT_CODE_NONFINITE, EXIT_CODE_PREEMPTED
from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer
from var_train.tokenizer.codebook import DeadCodeRestarter, quantizer_inputs_per_scale
from var_train.tokenizer.losses import LPIPS

WORKER = Path(__file__).with_name("tokenizer_ddp_worker.py")
# 32px images, 2 scales (1x1, 2x2): the smallest VQVAE this architecture allows, fast on CPU.
TINY = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2))
TINY_FLAGS = ["--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--patch-nums", "1,2", "--batch-size", "8",
              "--num-workers", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    """Two intra-op threads on a loaded 2-core machine spin against each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_demo_data(root, resolution=32, limit=240, progress=False)
    return root


def _config(data_dir: Path, output_dir: Path, **overrides) -> TokenizerTrainingConfig:
    fields = dict(TINY, data_dir=str(data_dir), output_dir=str(output_dir), batch_size=8, lr=1e-3,
                  max_steps=4, log_every=2, checkpoint_every=2, dead_code_steps=5, val_fraction=0.1,
                  num_workers=0, progress=False, wandb_mode="disabled")
    fields.update(overrides)
    return TokenizerTrainingConfig(**fields)


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _trained(output_dir: Path) -> list[dict]:
    return [r for r in _metrics(output_dir) if "train/loss" in r]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_training_reduces_heldout_reconstruction_error(digits, tmp_path):
    result = train_tokenizer(_config(digits, tmp_path, max_steps=40, log_every=10, checkpoint_every=100,
                                     dead_code_steps=10, wpe=1.0))
    assert result.exit_code == 0
    before, after = result.val_before["val/mse"], result.val_after["val/mse"]
    assert after < 0.6 * before, (before, after)
    trained = _trained(tmp_path)
    assert [r["step"] for r in trained] == [10, 20, 30, 40]
    assert trained[-1]["train/reconstruction_l2"] < trained[0]["train/reconstruction_l2"]
    for key in ("train/codebook_usage_pn1", "train/codebook_usage_pn2", "train/codebook_perplexity_pn2",
                "train/dead_codes_restarted", "train/vq_loss", "train/reconstruction_l1", "train/lr",
                "train/grad_norm", "perf/images_per_s"):
        assert key in trained[-1], key
    assert 0 < trained[-1]["train/codebook_usage_pn2"] <= 1
    # The logged total is the weighted sum of the logged terms (l2 + vq here; l1 weight 0).
    last = trained[-1]
    assert last["train/loss"] == pytest.approx(last["train/reconstruction_l2"] + last["train/vq_loss"], rel=1e-5)


def test_lr_schedule_and_loss_terms_per_step_in_metrics(digits, tmp_path):
    """Warmup from half the peak over 2 steps, no hold, linear decay to 0.1 x peak at the last step.
    The record at step s reports the LR that step s-1 (0-based) trained with; values by hand."""
    train_tokenizer(_config(digits, tmp_path, max_steps=6, log_every=1, checkpoint_every=100, warmup_steps=2,
                            warmup_start_ratio=0.5, hold_fraction=0.0, wpe=0.1, weight_decay=0.01,
                            l1_weight=0.5))
    trained = _trained(tmp_path)
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    assert [r["train/lr"] for r in trained] == pytest.approx([5e-4, 7.5e-4, 1e-3, 7e-4, 4e-4, 1e-4], rel=1e-9)
    assert all(r["train/weight_decay"] == 0.01 for r in trained)
    for record in trained:
        expected = record["train/reconstruction_l2"] + 0.5 * record["train/reconstruction_l1"] + record["train/vq_loss"]
        assert record["train/loss"] == pytest.approx(expected, rel=1e-5)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4))
    with torch.no_grad():  # all but 3 codes far from any feature: they can never be chosen
        quantizer.embedding.weight[3:] += 100.0
    optimizer = torch.optim.AdamW(quantizer.parameters(), lr=1e-3)
    features = torch.randn(16, 8, 4, 4)

    def step() -> list[torch.Tensor]:
        out = quantizer(features)
        optimizer.zero_grad()
        out.vq_loss.backward()
        optimizer.step()
        return out.tokens_per_scale

    restarter = DeadCodeRestarter(vocab_size=64, dead_after_steps=2, device=torch.device("cpu"))
    for _ in range(2):
        tokens = step()
        restarter.update(tokens)
    used_before = torch.cat([t.flatten() for t in tokens]).unique()
    assert set(used_before.tolist()) <= {0, 1, 2}
    assert restarter.dead_codes().numel() == 64 - len(used_before)

    candidates = quantizer_inputs_per_scale(quantizer, features, tokens)
    assert [c.shape for c in candidates] == [(16 * pn * pn, 8) for pn in (1, 2, 3, 4)]
    restarted = restarter.restart(quantizer, candidates, optimizer)
    assert restarted == 64 - len(used_before)
    pool = torch.cat(candidates)
    dead = [i for i in range(64) if i not in used_before.tolist()]
    for code in dead:  # every restarted code is one of the batch's quantizer inputs
        assert (pool - quantizer.embedding.weight[code]).norm(dim=1).min() < 1e-6
    moments = optimizer.state[quantizer.embedding.weight]
    assert moments["exp_avg"][dead].abs().sum() == 0 and moments["exp_avg_sq"][dead].abs().sum() == 0
    assert restarter.dead_codes().numel() == 0

    used_after = torch.cat([t.flatten() for t in quantizer(features).tokens_per_scale]).unique()
    assert len(used_after) > 20, used_after


def test_codebook_is_never_weight_decayed():
    vae = VQVAE(**TINY)
    groups = {g["name"]: g for g in vae.parameter_groups(0.05)}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    assert id(vae.quantize.embedding.weight) in no_decay_ids and groups["no_decay"]["weight_decay"] == 0.0
    assert id(vae.encoder.conv_in.weight) not in no_decay_ids and groups["decay"]["weight_decay"] == 0.05


@pytest.mark.distributed
def test_two_rank_training_keeps_replicas_identical(digits, tmp_path):
    proc = run_torchrun(WORKER, str(digits), str(tmp_path), nproc=2, timeout=300)
    assert proc.stdout.count("REPLICAS IDENTICAL (restarts)") == 2, proc.stdout
    assert proc.stdout.count("REPLICAS IDENTICAL (adversarial)") == 2, proc.stdout
    adversarial = _trained(tmp_path / "adversarial")
    assert any("train/discriminator_loss" in r for r in adversarial)
    restarts = [r["train/dead_codes_restarted"] for r in _trained(tmp_path)]
    assert sum(restarts) > 0  # the rank-0-draws-and-broadcasts path ran
    assert json.loads((latest_checkpoint(tmp_path / "checkpoints") / "metadata.json").read_text())["world_size"] == 2


def test_stop_and_resume_matches_uninterrupted_run(digits, tmp_path):
    """With the discriminator on from step 1 and dead codes restarted: everything a resume needs
    (engine state, RNG, discriminator and its optimizer, dead-code counters) is in the checkpoint."""
    common = dict(max_steps=4, disc_weight=0.1, disc_start=1, dead_code_steps=1)
    straight = train_tokenizer(_config(digits, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    first = train_tokenizer(_config(digits, interrupted, stop_after_steps=2, **common))
    assert first.exit_code == EXIT_CODE_PREEMPTED and first.step == 2 and first.model_path is None
    assert latest_checkpoint(interrupted / "checkpoints").name == "step-00000002"
    resumed = train_tokenizer(_config(digits, interrupted, **common))
    assert resumed.exit_code == 0 and resumed.step == 4
    assert [p.name for p in complete_checkpoints(interrupted / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in _trained(interrupted)] == [2, 4]  # the second run logged only its own steps
    assert _same_weights(straight.model, resumed.model)
    def train_metrics(run: Path) -> list[dict]:  # perf/ (speed, ETA) differs between runs by nature
        return [{k: v for k, v in r.items() if k.startswith("train/")} for r in _trained(run)]

    assert train_metrics(interrupted) == train_metrics(tmp_path / "straight")
    state = torch.load(latest_checkpoint(interrupted / "checkpoints") / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and {"discriminator", "disc_optimizer", "restarter"} <= state.keys()


def test_nonfinite_steps_are_skipped_then_stop_with_exit_43(digits, tmp_path, monkeypatch):
    import var_train.tokenizer.trainer as trainer_module

    real = trainer_module.reconstruction_losses

    def poisoned(reconstruction, images):  # a NaN loss at every step, as from a corrupt image
        return {name: value * float("nan") for name, value in real(reconstruction, images).items()}

    monkeypatch.setattr(trainer_module, "reconstruction_losses", poisoned)
    result = train_tokenizer(_config(digits, tmp_path, max_steps=10, log_every=5, max_consecutive_nonfinite=2))
    assert result.exit_code == EXIT_CODE_NONFINITE and result.step == 3 and result.model_path is None
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
    torch.manual_seed(0)  # the trainer's initialisation: no step may have been applied
    initial, trained = dict(VQVAE(**TINY).named_parameters()), dict(result.model.cpu().named_parameters())
    assert initial.keys() == trained.keys() and all(torch.equal(initial[k], trained[k]) for k in initial)
    assert [r["step"] for r in _trained(tmp_path)] == [1, 2, 3]  # every non-finite step is logged


def test_resume_refuses_another_architecture(digits, tmp_path):
    train_tokenizer(_config(digits, tmp_path, max_steps=2))
    with pytest.raises(MismatchError, match="another VQVAE"):
        train_tokenizer(_config(digits, tmp_path, max_steps=4, vocab_size=128))


def _var_prep_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("var-prep")
    prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "data_prep.cli"]
    return [*prefix, "train-tokenizer", *args]


def test_sigterm_checkpoints_exits_42_and_rerun_finishes_like_uninterrupted(digits, tmp_path):
    """A real `var-prep train-tokenizer` process: SIGTERM mid-run -> checkpoint + exit 42; the same
    command again resumes and ends with the same weights and losses as a run never interrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    flags = [*TINY_FLAGS, "--data-dir", str(digits), "--max-steps", "16", "--log-every", "1",
             "--checkpoint-every", "1000", "--dead-code-steps", "3", "--val-fraction", "0.05", "--lr", "1e-3"]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    command = _var_prep_command(*flags, "--output-dir", str(interrupted))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            metrics = interrupted / "metrics.jsonl"
            if metrics.is_file() and any('"train/loss"' in line for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_CODE_PREEMPTED, output
    stopped_at = int(latest_checkpoint(interrupted / "checkpoints").name.split("-")[1])
    assert 1 <= stopped_at < 16, output
    assert not (interrupted / "vqvae.safetensors").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from step {stopped_at}" in rerun.stdout
    # W&B only watches (it changes no number): off here to save its start-up.
    uninterrupted = subprocess.run(_var_prep_command(*flags, "--output-dir", str(straight), "--wandb-mode", "disabled"),
                                   env=env, capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr

    resumed_weights = load_file(interrupted / "vqvae.safetensors")
    straight_weights = load_file(straight / "vqvae.safetensors")
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    by_step = {r["step"]: r for r in _trained(interrupted)}  # the rerun's records come last and win
    assert sorted(by_step) == list(range(1, 17))  # a record per step, each with the LR and the loss terms
    for record in by_step.values():
        assert {"train/lr", "train/loss", "train/reconstruction_l2", "train/vq_loss"} <= record.keys()
    straight_losses = [r["train/loss"] for r in _trained(straight)]
    assert [by_step[s]["train/loss"] for s in range(1, 17)] == straight_losses
    # W&B (offline) continued the same run after the resume.
    assert (interrupted / "wandb").is_dir() and (interrupted / "wandb_run.json").is_file()


def test_cli_run_exports_reference_layout_that_loads_strictly(digits, tmp_path):
    out = tmp_path / "cli"
    code = var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(out), *TINY_FLAGS,
                     "--max-steps", "2", "--wandb-mode", "disabled"])
    assert code == 0
    ours, config = read_checkpoint(out / "vqvae.safetensors")
    assert config["patch_nums"] == [1, 2] and config["vocab_size"] == 64
    reference_state = torch.load(out / "vqvae.pth", weights_only=True)
    assert "quantize.ema_vocab_hit_SV" in reference_state
    model = VQVAE(**config)
    model.load_state_dict(reference_state, strict=True)
    loaded = load_vae(out / "vqvae.pth", patch_nums=(1, 2))
    assert _same_weights(model, loaded)
    assert all(torch.equal(ours[k], reference_state[k]) for k in ours)


def test_cli_user_errors_are_one_line_exit_2(digits, tmp_path, capsys):
    code = var_prep(["train-tokenizer", "--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"),
                     *TINY_FLAGS, "--wandb-mode", "disabled"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "image folder not found" in err[0]
    code = var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(tmp_path / "o"),
                     *TINY_FLAGS, "--lpips-weight", "1"])
    assert code == 2 and "--lpips-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check: before any process group
        var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(tmp_path / "o"), "--lr", "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        "error: argument --lr: must be a finite number, got nan (see var-prep train-tokenizer --help)"], err


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--warmup-steps", "50", "--max-steps", "10"], "error: --warmup-steps (50) must be below --max-steps (10)"),
    (["--lr", "-1"], "error: --lr, --weight-decay and --clip-grad-norm must be >= 0"),
    (["--hold-fraction", "1.5"], "error: --hold-fraction must be in [0, 1), got 1.5"),
])
def test_cli_range_errors_name_the_flags_typed(digits, tmp_path, capsys, flags, expected):
    code = var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(tmp_path / "o"),
                     "--wandb-mode", "disabled", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [expected], err
    assert not (tmp_path / "o").exists()


def _fake_lpips_files(tmp_path: Path) -> tuple[Path, Path]:
    """Random weights in the two files' real layouts (the real ones are downloads)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"], batch_norm=False)
    vgg_path, lin_path = tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg_path)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               lin_path)
    return vgg_path, lin_path


def test_lpips_from_local_files(tmp_path):
    vgg_path, lin_path = _fake_lpips_files(tmp_path)
    lpips = LPIPS(vgg_path, lin_path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    other = (images + 0.5 * torch.randn_like(images)).requires_grad_(True)
    assert lpips(images, images).item() == pytest.approx(0.0, abs=1e-6)
    distance = lpips(images, other)
    assert distance.item() > 0
    distance.backward()
    assert other.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lpips.parameters())
    with pytest.raises(FileNotFoundError, match="--lpips-weights"):
        LPIPS(vgg_path, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="--lpips-weights"):
        TokenizerTrainingConfig(data_dir="x", output_dir="y", lpips_weight=1.0)


def test_adversarial_and_perceptual_terms_train(digits, tmp_path):
    vgg_path, lin_path = _fake_lpips_files(tmp_path)
    result = train_tokenizer(_config(digits, tmp_path / "run", max_steps=2, log_every=1, disc_weight=0.1,
                                     disc_start=1, lpips_weight=0.5, lpips_weights=str(lin_path),
                                     vgg16_weights=str(vgg_path), val_fraction=0.0))
    assert result.step == 2
    first, second = _trained(tmp_path / "run")
    assert "train/discriminator_loss" not in first and "train/lpips" in first  # the discriminator starts at step 1
    assert {"train/discriminator_loss", "train/generator_adv", "train/lpips"} <= second.keys()
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in second.items() if k != "time")
    assert second["train/loss"] == pytest.approx(second["train/reconstruction_l2"] + second["train/vq_loss"]
                                                 + 0.5 * second["train/lpips"] + 0.1 * second["train/generator_adv"],
                                                 rel=1e-5)
    state = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainer_state.pt", weights_only=True)
    assert "discriminator" in state and "disc_optimizer" in state


def test_cli_small_layout_flags(digits, tmp_path):
    """--ch-mult / --encoder-blocks / --decoder-blocks build a 4x-downsampling tokenizer (16px here)."""
    out = tmp_path / "small"
    code = var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(out), "--vocab-size", "64",
                     "--z-channels", "8", "--ch", "32", "--ch-mult", "1,1,2", "--encoder-blocks", "1",
                     "--decoder-blocks", "1", "--patch-nums", "1,2,4", "--batch-size", "8", "--max-steps", "2",
                     "--num-workers", "0", "--no-progress", "--no-export-reference", "--wandb-mode", "disabled"])
    assert code == 0 and not (out / "vqvae.pth").exists()
    vae = load_vae(out / "vqvae.safetensors")
    assert vae.config["ch_mult"] == [1, 1, 2] and vae.resolution == 16
    assert [r for r in _metrics(out) if "val/mse" in r][-1]["val/mse"] > 0


def test_fine_tuning_starts_from_the_released_layout(digits, tmp_path):
    from var_train.models.checkpoint_io import save_reference_layout

    torch.manual_seed(1)
    released = VQVAE(**TINY)
    path = save_reference_layout(released, tmp_path / "vae_tiny.pth")
    # lr 0: the run must leave exactly the loaded weights (nothing re-initialised on the way).
    result = train_tokenizer(_config(digits, tmp_path / "ft", init_from=str(path), max_steps=1, lr=0.0,
                                     vocab_size=4096, ch=160))  # architecture flags are ignored with init_from
    loaded = dict(result.model.named_parameters())
    assert all(torch.equal(loaded[name], p) for name, p in released.named_parameters())
    assert result.model.config["vocab_size"] == 64


def test_a_time_budget_stops_no_earlier_than_min_steps_and_its_eta_counts_the_budget(digits, tmp_path):
    """A budget of 0.06 s is spent by the first step; min_steps=6 still trains 6 (a busy machine
    must not leave the demo a useless tokenizer). The ETA follows the budget, not max_steps' 100,000
    steps (which at this speed would read hours)."""
    result = train_tokenizer(_config(digits, tmp_path / "floor", max_steps=100_000, max_minutes=0.001, min_steps=6,
                                     log_every=2, checkpoint_every=1000))
    rows = _trained(tmp_path / "floor")
    assert result.exit_code == 0 and [r["step"] for r in rows] == [2, 4, 6], rows
    # At most 4 steps were ever owed (a step takes well under a second here); counted by max_steps the
    # ETA would be ~99,995 steps x at least 1 ms.
    assert all(r["perf/eta_seconds"] < 30 for r in rows), rows
    assert rows[-1]["perf/eta_seconds"] == 0  # nothing owed and the budget spent

    result = train_tokenizer(_config(digits, tmp_path / "no_floor", max_steps=100_000, max_minutes=0.001,
                                     log_every=1, checkpoint_every=1000))
    assert result.exit_code == 0 and [r["step"] for r in _trained(tmp_path / "no_floor")] == [1]
