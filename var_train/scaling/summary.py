"""What every training run records for the scaling laws: compute spent and held-out loss.

Compute: cumulative training FLOPs = the model's forward+backward FLOPs per image
(`VAR.train_flops_per_image`, the paper's count) x images seen by all ranks together (one global
batch per optimizer step, skipped non-finite steps included: their compute was spent). The count
lives in the trainer state of every checkpoint, so a resumed run continues it (and a run resumed
with another global batch adds its new batch size from then on).

`summary.json` in the run directory, rewritten atomically at every validation and when the run
stops: the run's size, its compute so far and its latest validation (val_loss = mean over all
tokens of every scale, as the reference's "L_mean"; *_last_scale = the last scale only, "L_tail";
error rate = 1 - token accuracy). `finished` is true only when the run reached its last step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from var_train.fileio import write_json_atomic

SUMMARY_FILE = "summary.json"
SUMMARY_KEYS = ("depth", "params", "train_flops", "images_seen", "val_loss", "val_loss_last_scale",
                "val_acc", "val_acc_last_scale")
# The validation metrics as logged (metrics.jsonl / W&B) -> their name in summary.json.
VALIDATION_KEYS = {"val/loss": "val_loss", "val/loss_last_scale": "val_loss_last_scale", "val/acc": "val_acc",
                   "val/acc_last_scale": "val_acc_last_scale", "val/error_rate": "val_error_rate",
                   "val/error_rate_last_scale": "val_error_rate_last_scale"}
IMAGES_SEEN, TRAIN_FLOPS = "progress/images_seen", "progress/train_flops"


@dataclass
class TrainingCompute:
    """Images seen and FLOPs spent by all ranks together since step 0 of the run."""

    flops_per_image: float
    images_seen: int = 0
    train_flops: float = 0.0

    def add_step(self, global_batch_size: int) -> None:
        self.images_seen += global_batch_size
        self.train_flops += global_batch_size * self.flops_per_image

    def metrics(self) -> dict[str, float]:
        return {IMAGES_SEEN: self.images_seen, TRAIN_FLOPS: self.train_flops}

    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen, "train_flops": self.train_flops}

    def load_state_dict(self, state: dict | None, *, step: int, global_batch_size: int) -> None:
        """`state` None (a checkpoint from before compute was recorded): step x global batch."""
        if state is None:
            self.images_seen = step * global_batch_size
            self.train_flops = self.images_seen * self.flops_per_image
        else:
            self.images_seen, self.train_flops = int(state["images_seen"]), float(state["train_flops"])


def format_count(count: float) -> str:
    """A parameter count readable at any size: 950, 31.2k, 3.1M, 2.0B (a d1 demo model is not "0M")."""
    value = float(count)
    for unit in ("", "k", "M", "B"):
        # compared after rounding, so 999,960 is "1.0M", not "1000.0k"
        if round(abs(value), 1) < 1000:
            return f"{value:.0f}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}T"


def validation_record(metrics: dict[str, float]) -> dict[str, float]:
    """Logged validation metrics -> summary.json fields."""
    return {name: float(metrics[key]) for key, name in VALIDATION_KEYS.items() if key in metrics}


def read_summary(run_dir: str | Path) -> dict | None:
    """summary.json of a run, or None if there is none (or it cannot be parsed)."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_summary(run_dir: str | Path, *, depth: int, params: int, embed_dim: int, compute: TrainingCompute,
                  step: int, total_steps: int, global_batch_size: int, finished: bool,
                  validation: dict | None) -> Path:
    """Write summary.json atomically. `validation`: summary fields of the latest validation plus
    its "val_step", "val_train_flops" and "val_images_seen" (None: no validation yet)."""
    summary = {
        "depth": depth, "params": params, "embed_dim": embed_dim, "flops_per_image": compute.flops_per_image,
        "train_flops": compute.train_flops, "images_seen": compute.images_seen, "global_batch_size": global_batch_size,
        "step": step, "total_steps": total_steps, "finished": finished,
        **{name: None for name in VALIDATION_KEYS.values()}, "val_step": None,
        **(validation or {}), "updated": time.time(),
    }
    return write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary)
