"""`var-train demo`: the whole pipeline on real data that ships with scikit-learn, on a CPU.

The demo is an orchestrator of both packages (data_prep's extraction, var_train's training and
evaluation), so it lives in the command layer, beside the command that starts it (cli/demo.py).

    digits (1,797 8x8 scans, 10 classes) -> 64px ImageFolder          (var-prep demo-data)
    -> multi-scale VQVAE tokenizer trained for a few minutes           (var-prep train-tokenizer)
    -> token shards                                                    (var-prep extract)
    -> a small VAR trained by 2 processes with FSDP2 over gloo         (torchrun ... var-train train)
    -> consolidated weights, a sample grid                             (var-train export / sample)
    -> FID / IS / precision / recall with a digits classifier's features, and the classifier's
       per-class accuracy on the generated digits                      (var-train eval)
Everything lands in one folder; each stage is skipped when its output is already there, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from var_train.errors import StageFailedError
from var_train.fileio import write_bytes_atomic, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_RECIPES = REPO_ROOT / "recipes"


# A tokenizer that learns in about two minutes on 2 CPU cores: the digits are 8x8 scans, so 16px
# (a 4x-downsampling VQVAE to a 4x4 grid, scales 1,2,3,4) loses nothing of them.
DEMO_TOKENIZER = dict(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2), encoder_blocks=1, decoder_blocks=1,
                      patch_nums=(1, 2, 3, 4), batch_size=32, lr=2e-3, dead_code_steps=20, checkpoint_every=200,
                      max_steps=100_000, num_workers=0,
                      # The time budget ends a quiet 2-core run after ~1,150 steps (BENCHMARKS.md); on a busy
                      # machine it ended after 88, and the whole demo scored FID 210 instead of 18.
                      min_steps=500)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    resolution: int = 16
    nproc: int = 2  # training processes (FSDP2 over gloo on a CPU)
    tokenizer_minutes: float = 2.0
    train_overrides: list[str] = field(default_factory=list)  # extra `section.key=value` for the VAR recipe
    samples_per_class: int = 20
    cfg: float = 2.0
    seed: int = 0
    recipe: str = str(REPO_RECIPES / "demo.yaml")
    precision: str = "auto"  # VAR training (bf16 on CPUs with native bf16) and sampling (auto = fp32 on CPUs)


class Stages:
    """Numbered, timed stage headers on the console."""

    def __init__(self, total: int):
        self.total, self.index, self.started = total, 0, time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def begin(self, name: str, detail: str = "") -> None:
        self.end()
        self.index += 1
        print(f"\n[{self.index}/{self.total}] {name}" + (f": {detail}" if detail else ""), flush=True)
        self._current = (name, time.perf_counter())

    def skip(self, what: Path) -> None:
        print(f"  already done ({what}), skipping", flush=True)

    def end(self) -> None:
        if self._current is not None:
            name, started = self._current
            self.seconds[name] = round(time.perf_counter() - started, 1)
            self._current = None


def _train_var(cfg: DemoConfig, shards: Path, vae: Path, run_dir: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               "-m", "var_train.cli", "train", "--recipe", cfg.recipe, f"data.train_shards={shards}",
               f"data.vae={vae}", f"run.output_dir={run_dir}", f"run.seed={cfg.seed}",
               f"parallel.precision={cfg.precision}", *cfg.train_overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    print("  " + " ".join(command), flush=True)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    relay = _StderrRelay(process)
    relay.start()
    try:
        returncode = process.wait()
    except BaseException:  # Ctrl-C: subprocess.run would SIGKILL torchrun at once and orphan its ranks
        _wait_for_training_to_stop(process)
        relay.join(timeout=5)
        raise
    relay.join(timeout=5)
    if returncode != 0 and relay.torchrun_signal == signal.SIGINT:
        # Ctrl-C reached torchrun (which then exits 1) but not this process, as when only it was
        # signalled or this process ignores SIGINT (a background job of a script): the ranks have
        # saved, so it is the same interruption as ours, with the same line and exit code 130.
        raise KeyboardInterrupt
    if returncode != 0 and relay.torchrun_signal is not None:
        raise StageFailedError(f"VAR training was stopped by signal {relay.torchrun_signal} (its ranks save a "
                               f"checkpoint first); its run directory is {run_dir}: run the demo again to resume it")
    if returncode != 0:
        raise StageFailedError(f"VAR training exited with {returncode} (its output is above); its run directory "
                               f"is {run_dir}: run the demo again to resume it")


class _StderrRelay(threading.Thread):
    """`relay_without_torchrun_signal_report` of a torchrun process's stderr, on a thread; afterwards
    `torchrun_signal` is the signal torchrun reported receiving (None: it received none)."""

    def __init__(self, process: subprocess.Popen):
        super().__init__(daemon=True)
        # newline="": a progress bar's "\r" ends a piece but is passed on as it is, not as a new line.
        self.source = io.TextIOWrapper(process.stderr, encoding="utf-8", errors="replace", newline="")
        self.torchrun_signal: int | None = None

    def run(self) -> None:
        self.torchrun_signal = relay_without_torchrun_signal_report(self.source, sys.stderr)


def _wait_for_training_to_stop(process: subprocess.Popen, relay_seconds: float = 10.0,
                               term_seconds: float = 120.0) -> None:
    """After Ctrl-C: wait until torchrun and its ranks are gone, so that nothing keeps writing to the
    run directory once this command has returned. A terminal's Ctrl-C reached them too (the ranks
    save and exit; another press reaches them as well and they quit at once), so further presses
    are not a reason to stop waiting. If after `relay_seconds` torchrun still runs, only this
    process was signalled: pass SIGTERM on (the ranks save, as on preemption); kill after
    `term_seconds` more."""
    started, terminated = time.monotonic(), False
    while True:
        try:
            process.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:
            continue
        waited = time.monotonic() - started
        if not terminated and waited > relay_seconds:
            process.send_signal(signal.SIGTERM)
            terminated = True
        if waited > relay_seconds + term_seconds:
            process.kill()
            process.wait()
            return


TORCHRUN_SIGNAL_REPORT = re.compile(r"torch\.distributed\.elastic\.multiprocessing\.api\.SignalException: "
                                    r"Process \d+ got signal: (\d+)")


def relay_without_torchrun_signal_report(source: TextIO, sink: TextIO) -> int | None:
    """Copy torchrun's stderr (its ranks' included) line by line, leaving out one thing: the
    traceback torchrun prints for the signal it received (Ctrl-C). The ranks answer that signal
    themselves (checkpoint, one line, exit 130), so the traceback reads like a crash that did not
    happen. Every other traceback, the ranks' and torchrun's, is passed on whole.
    -> the signal number of the report left out (None: there was none)."""
    received: int | None = None
    held: list[str] | None = None
    for line in source:
        if held is None and line.startswith("Traceback (most recent call last):"):
            held = [line]
            continue
        if held is None:
            sink.write(line)
            sink.flush()
            continue
        held.append(line)
        if not line.startswith((" ", "\t")):  # the exception line ends the traceback
            report = TORCHRUN_SIGNAL_REPORT.search(line)
            if report:
                received = int(report[1])
            else:
                sink.writelines(held)
            held = None
    if held:
        sink.writelines(held)
    sink.flush()
    return received


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(cfg: DemoConfig) -> dict:
    from data_prep.demo_data import write_demo_data
    from data_prep.extract import ExtractConfig, extract_tokens
    from var_train.checkpoint import export_checkpoint, latest_checkpoint
    from var_train.evaluation.classifier import train_classifier
    from var_train.evaluation.reference_stats import compute_fid_stats
    from var_train.evaluation.standalone import EvalSettings, evaluate_checkpoint
    from var_train.generate import generate_images, write_samples
    from var_train.models import SamplingSettings
    from var_train.models.checkpoint_io import load_vae, load_var
    from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images, tokenizer_dir, shards = out / "images", out / "tokenizer", out / "shards"
    run_dir, var_path = out / "train", out / "var.safetensors"
    stages = Stages(total=7)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    stages.begin("demo data", f"scikit-learn digits -> {cfg.resolution}px ImageFolder in {images}")
    if (images / "9").is_dir() and len(list(images.glob("*/*.png"))) == 1797:
        stages.skip(images)
    else:
        write_demo_data(images, resolution=cfg.resolution)

    stages.begin("tokenizer", f"multi-scale VQVAE, about {cfg.tokenizer_minutes:g} minutes of training "
                              f"(at least {DEMO_TOKENIZER['min_steps']} steps however busy the machine)")
    preset = dict(DEMO_TOKENIZER, max_minutes=cfg.tokenizer_minutes)
    vae_path = tokenizer_dir / "vae.safetensors"
    if vae_path.is_file():
        stages.skip(vae_path)
    else:
        result = train_tokenizer(TokenizerTrainingConfig(data_dir=str(images), output_dir=str(tokenizer_dir),
                                                         seed=cfg.seed, **preset))
        if result.exit_code != 0:
            raise StageFailedError(f"tokenizer training exited with {result.exit_code}; run the demo again to "
                                   f"resume it", exit_code=result.exit_code)
        if result.model_path != vae_path:
            write_bytes_atomic(vae_path, Path(result.model_path).read_bytes())
        before, after = result.val_before.get("val/mse"), result.val_after.get("val/mse")
        if before is not None and after is not None:
            print(f"  held-out reconstruction MSE: {before:.4f} -> {after:.4f}", flush=True)

    stages.begin("token shards", f"{images} -> {shards}")
    if (shards / "manifest.json").is_file():
        stages.skip(shards)
    else:
        extract_tokens(ExtractConfig(source=str(images), vae=str(vae_path), out=str(shards),
                                     resolution=cfg.resolution, patch_nums=tuple(preset["patch_nums"]),
                                     shard_size=512, batch_size=128, num_workers=0, min_size=8))

    stages.begin("VAR training", f"{cfg.nproc} processes, FSDP2 over gloo, recipe {cfg.recipe}")
    if var_path.is_file():
        stages.skip(var_path)
    else:
        _train_var(cfg, shards, vae_path, run_dir)
        export_checkpoint(latest_checkpoint(run_dir / "checkpoints"), var_path)

    stages.begin("samples", f"{cfg.samples_per_class} per class, cfg {cfg.cfg}")
    var = load_var(var_path).eval()
    vae = load_vae(vae_path, patch_nums=list(var.patch_nums)).eval()
    labels = torch.arange(var.num_classes).repeat_interleave(8)
    sampling = SamplingSettings(cfg=cfg.cfg, top_k=0, top_p=0.0, seed=cfg.seed,  # the digits' 256 codes: no filter
                                precision=cfg.precision)
    grid = write_samples(generate_images(var, vae, labels, sampling), labels, out / "samples", per_row=8,
                         display_size=64)
    print(f"  sample grid: {grid}", flush=True)

    stages.begin("digits classifier", "the feature extractor for FID/IS on this data")
    classifier = out / "classifier.safetensors"
    if classifier.is_file():
        stages.skip(classifier)
    else:
        summary = train_classifier(images, classifier)
        print(f"  held-out accuracy {summary.val_accuracy:.1%}", flush=True)
    reference = out / "reference_stats.npz"
    if not reference.is_file():
        compute_fid_stats(out=reference, images=images, feature_extractor=str(classifier))

    stages.begin("evaluation", f"{cfg.samples_per_class} samples per class against the real digits")
    settings = EvalSettings(sampling, per_class=cfg.samples_per_class, feature_extractor=str(classifier),
                            precision_recall=True)
    report = evaluate_checkpoint(var_path, vae_path, out / "eval", reference=reference, settings=settings)
    stages.end()

    metrics = {k: report[k] for k in ("fid", "inception_score", "precision", "recall", "class_accuracy") if k in report}
    per_class = {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("class_accuracy/")}
    summary = {"metrics": metrics, "class_accuracy_per_class": per_class, "stage_seconds": stages.seconds,
               "total_seconds": round(time.perf_counter() - stages.started, 1), "sample_grid": str(grid),
               "metrics_jsonl": str(run_dir / "metrics.jsonl")}
    write_json_atomic(out / "summary.json", summary)
    print("\n== demo results ==")
    for name, value in metrics.items():
        print(f"  {name:16s} {value:.4g}")
    if per_class:
        print("  per-class accuracy of generated digits: "
              + "  ".join(f"{name}:{value:.0%}" for name, value in per_class.items()))
    print(f"  sample grid {grid}; everything in {out}; {summary['total_seconds'] / 60:.1f} minutes")
    return summary
