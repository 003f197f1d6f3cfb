"""`var-train scaling demo`: a real scaling-law curve on this CPU, from scikit-learn's digits.

    digits -> 16px ImageFolder, split per class into train (6/7) and held-out val (1/7)
    -> the demo's small multi-scale VQVAE, trained on the train split only (or --vae to reuse one)
    -> train shards with N seeded random crops per image (--crops: shifts of up to 2 px, a new
       variant each epoch) and centre-crop val shards
    -> one VAR per depth (default 1 2 3 4 5; width 32 x depth, one head per 32 channels), each
       trained by 2 processes (FSDP2 over gloo) on the same data for the same epochs, validated
       on the held-out shards 8 times (each point with its cumulative training FLOPs)
    -> `var-train scaling fit` of the runs: fit.json, fit.md and the log-log plots in OUT/fit
Like the demo (cli/demo_pipeline.py, whose tokenizer preset and launcher it reuses), it lives in
the command layer because it drives both data_prep and var_train; a stage whose output exists is
skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from var_train.errors import StageFailedError
from var_train.fileio import write_bytes_atomic, write_json_atomic

from .demo_pipeline import DEMO_TOKENIZER, REPO_RECIPES, DemoConfig, Stages, _train_var

VAL_EVERY_NTH = 7  # every 7th image of each class (about 14%, 257 images) is held out


@dataclass
class ScalingDemoConfig:
    out: str = "scaling_demo"
    depths: tuple[int, ...] = (1, 2, 3, 4, 5)
    width_per_depth: int = 32  # embed_dim = width_per_depth x depth; heads of 32 channels
    epochs: float = 10
    base_lr: float = 4e-3  # peak 1e-3 at batch 64: demo.yaml's 2.5e-4 leaves the small models far from done
    crops: int = 8
    validations: int = 8  # validations per run (the points of its curve against compute)
    nproc: int = 2
    vae: str | None = None
    tokenizer_minutes: float = 2.0
    seed: int = 0
    train_overrides: list[str] = field(default_factory=list)
    recipe: str = str(REPO_RECIPES / "demo.yaml")


def split_train_val(images: Path, out: Path, every_nth: int = VAL_EVERY_NTH) -> tuple[Path, Path]:
    """Per class, sorted files: every n-th to val/, the rest to train/ (hard links where possible)."""
    train, val = out / "train", out / "val"
    if (out / "done").is_file():
        return train, val
    shutil.rmtree(out, ignore_errors=True)
    for class_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        for index, path in enumerate(sorted(class_dir.glob("*.png"))):
            target = (val if index % every_nth == 0 else train) / class_dir.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    (out / "done").write_text("")
    return train, val


def _finished(run_dir: Path) -> bool:
    from var_train.scaling.summary import read_summary

    summary = read_summary(run_dir)
    return bool(summary and summary.get("finished"))


def run_scaling_demo(cfg: ScalingDemoConfig) -> dict:
    from data_prep.demo_data import write_demo_data
    from data_prep.extract import ExtractConfig, extract_tokens
    from var_train.data import read_manifest
    from var_train.scaling.report import write_report
    from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images, split = out / "images", out / "split"
    stages = Stages(total=4 + len(cfg.depths))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    stages.begin("data", f"scikit-learn digits -> 16px, 1 in {VAL_EVERY_NTH} held out per class")
    if not ((images / "9").is_dir() and len(list(images.glob("*/*.png"))) == 1797):
        write_demo_data(images, resolution=16)
    train_images, val_images = split_train_val(images, split)

    preset = dict(DEMO_TOKENIZER, max_minutes=cfg.tokenizer_minutes)
    vae_path = Path(cfg.vae) if cfg.vae else out / "tokenizer" / "vae.safetensors"
    stages.begin("tokenizer", f"reusing {vae_path}" if cfg.vae else
                 f"the demo's VQVAE on the train split, about {cfg.tokenizer_minutes:g} minutes")
    if vae_path.is_file():
        stages.skip(vae_path)
    else:
        result = train_tokenizer(TokenizerTrainingConfig(data_dir=str(train_images), output_dir=str(out / "tokenizer"),
                                                         seed=cfg.seed, **preset))
        if result.exit_code != 0:
            raise StageFailedError(f"tokenizer training exited with {result.exit_code}; run again to resume it",
                                   exit_code=result.exit_code)
        if Path(result.model_path) != vae_path:
            write_bytes_atomic(vae_path, Path(result.model_path).read_bytes())

    shards = {"train": out / "shards" / "train", "val": out / "shards" / "val"}
    stages.begin("token shards", f"train: {cfg.crops} random crops per image; val: centre crops")
    for name, source, crops in (("train", train_images, cfg.crops), ("val", val_images, 1)):
        if (shards[name] / "manifest.json").is_file():
            stages.skip(shards[name])
            continue
        extract_tokens(ExtractConfig(source=str(source), vae=str(vae_path), out=str(shards[name]), resolution=16,
                                     patch_nums=tuple(preset["patch_nums"]), crops=crops, seed=cfg.seed,
                                     shard_size=512, batch_size=128, num_workers=0, progress=False))

    records = read_manifest(shards["train"]).num_records
    steps = int(cfg.epochs * (records // 64))  # demo.yaml: global batch 64 (2 ranks x 32)
    val_every = max(1, steps // cfg.validations)
    run_dirs = []
    for depth in cfg.depths:
        width = cfg.width_per_depth * depth
        run_dir = out / "runs" / f"d{depth}"
        run_dirs.append(run_dir)
        stages.begin(f"VAR d{depth}", f"width {width}, {depth} heads, {cfg.epochs:g} epochs, {cfg.nproc} processes")
        if _finished(run_dir):
            stages.skip(run_dir / "summary.json")
            continue
        overrides = [f"model.depth={depth}", f"model.embed_dim={width}", f"model.num_heads={depth}",
                     f"optim.epochs={cfg.epochs}", f"optim.base_lr={cfg.base_lr}", f"data.val_shards={shards['val']}",
                     f"run.val_every_steps={val_every}", "run.val_batches=1000", "checkpoint.every_steps=0",
                     "logging.log_every=50",
                     "logging.wandb_group=scaling-demo", f"logging.wandb_run_name=scaling-demo-d{depth}",
                     *cfg.train_overrides]
        _train_var(DemoConfig(nproc=cfg.nproc, seed=cfg.seed, recipe=cfg.recipe, train_overrides=overrides),
                   shards["train"], vae_path, run_dir)

    stages.begin("fit", f"L = (beta X)^alpha over {len(run_dirs)} sizes -> {out / 'fit'}")
    report = write_report(run_dirs, out / "fit")
    stages.end()
    summary = {"fits": {k: f.as_dict() for k, f in report.fits.items()}, "stage_seconds": stages.seconds,
               "total_seconds": round(time.perf_counter() - stages.started, 1),
               "runs": [str(p) for p in run_dirs], "files": {k: str(v) for k, v in report.files.items()}}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + report.files["fit.md"].read_text())
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    plots = [str(path) for name, path in report.files.items() if name.endswith(".png")]  # what was written
    print(f"plots: {', '.join(plots)}; {summary['total_seconds'] / 60:.1f} minutes")
    return summary
