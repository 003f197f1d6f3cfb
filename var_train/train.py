"""The training loop: token shards -> teacher-forcing input -> VAR -> loss -> engine step.

The Trainer does not know which engine it drives (FSDP2, DeepSpeed, DDP) nor how checkpoints
are written; it owns the order of things in a step, the schedules, the guards against
non-finite steps, preemption, and what gets logged. Every method that talks to the engine,
the checkpointer or the evaluator is collective: all ranks run the same sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from var_train.checkpoint import Checkpointer
from var_train.compatibility import check_resume_before_writing, check_training_inputs
from var_train.config import TrainConfig
from var_train.data import build_token_loader
from var_train.logging import MetricLogger
from var_train.loss import token_loss
from var_train.models import VAR
from var_train.models.adapt import WarmStartReport, warm_start
from var_train.models.freezing import freeze_parameters
from var_train.models.checkpoint_io import load_quantizer, read_checkpoint
from var_train.parallel import build_engine, grad_accumulation_steps, init_distributed
from var_train.parallel.distributed import all_reduce_mean
from var_train.parallel.ema import ParameterEMA
from var_train.precision import resolve_precision
from var_train.preemption import (EXIT_CODE_INTERRUPTED, EXIT_CODE_NONFINITE, EXIT_CODE_PREEMPTED,
                                  PreemptionHandler, stop_message)
from var_train.scaling.summary import TrainingCompute, format_count, read_summary, validation_record, write_summary
from var_train.schedules import build_schedule, steps_per_epoch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainResult:
    exit_code: int  # 0 done, EXIT_CODE_PREEMPTED, EXIT_CODE_INTERRUPTED, EXIT_CODE_NONFINITE
    step: int
    run_dir: Path


def build_model(cfg: TrainConfig) -> VAR:
    """The VAR of the `model` section: reference initialisation, or weights from `init_from`."""
    return build_model_with_report(cfg)[0]


def read_init_state(path: str) -> dict[str, torch.Tensor]:
    """`model.init_from`'s weights: a .safetensors / reference .pth file, or a run, checkpoints/ or
    step directory of this framework (consolidated on one process, whatever engine wrote it)."""
    if Path(path).is_dir():
        from var_train.checkpoint import consolidated_state_dict
        return consolidated_state_dict(path)[0]
    return read_checkpoint(path)[0]


def build_model_with_report(cfg: TrainConfig) -> tuple[VAR, "WarmStartReport | None"]:
    """build_model plus what the warm start did with each tensor (None without `init_from`)."""
    m = cfg.model
    model = VAR(vocab_size=m.vocab_size, z_channels=m.z_channels, num_classes=m.num_classes, depth=m.depth,
                embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                drop_path_rate=m.drop_path_rate, attn_l2_norm=m.attn_l2_norm, shared_aln=m.shared_aln,
                patch_nums=tuple(m.patch_nums), label_dropout=m.label_dropout,
                attention_backend=m.attention_backend)
    model.init_weights(alng=m.alng)  # None: the size rule of this depth
    report = None
    if m.init_from:
        report = warm_start(model, read_init_state(m.init_from), m.init_from, reinit=m.reinit,
                            class_init=m.class_init, generator=torch.Generator().manual_seed(cfg.run.seed))
    return model, report


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.run_dir = Path(cfg.run.output_dir)
        self.is_main = self.rank == 0
        accumulation = grad_accumulation_steps(cfg.optim, self.world_size)  # a batch that cannot split: before any write
        # Nothing is written before the VAE, shards and model are known to belong together
        # (every rank checks the same files, so all raise the same one-line error).
        self._start_messages: list[str] = []
        self.training_vae = check_training_inputs(
            cfg.model, cfg.data, warn=self._start_messages.append,
            eval_vae=cfg.eval.vae if (cfg.eval.every_steps > 0 or cfg.eval.at_end) else None)
        # ... and data too small for one optimizer step.
        self.loader = self._loader(cfg.data.train_shards, seed=cfg.run.seed, use_flip=cfg.data.use_flip,
                                   resampled=cfg.data.resampled)
        self.steps_per_epoch = steps_per_epoch(self.loader.batches_per_epoch, accumulation)

        # The evaluator checks its files (Inception weights, reference statistics) here, before the
        # run directory is written: a missing file is one line and leaves nothing behind.
        self.evaluator = None
        if cfg.eval.every_steps > 0 or cfg.eval.at_end:
            from var_train.evaluation.scheduled import ScheduledEvaluator
            eval_cfg = dataclasses.replace(cfg.eval, vae=cfg.eval.vae or cfg.data.vae)
            self.evaluator = ScheduledEvaluator(eval_cfg, cfg.model, self.device)

        # Same initial weights on every rank, then per-rank streams for label dropout and drop-path.
        torch.manual_seed(cfg.run.seed)
        model, warm_start_report = build_model_with_report(cfg)
        # Before the engine wraps the model: frozen parameters then get no gradient, no optimizer state.
        self.freeze_summary = freeze_parameters(model, cfg.optim.freeze)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 1)
        # ... and a resume continues the checkpoint's model, not a changed one (config.yaml untouched).
        check_resume_before_writing(cfg, model.config, self.run_dir, log=self._start_messages.append,
                                    vae=self.training_vae)
        if self.is_main:
            cfg.save(self.run_dir / "config.yaml")
        self.flops_per_image = model.train_flops_per_image()
        self.num_params = sum(p.numel() for p in model.parameters())
        self.compute = TrainingCompute(self.flops_per_image)  # images and FLOPs of all ranks since step 0
        self.patch_nums = model.patch_nums
        self.quantizer = load_quantizer(cfg.data.vae, patch_nums=cfg.model.patch_nums).to(self.device).eval()
        self.quantizer.requires_grad_(False)

        # precision=auto: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere (var_train/precision.py)
        self.precision = resolve_precision(cfg.parallel.precision, self.device)
        self.engine = build_engine(model, dataclasses.replace(cfg.parallel, precision=self.precision), cfg.optim,
                                   self.device)
        self.accumulation = self.engine.grad_accumulation_steps
        self.schedule = build_schedule(cfg.optim, self.steps_per_epoch)
        self.total_steps = min(self.schedule.total_steps, cfg.optim.max_steps or self.schedule.total_steps)

        # Checkpoints (and their exports) record the VAE's codebook: sampling checks the VAE it is given.
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, training_vae=self.training_vae.record())
        # The EMA starts from the weights training starts from; a resumed run restores it with the
        # checkpoint (the checkpointer saves and loads it beside the engine's state).
        self.ema = ParameterEMA(self.engine.unwrapped_model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        if self.ema is not None:
            self.checkpointer.companions.append(self.ema)
        self.step, self.nonfinite_total, self.nonfinite_in_a_row = 0, 0, 0
        resumed = self.checkpointer.load_latest(self.engine)
        wandb_run_id = None
        if resumed is not None:
            self.step = int(resumed["step"])
            self.loader.load_state_dict(resumed["loader"])
            self.nonfinite_total = int(resumed.get("nonfinite_total", 0))
            self.compute.load_state_dict(resumed.get("compute"), step=self.step,
                                         global_batch_size=cfg.optim.global_batch_size)
            wandb_run_id = resumed.get("wandb_run_id")
        self.logger = MetricLogger(cfg.logging, self.run_dir, cfg.to_dict(), self.is_main, wandb_run_id,
                                   resume_step=self.step if resumed is not None else None)
        for message in self._start_messages:
            self.logger.message(message)
        if warm_start_report is not None and resumed is None:
            self.logger.message(warm_start_report.describe())
        if self.freeze_summary.frozen:
            self.logger.message(f"optim.freeze={cfg.optim.freeze}: {self.freeze_summary.describe()}")
        if resumed is not None:
            self.logger.message(f"resumed from step {self.step} (epoch {self.loader.epoch}, "
                                f"{self.loader.batches_consumed} batches into it)")
        self.class_names = list(self.loader.manifest.class_names)
        self.sample_grid = None
        if cfg.eval.grid_every_steps > 0:  # no Inception file, no reference: generation and decoding only
            from var_train.evaluation.preview import SampleGrid
            self.sample_grid = SampleGrid(cfg.eval, cfg.model, self.device, vae_path=cfg.eval.vae or cfg.data.vae,
                                          vae=self.evaluator.vae if self.evaluator is not None else None,
                                          class_names=list(self.loader.manifest.class_names))
        self.preemption = PreemptionHandler(announce=self.is_main)
        self._batches = None
        # The latest validation of this run (kept across a resume through summary.json).
        previous = read_summary(self.run_dir) if resumed is not None else None
        self.last_validation = {k: v for k, v in (previous or {}).items() if k.startswith("val_")
                                and (previous.get("val_step") or 0) <= self.step}

    def _loader(self, shards: str, *, seed: int, use_flip: bool, resampled: bool):
        cfg = self.cfg
        return build_token_loader(shards, batch_size=cfg.optim.micro_batch_size, patch_nums=cfg.model.patch_nums,
                                  vocab_size=cfg.model.vocab_size, num_classes=cfg.model.num_classes,
                                  rank=self.rank, world_size=self.world_size, num_workers=cfg.data.num_workers,
                                  seed=seed, shuffle_buffer=cfg.data.shuffle_buffer, resampled=resampled,
                                  use_flip=use_flip, pin_memory=self.device.type == "cuda")

    # -- data --------------------------------------------------------------------------------------
    def _next_batch(self):
        # The loader seeds its workers from its own generator, so iterating never draws from the
        # global RNG: a resumed run keeps the same random stream (label dropout, drop-path).
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches).to(self.device)
            except StopIteration:
                self._batches = None

    # -- one optimizer step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        engine, cfg = self.engine, self.cfg
        lr = self.schedule.lr(self.step)
        weight_decay = self.schedule.weight_decay_at(self.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
            if group.get("name") == "decay":
                group["weight_decay"] = weight_decay
        active_scales = None
        if cfg.run.progressive_steps > 0 and self.step < cfg.run.progressive_steps:
            active_scales = 1 + self.step * len(self.patch_nums) // cfg.run.progressive_steps
        totals = None
        for micro_step in range(self.accumulation):
            batch = self._next_batch()
            with torch.no_grad():
                teacher_input = self.quantizer.tokens_to_teacher_input(batch.tokens_per_scale)
            targets = torch.cat(batch.tokens_per_scale, dim=1)
            # Gradients are averaged over ranks on the last micro-batch only (decided before the forward).
            with engine.micro_batch(sync=micro_step == self.accumulation - 1):
                with engine.autocast():
                    logits = engine.model(batch.labels, teacher_input)
                result = token_loss(logits, targets, self.patch_nums, active_scales)
                loss = result.loss
                if self.step in cfg.run.debug_nonfinite_steps:
                    loss = loss * float("nan")
                engine.backward(loss / self.accumulation)
            stats = torch.cat([loss.detach().view(1), result.accuracy.view(1), result.loss_per_scale,
                               result.accuracy_per_scale]).float()
            totals = stats if totals is None else totals + stats
        grad_norm = engine.clip_grad_norm(cfg.optim.clip_grad_norm)
        stats = totals / self.accumulation
        # One all-reduce for the logged statistics, which also tells every rank whether any rank
        # saw a non-finite loss (the gradient norm is already global).
        stats = all_reduce_mean(stats.to(self.device))
        finite = bool(torch.isfinite(stats[0]).item()) and bool(torch.isfinite(grad_norm).item())
        if finite:
            engine.optimizer_step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        engine.zero_grad()
        self.step += 1
        self.compute.add_step(cfg.optim.global_batch_size)
        scales = len(self.patch_nums)
        return {"loss": stats[0], "acc": stats[1], "loss_per_scale": stats[2:2 + scales],
                "acc_per_scale": stats[2 + scales:], "grad_norm": grad_norm.detach(), "lr": lr,
                "weight_decay": weight_decay, "finite": finite}

    # -- validation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        loader = self._loader(cfg.data.val_shards, seed=0, use_flip=False, resampled=False)
        model = self.engine.model
        was_training = self.engine.unwrapped_model.training
        model.eval()
        sums, count = None, 0
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                if count >= cfg.run.val_batches:
                    break
                batch = batch.to(self.device)
                teacher_input = self.quantizer.tokens_to_teacher_input(batch.tokens_per_scale)
                with self.engine.autocast():
                    logits = model(batch.labels, teacher_input)
                result = token_loss(logits, torch.cat(batch.tokens_per_scale, 1), self.patch_nums)
                stats = torch.stack([result.loss.detach(), result.accuracy, result.loss_per_scale[-1],
                                     result.accuracy_per_scale[-1]]).float()
                sums = stats if sums is None else sums + stats
                count += 1
        model.train(was_training)
        stats = all_reduce_mean(sums / count).tolist()
        return {"val/loss": stats[0], "val/acc": stats[1], "val/loss_last_scale": stats[2], "val/acc_last_scale": stats[3],
                "val/error_rate": 1 - stats[1], "val/error_rate_last_scale": 1 - stats[3], **self.compute.metrics()}

    def _validate_and_record(self) -> None:
        """Validate, log (each point with its cumulative compute) and rewrite summary.json."""
        metrics = self.validate()
        self.logger.log(self.step, metrics)
        self.last_validation = {**validation_record(metrics), "val_step": self.step,
                                "val_train_flops": self.compute.train_flops, "val_images_seen": self.compute.images_seen}
        self._write_summary(finished=False)

    def _write_summary(self, finished: bool) -> None:
        if self.is_main:
            write_summary(self.run_dir, depth=self.cfg.model.depth, params=self.num_params,
                          embed_dim=self.engine.unwrapped_model.embed_dim, compute=self.compute, step=self.step,
                          total_steps=self.total_steps, global_batch_size=self.cfg.optim.global_batch_size,
                          finished=finished, validation=self.last_validation)

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, blocking: bool = False) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total,
                 "wandb_run_id": self.logger.run_id, "schedule": dict(vars(self.schedule)),
                 "compute": self.compute.state_dict()}
        return self.checkpointer.save(self.step, self.engine, state, blocking=blocking)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.preemption.install()
        self.engine.unwrapped_model.train()
        self._log_start()
        images_per_step = cfg.optim.global_batch_size
        tokens_per_image = sum(p * p for p in self.patch_nums)
        peak = peak_flops(self.device)
        window_start, window_steps, eval_seconds, train_seconds = time.perf_counter(), 0, 0.0, 0.0
        fit_started, first_step = time.perf_counter(), self.step
        exit_code = 1  # what the W&B summary reports if an exception leaves the loop
        try:
            while self.step < self.total_steps:
                out = self.train_step()
                window_steps += 1
                last = self.step == self.total_steps
                if self.step % cfg.logging.log_every == 0 or last or not out["finite"]:
                    elapsed = time.perf_counter() - window_start
                    train_seconds += elapsed
                    images_per_s = images_per_step * window_steps / elapsed
                    metrics = self._train_metrics(out, images_per_s, tokens_per_image, peak)
                    # Wall clock per step so far (evaluations included) times the steps left.
                    metrics["perf/eta_seconds"] = ((time.perf_counter() - fit_started) / (self.step - first_step)
                                                   * (self.total_steps - self.step))
                    self.logger.log(self.step, metrics)
                    window_start, window_steps = time.perf_counter(), 0
                if self.nonfinite_in_a_row > cfg.run.max_consecutive_nonfinite:
                    self.save_checkpoint(blocking=True)
                    self.logger.message(
                        f"stopping: {self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient "
                        f"(run.max_consecutive_nonfinite={cfg.run.max_consecutive_nonfinite}); checkpoint saved "
                        f"at step {self.step}. Lower optim.base_lr or check the data.")
                    exit_code = EXIT_CODE_NONFINITE
                    break
                if cfg.data.val_shards and cfg.run.val_every_steps > 0 and self.step % cfg.run.val_every_steps == 0:
                    self._validate_and_record()
                if self.evaluator is not None and self.evaluator.due(self.step, last_step=last):
                    eval_seconds += self._evaluate(train_seconds)
                    window_start = time.perf_counter()
                if self.sample_grid is not None and self.sample_grid.due(self.step):
                    self._log_sample_grid()
                    window_start = time.perf_counter()
                if cfg.checkpoint.every_steps > 0 and self.step % cfg.checkpoint.every_steps == 0 and not last:
                    self.save_checkpoint()
                stop_requested = cfg.run.stop_after_steps is not None and self.step >= cfg.run.stop_after_steps
                stop_code = self.preemption.stop_code(self.device, planned=stop_requested and not last)
                if stop_code is not None:
                    self.save_checkpoint(blocking=True)
                    self.logger.message(stop_message(stop_code, self.step))
                    exit_code = stop_code
                    break
            else:
                exit_code = 0
                if cfg.data.val_shards and self.last_validation.get("val_step") != self.step:
                    self._validate_and_record()
                self.save_checkpoint(blocking=True)
                self.logger.message(f"done: {self.step} steps; checkpoints in {self.checkpointer.directory}")
            self._write_summary(finished=exit_code == 0)
        finally:
            self.checkpointer.wait()
            self.preemption.uninstall()
            self._log_wandb_summary(exit_code, time.perf_counter() - fit_started, train_seconds, eval_seconds)
            self.logger.close(exit_code)
        return TrainResult(exit_code, self.step, self.run_dir)

    def _log_sample_grid(self) -> None:
        """The cheap grid of `eval.grid_every_steps` (a collective: every rank samples the same batch)."""
        with self.engine.full_model() as model:
            preview = self.sample_grid.generate(model, self.quantizer)
        self.logger.log_samples(self.step, "samples/grid", preview.images, preview.labels, self.class_names,
                                grid=preview.grid)

    def _log_wandb_summary(self, exit_code: int, wall_seconds: float, train_seconds: float,
                           eval_seconds: float) -> None:
        """The W&B run summary: W&B keeps every metric's last value there; add how the run ended,
        its size and its compute (summary.json has the scaling fields too)."""
        if not self.is_main:
            return
        status = {0: "finished", EXIT_CODE_PREEMPTED: "preempted", EXIT_CODE_INTERRUPTED: "interrupted",
                  EXIT_CODE_NONFINITE: "stopped_nonfinite"}
        self.logger.summary({
            "final/step": self.step, "final/total_steps": self.total_steps,
            "final/status": status.get(exit_code, "crashed"),
            "params/total": self.num_params, "params/depth": self.cfg.model.depth,
            "params/flops_per_image": float(self.flops_per_image),
            "compute/images_seen": self.compute.images_seen, "compute/train_flops": float(self.compute.train_flops),
            "compute/precision": self.precision, "compute/engine": self.cfg.parallel.engine,
            "compute/devices": f"{self.world_size} x {self.device.type}",
            "compute/wall_seconds_this_job": wall_seconds, "compute/train_seconds_this_job": train_seconds,
            "compute/eval_seconds_this_job": eval_seconds,
            "compute/device_hours_this_job": wall_seconds * self.world_size / 3600,
        })

    def _evaluate(self, train_seconds: float) -> float:
        ema_weights = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with ema_weights, self.engine.full_model() as model:  # collective: the whole model on every rank
            result = self.evaluator.evaluate(model, self.quantizer, self.step)
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        seconds = result.metrics.get("eval_seconds", 0.0)
        metrics["eval/share_of_train_time"] = seconds / max(train_seconds, 1e-9)
        self.logger.log(self.step, metrics)
        if result.grid is not None:  # rank 0: the grid and, one row per sample, a W&B table with class names
            images = getattr(result, "images", None)
            self.logger.log_samples(self.step, "eval/samples", images if images is not None else [],
                                    list(getattr(result, "labels", None) or []), self.class_names, grid=result.grid)
        return seconds

    def _train_metrics(self, out: dict, images_per_s: float, tokens_per_image: int, peak: float | None) -> dict:
        metrics = {
            "train/loss": out["loss"].item(), "train/loss_last_scale": out["loss_per_scale"][-1].item(),
            "train/acc": out["acc"].item(), "train/acc_last_scale": out["acc_per_scale"][-1].item(),
            "train/lr": out["lr"], "train/weight_decay": out["weight_decay"], "train/grad_norm": out["grad_norm"].item(),
            "train/nonfinite_steps": self.nonfinite_total, "train/epoch": self.step / self.steps_per_epoch,
            "perf/images_per_s": images_per_s, "perf/tokens_per_s": images_per_s * tokens_per_image,
            "perf/memory_gib": memory_gib(self.device), **self.compute.metrics(),
        }
        for k, (loss, acc) in enumerate(zip(out["loss_per_scale"].tolist(), out["acc_per_scale"].tolist())):
            metrics[f"train/loss_scale_{k}"] = loss
            metrics[f"train/acc_scale_{k}"] = acc
        if peak:
            metrics["perf/mfu"] = self.flops_per_image * images_per_s / (peak * self.world_size)
        return metrics

    def _log_start(self) -> None:
        params = sum(p.numel() for p in self.engine.unwrapped_model.parameters())
        self.logger.message(
            f"training VAR d{self.cfg.model.depth} ({format_count(params)} parameters, engine {self.cfg.parallel.engine}, "
            f"{self.precision}) on {self.world_size} x {self.device.type}: steps {self.step} -> "
            f"{self.total_steps}, {self.steps_per_epoch:g} steps per epoch, {self.accumulation} micro-batch"
            f"{'' if self.accumulation == 1 else 'es'} of "
            f"{self.cfg.optim.micro_batch_size} per rank per step; run dir {self.run_dir}")


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).fit()
