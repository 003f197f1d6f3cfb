"""One-GPU benchmark suite: the table BENCHMARKS.md records for a GPU (run by benchmarks/gpu_suite.sh).

Stages (each reuses the single benchmark it summarises; each row says how it was measured):
  train     VAR d16/d20/d24/d30, bf16 train step (fwd+bwd+clip+AdamW, bench_model.train_step_fn) at
            the largest micro-batch that fits: plain SDPA without compile, then torch.compile per
            block + FlexAttention at the same micro-batch (same run, side by side): step time,
            images/s, tokens/s, MFU (paper's FLOP count, trainer's peak table), peak memory.
  sample    KV-cached sampling with decoding (models.generate_batch: cfg 1.5, top-k 900, top-p 0.96,
            ch160 VQVAE decode), d16 and d30, images/s.
  extract   `var-prep extract` with the ch160 VQVAE on 256px JPEGs (bench_extract.write_digits),
            images/s of the whole command, and the encoder alone.
  accelerate  2 optimizer steps of parallel.engine=accelerate under `accelerate launch --config_file
            configs/accelerate/fsdp2.yaml` (FSDP2 through Accelerate's plugin; d16, bf16).
Weights are random (speed does not depend on them).

  benchmarks/gpu_suite.sh                          # on a GPU; fails fast without CUDA
  benchmarks/gpu_suite.sh --dry-run                # CPU plumbing check: tiny models, seconds per stage
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_model import build, train_step_fn  # noqa: E402
from benchmarks.common import machine, peak_flops, time_it  # noqa: E402

FULL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TINY_PATCH_NUMS = (1, 2, 3, 4)
TINY_VAR = dict(vocab_size=64, z_channels=8, num_classes=10, embed_dim=64, num_heads=2, patch_nums=TINY_PATCH_NUMS)
TINY_VAE = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=TINY_PATCH_NUMS)
REAL_VAE = dict(vocab_size=4096, z_channels=32, ch=160)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- train ----------------------------------------------------------------------------------------
def make_var(depth: int, device: torch.device, tiny: bool):
    if not tiny:
        return build(depth, device, FULL_PATCH_NUMS)
    from var_train.models import VAR, MultiScaleQuantizer

    torch.manual_seed(0)
    var = VAR(depth=depth, **TINY_VAR).to(device)
    var.init_weights(alng=0.1)
    return var, MultiScaleQuantizer(vocab_size=64, z_channels=8, patch_nums=TINY_PATCH_NUMS).to(device)


def first_batch_guess(var, device: torch.device, cap: int) -> int:
    """The model's own memory facts: fp32 weights, gradients and AdamW states (16 bytes a
    parameter) plus bf16 activations per image, against 90% of the free memory."""
    if device.type != "cuda":
        return cap
    free, _ = torch.cuda.mem_get_info(device)
    static = 16 * sum(p.numel() for p in var.parameters())
    per_image = var.activation_bytes_per_image(2, False) * 1.3  # margin: allocator, AdamW temporaries
    guess = int((0.9 * free - static) // per_image)
    return max(1, min(cap, guess // 8 * 8 or guess))


def largest_fitting_batch(depth: int, device: torch.device, args) -> tuple[int, str]:
    """Start at the estimate, shrink by 3/4 on out-of-memory (a real train step is the test)."""
    var, quantizer = make_var(depth, device, args.tiny)
    batch = first_batch_guess(var, device, args.max_batch)
    tried = []
    while batch >= 1:
        try:
            train_step_fn(var, quantizer, batch, device, args.precision)()
            del var, quantizer
            free_memory()
            return batch, f"estimate {tried[0] if tried else batch}" + (f", OOM at {tried}" if tried else ", fits")
        except torch.cuda.OutOfMemoryError:
            tried.append(batch)
            free_memory()
            batch = batch * 3 // 4 // 8 * 8 if batch > 8 else batch // 2
    raise RuntimeError(f"d{depth}: not even one image fits")


def train_row(depth: int, batch: int, variant: str, device: torch.device, args) -> dict:
    var, quantizer = make_var(depth, device, args.tiny)
    attention, compiled = {"sdpa": ("sdpa", False), "flex+compile": ("flex", True)}[variant]
    if args.tiny and device.type == "cpu":
        attention, compiled = "sdpa", False  # dry run: FlexAttention has no CPU backward; no compile wait
    var.set_attention_backend(attention)
    if compiled:
        for i, block in enumerate(var.blocks):
            var.blocks[i] = torch.compile(block)
    var.train()
    free_memory()
    started = time.perf_counter()
    seconds = time_it(train_step_fn(var, quantizer, batch, device, args.precision), device,
                      warmup=args.warmup, repeats=args.repeats)
    peak = peak_flops(device)
    flops = var.train_flops_per_image() * batch / seconds
    row = {"stage": "train", "model": f"d{depth}", "variant": variant if not args.tiny else f"{variant} (dry: sdpa)",
           "batch": batch, "step_s": seconds, "images_s": batch / seconds, "tokens_s": batch * var.num_tokens / seconds,
           "mfu": flops / peak if peak else None,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "wall_s": time.perf_counter() - started}
    del var, quantizer
    free_memory()
    return row


# -- sampling -------------------------------------------------------------------------------------
@torch.no_grad()
def sample_row(depth: int, device: torch.device, args) -> dict:
    from var_train.models import VQVAE, SamplingSettings, generate_batch

    var, _ = make_var(depth, device, args.tiny)
    var.eval()
    vae = VQVAE(**(TINY_VAE if args.tiny else REAL_VAE)).to(device).eval()
    batch = args.sample_batch
    labels = torch.arange(batch, device=device) % var.num_classes
    settings = SamplingSettings(cfg=1.5, top_k=900, top_p=0.96, precision="auto")
    seconds = time_it(lambda: generate_batch(var, vae, labels, range(batch), settings), device, warmup=1,
                      repeats=args.repeats)
    row = {"stage": "sample+decode", "model": f"d{depth}", "variant": "KV cache, cfg 1.5, bf16 auto", "batch": batch,
           "step_s": seconds, "images_s": batch / seconds,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del var, vae
    free_memory()
    return row


# -- extraction -----------------------------------------------------------------------------------
def extract_row(device: torch.device, args) -> dict:
    from benchmarks.bench_extract import encoder_rate, write_digits
    from data_prep.extract import ExtractConfig, extract_tokens
    from var_train.models import VQVAE
    from var_train.models.checkpoint_io import save_model

    torch.manual_seed(0)
    vae = VQVAE(**(TINY_VAE if args.tiny else REAL_VAE)).eval()
    resolution = vae.resolution
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits(tmp / "images", args.extract_images, resolution, "jpg")
        checkpoint = save_model(vae, tmp / "vae.safetensors")
        summary = extract_tokens(ExtractConfig(
            source=str(tmp / "images"), vae=str(checkpoint), out=str(tmp / "tokens"), resolution=resolution,
            patch_nums=tuple(vae.patch_nums), batch_size=args.extract_batch, num_workers=args.extract_workers,
            shard_size=1000, progress=False, device=str(device)))
    encoder = encoder_rate(vae.to(device), resolution, args.extract_batch, device)
    return {"stage": "extract", "model": f"VQVAE ch{vae_channels(vae)}", "variant":
            f"{resolution}px JPEG, whole command ({args.extract_workers} workers); encoder alone {encoder:.0f} img/s",
            "batch": args.extract_batch, "step_s": summary.seconds, "images_s": summary.images_per_second}


def vae_channels(vae) -> int:
    return (TINY_VAE if vae.resolution == 64 else REAL_VAE)["ch"]


# -- FSDP2 through Accelerate ---------------------------------------------------------------------
def accelerate_row(device: torch.device, args) -> dict:
    """`accelerate launch --config_file configs/accelerate/<fsdp2|ddp>.yaml` on this script's
    `accelerate-steps` command (one process): build_engine(parallel.engine=accelerate), 2 steps."""
    config = "ddp.yaml" if device.type == "cpu" else "fsdp2.yaml"  # Accelerate's FSDP is GPU-only
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
           "--num_processes", "1", "--main_process_port", str(29500 + os.getpid() % 1000), str(Path(__file__)),
           "accelerate-steps", "--depth", str(args.accelerate_depth)] + (["--dry-run"] if args.tiny else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.stage_timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ACCELERATE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: {proc.stderr[-2000:]}")
    fields = dict(item.split("=", 1) for item in lines[-1].split()[1:])
    return {"stage": "accelerate", "model": f"d{args.accelerate_depth}" if not args.tiny else "tiny",
            "variant": f"{config} via accelerate launch, {fields['kind']}, 2 steps, losses {fields['losses']}",
            "batch": int(fields["batch"]), "step_s": float(fields["step_s"]),
            "images_s": int(fields["batch"]) / float(fields["step_s"]),
            "peak_gib": float(fields["peak_gib"]) if fields["peak_gib"] != "-" else None,
            "wall_s": time.perf_counter() - started}


def accelerate_steps(args) -> None:
    """Inside `accelerate launch`: 2 optimizer steps through the accelerate engine (random tokens)."""
    import torch.nn.functional as F

    from var_train.config import OptimConfig, ParallelConfig
    from var_train.parallel import build_engine, destroy_distributed, init_distributed
    from var_train.precision import resolve_precision

    info = init_distributed()
    var, quantizer = make_var(args.depth, info.device, args.tiny)
    batch = 4 if args.tiny else 16
    precision = resolve_precision("auto", info.device)
    engine = build_engine(var, ParallelConfig(engine="accelerate", precision=precision),
                          OptimConfig(global_batch_size=batch * info.world_size, micro_batch_size=batch), info.device)
    quantizer = quantizer.to(info.device)
    tokens = [torch.randint(0, var.vocab_size, (batch, p * p), device=info.device) for p in var.patch_nums]
    labels = torch.randint(0, var.num_classes, (batch,), device=info.device)
    losses, times = [], []
    for _ in range(2):
        started = time.perf_counter()
        with engine.micro_batch(sync=True):
            with engine.autocast():
                logits = engine.model(labels, quantizer.tokens_to_teacher_input(tokens))
            loss = F.cross_entropy(logits.float().flatten(0, 1), torch.cat(tokens, 1).flatten())
            engine.backward(loss)
        engine.clip_grad_norm(2.0)
        engine.optimizer_step()
        engine.zero_grad()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), f"non-finite loss {losses}"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if info.device.type == "cuda" else "-"
    if info.rank == 0:
        print(f"ACCELERATE kind={engine.kind} batch={batch} step_s={times[-1]:.4f} peak_gib={peak} "
              f"losses={','.join(f'{v:.3f}' for v in losses)}", flush=True)
    destroy_distributed()


# -- the table ------------------------------------------------------------------------------------
def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = ("| stage | model | variant | micro-batch | step s | images/s | tokens/s | MFU | peak GiB |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(r: dict) -> str:
    return (f"| {r['stage']} | {r['model']} | {r['variant']} | {r['batch']} | {fmt(r.get('step_s'), '.3f')} | "
            f"{fmt(r.get('images_s'), '.1f')} | {fmt(r.get('tokens_s'), ',.0f')} | "
            f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_gib'), '.1f')} |")


def run_suite(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; the GPU suite needs one GPU "
              "(use --dry-run to check the plumbing on a CPU)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    deadline = time.monotonic() + args.budget_s
    rows, skipped = [], []
    header = (f"GPU suite {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {machine()}"
              + (" -- DRY RUN (tiny models, CPU plumbing only; not a measurement)" if args.tiny else ""))
    print(header)
    print(TABLE_HEADER, flush=True)  # rows follow as they are measured (a timeout keeps those printed)
    depths = [int(d) for d in args.depths.split(",")]
    stages = args.stages.split(",")

    def run(name, fn, *fn_args):
        if time.monotonic() > deadline:
            skipped.append(f"{name} (time budget {args.budget_s}s spent)")
            return
        log(f"{name} ...")
        try:
            result = fn(*fn_args)
        except Exception as error:  # one failing stage must not lose the others' rows
            skipped.append(f"{name} failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            log(skipped[-1])
            free_memory()
            return
        for row in result if isinstance(result, list) else [result]:
            rows.append(row)
            print(table_row(row), flush=True)
            if "FAILED" in row["variant"]:
                skipped.append(f"{name}: {row['variant']}")

    # Cheap stages first: if the training stages run out of time, only the largest models go unmeasured.
    if "accelerate" in stages:
        run("accelerate", accelerate_row, device, args)
    if "sample" in stages:
        for depth in (depths[0], depths[-1]):
            run(f"sample d{depth}", sample_row, depth, device, args)
    if "extract" in stages:
        run("extract", extract_row, device, args)
    if "train" in stages:
        for depth in depths:
            def train_both(depth=depth):
                batch, how = largest_fitting_batch(depth, device, args)
                log(f"d{depth}: micro-batch {batch} ({how})")
                rows = [train_row(depth, batch, "sdpa", device, args)]
                try:  # the side-by-side row must not lose the baseline row above
                    rows.append(train_row(depth, batch, "flex+compile", device, args))
                except Exception as error:
                    free_memory()
                    rows.append({"stage": "train", "model": f"d{depth}", "batch": batch, "variant":
                                 f"flex+compile FAILED: {type(error).__name__}: {str(error).splitlines()[0][:120]}"})
                return rows
            run(f"train d{depth}", train_both)
    for line in skipped:
        print(f"not measured: {line}")
    return 1 if skipped else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="suite", choices=("suite", "accelerate-steps"))
    parser.add_argument("--dry-run", dest="tiny", action="store_true",
                        help="tiny models on the CPU for a few seconds per stage: checks the plumbing, measures nothing")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--depths", default=None, help="default 16,20,24,30 (2,3 with --dry-run)")
    parser.add_argument("--depth", type=int, default=16, help="accelerate-steps: model depth")
    parser.add_argument("--stages", default="train,sample,extract,accelerate")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--max-batch", type=int, default=None, help="cap on the micro-batch search (256; 8 dry)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-batch", type=int, default=None, help="64 (8 dry)")
    parser.add_argument("--extract-images", type=int, default=None, help="512 (16 dry)")
    parser.add_argument("--extract-batch", type=int, default=64)
    parser.add_argument("--extract-workers", type=int, default=8)
    parser.add_argument("--accelerate-depth", type=int, default=None)
    parser.add_argument("--budget-s", type=int, default=450, help="stop starting stages after this many seconds")
    parser.add_argument("--stage-timeout", type=int, default=240)
    args = parser.parse_args()
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.depths = args.depths or ("2,3" if tiny else "16,20,24,30")
    args.max_batch = args.max_batch or (8 if tiny else 256)
    args.sample_batch = args.sample_batch or (8 if tiny else 64)
    args.extract_images = args.extract_images or (16 if tiny else 512)
    args.accelerate_depth = args.accelerate_depth or (2 if tiny else 16)
    if tiny:
        args.warmup, args.repeats = 1, 1
        args.extract_batch, args.extract_workers = min(args.extract_batch, 8), min(args.extract_workers, 1)
        if args.precision == "bf16" and args.device == "cpu":
            from var_train.precision import cpu_has_native_bf16
            args.precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if args.command == "accelerate-steps":
        accelerate_steps(args)
        return 0
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
