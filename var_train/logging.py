"""Metrics out of the training loop: one `log` call writes the console line, the JSONL file and W&B.

Only the main rank writes. W&B runs offline unless `logging.wandb_mode=online` (offline runs are
uploaded later with `wandb sync RUN_DIR/wandb/offline-run-*`); the run id is kept in the trainer
state and in `RUN_DIR/wandb_run.json`, so a resumed job, and `var-train eval` of the run, continue
the same W&B run. Nothing from the environment (API keys included) is ever put into the logged
config.

W&B is a window on the run, never a reason for it to fail: `metrics.jsonl` is written first and
keeps everything; any W&B error (its `wandb-core` service killed by Slurm's SIGTERM, a
ConnectionResetError or BrokenPipeError from `log` or `finish`, a failed `init`) is reported once,
W&B is switched off for the rest of the run, and training continues. `close()` never raises.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from var_train.fileio import LineAppender, write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_FILE = "wandb_run.json"
SAMPLES_DIR = "samples"


def _format(name: str, value: float) -> str:
    if name == "eta_seconds":
        return f"eta {format_duration(value)}"
    if isinstance(value, float) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)):
        return f"{name} {value:.3e}"
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    return f"{name} {value}"


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7 -> '7s'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


CONSOLE_KEYS = ("train/loss", "train/loss_last_scale", "train/acc", "train/lr", "train/grad_norm",
                "perf/images_per_s", "perf/tokens_per_s", "perf/mfu", "perf/memory_gib", "perf/eta_seconds",
                "val/loss", "val/loss_last_scale", "val/acc", "eval/fid", "eval/inception_score",
                "eval/class_accuracy", "eval/eval_seconds")


def _console_label(metrics: dict) -> str:
    """'train', 'val' or 'eval': what a console line reports, from its metrics' sections."""
    sections = {key.split("/", 1)[0] for key in metrics}
    for label in ("val", "eval", "samples"):
        if label in sections and "train" not in sections:
            return label
    return "train"


