"""The tokenizer trainer: images -> VQVAE -> losses -> engine step, on the VAR trainer's machinery.

Loss per step (images x in [-1, 1], reconstruction x_hat), every term logged as `train/<name>`:
    l2_weight * reconstruction_l2 + l1_weight * reconstruction_l1 + vq_weight * vq_loss
    [+ lpips_weight * lpips]                        (only with local LPIPS/VGG16 weight files)
    [+ disc_weight * generator_adv]                 (from step `disc_start` on)
vq_loss is the quantizer's codebook + beta * commitment term averaged over the scales, with
straight-through gradients (the two MSEs have the same value; they differ in where the gradient
goes). The PatchGAN discriminator, when on, takes its own hinge-loss step (`discriminator_loss`)
after the VQVAE's. Codes unused for `dead_code_steps` steps are restarted from the batch
(var_train.tokenizer.codebook); codebook usage and perplexity per scale are logged per window.

What is shared with var_train.train.Trainer: `build_engine` (DDP; the discriminator is a second
DDP engine), the Checkpointer (step directories written under a temporary name and renamed, the
newest complete one resumed automatically; the discriminator, dead-code counters and clock ride in
the trainer state), the MetricLogger (console or progress bar, metrics.jsonl, W&B offline by
default), the PreemptionHandler (SIGTERM/SIGUSR1 -> checkpoint -> exit 42), the LR Schedule
(warmup, hold, linear decay) and the non-finite guard (skip the step; too many in a row ->
checkpoint -> exit 43). Every method is collective: all ranks call them in the same order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from var_train.checkpoint import Checkpointer, read_metadata
from var_train.errors import MismatchError
from var_train.logging import MetricLogger
from var_train.models import VQVAE
from var_train.models.checkpoint_io import load_vae, save_model, save_reference_layout
from var_train.parallel import build_engine, init_distributed
from var_train.parallel.distributed import (all_reduce_max, all_reduce_mean, all_reduce_sum, barrier,
                                            destroy_distributed, launcher_ranks)
from var_train.preemption import EXIT_CODE_NONFINITE, PreemptionHandler, stop_message
from var_train.schedules import Schedule

from .codebook import CodebookUsageWindow, DeadCodeRestarter, quantizer_inputs_per_scale
from .config import TokenizerTrainingConfig
from .data import EpochBatchSampler, batches_from, split_image_folder
from .losses import LPIPS, PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss, reconstruction_losses

FINAL_MODEL_FILE = "vqvae.safetensors"
FINAL_REFERENCE_FILE = "vqvae.pth"
VAL_BATCH_SIZE = 32


@dataclass
class TokenizerTrainingResult:
    exit_code: int  # 0 done; 42 preempted or 130 Ctrl-C (checkpoint saved; rerun to resume); EXIT_CODE_NONFINITE
    step: int
    model_path: Path | None  # the final model; None unless the run finished
    reference_path: Path | None
    val_before: dict[str, float] = field(default_factory=dict)  # held-out metrics at the start of this run
    val_after: dict[str, float] = field(default_factory=dict)
    minutes: float = 0.0  # training time over every run of this output_dir
    model: VQVAE | None = None  # the trained model, in memory (on this rank's device)


def build_vqvae(config: TokenizerTrainingConfig) -> VQVAE:
    """The VQVAE of `config`, or the one `init_from` holds (whose own architecture wins)."""
    if config.init_from:
        vae = load_vae(config.init_from, patch_nums=config.patch_nums)
        if vae.config["beta"] != config.beta:
            vae.quantize.beta = vae.config["beta"] = config.beta
        return vae
    return VQVAE(vocab_size=config.vocab_size, z_channels=config.z_channels, ch=config.ch,
                 share_quant_resi=config.share_quant_resi, patch_nums=config.patch_nums, beta=config.beta,
                 ch_mult=config.ch_mult, encoder_blocks=config.encoder_blocks, decoder_blocks=config.decoder_blocks)


def freeze_unused_phi(vae: VQVAE) -> int:
    """With fewer scales than phi convs (e.g. 2 scales, 4 convs) some convs serve no scale and never
    get a gradient; freezing them keeps DDP from waiting for their gradients. -> number frozen."""
    quantizer = vae.quantize
    used = {id(quantizer.phi(k)) for k in range(quantizer.num_scales)}
    unused = [conv for conv in quantizer.quant_resi.qresi_ls if id(conv) not in used]
    for conv in unused:
        conv.requires_grad_(False)
    return len(unused)


def _plain(value):
    """JSON round trip: tuples become lists, as in a checkpoint's metadata."""
    return json.loads(json.dumps(value))


