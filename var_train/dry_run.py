"""What a recipe would do, without training: sizes, FLOPs, steps and memory, for `--dry-run`."""

from __future__ import annotations

import yaml
import torch

from var_train.config import TrainConfig
from var_train.data import read_manifest
from var_train.parallel import estimate_memory_per_gpu


def describe(cfg: TrainConfig, world_size: int) -> str:
    from var_train.train import build_model

    init_from, cfg.model.init_from = cfg.model.init_from, None
    with torch.device("meta"):  # no memory, even for d30
        model = build_model(cfg)
    cfg.model.init_from = init_from
    params = sum(p.numel() for p in model.parameters())
    tokens_per_image = model.num_tokens
    lines = ["# resolved config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "", "# plan"]
    per_step = cfg.optim.micro_batch_size * world_size
    accumulation = cfg.optim.global_batch_size / per_step
    lines += [
        f"world size:            {world_size}",
        f"parameters:            {params:,} (d{model.depth}, width {model.embed_dim}, {model.num_heads} heads)",
        f"FLOPs per image:       {model.train_flops_per_image() / 1e9:,.1f} GFLOP forward+backward "
        f"({model.train_flops_per_image(include_attention_scores=True) / 1e9:,.1f} with attention scores)",
        f"tokens per step:       {cfg.optim.global_batch_size * tokens_per_image:,} "
        f"({cfg.optim.global_batch_size} images x {tokens_per_image} tokens)",
        f"gradient accumulation: {accumulation:g} micro-batches of {cfg.optim.micro_batch_size} per rank"
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
        manifest = read_manifest(cfg.data.train_shards)
        steps = manifest.num_records // cfg.optim.global_batch_size
        lines.append(f"steps per epoch:       {steps:,} ({manifest.num_records:,} records); "
                     f"{round(steps * cfg.optim.epochs):,} steps for {cfg.optim.epochs:g} epochs")
    except LookupError:
        pass
    except (FileNotFoundError, ValueError, OSError) as error:
        lines.append(f"steps per epoch:       unknown ({error})")
    memory = estimate_memory_per_gpu(params, cfg.parallel, world_size, cfg.optim.micro_batch_size,
                                     tokens_per_image, model.embed_dim, model.depth, model.vocab_size)
    lines.append(f"memory per GPU ({cfg.parallel.engine}, {cfg.parallel.precision}"
                 f"{', activation checkpointing' if cfg.parallel.activation_checkpointing else ''}): "
                 f"{memory['total'] / 2**30:.1f} GiB = "
                 + ", ".join(f"{k} {v / 2**30:.1f}" for k, v in memory.items() if k != "total"))
    return "\n".join(lines)
