"""Sampling speed against the reference code (FoundationVision/VAR), side by side in one run.

    git clone https://github.com/FoundationVision/VAR /tmp/ref_var      # never inside this repository
    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_vs_reference.py \
        --reference-repo /tmp/ref_var [--depth 6] [--batch 4] [--repeats 3] [--precisions fp32,auto]

Builds the reference's VQVAE (ch 160, vocab 4096, z 32) and VAR d{depth} (1000 classes, 256px
scales 1..16) with its own `build_vae_var` and a seeded random initialisation, and loads the very
same weights into ours (strict both ways, which also proves the architectures are the same). Before
timing it checks what must agree exactly: the teacher-forcing input built from one set of tokens,
the logits of one forward pass (same input, same weights) and the decode of one set of tokens;
and, for one image with the reference's generator seeded to our stream of sample 0, whether the
two samplers draw the same tokens and pixels.

Then, alternating the contestants within each repeat (a busy neighbour slows all alike), after one
warm-up each, median over repeats, for `batch` images with cfg 1.5, top-k 900, top-p 0.96:
the reference's `autoregressive_infer_cfg` (returns decoded images) against ours end to end
(`models.generate_batch`) at each `--precisions` entry. The decode part of both is timed by
wrapping the decode method of the VQVAE instance from the outside (`fhat_to_img` of the
reference's, `tokens_to_uint8_image` of ours): tokens = total - decode. "CPU s" is this process's
CPU time (time.process_time), which a busy neighbour on a small machine distorts less than wall
time; each run's load average goes to stderr. Models are randomly initialised (trained weights have
the same FLOPs and kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from var_train.models import VAR, VQVAE, SamplingSettings, generate_batch, sample_generator  # noqa: E402
from var_train.models.checkpoint_io import load_state_dict_strict  # noqa: E402
from var_train.models.sampling import sampling_autocast  # noqa: E402
from var_train.precision import describe_cpu_bf16  # noqa: E402

CFG, TOP_K, TOP_P = 1.5, 900, 0.96
# The reference's build_vae_var turns these classes' reset_parameters into no-ops for the whole
# process ("disable built-in initialization for speed"); we put them back after building.
PATCHED_BY_REFERENCE = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm,
                        torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d)


def check_reference_repo(path: str | None) -> Path:
    repo = Path(path) if path else None
    if repo is None or not (repo / "models" / "var.py").is_file() or not (repo / "dist.py").is_file():
        print(f"error: --reference-repo {path or '(not given)'} is not a checkout of the reference code "
              f"(needs models/var.py and dist.py); get it with `git clone https://github.com/FoundationVision/VAR "
              f"/tmp/ref_var` (outside this repository) and pass --reference-repo /tmp/ref_var")
        sys.exit(2)
    return repo


def build_reference(repo: Path, depth: int, seed: int):
    """The reference's VQVAE and VAR, built by its own build_vae_var; its VAE convolutions (left
    uninitialised by the patched reset_parameters) get PyTorch's default init from `seed`."""
    originals = {cls: cls.reset_parameters for cls in PATCHED_BY_REFERENCE}
    sys.path.insert(0, str(repo))
    try:
        import models as reference_models  # the reference's package, found through `repo` only
    except ImportError as error:
        print(f"error: cannot import the reference code from {repo}: {error} (install what it needs into this "
              f"environment, e.g. `.venv/bin/pip install huggingface_hub`)")
        sys.exit(2)
    finally:
        sys.path.remove(str(repo))
    torch.manual_seed(seed)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its constructor prints a banner
            vae, var = reference_models.build_vae_var(device="cpu", depth=depth, V=4096, Cvae=32, ch=160,
                                                      num_classes=1000, flash_if_available=False,
                                                      fused_if_available=False)
    finally:
        for cls, reset in originals.items():
            cls.reset_parameters = reset
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, PATCHED_BY_REFERENCE):
                module.reset_parameters()
    return vae.eval(), var.eval()


def build_ours_from(reference_vae, reference_var, depth: int):
    """Ours with the reference's weights, loaded strict; then loaded back into the reference
    strict (the key sets and shapes are the same both ways)."""
    vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, patch_nums=tuple(reference_var.patch_nums))
    var = VAR(vocab_size=4096, z_channels=32, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
              drop_path_rate=0.1 * depth / 24, attn_l2_norm=True, patch_nums=tuple(reference_var.patch_nums))
    load_state_dict_strict(vae, reference_vae.state_dict(), "reference VQVAE")
    load_state_dict_strict(var, reference_var.state_dict(), "reference VAR")
    reference_vae.load_state_dict(vae.state_dict(), strict=True)
    reference_var.load_state_dict(var.state_dict(), strict=True)
    return vae.eval(), var.eval()