class MetricLogger:
    def __init__(self, logging_cfg, run_dir: str | Path, config_dict: dict, is_main: bool,
                 resume_run_id: str | None = None, resume_step: int | None = None):
        """`resume_step`: the step a resumed training job restarts from; rows of metrics.jsonl past
        it describe steps that will be trained again, and are dropped so that each step has one."""
        self.cfg = logging_cfg
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.run_id = resume_run_id
        self._wandb_run = None
        self._wandb_failed = False
        self._jsonl = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            dropped = drop_rows_after(self.run_dir / METRICS_FILE, resume_step)
            if dropped:
                print(f"{METRICS_FILE}: dropped {dropped} rows after step {resume_step} (steps since the checkpoint, "
                      f"trained again now)", flush=True)
        # Whole lines only (a full disk cuts the file back), a torn last line from a crash dropped on resume.
        self._jsonl = LineAppender(self.run_dir / METRICS_FILE)
        if self._jsonl.repaired:
            print(f"warning: dropped a partly written last line of {self.run_dir / METRICS_FILE} (a crash or full disk)",
                  flush=True)
        if logging_cfg.wandb_mode != "disabled":
            self._start_wandb(config_dict)

    # -- W&B, fenced off ---------------------------------------------------------------------------
    def _start_wandb(self, config_dict: dict) -> None:
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex[:8]  # known before init, so the checkpoint can carry it
        os.environ.setdefault("WANDB_SILENT", "true")

        def start():
            import wandb

            run = wandb.init(
                project=self.cfg.wandb_project, entity=self.cfg.wandb_entity, name=self.cfg.wandb_run_name,
                tags=list(self.cfg.wandb_tags), config=config_dict, id=self.run_id, resume="allow",
                mode=self.cfg.wandb_mode, dir=str(self.run_dir),
                group=getattr(self.cfg, "wandb_group", None) or None,
            )
            # Charts use the trainer's step, not W&B's own counter: after a crash the resumed job
            # redoes the steps since the last checkpoint, which W&B would drop as going backwards.
            run.define_metric("trainer/step")
            run.define_metric("*", step_metric="trainer/step")
            return run

        self._wandb_run = self._wandb("init", start)
        if self._wandb_run is not None:
            write_json_atomic(self.run_dir / WANDB_RUN_FILE, {
                "id": self.run_id, "project": self.cfg.wandb_project, "entity": self.cfg.wandb_entity,
                "mode": self.cfg.wandb_mode, "dir": str(self.run_dir)})

    def _wandb(self, what: str, call):
        """Run a W&B call; on any failure report it once, turn W&B off and return None."""
        if self._wandb_failed:
            return None
        try:
            return call()
        except Exception as error:  # noqa: BLE001 -- W&B must never stop training
            self._disable_wandb(what, error)
            return None

    def _disable_wandb(self, what: str, error: BaseException) -> None:
        self._wandb_failed = True
        self._wandb_run = None
        print(f"warning: W&B {what} failed ({type(error).__name__}: {error}); W&B is off for the rest of this "
              f"run, training continues and {self.run_dir / METRICS_FILE} keeps every metric", file=sys.stderr,
              flush=True)
        try:  # close the dead connection now, or wandb's atexit hook prints the same error again
            import wandb

            wandb.teardown()
        except Exception:  # noqa: BLE001
            pass

    @property
    def wandb_active(self) -> bool:
        return self._wandb_run is not None

    # -- logging -----------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float], images: dict | None = None, console: bool = True) -> None:
        """`images`: name -> (PIL image or array, caption), logged to W&B as wandb.Image."""
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if console:
            shown = [_format(k.split("/", 1)[1], metrics[k]) for k in CONSOLE_KEYS if k in metrics]
            label = _console_label(metrics)
            print(f"{label:<5s} step {step:>7d} | " + " | ".join(shown), file=sys.stdout, flush=True)
        if self._wandb_run is not None:
            run = self._wandb_run

            def send():
                payload = {"trainer/step": step, **metrics}
                if images:
                    import wandb
                    for name, (image, caption) in images.items():
                        payload[name] = wandb.Image(image, caption=caption)
                run.log(payload)

            self._wandb("log", send)

    def log_samples(self, step: int, name: str, images, labels: list[int], class_names: list[str] | None = None,
                    grid=None, save_grid: bool = True) -> Path | None:
        """Generated samples at `step`: the grid (a PIL image) saved as RUN_DIR/samples/<name>-<step>.png,
        and in W&B the grid plus a wandb.Table of (step, class id, class name, image), one row a sample.
        `images` uint8 (N, 3, H, W)."""
        if not self.is_main:
            return None
        names = [_class_name(label, class_names) for label in labels]
        path = None
        if grid is not None and save_grid:
            folder = self.run_dir / SAMPLES_DIR
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name.replace('/', '_')}-step{step:07d}.png"
            grid.save(path)
        if self._wandb_run is not None:
            run = self._wandb_run

            def send():
                import wandb

                table = wandb.Table(columns=["step", "class_id", "class", "image"])
                for image, label, class_name in zip(images, labels, names):
                    array = image.permute(1, 2, 0).cpu().numpy() if hasattr(image, "permute") else image
                    table.add_data(step, int(label), class_name, wandb.Image(array, caption=class_name))
                payload = {"trainer/step": step, f"{name}_table": table}
                if grid is not None:
                    payload[name] = wandb.Image(grid, caption=" ".join(names))
                run.log(payload)

            self._wandb("sample table", send)
        return path

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", metadata: dict | None = None) -> None:
        """Attach a file (exported weights) to the W&B run as an artifact (offline: uploaded by `wandb sync`)."""
        if not self.is_main or self._wandb_run is None:
            return
        run = self._wandb_run

        def send():
            import wandb

            artifact = wandb.Artifact(name, type=kind, metadata=metadata or {})
            artifact.add_file(str(path))
            run.log_artifact(artifact)

        self._wandb("artifact", send)

    def summary(self, values: dict) -> None:
        """The run's final facts (metrics, parameters, compute) into the W&B run summary (the run
        directory's own summary.json is written by the trainer, var_train/scaling/summary.py)."""
        if self.is_main and self._wandb_run is not None:
            run = self._wandb_run
            self._wandb("summary", lambda: run.summary.update(values))

    def message(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def close(self, exit_code: int = 0) -> None:
        """Flush and finish; never raises (a W&B failure here is reported like any other)."""
        if self._jsonl is not None:
            try:
                self._jsonl.close()
            except OSError as error:
                print(f"warning: closing {self.run_dir / METRICS_FILE} failed: {error}", file=sys.stderr)
            self._jsonl = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            self._wandb("finish", lambda: run.finish(exit_code=exit_code))


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite a metrics JSONL file (atomically) without its rows of steps after `step`; -> how many."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step")
        except ValueError:  # a torn last line: LineAppender's repair handles it
            row_step = None
        if not (isinstance(row_step, int) and row_step > step):
            kept.append(line)
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(kept))
    return len(lines) - len(kept)


@contextlib.contextmanager
def training_run_logger(run_dir: str | Path):
    """A MetricLogger appending to an existing training run: its metrics.jsonl and, when the run used
    W&B, the same W&B run (resumed by id, in the run's mode). For `var-train eval` and `var-train
    export` of a run's checkpoint; W&B failures are reported once and never raised."""
    info = read_wandb_run(run_dir) or {}
    settings = SimpleNamespace(wandb_project=info.get("project") or "var_train", wandb_entity=info.get("entity"),
                               wandb_run_name=None, wandb_tags=[], wandb_mode=info.get("mode") or "disabled")
    logger = MetricLogger(settings, run_dir, {}, True, resume_run_id=info.get("id"))
    try:
        yield logger
    finally:
        logger.close()


def run_dir_of_checkpoint(path: str | Path) -> Path | None:
    """The training run directory of a run, checkpoints/ or step directory (None for a weights file)."""
    path = Path(path)
    if not path.is_dir():
        return None
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / METRICS_FILE).is_file() or (candidate / WANDB_RUN_FILE).is_file():
            return candidate
    return None


def read_wandb_run(run_dir: str | Path) -> dict | None:
    """The W&B run a training run directory logs to (written by MetricLogger), or None."""
    path = Path(run_dir) / WANDB_RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _class_name(label: int, class_names: list[str] | None) -> str:
    if class_names and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
