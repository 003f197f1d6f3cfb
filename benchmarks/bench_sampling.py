"""Sampling throughput (KV-cached, guided), evaluation cost, and evaluation overhead against training.

    python benchmarks/bench_sampling.py                 # tiny, demo and depth-6/256px configs
    python benchmarks/bench_sampling.py --configs tiny  # quick

Prints, per configuration: token sampling (VAR, cfg 1.5, top-k 900, top-p 0.96, KV cache),
decoding (VQVAE decoder) and feature extraction images/s; the time of a 50,000-sample evaluation
extrapolated from them; and, for the digits demo recipe, the share of training time that its
evaluation schedule costs (measured sample/score time against a measured train step).
Feature extraction with Inception is timed on the untrained network (the same FLOPs as the real
one; the weights file is not needed for timing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, time_it  # noqa: E402
from var_train.evaluation.classifier import ClassifierConfig, ClassifierFeatureExtractor  # noqa: E402
from var_train.evaluation.inception import InceptionFeatureExtractor  # noqa: E402
from var_train.models import VAR, VQVAE, sample_tokens  # noqa: E402

CONFIGS = {
    # name: (VAR kwargs, VQVAE kwargs, batch size, feature extractor)
    "tiny": (dict(vocab_size=64, z_channels=8, num_classes=10, depth=2, embed_dim=64, num_heads=2,
                  patch_nums=(1, 2, 3, 4)),
             dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)), 16, "classifier"),
    "demo": (dict(vocab_size=512, z_channels=16, num_classes=10, depth=4, embed_dim=128, num_heads=4,
                  patch_nums=(1, 2, 3, 4)),
             dict(vocab_size=512, z_channels=16, ch=32, patch_nums=(1, 2, 3, 4)), 50, "classifier"),
    "d6-256px": (dict(vocab_size=4096, z_channels=32, num_classes=1000, depth=6),
                 dict(vocab_size=4096, z_channels=32, ch=160), 4, "inception"),
}


def build(name: str, seed: int = 0):
    var_kw, vae_kw, batch, extractor_kind = CONFIGS[name]
    torch.manual_seed(seed)
    var = VAR(**var_kw)
    var.init_weights(alng=1e-3)
    vae = VQVAE(**vae_kw)
    if extractor_kind == "inception":
        extractor = InceptionFeatureExtractor(random_init=True)
    else:
        extractor = ClassifierFeatureExtractor(ClassifierConfig(num_classes=10, class_names=list("0123456789")))
    return var.eval(), vae.eval(), batch, extractor


@torch.no_grad()
def bench_config(name: str, repeats: int) -> dict:
    var, vae, batch, extractor = build(name)
    device = torch.device("cpu")
    labels = torch.arange(batch) % var.num_classes
    generator = torch.Generator().manual_seed(0)
    tokens = sample_tokens(var, vae.quantize, labels, cfg=1.5, top_k=900, top_p=0.96, generator=generator)
    sample_s = time_it(lambda: sample_tokens(var, vae.quantize, labels, cfg=1.5, top_k=900, top_p=0.96,
                                             generator=generator), device, warmup=0, repeats=repeats)
    decode_s = time_it(lambda: vae.tokens_to_image(tokens), device, warmup=0, repeats=repeats)
    images = vae.tokens_to_image(tokens).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    feature_s = time_it(lambda: extractor(images), device, warmup=1, repeats=repeats)
    per_image = {"sample": sample_s / batch, "decode": decode_s / batch, "features": feature_s / batch}
    total = sum(per_image.values())
    return {
        "config": name, "batch": batch, "var_params_M": sum(p.numel() for p in var.parameters()) / 1e6,
        "resolution": vae.resolution, "sample_img_s": 1 / per_image["sample"], "decode_img_s": 1 / per_image["decode"],
        "feature_img_s": 1 / per_image["features"], "all_img_s": 1 / total,
        "eval_50k_hours": 50_000 * total / 3600, "extractor": extractor.name,
    }


def bench_demo_overhead(repeats: int) -> dict:
    """The demo recipe (recipes/demo.yaml): measured train step at micro-batch 32 against its
    evaluation (200 samples in batches of 50, cfg 2.0, classifier features) at the end."""
    var, vae, _, extractor = build("demo")
    device = torch.device("cpu")
    var.train()
    optimizer = torch.optim.AdamW(var.parameters(), lr=1e-3)
    micro_batch = 32
    labels = torch.arange(micro_batch) % 10
    with torch.no_grad():
        teacher_tokens = sample_tokens(var.eval(), vae.quantize, labels, cfg=0.0, generator=torch.Generator().manual_seed(1))
        teacher_input = vae.quantize.tokens_to_teacher_input(teacher_tokens)
    targets = torch.cat(teacher_tokens, dim=1)
    var.train()

    def step():
        logits = var(labels, teacher_input)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s = time_it(step, device, warmup=1, repeats=repeats)
    var.eval()
    num_samples, batch = 200, 50

    @torch.no_grad()
    def evaluate():
        for start in range(0, num_samples, batch):
            batch_labels = torch.arange(start, start + batch) % 10
            tokens = sample_tokens(var, vae.quantize, batch_labels, cfg=2.0, generator=torch.Generator().manual_seed(start))
            extractor(vae.tokens_to_image(tokens).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8))

    eval_s = time_it(evaluate, device, warmup=0, repeats=max(1, repeats // 2))
    # demo: 1,797 images, global batch 64 (2 ranks x 32) -> 28 steps/epoch x 30 epochs
    steps = 30 * (1797 // 64)
    return {"train_step_s": step_s, "eval_s": eval_s, "steps": steps,
            "share_at_end": eval_s / (steps * step_s),
            "share_every_200_steps": (steps // 200 + 1) * eval_s / (steps * step_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,demo,d6-256px", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--skip-overhead", action="store_true", help="skip the demo training-overhead estimate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print("| config | VAR params | px | batch | sample img/s | decode img/s | features img/s (extractor) | "
          "all img/s | 50k eval (h) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.configs.split(","):
        started = time.perf_counter()
        r = bench_config(name, args.repeats)
        print(f"| {r['config']} | {r['var_params_M']:.1f}M | {r['resolution']} | {r['batch']} | {r['sample_img_s']:.2f} | "
              f"{r['decode_img_s']:.2f} | {r['feature_img_s']:.2f} ({r['extractor']}) | {r['all_img_s']:.2f} | "
              f"{r['eval_50k_hours']:.2f} |", flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if not args.skip_overhead:
        o = bench_demo_overhead(args.repeats)
        print(f"demo recipe: train step (micro-batch 32) {o['train_step_s']:.3f} s, {o['steps']} steps -> "
              f"{o['steps'] * o['train_step_s'] / 60:.1f} min of training per rank; evaluation (200 samples, "
              f"classifier) {o['eval_s']:.1f} s = {100 * o['share_at_end']:.1f}% of training at the end only, "
              f"{100 * o['share_every_200_steps']:.1f}% with eval.every_steps=200")


if __name__ == "__main__":
    main()
