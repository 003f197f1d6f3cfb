"""Training VAR's multi-scale VQVAE tokenizer (from scratch or fine-tuning a released one).

Loss per step (images x in [-1, 1], reconstruction x_hat):
    l2_weight * ||x - x_hat||^2 + l1_weight * |x - x_hat| + vq_weight * vq_loss
    [+ lpips_weight * LPIPS(x, x_hat)]                       (only with local LPIPS/VGG16 weights)
    [+ disc_weight * hinge_G(D(x_hat))]                      (after `disc_start` steps)
where vq_loss is the quantizer's codebook + beta * commitment term averaged over all scales, with
straight-through gradients inside the quantizer. Codes unused for `dead_code_steps` steps are
restarted from the batch (see `codebook_restart`). Distributed like the trainer (torchrun/srun):
one process per device, DDP over the VQVAE (and the discriminator), gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from var_train.models import DEFAULT_PATCH_NUMS, VQVAE
from var_train.models.checkpoint_io import load_vae, save_model, save_reference_layout
from var_train.parallel.distributed import default_device, init_distributed, launcher_ranks

from .codebook_restart import CodebookUsageWindow, DeadCodeRestarter, quantizer_inputs_per_scale
from .tokenizer_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .tokenizer_data import EpochBatchSampler, batches_from, split_image_folder
from .tokenizer_losses import (LPIPS, PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss,
                               reconstruction_losses)

FINAL_MODEL_FILE = "vqvae.safetensors"
FINAL_REFERENCE_FILE = "vqvae.pth"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TokenizerTrainingConfig:
    data_dir: str
    output_dir: str
    # Architecture (ignored when fine-tuning: `init_from` brings its own).
    init_from: str | None = None
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    beta: float = 0.25
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per level: 2^(levels-1)x downsampling
    encoder_blocks: int = 2
    decoder_blocks: int = 3
    # Optimisation.
    batch_size: int = 16  # per rank
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    max_steps: int = 10_000
    max_minutes: float | None = None  # stop (and save) after this much training time
    # Loss weights.
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    vq_weight: float = 1.0
    lpips_weight: float = 0.0
    lpips_weights: str | None = None
    vgg16_weights: str | None = None
    disc_weight: float = 0.0
    disc_start: int = 0
    # Codebook health.
    dead_code_steps: int = 50  # 0 = never restart codes
    # Data.
    hflip: bool = False
    val_fraction: float = 0.05
    val_max_images: int = 512
    num_workers: int = 2
    # Bookkeeping.
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: bool = True
    export_reference: bool = True
    precision: str = "fp32"  # or "bf16" (autocast on GPU)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        self.betas = tuple(float(b) for b in self.betas)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.lpips_weight > 0 and not (self.lpips_weights and self.vgg16_weights):
            raise ValueError("lpips_weight > 0 needs local weight files: --lpips-weights (LPIPS' vgg.pth) "
                             "and --vgg16-weights (torchvision's vgg16 state dict)")
        for name in ("batch_size", "max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class TokenizerTrainingResult:
    step: int
    model_path: Path
    reference_path: Path | None
    val_before: dict[str, float] = field(default_factory=dict)  # held-out metrics at the start of this run
    val_after: dict[str, float] = field(default_factory=dict)
    minutes: float = 0.0
    model: VQVAE | None = None  # the trained model, in memory (on this rank's device)


# -- process group ---------------------------------------------------------------------------------
def _setup_processes() -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). A process group is made only when a launcher (torchrun,
    srun) started several processes; a single process stays free of one."""
    rank, world_size, local_rank = launcher_ranks()
    if world_size > 1:
        info = init_distributed()
        return info.rank, info.world_size, info.device
    return 0, 1, default_device(local_rank)


def _all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


# -- model and evaluation --------------------------------------------------------------------------
def build_vqvae(config: TokenizerTrainingConfig) -> VQVAE:
    if config.init_from:
        vae = load_vae(config.init_from, patch_nums=config.patch_nums)
        if vae.config["beta"] != config.beta:
            vae.quantize.beta = vae.config["beta"] = config.beta
        return vae
    return VQVAE(vocab_size=config.vocab_size, z_channels=config.z_channels, ch=config.ch,
                 share_quant_resi=config.share_quant_resi, patch_nums=config.patch_nums, beta=config.beta,
                 ch_mult=tuple(config.ch_mult), encoder_blocks=config.encoder_blocks,
                 decoder_blocks=config.decoder_blocks)


def freeze_unused_phi(vae: VQVAE) -> int:
    """With fewer scales than phi convs (e.g. 2 scales, 4 convs) some convs serve no scale and never
    get a gradient; freezing them keeps DDP from waiting for their gradients. -> number frozen."""
    quantizer = vae.quantize
    used = {id(quantizer.phi(k)) for k in range(quantizer.num_scales)}
    unused = [conv for conv in quantizer.quant_resi.qresi_ls if id(conv) not in used]
    for conv in unused:
        conv.requires_grad_(False)
    return len(unused)


