"""The training loop: token shards -> teacher-forcing input -> VAR -> loss -> engine step.

The Trainer does not know which engine it drives (FSDP2, DeepSpeed, DDP) nor how checkpoints
are written; it owns the order of things in a step, the schedules, the guards against
non-finite steps, preemption, and what gets logged. Every method that talks to the engine,
the checkpointer or the evaluator is collective: all ranks run the same sequence.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from var_train.checkpoint import Checkpointer
from var_train.config import TrainConfig
from var_train.data import build_token_loader
from var_train.logging import MetricLogger
from var_train.loss import token_loss
from var_train.models import VAR, default_alng
from var_train.models.checkpoint_io import load_quantizer, load_state_dict_strict, read_checkpoint
from var_train.parallel import build_engine, init_distributed
from var_train.preemption import EXIT_CODE_NONFINITE, EXIT_CODE_PREEMPTED, PreemptionHandler
from var_train.schedules import build_schedule

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainResult:
    exit_code: int  # 0 done, EXIT_CODE_PREEMPTED, EXIT_CODE_NONFINITE
    step: int
    run_dir: Path


def build_model(cfg: TrainConfig) -> VAR:
    """The VAR of the `model` section: reference initialisation, or weights from `init_from`."""
    m = cfg.model
    model = VAR(vocab_size=m.vocab_size, z_channels=m.z_channels, num_classes=m.num_classes, depth=m.depth,
                embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                drop_path_rate=m.drop_path_rate, attn_l2_norm=m.attn_l2_norm, shared_aln=m.shared_aln,
                patch_nums=tuple(m.patch_nums), label_dropout=m.label_dropout,
                attention_backend=m.attention_backend)
    model.init_weights(alng=default_alng(m.depth) if m.alng is None else m.alng)
    if m.init_from:
        state, _ = read_checkpoint(m.init_from)
        load_state_dict_strict(model, state, m.init_from)
    return model


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.run_dir = Path(cfg.run.output_dir)
        self.is_main = self.rank == 0
        if self.is_main:
            cfg.save(self.run_dir / "config.yaml")

        # Same initial weights on every rank, then per-rank streams for label dropout and drop-path.
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 1)
        self.flops_per_image = model.train_flops_per_image()
        self.patch_nums = model.patch_nums
        self.quantizer = load_quantizer(cfg.data.vae, patch_nums=cfg.model.patch_nums).to(self.device).eval()
        self.quantizer.requires_grad_(False)

        self.loader = self._loader(cfg.data.train_shards, seed=cfg.run.seed, use_flip=cfg.data.use_flip,
                                   resampled=cfg.data.resampled)
        self.engine = build_engine(model, cfg.parallel, cfg.optim, self.device)
        self.accumulation = self.engine.grad_accumulation_steps
        steps_per_epoch = self.loader.batches_per_epoch // self.accumulation
        if steps_per_epoch == 0:
            raise ValueError(f"one epoch has {self.loader.batches_per_epoch} micro-batches per rank, fewer than the "
                             f"{self.accumulation} accumulated into one optimizer step: lower optim.global_batch_size")
        self.steps_per_epoch = steps_per_epoch
        self.schedule = build_schedule(cfg.optim, steps_per_epoch)
        self.total_steps = min(self.schedule.total_steps, cfg.optim.max_steps or self.schedule.total_steps)

        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir)
        self.step, self.nonfinite_total, self.nonfinite_in_a_row = 0, 0, 0
        resumed = self.checkpointer.load_latest(self.engine)
        wandb_run_id = None
        if resumed is not None:
            self.step = int(resumed["step"])
            self.loader.load_state_dict(resumed["loader"])
            self.nonfinite_total = int(resumed.get("nonfinite_total", 0))
            wandb_run_id = resumed.get("wandb_run_id")
        self.logger = MetricLogger(cfg.logging, self.run_dir, cfg.to_dict(), self.is_main, wandb_run_id)
        if resumed is not None:
            self.logger.message(f"resumed from step {self.step} (epoch {self.loader.epoch}, "
                                f"{self.loader.batches_consumed} batches into it)")
        self.evaluator = None
        if cfg.eval.every_steps > 0 or cfg.eval.at_end:
            from var_train.evaluation.scheduled import ScheduledEvaluator
            if cfg.eval.vae is None:
                cfg.eval.vae = cfg.data.vae
            self.evaluator = ScheduledEvaluator(cfg.eval, cfg.model, self.device)
        self.preemption = PreemptionHandler()
        self._batches = None

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
            with engine.autocast():
                logits = engine.model(batch.labels, teacher_input)
            result = token_loss(logits, targets, self.patch_nums, active_scales)
            loss = result.loss
            if self.step in cfg.run.debug_nonfinite_steps:
                loss = loss * float("nan")
            engine.backward(loss / self.accumulation, sync_gradients=micro_step == self.accumulation - 1)
            stats = torch.cat([loss.detach().view(1), result.accuracy.view(1), result.loss_per_scale,
                               result.accuracy_per_scale]).float()
            totals = stats if totals is None else totals + stats
        grad_norm = engine.clip_grad_norm(cfg.optim.clip_grad_norm)
        stats = totals / self.accumulation
        # One all-reduce for the logged statistics, which also tells every rank whether any rank
        # saw a non-finite loss (the gradient norm is already global).
        stats = _all_reduce_mean(stats.to(self.device), self.world_size)
        finite = bool(torch.isfinite(stats[0]).item()) and bool(torch.isfinite(grad_norm).item())
        if finite:
            engine.optimizer_step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        engine.zero_grad()
        self.step += 1
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
        stats = _all_reduce_mean(sums / count, self.world_size).tolist()
        return {"val/loss": stats[0], "val/acc": stats[1], "val/loss_last_scale": stats[2], "val/acc_last_scale": stats[3]}

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, blocking: bool = False) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total,
                 "wandb_run_id": self.logger.run_id, "schedule": dict(vars(self.schedule))}
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
        exit_code = 0
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
                    self.logger.log(self.step, self.validate())
                if self.evaluator is not None and self.evaluator.due(self.step, last_step=last):
                    eval_seconds += self._evaluate(train_seconds)
                    window_start = time.perf_counter()
                if cfg.checkpoint.every_steps > 0 and self.step % cfg.checkpoint.every_steps == 0 and not last:
                    self.save_checkpoint()
                stop_requested = cfg.run.stop_after_steps is not None and self.step >= cfg.run.stop_after_steps
                if self.preemption.should_stop(self.device) or (stop_requested and not last):
                    self.save_checkpoint(blocking=True)
                    self.logger.message(f"preempted: checkpoint saved at step {self.step}; exiting with "
                                        f"{EXIT_CODE_PREEMPTED} so the job can be requeued")
                    exit_code = EXIT_CODE_PREEMPTED
                    break
            else:
                if cfg.data.val_shards:
                    self.logger.log(self.step, self.validate())
                self.save_checkpoint(blocking=True)
                self.logger.message(f"done: {self.step} steps; checkpoints in {self.checkpointer.directory}")
        finally:
            self.checkpointer.wait()
            self.preemption.uninstall()
            self.logger.close()
        return TrainResult(exit_code, self.step, self.run_dir)

    def _evaluate(self, train_seconds: float) -> float:
        result = self.evaluator.evaluate(self.engine.model, self.quantizer, self.step)
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        seconds = result.metrics.get("eval_seconds", 0.0)
        metrics["eval/share_of_train_time"] = seconds / max(train_seconds, 1e-9)
        images = {"eval/samples": (result.grid, " ".join(result.captions))} if result.grid is not None else None
        self.logger.log(self.step, metrics, images=images)
        return seconds

    def _train_metrics(self, out: dict, images_per_s: float, tokens_per_image: int, peak: float | None) -> dict:
        metrics = {
            "train/loss": out["loss"].item(), "train/loss_last_scale": out["loss_per_scale"][-1].item(),
            "train/acc": out["acc"].item(), "train/acc_last_scale": out["acc_per_scale"][-1].item(),
            "train/lr": out["lr"], "train/weight_decay": out["weight_decay"], "train/grad_norm": out["grad_norm"].item(),
            "train/nonfinite_steps": self.nonfinite_total, "train/epoch": self.step / self.steps_per_epoch,
            "perf/images_per_s": images_per_s, "perf/tokens_per_s": images_per_s * tokens_per_image,
            "perf/memory_gib": memory_gib(self.device),
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
            f"training VAR d{self.cfg.model.depth} ({params / 1e6:.1f}M parameters, engine {self.cfg.parallel.engine}, "
            f"{self.cfg.parallel.precision}) on {self.world_size} x {self.device.type}: steps {self.step} -> "
            f"{self.total_steps}, {self.steps_per_epoch} steps per epoch, {self.accumulation} micro-batches of "
            f"{self.cfg.optim.micro_batch_size} per rank per step; run dir {self.run_dir}")


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).fit()