@torch.no_grad()
def agreement(reference_vae, reference_var, vae: VQVAE, var: VAR, seed: int) -> list[str]:
    """What must agree exactly (up to float rounding), as printable lines."""
    lines = []
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, 4096, (2, pn * pn), generator=generator) for pn in var.patch_nums]
    labels = torch.tensor([3, 707])
    ours_input = vae.quantize.tokens_to_teacher_input(tokens)
    reference_input = reference_vae.quantize.idxBl_to_var_input(tokens)
    lines.append(f"teacher-forcing input from the same tokens: max |ours - reference| "
                 f"{(ours_input - reference_input).abs().max():.2e}")
    reference_var.cond_drop_rate = 0.0  # its forward drops labels even in eval mode; not here
    ours_logits = var(labels, reference_input)
    reference_logits = reference_var(labels, reference_input)
    lines.append(f"logits of one forward pass (batch 2, L {var.num_tokens}, same input): max |ours - reference| "
                 f"{(ours_logits - reference_logits).abs().max():.2e} (logits std {reference_logits.std():.2f})")
    one = [t[:1] for t in tokens]
    ours_image = vae.tokens_to_image(one)
    reference_image = reference_vae.idxBl_to_img(one, same_shape=True, last_one=True)
    lines.append(f"decode of the same tokens (1 image, [-1, 1]): max |ours - reference| "
                 f"{(ours_image - reference_image).abs().max():.2e}")
    # One image, the reference's generator seeded with our stream of sample 0: the same draws if the
    # guided, filtered probabilities agree.
    settings = SamplingSettings(cfg=CFG, top_k=TOP_K, top_p=TOP_P, seed=seed, precision="fp32")
    stream_seed = sample_generator(seed, 0).initial_seed()
    ours_pixels = generate_batch(var, vae, labels[:1], [0], settings)
    reference_pixels = to_uint8(reference_var.autoregressive_infer_cfg(1, labels[:1], g_seed=stream_seed, cfg=CFG,
                                                                       top_k=TOP_K, top_p=TOP_P, more_smooth=False))
    difference = (ours_pixels.int() - reference_pixels.int()).abs()
    lines.append(f"one image sampled with the same random stream (cfg {CFG}, top-k {TOP_K}, top-p {TOP_P}): "
                 f"uint8 pixels max |diff| {difference.max()}, {(difference > 0).float().mean():.2%} differ")
    return lines


def to_uint8(image_01: torch.Tensor) -> torch.Tensor:
    """The reference's [0, 1] images in our uint8 convention ((x + 1) * 127.5, rounded)."""
    return image_01.mul(255).round().clamp(0, 255).to(torch.uint8)


class DecodeClock:
    """Seconds spent in one method of one object, wrapped from the outside (the class is untouched)."""

    def __init__(self, owner, method_name: str):
        self.seconds = 0.0
        original = getattr(owner, method_name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, method_name, timed)  # an instance attribute shadows the bound method