@torch.no_grad()
def evaluate_reconstruction(vae: VQVAE, dataset, device: torch.device, batch_size: int = 32,
                            num_workers: int = 0) -> dict[str, float]:
    """Held-out reconstruction MSE (in [-1, 1] units, output clamped as at inference) and the
    fraction of codes each scale uses over the whole set. Collective when distributed: every
    rank scores its interleaved share and the sums are combined."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=num_workers)
    was_training = vae.training
    vae.eval()
    usage = CodebookUsageWindow(vae.patch_nums, vae.quantize.vocab_size, device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # squared error, number of values
    for images, _ in loader:
        images = images.to(device)
        features = vae.encode_features(images)
        tokens = vae.quantize.features_to_tokens(features)
        reconstruction = vae.features_to_image(vae.quantize.tokens_to_features(tokens))
        sums[0] += (reconstruction.float() - images).square().sum().double()
        sums[1] += images.numel()
        usage.update(tokens)
    vae.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(sums)
    metrics = {"val_mse": (sums[0] / sums[1].clamp_min(1)).item()}
    metrics.update({k: v for k, v in usage.report("val_").items() if "usage" in k})
    return metrics


class _JsonlWriter:
    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


# -- the loop --------------------------------------------------------------------------------------
def train_tokenizer(config: TokenizerTrainingConfig) -> TokenizerTrainingResult:
    """Train (or fine-tune) a VQVAE; resumes from the newest checkpoint in `output_dir`."""
    rank, world_size, device = _setup_processes()
    is_main = rank == 0
    output_dir = Path(config.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed + rank)

    vae = build_vqvae(config).to(device)
    freeze_unused_phi(vae)
    resolution = vae.resolution
    train_set, val_set = split_image_folder(config.data_dir, resolution, config.val_fraction, config.seed,
                                            config.hflip, config.val_max_images)
    sampler = EpochBatchSampler(len(train_set), config.batch_size, rank, world_size, config.seed)

    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    discriminator = disc_optimizer = None
    if config.disc_weight > 0:
        discriminator = PatchDiscriminator().to(device)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
    lpips = LPIPS(config.vgg16_weights, config.lpips_weights).to(device) if config.lpips_weight > 0 else None
    restarter = (DeadCodeRestarter(vae.quantize.vocab_size, config.dead_code_steps, device, config.seed)
                 if config.dead_code_steps > 0 else None)

    step, trained_seconds = 0, 0.0
    resume_from = latest_checkpoint(output_dir) if config.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, vae)
        vae.to(device)
        optimizer.load_state_dict(state["optimizer"])
        if discriminator is not None and "discriminator" in state:
            discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        if restarter is not None and "restarter" in state:
            restarter.load_state_dict(state["restarter"])
        step, trained_seconds = int(state["step"]), float(state.get("trained_seconds", 0.0))
        torch.set_rng_state(state["rng_per_rank"][rank] if rank < len(state["rng_per_rank"]) else torch.get_rng_state())
        if is_main:
            print(f"resumed from {resume_from} at step {step}")

    ddp_vae = DistributedDataParallel(vae) if world_size > 1 else vae
    ddp_disc = (DistributedDataParallel(discriminator) if world_size > 1 and discriminator is not None
                else discriminator)
    # The encoder output f is needed to draw restart vectors; a hook keeps VQVAE.forward the one
    # definition of the model's computation.
    captured: dict[str, torch.Tensor] = {}
    vae.quant_conv.register_forward_hook(lambda module, inputs, output: captured.__setitem__("f", output.detach()))
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if config.precision == "bf16" else nullcontext())

    def training_state() -> dict:
        rng = torch.get_rng_state()
        if dist.is_initialized():
            gathered = [torch.empty_like(rng) for _ in range(world_size)]
            dist.all_gather(gathered, rng.to(device) if device.type == "cuda" else rng)
            rng_per_rank = [g.cpu() for g in gathered]
        else:
            rng_per_rank = [rng]
        state = {"step": step, "trained_seconds": trained_seconds, "optimizer": optimizer.state_dict(),
                 "rng_per_rank": rng_per_rank, "config": json.loads(json.dumps(dataclasses.asdict(config)))}
        if discriminator is not None:
            state["discriminator"] = discriminator.state_dict()
            state["disc_optimizer"] = disc_optimizer.state_dict()
        if restarter is not None:
            state["restarter"] = restarter.state_dict()
        return state

    def checkpoint() -> None:
        state = training_state()  # collective (RNG gather)
        if is_main:
            save_checkpoint(output_dir, step, vae, state, config.keep_last)
        if dist.is_initialized():
            dist.barrier()

    log = _JsonlWriter(output_dir / METRICS_FILE, is_main)
    val_before = evaluate_reconstruction(vae, val_set, device) if val_set is not None else {}
    if is_main and val_before:
        log.write({"step": step, **val_before})
    usage = CodebookUsageWindow(vae.patch_nums, vae.quantize.vocab_size, device)
    window: dict[str, float] = {}
    window_steps, window_images, window_start = 0, 0, time.perf_counter()
    restarted_in_window = 0
    progress = tqdm(total=config.max_steps, initial=step, desc="train-tokenizer", unit="step",
                    disable=not (is_main and config.progress), dynamic_ncols=True)
    batches = batches_from(train_set, sampler, step, config.num_workers, pin_memory=device.type == "cuda")
    session_start = time.perf_counter()
    seconds_before = trained_seconds
    vae.train()
    try:
        while step < config.max_steps:
            images = next(batches).to(device, non_blocking=True)
            with autocast:
                out = ddp_vae(images)
            reconstruction = out.reconstruction.float()
            terms = reconstruction_losses(reconstruction, images)
            terms["vq_loss"] = out.vq_loss
            loss = (config.l2_weight * terms["reconstruction_l2"] + config.l1_weight * terms["reconstruction_l1"]
                    + config.vq_weight * out.vq_loss)
            if lpips is not None:
                terms["lpips"] = lpips(images, reconstruction)
                loss = loss + config.lpips_weight * terms["lpips"]
            adversarial = discriminator is not None and step >= config.disc_start
            if adversarial:
                # The generator step must not train D (nor sync its gradients), so it calls the
                # unwrapped, frozen discriminator.
                discriminator.requires_grad_(False)
                terms["generator_adv"] = hinge_generator_loss(discriminator(reconstruction))
                discriminator.requires_grad_(True)
                loss = loss + config.disc_weight * terms["generator_adv"]
            terms["loss"] = loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if adversarial:
                logits = ddp_disc(torch.cat([images, reconstruction.detach()]))
                real, fake = logits.chunk(2)
                terms["discriminator_loss"] = hinge_discriminator_loss(real, fake)
                disc_optimizer.zero_grad(set_to_none=True)
                terms["discriminator_loss"].backward()
                disc_optimizer.step()

            usage.update(out.tokens_per_scale)
            if restarter is not None:
                restarter.update(out.tokens_per_scale)
                if restarter.dead_codes().numel():
                    candidates = quantizer_inputs_per_scale(vae.quantize, captured["f"], out.tokens_per_scale)
                    restarted_in_window += restarter.restart(vae.quantize, candidates, optimizer)
            step += 1
            window_steps += 1
            window_images += images.shape[0] * world_size
            for name, value in terms.items():
                window[name] = window.get(name, 0.0) + value.item()
            progress.update(1)

            # Rank 0 owns the clock; everyone stops at the same step.
            stop = torch.tensor([0.0], device=device)
            if is_main and config.max_minutes is not None:
                elapsed = seconds_before + time.perf_counter() - session_start
                stop[0] = float(elapsed >= 60 * config.max_minutes)
            if dist.is_initialized() and config.max_minutes is not None:
                dist.broadcast(stop, src=0)
            finished = step >= config.max_steps or bool(stop.item())

            if step % config.log_every == 0 or finished:
                seconds = time.perf_counter() - window_start
                metrics = _all_reduce_mean({k: v / window_steps for k, v in window.items()}, device)
                metrics.update(usage.report())
                metrics["dead_codes_restarted"] = restarted_in_window
                metrics["images_per_second"] = window_images / max(seconds, 1e-9)
                metrics["lr"] = config.lr
                if is_main:
                    log.write({"step": step, **metrics})
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", l2=f"{metrics['reconstruction_l2']:.4f}",
                                         refresh=False)
                window, window_steps, window_images, restarted_in_window = {}, 0, 0, 0
                window_start = time.perf_counter()
            trained_seconds = seconds_before + time.perf_counter() - session_start
            if step % config.checkpoint_every == 0 or finished:
                checkpoint()
            if finished:
                break
    finally:
        progress.close()
    val_after = evaluate_reconstruction(vae, val_set, device) if val_set is not None else {}

    model_path = output_dir / FINAL_MODEL_FILE
    reference_path = output_dir / FINAL_REFERENCE_FILE if config.export_reference else None
    if is_main:
        if val_after:
            log.write({"step": step, **val_after})
        save_model(vae, model_path)
        if reference_path is not None:
            save_reference_layout(vae, reference_path)
    log.close()
    if dist.is_initialized():
        dist.barrier()
    return TokenizerTrainingResult(step, model_path, reference_path, val_before, val_after, trained_seconds / 60, vae)
