"""The tokenizer trainer's configuration: one dataclass, one field per `var-prep train-tokenizer` flag.

The trainer runs on the VAR trainer's machinery; `engine_configs`, `checkpoint_config` and
`logging_config` translate this flat config into the sections those pieces take (var_train.config),
so a field here, its flag (`--log-every` for `log_every`) and the section key it feeds share one
name wherever the two trainers share a concept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from var_train.config import CheckpointConfig, LoggingConfig, OptimConfig, ParallelConfig
from var_train.errors import ConfigError
from var_train.models import DEFAULT_PATCH_NUMS

# The VQVAE is replicated (about 110M parameters at the released size, small beside a VAR), and
# dead-code restarts write codebook rows in place: DDP, the engine where every rank holds them all.
TOKENIZER_ENGINE = "ddp"
PRECISIONS = ("fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TokenizerTrainingConfig:
    data_dir: str
    output_dir: str
    # -- architecture (ignored when fine-tuning: `init_from` brings its own) ------------------------
    init_from: str | None = None  # a VQVAE to fine-tune (.pth reference layout or our .safetensors)
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    beta: float = 0.25  # commitment weight inside the VQ loss
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per level: 2^(levels-1)x downsampling
    encoder_blocks: int = 2
    decoder_blocks: int = 3
    # -- optimisation --------------------------------------------------------------------------------
    batch_size: int = 16  # per rank
    lr: float = 1e-4  # peak learning rate (AdamW), of the VQVAE and of the discriminator
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0  # matrices only; biases, 1-D parameters and the codebook never decay
    clip_grad_norm: float = 0.0  # 0 = no clipping (the norm is logged either way)
    max_steps: int = 10_000  # the LR schedule spans these steps
    max_minutes: float | None = None  # stop (and finish: final model, export) after this much training time
    min_steps: int = 0  # with max_minutes: train at least this many steps, however slow the machine is
    # -- LR schedule (var_train.schedules.Schedule: warmup, hold, linear decay to wpe x peak) ---------
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.005  # warmup starts at this fraction of the peak
    hold_fraction: float = 0.05  # of the post-warmup steps, held at the peak before the decay
    wpe: float = 0.1  # final LR as a fraction of the peak (1.0 = constant after warmup)
    # -- loss weights --------------------------------------------------------------------------------
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    vq_weight: float = 1.0
    lpips_weight: float = 0.0
    lpips_weights: str | None = None
    vgg16_weights: str | None = None
    disc_weight: float = 0.0
    disc_start: int = 0
    # -- codebook health -----------------------------------------------------------------------------
    dead_code_steps: int = 50  # 0 = never restart codes
    # -- data ----------------------------------------------------------------------------------------
    hflip: bool = False
    val_fraction: float = 0.05
    val_max_images: int = 512
    num_workers: int = 2
    # -- bookkeeping ---------------------------------------------------------------------------------
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2  # 0 = keep every checkpoint
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    export_reference: bool = True  # also write the final model in the released checkpoints' layout
    precision: str = "fp32"  # or "bf16" (autocast)
    seed: int = 0
    progress: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "var_train_tokenizer"
    wandb_run_name: str | None = None
    max_consecutive_nonfinite: int = 10  # then checkpoint and exit 43
    stop_after_steps: int | None = None  # debugging and tests: checkpoint and exit 42 at this step

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.betas = tuple(float(b) for b in self.betas)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if self.lpips_weight > 0 and not (self.lpips_weights and self.vgg16_weights):
            raise ConfigError("lpips_weight > 0 needs local weight files: --lpips-weights (LPIPS' vgg.pth) "
                              "and --vgg16-weights (torchvision's vgg16 state dict)")
        for name in ("batch_size", "max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "dead_code_steps", "keep_last", "disc_start", "num_workers", "min_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr < 0 or self.weight_decay < 0 or self.clip_grad_norm < 0:
            raise ConfigError("lr, weight_decay and clip_grad_norm must be >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.hold_fraction < 1:
            raise ConfigError(f"hold_fraction must be in [0, 1), got {self.hold_fraction}")
        if not 0 <= self.wpe <= 1 or not 0 <= self.warmup_start_ratio <= 1:
            raise ConfigError("wpe and warmup_start_ratio are fractions of the peak LR: in [0, 1]")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- the sections of the shared machinery ---------------------------------------------------------
    def engine_configs(self, world_size: int) -> tuple[ParallelConfig, OptimConfig]:
        """(parallel, optim) for `build_engine`: one micro-batch of `batch_size` per rank and step."""
        parallel = ParallelConfig(engine=TOKENIZER_ENGINE, precision=self.precision)
        optim = OptimConfig(micro_batch_size=self.batch_size, global_batch_size=self.batch_size * world_size,
                            base_lr=self.lr,
                            weight_decay=self.weight_decay, betas=list(self.betas),
                            clip_grad_norm=self.clip_grad_norm, warmup_start_ratio=self.warmup_start_ratio,
                            hold_fraction=self.hold_fraction, wpe=self.wpe, max_steps=self.max_steps)
        return parallel, optim

    def checkpoint_config(self) -> CheckpointConfig:
        return CheckpointConfig(every_steps=self.checkpoint_every, keep_last=self.keep_last, async_save=False,
                                resume="auto" if self.resume else "none")

    def logging_config(self) -> LoggingConfig:
        return LoggingConfig(log_every=self.log_every, wandb_project=self.wandb_project,
                             wandb_run_name=self.wandb_run_name, wandb_mode=self.wandb_mode, wandb_tags=["tokenizer"])
