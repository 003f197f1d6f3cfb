"""Training checkpoints: sharded model/optimizer state, trainer state and RNG, written atomically.

Layout of one checkpoint, `<run_dir>/checkpoints/step-00001000/`:
    state/                 torch.distributed.checkpoint (DCP) files: {"model", "optimizer"}, sharded
                           as the engine shards them (fsdp2, ddp); reshardable to another world size
    deepspeed/state/       DeepSpeed's own checkpoint instead, for the deepspeed engine
    trainer_state.pt       step, scheduler, loader position, counters, W&B run id (rank 0)
    rng/rank-00000.pt      python / numpy / torch / CUDA generator states of each rank
    metadata.json          written last: its presence marks the checkpoint complete

Atomicity: every rank writes into `.tmp-step-00001000/`; once all have finished, rank 0 writes
metadata.json and renames the directory. A crash at any point leaves either the previous
checkpoints untouched plus a `.tmp-*` leftover (ignored, and removed by the next save) or a
complete new one. With `async_save`, the model/optimizer files are written by a background
thread after their state has been copied; the rename happens at the next `save`, `wait` or
`load_latest` (so a run that dies meanwhile resumes from the previous checkpoint).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from var_train.parallel.engine import CHECKPOINT_FORMAT_DEEPSPEED

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
METADATA_FILE = "metadata.json"
TRAINER_STATE_FILE = "trainer_state.pt"
DCP_DIR = "state"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
FORMAT_VERSION = 1


# -- finding checkpoints ---------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(STEP_PREFIX) and (path / METADATA_FILE).is_file()


def complete_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `checkpoints_dir`, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if is_complete(p) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint from its own directory, a `checkpoints/` directory or a run directory
    (the newest one in the latter two)."""
    path = Path(path)
    if is_complete(path):
        return path
    for candidate in (path, path / CHECKPOINTS_DIR):
        newest = latest_checkpoint(candidate)
        if newest is not None:
            return newest
    if path.is_dir() and path.name.startswith(STEP_PREFIX):
        raise FileNotFoundError(f"{path} is an incomplete checkpoint (no {METADATA_FILE}): its save was interrupted")
    raise FileNotFoundError(f"no complete checkpoint at {path} (looked for {STEP_PREFIX}*/{METADATA_FILE} "
                            f"there and in {path / CHECKPOINTS_DIR})")


def read_metadata(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / METADATA_FILE).read_text())


# -- random number generators -----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- small helpers --------------------------------------------------------------------------------------
def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_from_main(value):
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _model_config(engine) -> dict:
    return dict(getattr(engine.unwrapped_model, "config", {}) or {})


