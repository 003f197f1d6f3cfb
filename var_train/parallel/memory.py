"""Rough per-GPU memory estimate for `var-train train --dry-run`.

Counts, in bytes: parameters (fp32 masters plus the unsharded compute copies that FSDP2 / ZeRO-3
gather), gradients, AdamW states (two fp32 moments; ZeRO also keeps an fp32 master partition) and
activations. Activations follow Korthikanti et al. (2022): 34 * tokens * width bytes per
transformer block per sample in 16-bit, without the attention-score term because fused
attention kernels do not keep the scores; doubled in fp32; with activation checkpointing only
each block's input is kept, plus one block recomputed at a time. Logits (fp32, with their
softmax and gradient) are added. Allocator fragmentation, communication buffers and the
CUDA context are not counted: budget 10-20% on top.
"""

from __future__ import annotations


def _activation_bytes(micro_batch_size: int, num_tokens: int, embed_dim: int, depth: int,
                      compute_bytes: int, activation_checkpointing: bool, vocab_size: int) -> float:
    per_block = 34 * num_tokens * embed_dim * micro_batch_size * compute_bytes / 2
    block_input = num_tokens * embed_dim * micro_batch_size * compute_bytes
    blocks = depth * block_input + per_block if activation_checkpointing else depth * per_block
    logits = 3 * micro_batch_size * num_tokens * vocab_size * 4
    return blocks + logits


def estimate_memory_per_gpu(model_num_params: int, parallel_cfg, world_size: int, micro_batch_size: int,
                            num_tokens: int, embed_dim: int, depth: int, vocab_size: int = 4096) -> dict[str, float]:
    """-> {"params", "grads", "optimizer_states", "activations", "total"} in bytes per GPU."""
    n = float(model_num_params)
    compute_bytes = 2 if parallel_cfg.precision == "bf16" else 4
    block_params = 12 * embed_dim * embed_dim + 6 * embed_dim * embed_dim  # attn + ffn + ada_lin
    engine = parallel_cfg.engine
    if engine == "fsdp2":
        shard = world_size // max(1, parallel_cfg.replicate_degree)
        # Unsharded copies: two blocks in flight (current and prefetched), or every block from
        # forward to backward without resharding (ZeRO-2 behaviour).
        gathered = (n if not parallel_cfg.reshard_after_forward else 2 * block_params) * compute_bytes
        params = 4 * n / shard + gathered
        grads = 4 * n / shard + 2 * block_params * 4
        optimizer = 8 * n / shard
    elif engine == "deepspeed":
        stage = parallel_cfg.zero_stage
        params = 4 * n / world_size + 2 * block_params * 4 if stage == 3 else 4 * n
        grads = 4 * n / world_size + 2 * block_params * 4 if stage >= 2 else 4 * n
        optimizer = 12 * n / world_size  # fp32 master partition + two moments
    elif engine == "ddp":
        params, grads, optimizer = 4 * n, 8 * n, 8 * n  # gradients plus DDP's reduction buckets
    else:
        raise ValueError(f"unknown engine {engine!r}")
    activations = _activation_bytes(micro_batch_size, num_tokens, embed_dim, depth, compute_bytes,
                                    parallel_cfg.activation_checkpointing, vocab_size)
    estimate = {"params": params, "grads": grads, "optimizer_states": optimizer, "activations": activations}
    estimate["total"] = sum(estimate.values())
    return {k: float(v) for k, v in estimate.items()}
