"""Training configuration: typed dataclasses, the single place where defaults live.

A recipe is YAML with one mapping per section (`model`, `data`, `optim`, `parallel`,
`checkpoint`, `logging`, `eval`, `run`); command-line overrides are dotted `section.key=value`
pairs whose values are parsed as YAML (`optim.base_lr=2e-4`, `model.patch_nums=[1,2,3,4]`).
Unknown keys and values of the wrong type are rejected with the list of valid keys; every numeric
value is range-checked at load (`validate`), and a YAML syntax error names the file, line and column.
All of these raise ConfigError, which the commands print as one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from var_train.errors import ConfigError
from var_train.models import DEFAULT_PATCH_NUMS, SamplingSettings
from var_train.parallel.registry import ENGINES


@dataclass
class ModelConfig:
    depth: int = 16
    embed_dim: int | None = None  # None: by depth, models/size_rules.py (64 * depth)
    num_heads: int | None = None  # None: by depth (depth heads of 64)
    mlp_ratio: float = 4.0
    drop_path_rate: float | None = None  # None: by depth (0.1 * depth / 24)
    attn_l2_norm: bool = True
    shared_aln: bool = False
    label_dropout: float = 0.1
    alng: float | None = None  # AdaLN gamma init; None: by depth (1e-3, 1e-4 from d24, 1e-5 from d30)
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: list[int] = field(default_factory=lambda: list(DEFAULT_PATCH_NUMS))
    init_from: str | None = None  # VAR weights to start from: .safetensors, reference .pth, or a run/checkpoint dir
    reinit: list[str] = field(default_factory=list)  # with init_from: name prefixes/globs initialised fresh, e.g. [class_emb]
    class_init: str = "reference"  # new class rows after reinit=[class_emb]: reference | mean (of old rows + noise)
    attention_backend: str = "sdpa"  # "flex" on GPU skips fully-masked tiles


@dataclass
class DataConfig:
    train_shards: str = ""  # folder with shard-*.tar and manifest.json (var-prep extract)
    val_shards: str | None = None
    vae: str = ""  # VQVAE checkpoint: only its codebook and phi convs are loaded
    num_workers: int = 2
    shuffle_buffer: int = 2000
    resampled: bool = False
    use_flip: bool = True
    # The VAE, shards and model are checked against each other at start (file hash or codebook
    # fingerprint, vocab size, z channels, patch_nums, resolution). True: report and continue.
    allow_vae_mismatch: bool = False


@dataclass
class OptimConfig:
    global_batch_size: int = 768
    micro_batch_size: int = 16  # per rank and forward; accumulation = global / (micro * world)
    base_lr: float = 1e-4  # peak LR = base_lr * global_batch_size / 256
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine rise to this value (d30: 0.08); None = constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad_norm: float = 2.0
    warmup_epochs: float | None = None  # default epochs / 50
    warmup_start_ratio: float = 0.005  # warmup starts at this fraction of the peak LR
    hold_fraction: float = 0.05  # of the post-warmup steps, held at the peak before the decay
    wpe: float = 0.1  # final LR as a fraction of the peak
    epochs: float = 200
    max_steps: int | None = None  # stop early (the schedule still spans `epochs`)
    freeze: list[str] = field(default_factory=list)  # globs on parameter names, e.g. ["blocks.[0-7].*", "word_embed.*"]
    ema_decay: float | None = None  # EMA of the weights (typical 0.9999); None = off


@dataclass
class ParallelConfig:
    engine: str = "fsdp2"  # a name in var_train.parallel.ENGINES: fsdp2 | deepspeed | ddp | accelerate
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    reshard_after_forward: bool = True  # ZeRO-3 behaviour; False = ZeRO-2
    replicate_degree: int = 1  # >1: hybrid sharding, a (replicate, shard) device mesh
    activation_checkpointing: bool = False
    compile: bool = False
    zero_stage: int = 2  # deepspeed only
    # engine=accelerate: an `accelerate config` YAML (configs/accelerate/); None: the environment of
    # `accelerate launch --config_file ...` (plain DDP without it)
    accelerate_config: str | None = None


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    async_save: bool = False
    resume: str = "auto"  # auto | none | path to a checkpoint


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb_project: str = "var_train"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_group: str | None = None  # runs of one sweep share a group (`var-train scaling plan` sets it)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = no scheduled evaluation
    at_end: bool = False
    num_samples: int = 1000
    batch_size: int = 25
    cfg: float = SamplingSettings.cfg      # the paper's sampling settings, defined once
    top_k: int = SamplingSettings.top_k
    top_p: float = SamplingSettings.top_p
    seed: int = 0
    vae: str | None = None  # full VQVAE for decoding; default: data.vae
    feature_extractor: str = "inception"  # or a path to a classifier checkpoint
    inception_weights: str | None = None
    reference_stats: str | None = None
    precision_recall: bool = False
    grid_every_steps: int = 0  # a cheap sample grid (no FID, no Inception file) every N steps; 0 = off
    grid_samples: int = 16  # images in that grid, spread over the classes


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_consecutive_nonfinite: int = 10
    val_every_steps: int = 0  # 0 = validate only at the end (when data.val_shards is set)
    val_batches: int = 50
    progressive_steps: int = 0  # >0: train on a growing prefix of scales during these first steps
    stop_after_steps: int | None = None  # debugging: stop (with a checkpoint) at this step
    debug_nonfinite_steps: list[int] = field(default_factory=list)  # tests: make these steps' loss NaN


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


CHOICES = {
    "parallel.engine": tuple(ENGINES),  # the registry is the one list of engines
    "parallel.precision": ("auto", "bf16", "fp32"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "model.attention_backend": ("sdpa", "flex"),
    "model.class_init": ("reference", "mean"),
}


# -- typed assignment -------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def _set(section: Any, section_name: str, key: str, value: Any) -> None:
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        valid = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"unknown key {section_name}.{key}; valid keys of [{section_name}]: {valid}")
    where = f"{section_name}.{key}"
    value = _coerce(value, hints[key], where)
    if where in CHOICES and value not in CHOICES[where]:
        raise ConfigError(f"{where} must be one of {CHOICES[where]}, got {value!r}")
    setattr(section, key, value)


def apply_mapping(config: TrainConfig, mapping: dict, source: str = "recipe") -> TrainConfig:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
    sections = [f.name for f in dataclasses.fields(config)]
    for section_name, values in mapping.items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown section {section_name!r}; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping")
        for key, value in values.items():
            _set(getattr(config, section_name), section_name, key, value)
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """'optim.base_lr=2e-4' -> ('optim', 'base_lr', 2e-4)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. optim.base_lr=2e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: cannot parse the value: {error}") from None
    return parts[0], parts[1], value