# -- the checkpointer ------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores training state under `<run_dir>/checkpoints/`. Construct it and call every
    method on all ranks, in the same order: they are collective."""

    def __init__(self, checkpoint_cfg, run_dir: str | Path):
        self.cfg = checkpoint_cfg
        self.directory = Path(run_dir) / CHECKPOINTS_DIR
        self.rank, self.world_size = _rank_and_world()
        self._pending: tuple[Any, Path, Path, dict] | None = None
        # Background writes talk over their own gloo group so they never interleave with the
        # training collectives of the default group.
        use_async_group = checkpoint_cfg.async_save and dist.is_initialized()
        self._async_group = dist.new_group(backend="gloo") if use_async_group else None

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict, blocking: bool = False) -> Path:
        """Write a checkpoint of `engine` and `trainer_state` (plain Python values and tensors) for
        `step`; returns its final path. With `checkpoint.async_save` (and not `blocking`) the
        model/optimizer files are still being written when this returns."""
        self.wait()
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)  # from an interrupted save
            (tmp / "rng").mkdir(parents=True)
        _barrier()

        future = None
        if engine.checkpoint_format == CHECKPOINT_FORMAT_DEEPSPEED:
            engine.save_deepspeed_checkpoint(str(tmp / DEEPSPEED_DIR), DEEPSPEED_TAG)
        else:
            import torch.distributed.checkpoint as dcp

            model_state, optimizer_state = engine.dcp_state()
            state = {"model": model_state, "optimizer": optimizer_state}
            if self.cfg.async_save and not blocking:
                future = dcp.async_save(state, checkpoint_id=str(tmp / DCP_DIR), process_group=self._async_group)
            else:
                dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        metadata = {
            "format_version": FORMAT_VERSION, "step": step, "engine": engine.name,
            "checkpoint_format": engine.checkpoint_format, "world_size": self.world_size,
            "precision": engine.precision, "model_config": _model_config(engine),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if future is not None:
            self._pending = (future, tmp, final, metadata)
        else:
            self._finalize(tmp, final, metadata)
        return final

    def wait(self) -> None:
        """Finish a pending asynchronous save (collective). Call before exiting."""
        if self._pending is None:
            return
        future, tmp, final, metadata = self._pending
        self._pending = None
        completion = getattr(future, "upload_completion", future)
        completion.result()
        self._finalize(tmp, final, metadata)

    close = wait

    def _finalize(self, tmp: Path, final: Path, metadata: dict) -> None:
        _barrier()  # every rank's files are on disk
        if self.rank == 0:
            _write_json_atomically(tmp / METADATA_FILE, metadata)
            replaced = None
            if final.exists():  # saving the same step again (e.g. after a resume): keep the old until the swap
                replaced = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
                final.rename(replaced)
            tmp.rename(final)
            _fsync_dir(self.directory)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            self._apply_retention()
        _barrier()

    def _apply_retention(self) -> None:
        keep = self.cfg.keep_last
        if keep is None or keep <= 0:
            return
        for old in complete_checkpoints(self.directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------
    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for: "auto" = newest complete one here (None if
        there is none), "none" = None, else a path (which must hold a complete checkpoint)."""
        resume = str(self.cfg.resume)
        if resume == "none":
            return None
        if resume == "auto":
            found = latest_checkpoint(self.directory) if self.rank == 0 else None
            found = _broadcast_from_main(str(found) if found is not None else None)
            return Path(found) if found is not None else None
        return resolve_checkpoint(resume)

    def load_latest(self, engine) -> dict | None:
        """Restore `engine` (model, optimizer) and this rank's RNG from the checkpoint to resume
        from; return its trainer state, or None when there is nothing to resume."""
        self.wait()
        checkpoint = self.checkpoint_to_resume()
        return None if checkpoint is None else self.load(checkpoint, engine)

    def load(self, checkpoint: str | Path, engine) -> dict:
        checkpoint = Path(checkpoint)
        if not is_complete(checkpoint):
            raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {METADATA_FILE})")
        metadata = read_metadata(checkpoint)
        if metadata["checkpoint_format"] != engine.checkpoint_format:
            raise ValueError(f"{checkpoint} was written by the {metadata['engine']} engine; the "
                             f"{engine.name} engine cannot resume it (export it and use model.init_from)")
        if engine.checkpoint_format == CHECKPOINT_FORMAT_DEEPSPEED:
            if metadata["world_size"] != self.world_size:
                raise ValueError(f"{checkpoint} holds DeepSpeed ZeRO partitions of {metadata['world_size']} ranks; "
                                 f"resume it on {metadata['world_size']} ranks, not {self.world_size}")
            engine.load_deepspeed_checkpoint(str(checkpoint / DEEPSPEED_DIR), DEEPSPEED_TAG)
        else:
            import torch.distributed.checkpoint as dcp

            model_state, optimizer_state = engine.dcp_state()
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=str(checkpoint / DCP_DIR))  # reshards to this world size
            engine.load_dcp_state(state["model"], state["optimizer"])
        rng_file = checkpoint / "rng" / f"rank-{self.rank:05d}.pt"
        if rng_file.is_file():  # absent for ranks beyond a smaller saving world
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        trainer_state = torch.load(checkpoint / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        _barrier()
        return trainer_state


# -- export ------------------------------------------------------------------------------------------------
EXPORT_FORMATS = ("safetensors", "pth")


def consolidated_state_dict(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full model state dict (reference key names, buffers included) and model config of a
    checkpoint, read on one process without a process group."""
    from var_train.models import VAR

    checkpoint = resolve_checkpoint(checkpoint)
    metadata = read_metadata(checkpoint)
    config = metadata["model_config"]
    model = VAR(**config)
    if metadata["checkpoint_format"] == CHECKPOINT_FORMAT_DEEPSPEED:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates every shard
            weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        # Buffers are derived from the config (scale index, mask); take the model's own for any
        # that DeepSpeed's consolidation leaves out.
        state = {key: weights.get(key, value) for key, value in model.state_dict().items()}
        unexpected = sorted(set(weights) - set(state))
        if unexpected:
            raise ValueError(f"{checkpoint}: DeepSpeed state has keys the model lacks: {unexpected[:10]}")
        missing = sorted(name for name, _ in model.named_parameters() if name not in weights)
        if missing:
            raise ValueError(f"{checkpoint}: DeepSpeed state lacks parameters: {missing[:10]}")
    else:
        import torch.distributed.checkpoint as dcp

        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        holder = {"model": state}
        with warnings.catch_warnings():  # "no process group, loading in one process": intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(holder, checkpoint_id=str(checkpoint / DCP_DIR), no_dist=True)
    return state, config


def export_checkpoint(checkpoint_dir: str | Path, out_path: str | Path, format: str | None = None) -> Path:
    """Write a checkpoint's consolidated weights as safetensors (config in metadata) or as a plain
    reference-layout `.pth` state dict; `format` defaults to the output file's suffix."""
    from var_train.models import VAR
    from var_train.models.checkpoint_io import load_state_dict_strict, save_model, save_reference_layout

    out_path = Path(out_path)
    format = format or {".safetensors": "safetensors", ".pth": "pth", ".pt": "pth"}.get(out_path.suffix)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS} (or an output file ending in "
                         f".safetensors / .pth), got {format!r} for {out_path}")
    state, config = consolidated_state_dict(checkpoint_dir)
    model = VAR(**config)
    load_state_dict_strict(model, state, str(checkpoint_dir))
    return save_model(model, out_path) if format == "safetensors" else save_reference_layout(model, out_path)
