"""What a recipe would do, without training: sizes, FLOPs, steps and memory, for `--dry-run`.

`meta_model(cfg)` and `memory_per_gpu(cfg, model, world_size)` are also the estimates that
`var-train scaling plan` sizes its jobs with, so a planned job and its dry run agree.
"""

from __future__ import annotations

import dataclasses

import torch
import yaml

from var_train import schedules
from var_train.config import TrainConfig
from var_train.errors import ConfigError, MismatchError
from var_train.data.sources import read_shard_manifest
from var_train.models import VAR, size_rule
from var_train.parallel import engine_class, estimate_memory_per_gpu


def meta_model(cfg: TrainConfig) -> VAR:
    """The recipe's VAR on the meta device: shapes only, no memory, even for d30."""
    from var_train.train import build_model

    model_cfg = dataclasses.replace(cfg.model, init_from=None)
    with torch.device("meta"):
        return build_model(dataclasses.replace(cfg, model=model_cfg))


def memory_per_gpu(cfg: TrainConfig, model: VAR, world_size: int) -> dict[str, float]:
    """Bytes per GPU ({"params", "grads", "optimizer_states", "activations", "total"}) of training
    `model` with the recipe's engine, precision, activation checkpointing and micro-batch."""
    parallel = cfg.parallel
    if parallel.precision not in ("bf16", "fp32"):  # "auto" resolves at run time; a GPU runs bf16
        parallel = dataclasses.replace(parallel, precision="bf16")
    return estimate_memory_per_gpu(model, parallel, world_size, cfg.optim.micro_batch_size)


def steps_per_epoch(num_images: int, cfg: TrainConfig, world_size: int) -> float:
    """Optimizer steps in one epoch, as the trainer counts them (`schedules.steps_per_epoch`): whole
    micro-batches per rank over the micro-batches one step accumulates."""
    per_rank_batches = num_images // (world_size * cfg.optim.micro_batch_size)
    accumulation = cfg.optim.global_batch_size // (cfg.optim.micro_batch_size * world_size)
    return schedules.steps_per_epoch(per_rank_batches, max(1, accumulation))


def rule_differences(cfg: TrainConfig, model: VAR) -> list[str]:
    """Where the recipe departs from the paper's size rule of its depth (models/size_rules.py)."""
    rule = size_rule(cfg.model.depth)
    actual = {"embed_dim": model.embed_dim, "num_heads": model.num_heads,
              "drop_path_rate": model.config["drop_path_rate"],
              "alng": rule.alng if cfg.model.alng is None else cfg.model.alng,
              **{k: getattr(cfg.optim, k) for k in ("base_lr", "wpe", "global_batch_size", "epochs", "weight_decay",
                                                    "weight_decay_end")}}
    wanted = rule.as_dict()
    return [f"{k} {v:g} (rule {wanted[k]:g})" if isinstance(v, (int, float)) and wanted[k] is not None
            else f"{k} {v} (rule {wanted[k]})"
            for k, v in actual.items() if not _same(v, wanted[k])]


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def fine_tuning_lines(cfg: TrainConfig, model: VAR, memory: dict[str, float], world_size: int) -> list[str]:
    """Warm start, frozen parameters (their gradients and AdamW states are never allocated, so the
    estimate above shrinks by that share) and the EMA copy (one more copy of the trainable
    parameters, sharded like them)."""
    from var_train.models.adapt import check_reinit
    from var_train.models.freezing import freeze_parameters

    lines = []
    m = cfg.model
    if m.init_from:
        check_reinit(model, m.reinit)  # the names alone: the weights are read when training starts
        lines.append(f"warm start:            from {m.init_from}" + (f", fresh: {', '.join(m.reinit)}" if m.reinit else "")
                     + " (every loaded / reinitialised / adapted tensor is listed when training starts)")
    summary = freeze_parameters(model, cfg.optim.freeze)
    share = summary.trainable / max(1, summary.trainable + summary.frozen)
    if summary.frozen:
        saved = (memory["grads"] + memory["optimizer_states"]) * (1 - share)
        lines.append(f"frozen:                {summary.describe()}; saves {saved / 2**30:.2f} GiB per GPU "
                     f"of gradients and optimizer states: {(memory['total'] - saved) / 2**30:.1f} GiB in all")
    if cfg.optim.ema_decay:
        p = cfg.parallel
        sharded = engine_class(p.engine).shards_parameters(p)
        ema = 4.0 * summary.trainable / (world_size if sharded else 1)
        lines.append(f"EMA (optim.ema_decay): {cfg.optim.ema_decay:g}, +{ema / 2**30:.2f} GiB per GPU (an fp32 copy "
                     f"of the trainable parameters, {'sharded' if sharded else 'replicated'} like them)")
    return lines


