"""Fine-tuning against training from scratch on new classes (BENCHMARKS.md "Fine-tuning").

scikit-learn's digits, the demo's pieces (16px, a small tokenizer trained on all ten digits, the
demo recipe, 2 FSDP2 processes over gloo):
  1. pretrain a VAR on digits 0-4 for --pretrain-steps;
  2. fine-tune it on digits 5-9 (5 new classes: model.reinit=[class_emb], the null row carried
     over) for --steps, against a fresh VAR trained on 5-9 for the same --steps, same recipe;
  3. score both: training loss per step, FID with a digits classifier's features (trained on 5-9)
     against the real 5-9 digits, and that classifier's accuracy on the generated digits.
Writes <out>/results.json, <out>/curve.png (loss per step, both runs) and prints a Markdown table.

    python benchmarks/bench_finetune.py --out bench_out/finetune --pretrain-steps 300 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402


def class_subset(images: Path, digits: list[int], out: Path) -> Path:
    """An ImageFolder of some digits (copies); ImageFolder labels follow the sorted folder names."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for digit in digits:
        shutil.copytree(images / str(digit), tmp / str(digit))
    tmp.rename(out)
    return out


def train(run_dir: Path, shards: Path, vae: Path, steps: int, *overrides: str) -> float:
    """torchrun, 2 processes, the demo recipe with 5 classes; returns wall seconds."""
    from var_train.cli.demo_pipeline import _free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "var_train.cli", "train",
               "--recipe", str(REPO_ROOT / "recipes" / "demo.yaml"), f"data.train_shards={shards}",
               f"data.vae={vae}", f"run.output_dir={run_dir}", "model.num_classes=5", f"optim.max_steps={steps}",
               "logging.log_every=1", "logging.wandb_mode=disabled", "checkpoint.every_steps=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    (run_dir.parent / f"{run_dir.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"training {run_dir} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - started


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/finetune")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning and from-scratch steps")
    parser.add_argument("--tokenizer-minutes", type=float, default=6.0, help="tokenizer time budget (default 6)")
    parser.add_argument("--tokenizer-steps", type=int, default=400, help="tokenizer step budget (default 400)")
    parser.add_argument("--per-class", type=int, default=40, help="generated digits per class for FID/accuracy")
    args = parser.parse_args()

    from data_prep.demo_data import write_demo_data
    from data_prep.extract import ExtractConfig, extract_tokens
    from var_train.checkpoint import export_checkpoint, latest_checkpoint
    from var_train.cli.demo_pipeline import DEMO_TOKENIZER
    from var_train.evaluation.classifier import train_classifier
    from var_train.evaluation.reference_stats import compute_fid_stats
    from var_train.evaluation.standalone import EvalSettings, evaluate_checkpoint
    from var_train.models import SamplingSettings
    from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images = out / "images"
    if not (images / "9").is_dir():
        write_demo_data(images, resolution=16, progress=False)
    vae = out / "tokenizer" / "vae.safetensors"
    if not vae.is_file():  # one tokenizer for all ten digits, as the released VAE serves any class set
        preset = dict(DEMO_TOKENIZER, max_minutes=args.tokenizer_minutes, max_steps=args.tokenizer_steps)
        result = train_tokenizer(TokenizerTrainingConfig(data_dir=str(images), output_dir=str(out / "tokenizer"),
                                                         seed=0, **preset))
        if Path(result.model_path) != vae:
            shutil.copyfile(result.model_path, vae)
    splits = {"old": [0, 1, 2, 3, 4], "new": [5, 6, 7, 8, 9]}
    shards = {}
    for name, digits in splits.items():
        folder = class_subset(images, digits, out / f"images_{name}")
        shards[name] = out / f"shards_{name}"
        if not (shards[name] / "manifest.json").is_file():
            extract_tokens(ExtractConfig(source=str(folder), vae=str(vae), out=str(shards[name]), resolution=16,
                                         patch_nums=(1, 2, 3, 4), shard_size=512, batch_size=128, num_workers=0,
                                         progress=False))

    seconds = {}
    pretrained = out / "pretrain_0-4"
    if not (pretrained / "metrics.jsonl").is_file():
        seconds["pretrain"] = train(pretrained, shards["old"], vae, args.pretrain_steps)
    runs = {"fine-tuned from 0-4": (out / "finetune_5-9", [f"model.init_from={pretrained}", "model.reinit=[class_emb]"]),
            "from scratch": (out / "scratch_5-9", [])}
    for label, (run_dir, extra) in runs.items():
        if not (run_dir / "metrics.jsonl").is_file():
            seconds[label] = train(run_dir, shards["new"], vae, args.steps, *extra)

    classifier = out / "classifier_5-9.safetensors"
    if not classifier.is_file():  # labels 0..4 = digits 5..9, as in the fine-tuning data
        train_classifier(out / "images_new", classifier)
    reference = out / "reference_5-9.npz"
    if not reference.is_file():
        compute_fid_stats(out=reference, images=out / "images_new", feature_extractor=str(classifier), progress=False)

    results = {"machine": machine(), "pretrain_steps": args.pretrain_steps, "steps": args.steps,
               "per_class": args.per_class, "train_seconds": seconds, "runs": {}}
    for label, (run_dir, _) in runs.items():
        var_path = run_dir / "var.safetensors"
        if not var_path.is_file():
            export_checkpoint(latest_checkpoint(run_dir / "checkpoints"), var_path)
        settings = EvalSettings(SamplingSettings(cfg=2.0, top_k=0, top_p=0.0, seed=0), per_class=args.per_class,
                                feature_extractor=str(classifier), precision_recall=False)
        report = evaluate_checkpoint(var_path, vae, run_dir / "eval", reference=reference, settings=settings,
                                     progress=False)
        curve = losses(run_dir)
        last = [curve[s] for s in sorted(curve)[-10:]]
        results["runs"][label] = {"loss_first": curve[min(curve)], "loss_last10_mean": sum(last) / len(last),
                                  "fid": report["fid"], "class_accuracy": report["class_accuracy"],
                                  "curve": curve}
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, run in results["runs"].items():
        steps = sorted(run["curve"])
        axis.plot(steps, [run["curve"][s] for s in steps], label=label)
    axis.set_xlabel("optimizer step (batch 64)")
    axis.set_ylabel("train loss (digits 5-9)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=120)

    print(f"machine: {results['machine']}; pretrain {args.pretrain_steps} steps on 0-4, then {args.steps} steps on 5-9")
    print("| run (digits 5-9) | loss at step 1 | loss, mean of last 10 steps | FID (digits classifier) | class accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for label, run in results["runs"].items():
        print(f"| {label} | {run['loss_first']:.3f} | {run['loss_last10_mean']:.3f} | {run['fid']:.2f} | "
              f"{run['class_accuracy']:.1%} |")
    marks = [s for s in (1, 5, 10, 25, 50, 75, 100, 150, 200, 300) if s <= args.steps]
    print("\n| train loss at step | " + " | ".join(str(s) for s in marks) + " |")
    print("| --- |" + " --- |" * len(marks))
    for label, run in results["runs"].items():
        print(f"| {label} | " + " | ".join(f"{run['curve'][s]:.3f}" for s in marks) + " |")
    print(f"curve: {out / 'curve.png'}; {results['total_seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    main()
