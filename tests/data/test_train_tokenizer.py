"""Tokenizer training: learning, dead-code restarts, DDP consistency, resume, export, extra losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep.cli import main as var_prep
from data_prep.codebook_restart import DeadCodeRestarter, quantizer_inputs_per_scale
from data_prep.demo_data import write_demo_data
from data_prep.tokenizer_checkpoint import latest_checkpoint, list_checkpoints
from data_prep.tokenizer_losses import LPIPS
from data_prep.tokenizer_training import TokenizerTrainingConfig, train_tokenizer
from tests.conftest import run_torchrun
from var_train.models import VQVAE, MultiScaleQuantizer
from var_train.models.checkpoint_io import load_vae, read_checkpoint

WORKER = Path(__file__).with_name("tokenizer_ddp_worker.py")
# 32px images, 2 scales (1x1, 2x2): the smallest VQVAE this architecture allows, fast on CPU.
TINY = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2))


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
                  num_workers=0, progress=False)
    fields.update(overrides)
    return TokenizerTrainingConfig(**fields)


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_training_reduces_heldout_reconstruction_error(digits, tmp_path):
    result = train_tokenizer(_config(digits, tmp_path, max_steps=40, log_every=10, checkpoint_every=100,
                                     dead_code_steps=10))
    before, after = result.val_before["val_mse"], result.val_after["val_mse"]
    assert after < 0.6 * before, (before, after)
    records = _metrics(tmp_path)
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [10, 20, 30, 40]
    assert trained[-1]["reconstruction_l2"] < trained[0]["reconstruction_l2"]
    for key in ("codebook_usage_pn1", "codebook_usage_pn2", "perplexity_pn2", "dead_codes_restarted", "vq_loss"):
        assert key in trained[-1]
    assert 0 < trained[-1]["codebook_usage_pn2"] <= 1


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


@pytest.mark.distributed
def test_two_rank_training_keeps_replicas_identical(digits, tmp_path):
    proc = run_torchrun(WORKER, str(digits), str(tmp_path), nproc=2, timeout=300)
    assert proc.stdout.count("REPLICAS IDENTICAL (restarts)") == 2, proc.stdout
    assert proc.stdout.count("REPLICAS IDENTICAL (adversarial)") == 2, proc.stdout
    adversarial = _metrics(tmp_path / "adversarial")
    assert any("discriminator_loss" in r for r in adversarial)
    restarts = [r["dead_codes_restarted"] for r in _metrics(tmp_path) if "dead_codes_restarted" in r]
    assert sum(restarts) > 0  # the rank-0-draws-and-broadcasts path ran


def test_checkpoint_resume_continues_and_matches_uninterrupted_run(digits, tmp_path):
    straight = train_tokenizer(_config(digits, tmp_path / "straight", max_steps=4))
    interrupted = tmp_path / "interrupted"
    first = train_tokenizer(_config(digits, interrupted, max_steps=2))
    assert first.step == 2 and latest_checkpoint(interrupted).name == "step-00000002"
    resumed = train_tokenizer(_config(digits, interrupted, max_steps=4))
    assert resumed.step == 4
    assert [p.name for p in list_checkpoints(interrupted)] == ["step-00000002", "step-00000004"]
    trained_steps = [r["step"] for r in _metrics(interrupted) if "loss" in r]
    assert trained_steps == [2, 4]  # the second run logged only its own steps
    assert _same_weights(straight.model, resumed.model)
    state = torch.load(latest_checkpoint(interrupted) / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "restarter" in state


def test_cli_run_exports_reference_layout_that_loads_strictly(digits, tmp_path):
    out = tmp_path / "cli"
    code = var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(out),
                     "--vocab-size", "64", "--z-channels", "8", "--ch", "32", "--patch-nums", "1,2",
                     "--batch-size", "8", "--max-steps", "2", "--num-workers", "0", "--no-progress"])
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
    first, second = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert "discriminator_loss" not in first and "lpips" in first  # the discriminator starts at step 1
    assert {"discriminator_loss", "generator_adv", "lpips"} <= second.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in second.values())
    state = torch.load(latest_checkpoint(tmp_path / "run") / "training_state.pt", weights_only=True)
    assert "discriminator" in state and "disc_optimizer" in state


def test_cli_small_layout_flags(digits, tmp_path):
    """--ch-mult / --encoder-blocks / --decoder-blocks build a 4x-downsampling tokenizer (16px here)."""
    out = tmp_path / "small"
    code = var_prep(["train-tokenizer", "--data-dir", str(digits), "--output-dir", str(out), "--vocab-size", "64",
                     "--z-channels", "8", "--ch", "32", "--ch-mult", "1,1,2", "--encoder-blocks", "1",
                     "--decoder-blocks", "1", "--patch-nums", "1,2,4", "--batch-size", "8", "--max-steps", "2",
                     "--num-workers", "0", "--no-progress", "--no-export-reference"])
    assert code == 0 and not (out / "vqvae.pth").exists()
    vae = load_vae(out / "vqvae.safetensors")
    assert vae.config["ch_mult"] == [1, 1, 2] and vae.resolution == 16
    assert [r for r in _metrics(out) if "val_mse" in r][-1]["val_mse"] > 0


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