# -- value ranges -----------------------------------------------------------------------------------
# Checked at load, so a bad value fails in the first second with its key, not hours later (or never).
# A field without a rule here still has to be a finite number if it is one. None is always allowed
# for optional fields (it means "the default").
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
_POSITIVE = (lambda v: v > 0, "positive")
_PROBABILITY = (lambda v: 0 <= v <= 1, "between 0 and 1")
_BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")

RANGES: dict[str, tuple] = {
    "model.depth": _AT_LEAST_1, "model.embed_dim": _AT_LEAST_1, "model.num_heads": _AT_LEAST_1,
    "model.mlp_ratio": _POSITIVE, "model.drop_path_rate": _BELOW_1, "model.label_dropout": _PROBABILITY,
    "model.alng": _AT_LEAST_0, "model.num_classes": _AT_LEAST_1, "model.vocab_size": (lambda v: v >= 2, "at least 2"),
    "model.z_channels": _AT_LEAST_1,
    "data.num_workers": _AT_LEAST_0, "data.shuffle_buffer": _AT_LEAST_0,
    "optim.global_batch_size": _AT_LEAST_1, "optim.micro_batch_size": _AT_LEAST_1, "optim.base_lr": _POSITIVE,
    "optim.weight_decay": _AT_LEAST_0, "optim.weight_decay_end": _AT_LEAST_0, "optim.eps": _POSITIVE,
    "optim.clip_grad_norm": _AT_LEAST_0, "optim.warmup_epochs": _AT_LEAST_0,
    "optim.warmup_start_ratio": _PROBABILITY, "optim.hold_fraction": _PROBABILITY, "optim.wpe": _PROBABILITY,
    "optim.epochs": _POSITIVE, "optim.max_steps": _AT_LEAST_1,
    "optim.ema_decay": (lambda v: 0 < v < 1, "between 0 and 1, e.g. 0.9999 (or null: no EMA)"),
    "parallel.replicate_degree": _AT_LEAST_1, "parallel.zero_stage": (lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    "checkpoint.every_steps": _AT_LEAST_0, "checkpoint.keep_last": _AT_LEAST_0,
    "logging.log_every": _AT_LEAST_1,
    "eval.every_steps": _AT_LEAST_0, "eval.num_samples": _AT_LEAST_1, "eval.batch_size": _AT_LEAST_1,
    "eval.cfg": _AT_LEAST_0, "eval.top_k": _AT_LEAST_0, "eval.top_p": _PROBABILITY, "eval.seed": _AT_LEAST_0, "eval.grid_every_steps": _AT_LEAST_0,
    "eval.grid_samples": _AT_LEAST_1,
    "run.seed": _AT_LEAST_0, "run.max_consecutive_nonfinite": _AT_LEAST_0, "run.val_every_steps": _AT_LEAST_0,
    "run.val_batches": _AT_LEAST_1, "run.progressive_steps": _AT_LEAST_0, "run.stop_after_steps": _AT_LEAST_1,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: TrainConfig) -> TrainConfig:
    """Raise ConfigError naming the first value out of range (every numeric field is checked)."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            key, value = f"{section.name}.{item.name}", getattr(values, item.name)
            numbers = [value] if _is_number(value) else (
                [v for v in value if _is_number(v)] if isinstance(value, list) else [])
            for number in numbers:
                if isinstance(number, float) and not math.isfinite(number):
                    raise ConfigError(f"{key} must be a finite number, got {value!r}")
            if key in RANGES and _is_number(value):
                check, wanted = RANGES[key]
                if not check(value):
                    raise ConfigError(f"{key} must be {wanted}, got {value!r}")
    m, o = config.model, config.optim
    pn = m.patch_nums
    if not pn or any(p < 1 for p in pn) or any(a >= b for a, b in zip(pn, pn[1:])):
        raise ConfigError(f"model.patch_nums must be positive and strictly increasing, e.g. [1, 2, 3, 4], got {pn}")
    if m.reinit and not m.init_from:
        raise ConfigError(f"model.reinit={m.reinit} needs model.init_from (the checkpoint to warm-start from)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if m.embed_dim is not None and m.num_heads is not None and m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim {m.embed_dim} must be a multiple of model.num_heads {m.num_heads}")
    if o.global_batch_size % o.micro_batch_size:
        raise ConfigError(f"optim.global_batch_size {o.global_batch_size} must be a multiple of "
                          f"optim.micro_batch_size {o.micro_batch_size}")
    return config


def _read_recipe(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(part) for part in (error.context, error.problem) if part)
        raise ConfigError(f"{where}: invalid YAML: {problem or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the recipe {path}: {error}") from None


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    config = TrainConfig()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        apply_mapping(config, _read_recipe(path) or {}, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        apply_mapping(config, {section: {key: value}}, f"override {text!r}")
    return validate(config)
