"""fp32 against bf16 autocast on this machine, side by side: what `precision=auto` buys on a CPU with
native bf16 (AVX512-BF16 / AMX), and what it costs in accuracy.

    PYTHONPATH=. python benchmarks/bench_precision.py                # d6 / 256px / ch160 and the demo size
    PYTHONPATH=. python benchmarks/bench_precision.py --quick        # fewer repeats
    PYTHONPATH=. python benchmarks/bench_precision.py --only-trained --var demo_out/var.safetensors \
        --vae demo_out/tokenizer/vae.safetensors                      # + a trained model's sampling with decoding

Each measurement alternates fp32 and bf16 runs (so a busy neighbour slows both alike) and reports
the median. Rows: the VAR d6 train step (forward + backward, batch 4, 256px scales); KV-cached
token sampling (cfg 1.5, top-k 900, top-p 0.96); the ch160 VQVAE decode of 4 images (and how many
uint8 pixel levels bf16 changes); the VQVAE encode + quantize of extraction (and the share of
token ids bf16 changes: why extraction stays fp32); the demo-sized VAR's sampling (batch 50).
Models are randomly initialised (the FLOPs and the kernels are those of trained ones).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from var_train.loss import token_loss  # noqa: E402
from var_train.models import VAR, VQVAE, sample_tokens  # noqa: E402
from var_train.precision import describe_cpu_bf16  # noqa: E402


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def side_by_side(fn, repeats: int) -> dict[str, float]:
    """Median seconds of fn(precision) for fp32 and bf16, runs interleaved after one warm-up each."""
    times = {"fp32": [], "bf16": []}
    for precision in times:
        fn(precision)
    for _ in range(repeats):
        for precision in times:
            started = time.perf_counter()
            fn(precision)
            times[precision].append(time.perf_counter() - started)
    return {p: sorted(t)[len(t) // 2] for p, t in times.items()}


def row(name: str, seconds: dict[str, float], unit_count: int, unit: str, note: str = "") -> None:
    fp32, bf16 = seconds["fp32"], seconds["bf16"]
    print(f"| {name} | {fp32:.3f} s ({unit_count / fp32:.2f} {unit}/s) | {bf16:.3f} s ({unit_count / bf16:.2f} {unit}/s) "
          f"| {fp32 / bf16:.2f}x | {note} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 3")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--var", help="a trained VAR (e.g. the demo's var.safetensors): time generate_batch")
    parser.add_argument("--vae", help="its VQVAE")
    parser.add_argument("--only-trained", action="store_true", help="only the --var/--vae row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 3
    print(f"# {machine()}; {describe_cpu_bf16()}; load average {os.getloadavg()[0]:.1f}")
    print("| measurement | fp32 | bf16 autocast | speed-up | accuracy |")
    print("| --- | --- | --- | --- | --- |")

    if args.var:
        trained_row(args.var, args.vae, repeats + 2)
    if args.only_trained:
        return
    torch.manual_seed(0)
    var = VAR(vocab_size=4096, z_channels=32, num_classes=1000, depth=6)
    var.init_weights()
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=160).eval()
    batch, scales = 4, var.patch_nums
    labels = torch.randint(0, 1000, (batch,))
    tokens = [torch.randint(0, 4096, (batch, pn * pn)) for pn in scales]

    with torch.no_grad():
        teacher = vae.quantize.tokens_to_teacher_input(tokens)
    targets = torch.cat(tokens, 1)

    def train_step(precision):
        var.zero_grad(set_to_none=True)
        with autocast(precision):
            logits = var(labels, teacher)
        token_loss(logits, targets, scales).loss.backward()

    var.train()
    row("VAR d6 train step (fwd+bwd, batch 4, 256px)", side_by_side(train_step, repeats), batch, "img")
    var.eval()

    def sample(precision, model=var, quantizer=vae.quantize, rows=labels):
        with torch.no_grad(), autocast(precision):
            return sample_tokens(model, quantizer, rows, cfg=1.5, top_k=900, top_p=0.96,
                                 generator=torch.Generator().manual_seed(0))

    row("VAR d6 token sampling (KV cache, batch 4)", side_by_side(sample, repeats), batch, "img")

    drawn = sample("fp32")
    decoded = {}

    def decode(precision):
        with torch.no_grad(), autocast(precision):
            decoded[precision] = vae.tokens_to_uint8_image(drawn)

    seconds = side_by_side(decode, repeats)
    difference = (decoded["fp32"].int() - decoded["bf16"].int()).abs()
    row("VQVAE ch160 decode (4 images, 256px)", seconds, batch, "img",
        f"uint8 pixels: mean |diff| {difference.float().mean():.2f}, max {difference.max()}, "
        f"{(difference > 2).float().mean():.1%} differ by > 2 levels")

    images = torch.rand(batch, 3, 256, 256) * 2 - 1
    encoded = {}

    def encode(precision):
        with torch.no_grad(), autocast(precision):
            encoded[precision] = torch.cat(vae.image_to_tokens(images), 1)

    seconds = side_by_side(encode, repeats)
    changed = (encoded["fp32"] != encoded["bf16"]).float().mean()
    row("VQVAE ch160 encode + quantize (extraction, 4 images)", seconds, batch, "img",
        f"{changed:.1%} of token ids differ from fp32")

    torch.manual_seed(0)
    demo = VAR(vocab_size=512, z_channels=16, num_classes=10, depth=4, embed_dim=128, num_heads=4, patch_nums=(1, 2, 3, 4))
    demo.init_weights()
    demo.eval()
    demo_vae = VQVAE(vocab_size=512, z_channels=16, ch=32, patch_nums=(1, 2, 3, 4)).eval()
    demo_labels = torch.arange(50) % 10

    def sample_demo(precision):
        sample(precision, demo, demo_vae.quantize, demo_labels)

    row("demo-size VAR (d4, w128) token sampling, batch 50", side_by_side(sample_demo, repeats), 50, "img")


def trained_row(var_path: str, vae_path: str, repeats: int) -> None:
    """The project's generation path (models.generate_batch: sampling under the precision, fp32 decode)."""
    from var_train.models import SamplingSettings, generate_batch
    from var_train.models.checkpoint_io import load_vae, load_var

    var = load_var(var_path).eval()
    vae = load_vae(vae_path, patch_nums=list(var.patch_nums)).eval()
    labels = torch.arange(32) % var.num_classes
    images = {}

    def generate(precision):
        settings = SamplingSettings(cfg=2.0, top_k=0, top_p=0.0, seed=0, precision=precision)
        images[precision] = generate_batch(var, vae, labels, range(len(labels)), settings)

    seconds = side_by_side(generate, repeats)
    same = (images["fp32"] == images["bf16"]).all(dim=(1, 2, 3)).float().mean()
    row(f"trained {Path(var_path).name}: generate_batch (sample + fp32 decode), batch 32", seconds, 32, "img",
        f"{same:.0%} of the images identical to fp32")


if __name__ == "__main__":
    main()
