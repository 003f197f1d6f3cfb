"""Model benchmarks: VAR training step and the attention variant against the plain masked one.

  python benchmarks/bench_model.py train-step --depth 6 --batch 4            # CPU anchor config
  python benchmarks/bench_model.py train-step --depth 16 --batch 32 --precision bf16 --compile  # GPU, prints MFU
  python benchmarks/bench_model.py attention --depth 6 --batch 4

A training step is forward + backward + AdamW on 256px token maps (L = 680) with random tokens;
teacher input is built by the quantizer, as in training.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, peak_flops, time_it  # noqa: E402
from var_train.models import VAR, MultiScaleQuantizer  # noqa: E402
from var_train.models import transformer_blocks  # noqa: E402


def build(depth: int, device: torch.device, patch_nums) -> tuple[VAR, MultiScaleQuantizer]:
    torch.manual_seed(0)
    var = VAR(depth=depth, patch_nums=patch_nums).to(device)
    var.init_weights()
    quantizer = MultiScaleQuantizer(patch_nums=patch_nums).to(device)
    return var, quantizer


def random_batch(var: VAR, quantizer: MultiScaleQuantizer, batch: int, device):
    tokens = [torch.randint(0, var.vocab_size, (batch, p * p), device=device) for p in var.patch_nums]
    labels = torch.randint(0, var.num_classes, (batch,), device=device)
    return labels, tokens, torch.cat(tokens, 1)


def train_step_fn(var, quantizer, batch, device, precision):
    optimizer = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device.type == "cuda")
    labels, tokens, targets = random_batch(var, quantizer, batch, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    def step():
        with torch.no_grad():
            teacher_input = quantizer.tokens_to_teacher_input(tokens)
        with autocast:
            logits = var(labels, teacher_input)
        loss = F.cross_entropy(logits.view(-1, var.vocab_size), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def cmd_train_step(args, device):
    var, quantizer = build(args.depth, device, args.patch_nums)
    if args.attention_backend:
        var.set_attention_backend(args.attention_backend)
    if args.compile:
        for i, block in enumerate(var.blocks):
            var.blocks[i] = torch.compile(block)
    var.train()
    seconds = time_it(train_step_fn(var, quantizer, args.batch, device, args.precision), device,
                      warmup=args.warmup, repeats=args.repeats)
    tokens = args.batch * var.num_tokens
    print(f"machine: {machine()}")
    print(f"VAR d{args.depth} ({sum(p.numel() for p in var.parameters()) / 1e6:.1f}M params), batch {args.batch}, "
          f"L={var.num_tokens}, {args.precision}, attention={var.attention_backend}, compile={args.compile}")
    print(f"train step (fwd+bwd+AdamW): {seconds:.3f} s  |  {args.batch / seconds:.2f} images/s  |  {tokens / seconds:,.0f} tokens/s")
    peak = peak_flops(device)
    if peak:
        achieved = var.train_flops_per_image() * args.batch / seconds
        print(f"MFU: {achieved / peak:.1%} ({achieved / 1e12:.0f} TFLOP/s of {peak / 1e12:.0f}; paper's FLOP count)")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def plain_masked_attention(q, k, v, attn_mask, scale):
    """The unfused alternative: explicit scores, additive -inf mask, manual softmax."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    return scores.softmax(dim=-1) @ v


def cmd_attention(args, device):
    var, quantizer = build(args.depth, device, args.patch_nums)
    var.train()
    step = train_step_fn(var, quantizer, args.batch, device, args.precision)
    results = {}
    backends = ["sdpa"] + (["flex"] if device.type == "cuda" else [])
    for backend in backends:
        var.set_attention_backend(backend)
        results[backend] = time_it(step, device, warmup=args.warmup, repeats=args.repeats)
    var.set_attention_backend("sdpa")
    fused = transformer_blocks.block_causal_attention
    transformer_blocks.block_causal_attention = plain_masked_attention
    try:
        results["plain masked (manual softmax)"] = time_it(step, device, warmup=args.warmup, repeats=args.repeats)
    finally:
        transformer_blocks.block_causal_attention = fused
    print(f"machine: {machine()}")
    print(f"VAR d{args.depth}, batch {args.batch}, L={var.num_tokens}, {args.precision}: train step seconds")
    base = results["plain masked (manual softmax)"]
    for name, seconds in results.items():
        print(f"  {name:32s} {seconds:.3f} s   ({base / seconds:.2f}x vs plain)")
    chosen = "flex" if device.type == "cuda" else "sdpa"
    print(f"chosen for training on this device: {chosen}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train-step", "attention"))
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch-nums", default="1,2,3,4,5,6,8,10,13,16")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention-backend", choices=("sdpa", "flex"), default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.patch_nums = tuple(int(p) for p in args.patch_nums.split(","))
    device = torch.device(args.device)
    {"train-step": cmd_train_step, "attention": cmd_attention}[args.command](args, device)


if __name__ == "__main__":
    main()
