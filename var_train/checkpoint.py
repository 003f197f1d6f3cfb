"""Training checkpoints: sharded model/optimizer state, trainer state and RNG, written atomically.

Layout of one checkpoint, `<run_dir>/checkpoints/step-00001000/`:
    state/ or deepspeed/   the engine's model/optimizer state, written and read by the engine
                           itself (`Engine.save_state` / `load_state`): torch.distributed.checkpoint
                           files for fsdp2 and ddp (reshardable), DeepSpeed's own for deepspeed
    trainer_state.pt       step, scheduler, loader position, counters, W&B run id (rank 0)
    rng/rank-00000.pt      python / numpy / torch / CUDA generator states of each rank
    checksums.json         size and XXH3-128 of every file above (var_train/checksums.py)
    metadata.json          written last: its presence marks the checkpoint complete; it records
                           the digest of checksums.json and (`training_vae`) which VAE the model
                           is trained with, carried into exports for sampling's check

Atomicity: every rank writes into `.tmp-step-00001000/`; once all have finished, rank 0 writes
metadata.json and renames the directory. A crash at any point leaves either the previous
checkpoints untouched plus a `.tmp-*` leftover (ignored, and removed by the next save) or a
complete new one. With `async_save`, the model/optimizer files are written by a background
thread after their state has been copied; the rename happens at the next `save`, `wait` or
`load_latest` (so a run that dies meanwhile resumes from the previous checkpoint).

Integrity: a checkpoint is verified (every file against checksums.json, DCP's .metadata through
the restricted unpickler of var_train/safe_dcp.py) before a resume or an export uses it. On resume
a damaged newest checkpoint is reported with its bad files, moved aside to `corrupt-step-*` (never
deleted) and the newest intact one is used; a checkpoint whose metadata would run code is refused
outright. Retention deletes old checkpoints only once this run has written (and checksummed) a
newer one. A failed save (a full disk: DiskFullError "no space left on device at <path> (needed
~X, free Y)") removes its temporary folder on every rank and raises on every rank; stale `.tmp-*`
folders of a crashed save are removed when the checkpointer starts.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from var_train.checksums import ALGORITHM, hash_files, list_files, verify_folder, write_checksums
from var_train.errors import ConfigError, CorruptFileError, MissingInputError, UnsafeFileError, UserError
from var_train.fileio import disk_full_error, fsync_path, is_disk_full, write_json_atomic
from var_train.parallel import consolidate_checkpoint
from var_train.parallel.distributed import barrier, broadcast_object, get_rank, get_world_size

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
METADATA_FILE = "metadata.json"
TRAINER_STATE_FILE = "trainer_state.pt"
CORRUPT_PREFIX = "corrupt-"
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
        raise MissingInputError(f"{path} is an incomplete checkpoint (no {METADATA_FILE}): its save was interrupted")
    raise MissingInputError(f"no complete checkpoint at {path} (looked for {STEP_PREFIX}*/{METADATA_FILE} "
                            f"there and in {path / CHECKPOINTS_DIR})")


def read_metadata(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / METADATA_FILE
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path} is unreadable ({error}): the checkpoint is damaged") from None


# -- integrity ---------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    checkpoint: Path
    problems: list[str] = field(default_factory=list)
    unsafe: bool = False          # would run code if loaded: refused, never silently skipped
    has_checksums: bool = True

    @property
    def intact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.unsafe:
            return "UNSAFE (refused; never load it)"
        if self.problems:
            return f"DAMAGED ({len(self.problems)} problem(s))"
        return "intact" if self.has_checksums else "no checksums (written before they existed); metadata safe"

    def describe(self) -> str:
        shown = self.problems[:3] + ([f"and {len(self.problems) - 3} more"] if len(self.problems) > 3 else [])
        return f"{self.checkpoint}: " + "; ".join(shown)


def verify_checkpoint(checkpoint: str | Path) -> VerifyReport:
    """Check one checkpoint without loading it (one process, no group): metadata.json readable,
    every file against checksums.json, DCP's .metadata through the restricted unpickler, and every
    other pickle (.pt: trainer state, RNG, DeepSpeed's files) scanned for globals beyond plain data."""
    from var_train.safe_dcp import check_pickle_file, read_dcp_metadata

    checkpoint = Path(checkpoint)
    report = VerifyReport(checkpoint)
    try:
        metadata = read_metadata(checkpoint)
    except (OSError, CorruptFileError) as error:
        report.problems.append(f"{METADATA_FILE}: {error}")
        return report
    recorded = metadata.get("checksums")
    if recorded:
        report.problems += verify_folder(checkpoint, recorded.get("checksums_file"), exclude=(METADATA_FILE,))
    else:
        report.has_checksums = False
    pickles = sorted(checkpoint.rglob(".metadata")) + sorted(checkpoint.rglob("*.pt"))
    for pickled in pickles:
        if any(str(pickled.relative_to(checkpoint)) == p.split(":")[0] for p in report.problems):
            continue  # already reported as damaged
        try:
            read_dcp_metadata(pickled) if pickled.name == ".metadata" else check_pickle_file(pickled)
        except UnsafeFileError as error:
            report.unsafe = True
            report.problems.insert(0, str(error))
        except CorruptFileError as error:
            report.problems.append(str(error))
    return report


def move_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to `corrupt-<name>` (numbered if taken): kept for inspection,
    never deleted, and no longer taken for a checkpoint."""
    target = checkpoint.with_name(CORRUPT_PREFIX + checkpoint.name)
    number = 1
    while target.exists():
        number += 1
        target = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}-{number}")
    checkpoint.rename(target)
    return target


def checkpoints_to_verify(path: str | Path) -> list[Path]:
    """A step directory itself, or every checkpoint of a run or checkpoints/ directory, newest first."""
    path = Path(path)
    if path.is_dir() and path.name.startswith(STEP_PREFIX):
        return [path]
    for candidate in (path / CHECKPOINTS_DIR, path):
        found = complete_checkpoints(candidate)
        if found:
            return found[::-1]
    return []


def _refuse_unsafe(report: VerifyReport) -> None:
    if report.unsafe:
        raise UnsafeFileError(report.problems[0])


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _disk_full(error: BaseException, folder: Path, needed: int | None) -> bool:
    """ENOSPC, or a write error with less room left than a checkpoint needs: torch's zip writer
    reports a full disk only as "unexpected pos 704 vs 598", without the errno."""
    if is_disk_full(error):
        return True
    try:
        return needed is not None and shutil.disk_usage(folder).free < needed
    except OSError:
        return False


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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
def _model_config(engine) -> dict:
    return dict(getattr(engine.unwrapped_model, "config", {}) or {})


# -- the checkpointer ------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores training state under `<run_dir>/checkpoints/`. Construct it and call every
    method on all ranks, in the same order: they are collective."""

    def __init__(self, checkpoint_cfg, run_dir: str | Path, training_vae: dict | None = None):
        self.cfg = checkpoint_cfg
        self.training_vae = training_vae  # {"codebook_sha256", "path"[, "sha256"]}: recorded in metadata.json
        self.directory = Path(run_dir) / CHECKPOINTS_DIR
        self.rank, self.world_size = get_rank(), get_world_size()
        self._pending: tuple[Any, Path, Path, dict] | None = None
        self._written: set[str] = set()  # checkpoints this run wrote and checksummed
        self._remove_stale_temporaries()  # a crashed save's leftovers would keep a full disk full
        # State that lives beside the engine's (the EMA weights): objects with collective
        # save(checkpoint_dir) / load(checkpoint_dir), written synchronously into every checkpoint.
        self.companions: list = []
        # Background writes talk over their own gloo group so they never interleave with the
        # training collectives of the default group.
        use_async_group = checkpoint_cfg.async_save and dist.is_initialized()
        self._async_group = dist.new_group(backend="gloo") if use_async_group else None

    def _remove_stale_temporaries(self) -> None:
        if self.rank == 0 and self.directory.is_dir():
            for leftover in self.directory.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        barrier()

    def _agree(self, error: BaseException | None, tmp: Path, engine=None) -> None:
        """Collective: if any rank failed to write, every rank removes nothing but waits, rank 0
        removes the temporary folder, and every rank raises (the same DiskFullError for a full disk)."""
        needed = self._size_estimate(engine) if error is not None else None
        outcomes = _all_gather(None if error is None else (_disk_full(error, self.directory, needed),
                                                           f"{type(error).__name__}: {error}"))
        failures = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if not failures:
            return
        barrier()
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if any(disk_full for _, (disk_full, _) in failures):
            raise disk_full_error(self.directory, needed or self._size_estimate(engine)) from error
        if error is not None:
            raise error
        rank, (_, text) = failures[0]
        raise RuntimeError(f"rank {rank} failed to write the checkpoint {tmp.name}: {text}")

    def _size_estimate(self, engine) -> int | None:
        """The space a checkpoint needs: the newest one's size, or weights + two AdamW moments."""
        newest = latest_checkpoint(self.directory)
        if newest is not None:
            return _folder_bytes(newest)
        if engine is None:
            return None
        return sum(p.numel() * p.element_size() * 3 for p in engine.unwrapped_model.parameters())

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict, blocking: bool = False) -> Path:
        """Write a checkpoint of `engine` and `trainer_state` (plain Python values and tensors) for
        `step`; returns its final path. With `checkpoint.async_save` (and not `blocking`) the
        model/optimizer files are still being written when this returns."""
        self.wait()
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        error = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for leftover in self.directory.glob(f"{TMP_PREFIX}*"):
                    shutil.rmtree(leftover, ignore_errors=True)  # from an interrupted save
                (tmp / "rng").mkdir(parents=True)
            except OSError as failure:
                error = failure
        self._agree(error, tmp, engine)

        future = None
        try:
            future = engine.save_state(tmp, async_group=self._async_group,
                                       blocking=blocking or not self.cfg.async_save)
            for companion in self.companions:
                companion.save(tmp)
            torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")
            if self.rank == 0:
                torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        except BaseException as failure:  # every rank learns of it, so none waits in a collective alone
            if isinstance(failure, (KeyboardInterrupt, SystemExit)):
                raise
            error = failure  # (DCP's CheckpointException is a BaseException)
        self._agree(error, tmp, engine)
        metadata = {
            "format_version": FORMAT_VERSION, "step": step, **engine.state_metadata(),
            "world_size": self.world_size, "model_config": _model_config(engine),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self.training_vae:
            metadata["training_vae"] = self.training_vae
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
        error = None
        try:
            completion.result()
        except BaseException as failure:  # DCP's CheckpointException is a BaseException
            if isinstance(failure, (KeyboardInterrupt, SystemExit)):
                raise
            error = failure
        self._agree(error, tmp)
        self._finalize(tmp, final, metadata)

    close = wait

    def _finalize(self, tmp: Path, final: Path, metadata: dict) -> None:
        barrier()  # every rank's files are on disk
        # Checksums of every file, each rank hashing its share of the names (they are still cached).
        error, entries = None, {}
        try:
            entries = hash_files(tmp, list_files(tmp)[self.rank::self.world_size])
        except Exception as failure:
            error = failure
        self._agree(error, tmp)
        merged = {name: entry for part in _all_gather(entries) for name, entry in part.items()}
        if self.rank == 0:
            try:
                digest = write_checksums(tmp, merged)
                metadata = {**metadata, "checksums": {"algorithm": ALGORITHM, "checksums_file": digest,
                                                      "files": len(merged)}}
                write_json_atomic(tmp / METADATA_FILE, metadata)
            except Exception as failure:
                error = failure
        self._agree(error, tmp)
        if self.rank == 0:
            replaced = None
            if final.exists():  # saving the same step again (e.g. after a resume): keep the old until the swap
                replaced = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
                final.rename(replaced)
            tmp.rename(final)
            fsync_path(self.directory)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            self._written.add(final.name)
            self._apply_retention()
        barrier()

    def _apply_retention(self) -> None:
        """Keep the newest `keep_last`; an older one goes only once this run has written and
        checksummed a newer one (never on the word of a checkpoint this run did not verify)."""
        keep = self.cfg.keep_last
        if keep is None or keep <= 0:
            return
        found = complete_checkpoints(self.directory)
        own = [i for i, checkpoint in enumerate(found) if checkpoint.name in self._written]
        if not own:
            return
        for old in found[:max(0, len(found) - keep)]:
            if found.index(old) < own[-1]:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------
    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for, verified (collective): "auto" = the newest
        intact one here (damaged newer ones are moved aside with a warning; None if there is none),
        "none" = None, else a path, which must be a complete, intact checkpoint."""
        resume = str(self.cfg.resume)
        if resume == "none":
            return None
        found, error = None, None
        if self.rank == 0:
            try:
                found = self._newest_intact() if resume == "auto" else self._verified(resolve_checkpoint(resume))
            except UserError as failure:
                error = (type(failure).__name__, str(failure))
        found, error = broadcast_object((str(found) if found is not None else None, error))
        if error is not None:  # the same one-line error on every rank, none left waiting
            kind = {"UnsafeFileError": UnsafeFileError, "MissingInputError": MissingInputError}.get(error[0],
                                                                                                    CorruptFileError)
            raise kind(error[1])
        return Path(found) if found is not None else None

    def _verified(self, checkpoint: Path) -> Path:
        report = verify_checkpoint(checkpoint)
        _refuse_unsafe(report)
        if not report.intact:
            raise CorruptFileError(f"checkpoint.resume={checkpoint} is damaged: {report.describe()}")
        return checkpoint

    def _newest_intact(self) -> Path | None:
        for checkpoint in reversed(complete_checkpoints(self.directory)):
            report = verify_checkpoint(checkpoint)
            _refuse_unsafe(report)
            if report.intact:
                if not report.has_checksums:
                    _warn(f"warning: {checkpoint} has no checksums (written by an older var_train): not verified")
                return checkpoint
            aside = move_aside(checkpoint)
            _warn(f"warning: checkpoint {report.describe()}; moved aside to {aside} (not deleted); "
                  f"falling back to the newest intact checkpoint")
        return None

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
        try:
            engine.load_state(checkpoint, read_metadata(checkpoint))  # ValueError if it cannot
        except (EOFError, pickle.UnpicklingError, OSError) as error:
            raise CorruptFileError(f"cannot read {checkpoint}: {type(error).__name__}: {error}; "
                                   f"run `var-train verify {checkpoint}`") from error
        except BaseException as error:  # DCP wraps a rank's read error in CheckpointException (a BaseException)
            if type(error).__name__ != "CheckpointException":
                raise
            raise CorruptFileError(f"cannot read {checkpoint}: {str(error).splitlines()[0][:300]}; "
                                   f"run `var-train verify {checkpoint}`") from error
        for companion in self.companions:
            companion.load(checkpoint)
        rng_file = checkpoint / "rng" / f"rank-{self.rank:05d}.pt"
        if rng_file.is_file():  # absent for ranks beyond a smaller saving world
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        trainer_state = torch.load(checkpoint / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        barrier()
        return trainer_state


# -- export ------------------------------------------------------------------------------------------------
EXPORT_FORMATS = ("safetensors", "pth")


def checkpoint_to_export(path: str | Path, newest_intact: bool = False) -> Path:
    """The checkpoint `path` names (its newest for a run or checkpoints/ directory), verified: a
    damaged one is refused, unless `newest_intact`, which takes the newest intact one instead (with
    a warning). Never loads a checkpoint whose metadata would run code."""
    checkpoint = resolve_checkpoint(path)
    report = verify_checkpoint(checkpoint)
    _refuse_unsafe(report)
    if report.intact:
        return checkpoint
    if not newest_intact:
        raise CorruptFileError(f"checkpoint {report.describe()}; it cannot be exported. Pass --newest-intact to "
                               f"export the newest intact checkpoint instead (or name another step directory)")
    for older in reversed(complete_checkpoints(checkpoint.parent)):
        if int(older.name[len(STEP_PREFIX):]) >= int(checkpoint.name[len(STEP_PREFIX):]):
            continue
        older_report = verify_checkpoint(older)
        _refuse_unsafe(older_report)
        if older_report.intact:
            _warn(f"warning: checkpoint {report.describe()}; exporting {older} instead")
            return older
    raise CorruptFileError(f"no intact checkpoint in {checkpoint.parent} (the newest: {report.describe()})")


def consolidated_state_dict(checkpoint: str | Path, newest_intact: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The full model state dict (reference key names, buffers included) and model config of a
    verified checkpoint (see `checkpoint_to_export`), read on one process without a process group."""
    return _consolidate(checkpoint_to_export(checkpoint, newest_intact))


def _consolidate(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from var_train.models import VAR
    from var_train.models.checkpoint_io import build_from_record

    metadata = read_metadata(checkpoint)
    config = metadata["model_config"]
    return consolidate_checkpoint(checkpoint, metadata, build_from_record(VAR, config, checkpoint)), config


def load_var_any(path: str | Path):
    """A VAR from a reference .pth, our .safetensors, or a training checkpoint directory (a run
    directory, its `checkpoints/` or one `step-*` directory: verified, then consolidated on this
    process), for every command that samples: sample, edit, eval."""
    from var_train.models import VAR
    from var_train.models.checkpoint_io import build_from_record, load_state_dict_strict, load_var

    path = Path(path)
    if not path.is_dir():
        return load_var(path)
    state, config = consolidated_state_dict(path)
    model = build_from_record(VAR, config, path)
    load_state_dict_strict(model, state, str(path))
    return model


def export_checkpoint(checkpoint_dir: str | Path, out_path: str | Path, format: str | None = None,
                      ema: bool = False, newest_intact: bool = False) -> Path:
    """Write a checkpoint's consolidated weights as safetensors (config in metadata) or as a plain
    reference-layout `.pth` state dict; `format` defaults to the output file's suffix. `ema`: the
    EMA weights (optim.ema_decay) instead of the training weights. The VAE the checkpoint records
    (`training_vae`) goes into a safetensors file's metadata; a .pth has no place for it."""
    from var_train.models import VAR
    from var_train.models.checkpoint_io import build_from_record, load_state_dict_strict, save_model, save_reference_layout

    out_path = Path(out_path)
    format = format or {".safetensors": "safetensors", ".pth": "pth", ".pt": "pth"}.get(out_path.suffix)
    if format is None:
        raise ConfigError(f"cannot tell the export format from {out_path.name}: end --out in .safetensors or .pth, "
                          f"or give --format")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, got {format!r}")
    checkpoint_dir = checkpoint_to_export(checkpoint_dir, newest_intact)
    state, config = _consolidate(checkpoint_dir)  # verified just above
    if ema:
        from var_train.parallel.ema import consolidate_ema
        state = consolidate_ema(resolve_checkpoint(checkpoint_dir), state)
    model = build_from_record(VAR, config, checkpoint_dir)
    load_state_dict_strict(model, state, str(checkpoint_dir))
    if format == "pth":
        return save_reference_layout(model, out_path)
    return save_model(model, out_path, training_vae=read_metadata(checkpoint_dir).get("training_vae"))