def contestants(reference_vae, reference_var, vae: VQVAE, var: VAR, labels: torch.Tensor, precisions: list[str]):
    """name -> (run(repeat) -> images, decode clock)."""
    reference_clock = DecodeClock(reference_vae, "fhat_to_img")
    ours_clock = DecodeClock(vae, "tokens_to_uint8_image")
    batch = len(labels)

    def reference(repeat: int):
        return reference_var.autoregressive_infer_cfg(batch, labels, g_seed=repeat, cfg=CFG, top_k=TOP_K,
                                                      top_p=TOP_P, more_smooth=False)

    def ours(precision: str):
        def run(repeat: int):
            settings = SamplingSettings(cfg=CFG, top_k=TOP_K, top_p=TOP_P, seed=repeat, precision=precision)
            return generate_batch(var, vae, labels, range(batch), settings)
        return run

    entries = {"reference (fp32, its autoregressive_infer_cfg)": (reference, reference_clock)}
    for precision in precisions:
        autocasting = isinstance(sampling_autocast(var, labels.device, precision), torch.autocast)
        resolved = "bf16 autocast" if autocasting else "fp32"
        entries[f"ours, precision={precision} (tokens in {resolved}, decode fp32)"] = (ours(precision), ours_clock)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", help="a checkout of https://github.com/FoundationVision/VAR")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported), after one warm-up")
    parser.add_argument("--precisions", default="fp32,auto", help="ours at each of these (fp32, auto, bf16)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    repo = check_reference_repo(args.reference_repo)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in ("fp32", "auto", "bf16") for p in precisions):
        print(f"error: --precisions takes fp32, auto and bf16, got {args.precisions!r}")
        sys.exit(2)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    print(f"# {machine()}; {describe_cpu_bf16()}")
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}; torch threads {torch.get_num_threads()} "
          f"(interop {torch.get_num_interop_threads()}); load average at start {load_at_start[0]:.2f} "
          f"{load_at_start[1]:.2f} {load_at_start[2]:.2f}")

    reference_vae, reference_var = build_reference(repo, args.depth, args.seed)
    vae, var = build_ours_from(reference_vae, reference_var, args.depth)
    params = sum(p.numel() for p in var.parameters()) / 1e6
    print(f"# VAR d{args.depth} ({params:.1f}M params, L {var.num_tokens}, {vae.resolution}px) + VQVAE ch160: "
          f"the same weights in both (strict load both ways); batch {args.batch}, cfg {CFG}, top-k {TOP_K}, "
          f"top-p {TOP_P}")
    for line in agreement(reference_vae, reference_var, vae, var, args.seed):
        print(f"# check: {line}", flush=True)

    labels = (torch.arange(args.batch) * 97 + 1) % 1000
    entries = contestants(reference_vae, reference_var, vae, var, labels, precisions)
    totals = {name: [] for name in entries}
    decodes = {name: [] for name in entries}
    cpu_seconds = {name: [] for name in entries}  # this process's CPU time: less sensitive to busy neighbours
    images = {}
    for repeat in range(args.repeats + 1):  # round 0 is the warm-up
        for name, (run, clock) in entries.items():
            clock.seconds = 0.0
            load = os.getloadavg()[0]
            started, cpu_started = time.perf_counter(), time.process_time()
            images[name] = run(repeat)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            print(f"  {'warm-up' if repeat == 0 else f'repeat {repeat}'}: {name}: {elapsed:.2f} s "
                  f"(decode {clock.seconds:.2f} s; CPU {cpu:.2f} s; load average before {load:.2f})",
                  file=sys.stderr, flush=True)
            if repeat > 0:
                totals[name].append(elapsed)
                decodes[name].append(clock.seconds)
                cpu_seconds[name].append(cpu)

    reference_name = next(iter(entries))
    reference_total = statistics.median(totals[reference_name])
    reference_tokens = statistics.median(t - d for t, d in zip(totals[reference_name], decodes[reference_name]))
    reference_decode = statistics.median(decodes[reference_name])
    reference_cpu = statistics.median(cpu_seconds[reference_name])
    print()
    print(f"| sampler (batch {args.batch}, median of {args.repeats}) | s per batch | images/s | speed-up vs reference "
          f"| tokens s (speed-up) | decode s (speed-up) | CPU s per batch (speed-up) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in entries:
        total = statistics.median(totals[name])
        tokens = statistics.median(t - d for t, d in zip(totals[name], decodes[name]))
        decode = statistics.median(decodes[name])
        cpu = statistics.median(cpu_seconds[name])
        print(f"| {name} | {total:.2f} | {args.batch / total:.3f} | {reference_total / total:.2f}x | "
              f"{tokens:.2f} ({reference_tokens / tokens:.2f}x) | {decode:.2f} ({reference_decode / decode:.2f}x) | "
              f"{cpu:.2f} ({reference_cpu / cpu:.2f}x) |")

    reference_images = images[reference_name]
    for name in list(entries)[1:]:
        ours = images[name]
        print(f"# images: {name}: {tuple(ours.shape)} {ours.dtype} in [{ours.min()}, {ours.max()}]; reference "
              f"{tuple(reference_images.shape)} {reference_images.dtype} in [{reference_images.min():.3f}, "
              f"{reference_images.max():.3f}] (x255 -> [{to_uint8(reference_images).min()}, "
              f"{to_uint8(reference_images).max()}]); same shape: {ours.shape == reference_images.shape}")
    load_at_end = os.getloadavg()
    print(f"# load average at end {load_at_end[0]:.2f} {load_at_end[1]:.2f} {load_at_end[2]:.2f}")


if __name__ == "__main__":
    main()