class TokenizerTrainer:
    def __init__(self, config: TokenizerTrainingConfig):
        self.config = config
        info = init_distributed()
        self.device, self.rank, self.world_size = info.device, info.rank, info.world_size
        self.is_main = self.rank == 0
        self.run_dir = Path(config.output_dir)

        # Initial weights from the seed alone (DDP then starts every rank from rank 0's anyway); after
        # that a stream per rank, restored from the checkpoint on resume.
        torch.manual_seed(config.seed)
        vae = build_vqvae(config)
        freeze_unused_phi(vae)
        discriminator = PatchDiscriminator() if config.disc_weight > 0 else None
        torch.manual_seed(config.seed * 1000 + self.rank + 1)

        self.train_set, self.val_set = split_image_folder(config.data_dir, vae.resolution, config.val_fraction,
                                                          config.seed, config.hflip, config.val_max_images)
        self.sampler = EpochBatchSampler(len(self.train_set), config.batch_size, self.rank, self.world_size,
                                         config.seed)
        parallel_cfg, optim_cfg = config.engine_configs(self.world_size)
        self.engine = build_engine(vae, parallel_cfg, optim_cfg, self.device)
        self.disc_engine = (build_engine(discriminator, parallel_cfg, optim_cfg, self.device)
                            if discriminator is not None else None)
        self.vae: VQVAE = self.engine.unwrapped_model
        self.lpips = (LPIPS(config.vgg16_weights, config.lpips_weights).to(self.device)
                      if config.lpips_weight > 0 else None)
        self.restarter = (DeadCodeRestarter(self.vae.quantize.vocab_size, config.dead_code_steps, self.device,
                                            config.seed) if config.dead_code_steps > 0 else None)
        self.usage = CodebookUsageWindow(self.vae.patch_nums, self.vae.quantize.vocab_size, self.device)
        self.schedule = Schedule(peak_lr=config.lr, total_steps=config.max_steps, warmup_steps=config.warmup_steps,
                                 warmup_start_ratio=config.warmup_start_ratio, hold_fraction=config.hold_fraction,
                                 wpe=config.wpe, weight_decay=config.weight_decay)
        # The encoder output f is needed to draw restart vectors; a hook keeps VQVAE.forward the one
        # definition of the model's computation.
        self._features: torch.Tensor | None = None
        self.vae.quant_conv.register_forward_hook(self._capture_features)

        self.checkpointer = Checkpointer(config.checkpoint_config(), self.run_dir)
        self.step, self.trained_seconds = 0, 0.0
        self.nonfinite_total, self.nonfinite_in_a_row = 0, 0
        resumed = self._resume()
        self.logger = MetricLogger(config.logging_config(), self.run_dir, config.to_dict(), self.is_main,
                                   resumed.get("wandb_run_id") if resumed else None,
                                   resume_step=self.step if resumed else None)
        if resumed:
            self.logger.message(f"resumed from step {self.step} ({self.trained_seconds / 60:.1f} minutes trained)")
        self.preemption = PreemptionHandler(announce=self.is_main)
        self._batches = batches_from(self.train_set, self.sampler, self.step, config.num_workers,
                                     pin_memory=self.device.type == "cuda")
        self._saved_step = self.step if resumed else None

    def _capture_features(self, module, inputs, output) -> None:
        self._features = output.detach()

    # -- checkpoints ---------------------------------------------------------------------------------
    def _resume(self) -> dict | None:
        checkpoint = self.checkpointer.checkpoint_to_resume()
        if checkpoint is None:
            return None
        saved, wanted = read_metadata(checkpoint).get("model_config") or {}, _plain(self.vae.config)
        # The commitment weight beta is a loss setting, free to change; everything else is the architecture.
        differences = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted))
                       if k != "beta" and saved.get(k) != wanted.get(k)}
        if saved and differences:
            raise MismatchError(f"{checkpoint} was made for another VQVAE; (checkpoint, requested): {differences}. "
                                f"Use another --output-dir, or --no-resume to start over")
        state = self.checkpointer.load(checkpoint, self.engine)
        self.step, self.trained_seconds = int(state["step"]), float(state["trained_seconds"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if self.disc_engine is not None and "discriminator" in state:
            self.disc_engine.unwrapped_model.load_state_dict(state["discriminator"])
            self.disc_engine.optimizer.load_state_dict(state["disc_optimizer"])
        if self.restarter is not None and "restarter" in state:
            self.restarter.load_state_dict(state["restarter"])
        return state

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "trained_seconds": self.trained_seconds, "nonfinite_total": self.nonfinite_total,
                 "wandb_run_id": self.logger.run_id, "config": _plain(self.config.to_dict())}
        if self.disc_engine is not None:  # replicated by DDP: rank 0's copy is every rank's
            state["discriminator"] = self.disc_engine.full_state_dict()
            state["disc_optimizer"] = self.disc_engine.optimizer.state_dict()
        if self.restarter is not None:
            state["restarter"] = self.restarter.state_dict()
        self._saved_step = self.step
        return self.checkpointer.save(self.step, self.engine, state, blocking=True)

    # -- one optimizer step --------------------------------------------------------------------------------
    def _set_schedule(self) -> tuple[float, float]:
        lr, weight_decay = self.schedule.lr(self.step), self.schedule.weight_decay_at(self.step)
        for engine in filter(None, (self.engine, self.disc_engine)):
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
                if group.get("name") == "decay":
                    group["weight_decay"] = weight_decay
        return lr, weight_decay

    def train_step(self) -> dict:
        """One step of the VQVAE (and of the discriminator) -> the step's loss terms (this rank's,
        detached), the global gradient norm, the LR, and whether the step was applied."""
        cfg, engine = self.config, self.engine
        lr, weight_decay = self._set_schedule()
        images = next(self._batches).to(self.device, non_blocking=True)
        with engine.autocast():
            out = engine.model(images)
        reconstruction = out.reconstruction.float()
        terms = reconstruction_losses(reconstruction, images)
        terms["vq_loss"] = out.vq_loss
        loss = (cfg.l2_weight * terms["reconstruction_l2"] + cfg.l1_weight * terms["reconstruction_l1"]
                + cfg.vq_weight * out.vq_loss)
        if self.lpips is not None:
            terms["lpips"] = self.lpips(images, reconstruction)
            loss = loss + cfg.lpips_weight * terms["lpips"]
        adversarial = self.disc_engine is not None and self.step >= cfg.disc_start
        if adversarial:
            # The VQVAE's step must not train D (nor sync D's gradients): it calls the plain module, frozen.
            discriminator = self.disc_engine.unwrapped_model
            discriminator.requires_grad_(False)
            terms["generator_adv"] = hinge_generator_loss(discriminator(reconstruction))
            discriminator.requires_grad_(True)
            loss = loss + cfg.disc_weight * terms["generator_adv"]
        terms["loss"] = loss
        engine.backward(loss)
        grad_norm = engine.clip_grad_norm(cfg.clip_grad_norm or None)
        # Gradients are averaged over ranks, so a non-finite loss anywhere makes the norm non-finite
        # everywhere: every rank takes the same decision without another collective.
        finite = bool(torch.isfinite(grad_norm).item())
        restarted = 0
        if finite:
            engine.optimizer_step()
            if adversarial:
                terms["discriminator_loss"] = self._discriminator_step(images, reconstruction.detach())
            self.usage.update(out.tokens_per_scale)
            if self.restarter is not None:
                self.restarter.update(out.tokens_per_scale)
                if self.restarter.dead_codes().numel():
                    candidates = quantizer_inputs_per_scale(self.vae.quantize, self._features, out.tokens_per_scale)
                    restarted = self.restarter.restart(self.vae.quantize, candidates, engine.optimizer)
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        self.nonfinite_total += int(not finite)
        engine.zero_grad()
        self.step += 1
        return {"terms": {name: value.detach().float() for name, value in terms.items()}, "grad_norm": grad_norm,
                "lr": lr, "weight_decay": weight_decay, "finite": finite, "dead_codes_restarted": restarted}

    def _discriminator_step(self, images: torch.Tensor, fakes: torch.Tensor) -> torch.Tensor:
        engine = self.disc_engine
        with engine.autocast():
            logits = engine.model(torch.cat([images, fakes]))
        real, fake = logits.float().chunk(2)
        loss = hinge_discriminator_loss(real, fake)
        engine.backward(loss)
        engine.clip_grad_norm(self.config.clip_grad_norm or None)
        engine.optimizer_step()
        engine.zero_grad()
        return loss

    # -- validation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out reconstruction MSE (in [-1, 1] units, output clamped as at inference) and each
        scale's codebook usage and perplexity over the whole set. Every rank scores an interleaved
        share; the sums are combined."""
        if self.val_set is None:
            return {}
        indices = list(range(self.rank, len(self.val_set), self.world_size))
        loader = DataLoader(Subset(self.val_set, indices), batch_size=VAL_BATCH_SIZE, num_workers=0)
        usage = CodebookUsageWindow(self.vae.patch_nums, self.vae.quantize.vocab_size, self.device)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # squared error, number of values
        with self.engine.full_model() as vae, torch.random.fork_rng(devices=[]):
            was_training = vae.training
            vae.eval()
            for images, _ in loader:
                images = images.to(self.device)
                tokens = vae.quantize.features_to_tokens(vae.encode_features(images))
                reconstruction = vae.features_to_image(vae.quantize.tokens_to_features(tokens))
                sums[0] += (reconstruction.float() - images).square().sum().double()
                sums[1] += images.numel()
                usage.update(tokens)
            vae.train(was_training)
        sums = all_reduce_sum(sums)
        return {"val/mse": (sums[0] / sums[1].clamp_min(1)).item(), **usage.report("val/")}

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> TokenizerTrainingResult:
        cfg = self.config
        self.preemption.install()
        show = self.is_main and cfg.progress
        budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
        if budget is None:
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train-tokenizer", unit="step", dynamic_ncols=True,
                       disable=not show)
        else:  # a time budget ends the run: the bar, and its ETA, count training seconds (steps in the postfix)
            bar = tqdm(total=round(budget), initial=min(round(self.trained_seconds), round(budget)),
                       desc="train-tokenizer (time budget)", unit="s", dynamic_ncols=True, disable=not show,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
        self._console = bar.disable
        exit_code, val_after, model_path, reference_path = 0, {}, None, None
        try:
            val_before = self.validate()
            self._log(val_before)
            self.vae.train()
            window = _Window()
            session_start, seconds_before = time.perf_counter(), self.trained_seconds
            counting_steps = budget is None
            while self.step < cfg.max_steps:
                out = self.train_step()
                window.add(out, self.config.batch_size * self.world_size)
                self.trained_seconds = seconds_before + time.perf_counter() - session_start
                if counting_steps:
                    bar.update(1)
                elif self.trained_seconds < budget or self.step >= cfg.min_steps:
                    bar.update(min(self.trained_seconds, budget) - bar.n)
                else:  # the budget is spent but steps are owed to min_steps: count those, not a full bar
                    bar.close()
                    bar = tqdm(total=cfg.min_steps, initial=self.step, unit="step", dynamic_ncols=True,
                               desc="train-tokenizer (budget spent, up to min_steps)", disable=not show)
                    counting_steps = True
                finished = self.step >= cfg.max_steps or self._out_of_time()
                if self.step % cfg.log_every == 0 or finished or not out["finite"]:
                    metrics = self._window_metrics(window)
                    self._log(metrics)
                    bar.set_postfix(step=self.step, loss=f"{metrics['train/loss']:.4f}",
                                    lr=f"{metrics['train/lr']:.2e}", refresh=False)
                    window = _Window()
                if self.nonfinite_in_a_row > cfg.max_consecutive_nonfinite:
                    self.save_checkpoint()
                    self.logger.message(
                        f"stopping: {self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient "
                        f"(max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); checkpoint saved at step "
                        f"{self.step}. Lower --lr or check the images.")
                    exit_code = EXIT_CODE_NONFINITE
                    break
                if finished:
                    break
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                stop_requested = cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps
                stop_code = self.preemption.stop_code(self.device, planned=stop_requested)
                if stop_code is not None:
                    if window.steps:  # the steps since the last line are not trained again after a resume
                        self._log(self._window_metrics(window))
                    if self._saved_step != self.step:
                        self.save_checkpoint()
                    self.logger.message(stop_message(stop_code, self.step))
                    exit_code = stop_code
                    break
            bar.close()
            if exit_code == 0:
                if self._saved_step != self.step:
                    self.save_checkpoint()
                val_after = self.validate()
                self._log(val_after)
                model_path, reference_path = self.export()
                self.logger.message(f"done: {self.step} steps; model {model_path}"
                                    + (f", reference layout {reference_path}" if reference_path else ""))
        finally:
            bar.close()
            self.checkpointer.wait()
            self.preemption.uninstall()
            self.logger.close()
        return TokenizerTrainingResult(exit_code, self.step, model_path, reference_path, val_before, val_after,
                                       self.trained_seconds / 60, self.vae)

    def export(self) -> tuple[Path, Path | None]:
        """The final model in our format (weights + constructor config) and, unless switched off,
        in the released checkpoints' layout. Collective; rank 0 writes."""
        model_path = self.run_dir / FINAL_MODEL_FILE
        reference_path = self.run_dir / FINAL_REFERENCE_FILE if self.config.export_reference else None
        with self.engine.full_model() as vae:
            if self.is_main:
                save_model(vae, model_path)
                if reference_path is not None:
                    save_reference_layout(vae, reference_path)
        barrier()
        return model_path, reference_path

    def _out_of_time(self) -> bool:
        """Rank 0's clock decides (collective when `max_minutes` is set), so every rank stops together."""
        if self.config.max_minutes is None:
            return False
        late = float(self.is_main and self.trained_seconds >= 60 * self.config.max_minutes
                     and self.step >= self.config.min_steps)
        return bool(all_reduce_max(torch.tensor([late], device=self.device)).item())

    def _window_metrics(self, window: "_Window") -> dict[str, float]:
        """The window's report, its ETA counting what ends the run: the steps left, or under a time
        budget the budget's seconds left (or more, while steps are owed to `min_steps`)."""
        remaining_steps = self.config.max_steps - self.step
        metrics = window.report(self.usage, remaining_steps=remaining_steps)
        if self.config.max_minutes is not None and remaining_steps > 0:
            per_step = metrics["perf/eta_seconds"] / remaining_steps
            budget_left = max(0.0, 60 * self.config.max_minutes - self.trained_seconds)
            owed = per_step * max(0, self.config.min_steps - self.step)
            metrics["perf/eta_seconds"] = min(metrics["perf/eta_seconds"], max(budget_left, owed))
        return metrics

    def _log(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        held_out = "val/mse" in metrics  # its own console line below: the logger's shows train metrics
        self.logger.log(self.step, metrics, console=self._console and not held_out)
        if held_out:
            usage = ", ".join(f"{k.removeprefix('val/codebook_usage_')}={v:.3f}" for k, v in metrics.items()
                              if k.startswith("val/codebook_usage_"))
            line = f"held-out at step {self.step}: MSE {metrics['val/mse']:.4f}; codebook usage {usage}"
            if self._console:
                self.logger.message(line)
            elif self.is_main:
                tqdm.write(line)


class _Window:
    """Loss terms summed over the steps since the last log line (each term over the steps it ran)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = self.images = self.restarted = 0
        self.started = time.perf_counter()
        self.last: dict = {}

    def add(self, out: dict, images: int) -> None:
        for name, value in out["terms"].items():
            self.sums[name] = self.sums.get(name, 0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1
        self.images += images
        self.restarted += out["dead_codes_restarted"]
        self.last = out

    def report(self, usage: CodebookUsageWindow, remaining_steps: int) -> dict[str, float]:
        """Collective: the window's means over steps and ranks, the codebook usage, the LR."""
        names = sorted(self.sums)  # the same names on every rank: the terms depend on the step only
        means = all_reduce_mean(torch.stack([self.sums[n] / self.counts[n] for n in names]))
        metrics = {f"train/{name}": value for name, value in zip(names, means.tolist())}
        metrics.update(usage.report("train/"))
        seconds = time.perf_counter() - self.started
        seconds_per_step = seconds / max(self.steps, 1)
        metrics.update({
            "train/lr": self.last["lr"], "train/weight_decay": self.last["weight_decay"],
            "train/grad_norm": float(self.last["grad_norm"]), "train/dead_codes_restarted": self.restarted,
            "perf/images_per_s": self.images / max(seconds, 1e-9),
            "perf/eta_seconds": seconds_per_step * remaining_steps,
        })
        return metrics


def train_tokenizer(config: TokenizerTrainingConfig) -> TokenizerTrainingResult:
    """Train (or fine-tune) a VQVAE; resumes from the newest checkpoint in `output_dir`.

    In a single process (no launcher), the world-of-one process group made for the engine is taken
    down again on return, so the caller's process is left as it was."""
    single = not dist.is_initialized() and launcher_ranks()[1] == 1
    try:
        return TokenizerTrainer(config).fit()
    finally:
        if single:
            destroy_distributed()