def describe(cfg: TrainConfig, world_size: int) -> str:
    model = meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    tokens_per_image = model.num_tokens
    lines = ["# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "", "# plan"]
    per_step = cfg.optim.micro_batch_size * world_size
    accumulation = cfg.optim.global_batch_size / per_step
    differences = rule_differences(cfg, model)
    lines += [
        f"world size:            {world_size}",
        f"parameters:            {params:,} (d{model.depth}, width {model.embed_dim}, {model.num_heads} heads)",
        f"paper's size rule:     " + ("followed (models/size_rules.py)" if not differences
                                      else "departs in " + ", ".join(differences)),
        f"FLOPs per image:       {model.train_flops_per_image() / 1e9:,.1f} GFLOP forward+backward "
        f"({model.train_flops_per_image(include_attention_scores=True) / 1e9:,.1f} with attention scores)",
        f"tokens per step:       {cfg.optim.global_batch_size * tokens_per_image:,} "
        f"({cfg.optim.global_batch_size} images x {tokens_per_image} tokens)",
        f"gradient accumulation: {accumulation:g} micro-batch{'' if accumulation == 1 else 'es'} of "
        f"{cfg.optim.micro_batch_size} per rank"
        + ("" if accumulation.is_integer() else "  <-- not an integer: fix optim.global_batch_size"),
        f"peak LR:               {cfg.optim.base_lr * cfg.optim.global_batch_size / 256:.3g}",
    ]
    imagenet = 1_281_167 // cfg.optim.global_batch_size
    if not cfg.data.train_shards:
        lines.append(f"steps per epoch:       unknown: data.train_shards is not set (ImageNet-1k's 1,281,167 "
                     f"images would give {imagenet:,}, {round(imagenet * cfg.optim.epochs):,} in all)")
    try:
        if not cfg.data.train_shards:
            raise LookupError
        manifest = read_shard_manifest(cfg.data.train_shards)  # a folder or a URL
        manifest.check_compatible(cfg.model.patch_nums, cfg.model.vocab_size, cfg.model.num_classes,
                                  where=f"of data.train_shards ({cfg.data.train_shards})")  # as training will
        steps = steps_per_epoch(manifest.num_records, cfg, world_size) if accumulation.is_integer() else \
            manifest.num_records // cfg.optim.global_batch_size
        steps_text = f"{steps:,.0f}" if float(steps).is_integer() else f"{steps:,.2f}"
        lines.append(f"steps per epoch:       {steps_text} ({manifest.num_records:,} records); "
                     f"{round(steps * cfg.optim.epochs):,} steps for {cfg.optim.epochs:g} epochs"
                     + (f"; the run stops at optim.max_steps={cfg.optim.max_steps:,} (the schedule still spans the "
                        f"epochs)" if cfg.optim.max_steps and cfg.optim.max_steps < steps * cfg.optim.epochs else ""))
    except LookupError:
        pass
    except (ConfigError, MismatchError):  # shards unlike the model, or too few for one step: as training would
        raise
    except (FileNotFoundError, ValueError, OSError) as error:
        lines.append(f"steps per epoch:       unknown ({error})")
    memory = memory_per_gpu(cfg, model, world_size)
    lines.append(f"memory per GPU ({cfg.parallel.engine}, {cfg.parallel.precision}"
                 f"{', activation checkpointing' if cfg.parallel.activation_checkpointing else ''}): "
                 f"{memory['total'] / 2**30:.1f} GiB = "
                 + ", ".join(f"{k} {v / 2**30:.1f}" for k, v in memory.items() if k != "total"))
    lines += fine_tuning_lines(cfg, model, memory, world_size)
    return "\n".join(lines)
