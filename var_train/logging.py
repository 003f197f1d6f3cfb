"""Metrics out of the training loop: one `log` call writes the console line, the JSONL file and W&B.

Only the main rank writes. W&B runs offline unless `logging.wandb_mode=online`; the run id is
kept in the trainer state so a resumed job continues the same W&B run. Nothing from the
environment (API keys included) is ever put into the logged config.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _format(name: str, value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)):
        return f"{name} {value:.3e}"
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    return f"{name} {value}"


CONSOLE_KEYS = ("train/loss", "train/loss_last_scale", "train/acc", "train/lr", "train/grad_norm",
                "perf/images_per_s", "perf/tokens_per_s", "perf/mfu", "perf/memory_gib",
                "val/loss", "val/acc", "eval/fid", "eval/inception_score", "eval/eval_seconds")


class MetricLogger:
    def __init__(self, logging_cfg, run_dir: str | Path, config_dict: dict, is_main: bool,
                 resume_run_id: str | None = None):
        self.cfg = logging_cfg
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.run_id = resume_run_id
        self._wandb_run = None
        self._jsonl = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        if logging_cfg.wandb_mode != "disabled":
            self._start_wandb(config_dict)

    def _start_wandb(self, config_dict: dict) -> None:
        import wandb

        if self.run_id is None:
            self.run_id = uuid.uuid4().hex[:8]  # known before init, so the checkpoint can carry it
        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb_run = wandb.init(
            project=self.cfg.wandb_project, entity=self.cfg.wandb_entity, name=self.cfg.wandb_run_name,
            tags=list(self.cfg.wandb_tags), config=config_dict, id=self.run_id, resume="allow",
            mode=self.cfg.wandb_mode, dir=str(self.run_dir),
        )
        # Charts use the trainer's step, not W&B's own counter: after a crash the resumed job
        # redoes the steps since the last checkpoint, which W&B would drop as going backwards.
        self._wandb_run.define_metric("trainer/step")
        self._wandb_run.define_metric("*", step_metric="trainer/step")

    def log(self, step: int, metrics: dict[str, float], images: dict | None = None, console: bool = True) -> None:
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if console:
            shown = [_format(k.split("/", 1)[1], metrics[k]) for k in CONSOLE_KEYS if k in metrics]
            print(f"step {step:>7d} | " + " | ".join(shown), file=sys.stdout, flush=True)
        if self._wandb_run is not None:
            payload = {"trainer/step": step, **metrics}
            if images:
                import wandb
                for name, (image, caption) in images.items():
                    payload[name] = wandb.Image(image, caption=caption)
            self._wandb_run.log(payload)

    def message(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
