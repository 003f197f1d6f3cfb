"""The interface the trainer drives, whatever does the data parallelism underneath.

One optimizer step over `grad_accumulation_steps` micro-batches:

    for micro_step, batch in enumerate(micro_batches):
        # Whether this micro-batch's gradients are averaged over ranks is decided here, before its
        # forward (DDP arms its reduction hooks in the forward): only the last one of a step syncs.
        with engine.micro_batch(sync=micro_step == accumulation - 1):
            with engine.autocast():
                loss = criterion(engine.model(batch.labels, teacher_input), targets)
            engine.backward(loss / accumulation)
    for group in engine.optimizer.param_groups: group["lr"] = ...   # before clip_grad_norm
    grad_norm = engine.clip_grad_norm(max_norm)
    engine.optimizer_step()          # the trainer may skip it when grad_norm is not finite
    engine.zero_grad()

`backward` does not rescale the loss: the trainer divides by the accumulation count itself. A
`backward` outside `micro_batch` syncs (a step of one micro-batch). DeepSpeed computes the norm
inside its own step, so its engine steps in `clip_grad_norm` (hence the learning rate first) and
skips non-finite steps itself.

Beyond the step, an engine owns everything that depends on how the model is distributed:
  - `full_model()`: a context yielding the plain model, callable piece by piece (sampling with a
    KV cache, evaluation, export); collective on entry and exit.
  - `full_state_dict()`: the whole model's weights on every rank (collective).
  - `save_state(checkpoint_dir)` / `load_state(checkpoint_dir, metadata)`: its sharded model and
    optimizer state inside a checkpoint directory (its own sub-directory; the checkpointer
    handles step directories, atomicity, RNG and trainer state), and the class method
    `consolidate(checkpoint_dir, model)`, which rebuilds the full model state dict of a saved
    checkpoint on one process without a process group (export, evaluation of checkpoints).
Engines are built by `var_train.parallel.build_engine`, which applies activation checkpointing
and compilation first; a subclass only wraps (see ENGINES in parallel/__init__.py).
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

CHECKPOINT_FORMAT_DCP = "dcp"
CHECKPOINT_FORMAT_DEEPSPEED = "deepspeed"
DCP_DIR = "state"  # inside a checkpoint directory


@dataclass(frozen=True)
class EngineSetup:
    """What every engine's constructor receives from `build_engine`."""

    parallel: Any  # config.ParallelConfig
    optim: Any  # config.OptimConfig
    device: torch.device
    world_size: int
    grad_accumulation_steps: int
    # AdamW groups by parameter name (taken from the model before any wrapper renamed them):
    # [{"name", "param_names", "weight_decay"}]; see optimizer.build_optimizer.
    parameter_groups: list[dict]


class Engine(ABC):
    name: ClassVar[str]
    # "dcp": model/optimizer state through torch.distributed.checkpoint (fsdp2, ddp: the same
    # names and global shapes, so either reads the other's checkpoints, at any world size);
    # "deepspeed": DeepSpeed's own checkpoint files.
    checkpoint_format: ClassVar[str] = CHECKPOINT_FORMAT_DCP
    # bf16 forward under torch.autocast (False where the engine's library does it itself).
    uses_autocast: ClassVar[bool] = True

    def __init__(self, model: nn.Module, unwrapped_model: nn.Module, optimizer: torch.optim.Optimizer,
                 setup: EngineSetup):
        self.model = model  # what the trainer calls in its training forward
        self.unwrapped_model = unwrapped_model  # the model itself: .train()/.eval(), parameter counts
        self.optimizer = optimizer
        self.device = setup.device
        self.precision = setup.parallel.precision
        self.world_size = setup.world_size
        self.grad_accumulation_steps = setup.grad_accumulation_steps
        self._sync = True  # does the current micro-batch's backward sync gradients

    @classmethod
    def shards_parameters(cls, parallel_cfg) -> bool:
        """Whether each rank holds only a shard of the parameters (so per-parameter extras, such as
        an EMA copy, shard like them)."""
        return False

    @classmethod
    def check_config(cls, parallel_cfg) -> None:
        """Reject settings this engine cannot run, before the model is touched."""
        if parallel_cfg.precision not in ("bf16", "fp32"):
            raise ValueError(f"parallel.precision must be 'bf16' or 'fp32', got {parallel_cfg.precision!r}")

    # -- the step ---------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass: bf16 autocast when precision is bf16, unless the engine
        does it itself (DeepSpeed's torch_autocast)."""
        if self.precision == "bf16" and self.uses_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def micro_batch(self, sync: bool):
        """One micro-batch's forward and backward; its gradients are averaged over ranks only when
        `sync` (the last micro-batch of a step), otherwise they accumulate locally."""
        previous, self._sync = self._sync, bool(sync)
        try:
            with self._gradient_sync(self._sync):
                yield
        finally:
            self._sync = previous

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """The engine's own switch for `micro_batch` (entered before the forward)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clip gradients to `max_norm` (no clipping for None or <= 0); return the total L2 norm
        over all ranks before clipping, as a 0-d float tensor."""
        return global_grad_norm(list(self.unwrapped_model.parameters()), max_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- the full model ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        """Yield the plain model with every parameter usable outside its own training forward (its
        embeddings, head and blocks may be called directly, e.g. KV-cached sampling). Collective:
        all ranks enter and leave together, and run the same forwards inside (a sharded block may
        all-gather in its forward). The mode (train/eval) is left to the caller."""
        yield self.unwrapped_model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (clean parameter names, buffers included) as CPU tensors on
        every rank. Collective: every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=False))
        return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}

    # -- checkpoint state (DCP; DeepSpeed overrides) ------------------------------------------------
    def state_metadata(self) -> dict:
        """What the checkpointer records about this engine in metadata.json."""
        return {"engine": self.name, "checkpoint_format": self.checkpoint_format, "precision": self.precision}

    def dcp_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts for torch.distributed.checkpoint, keyed by clean
        parameter names (no wrapper prefixes), sharded where the engine shards."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(self.model, self.optimizer)

    def load_dcp_state(self, model_state: dict, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)

    def save_state(self, checkpoint_dir: str | Path, *, async_group=None, blocking: bool = True):
        """Write model and optimizer state under `checkpoint_dir` (collective). Non-blocking: the
        state is copied, the files are written in the background over `async_group`, and the
        returned future completes when they are on disk; blocking returns None."""
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = self.dcp_state()
        state = {"model": model_state, "optimizer": optimizer_state}
        path = str(Path(checkpoint_dir) / DCP_DIR)
        if not blocking:
            return dcp.async_save(state, checkpoint_id=path, process_group=async_group)
        dcp.save(state, checkpoint_id=path)
        return None

    def load_state(self, checkpoint_dir: str | Path, metadata: dict) -> None:
        """Restore model and optimizer state saved by `save_state` (collective); DCP reshards it to
        this world size. ValueError when this engine cannot read the checkpoint."""
        import torch.distributed.checkpoint as dcp

        self._check_readable(checkpoint_dir, metadata)
        model_state, optimizer_state = self.dcp_state()
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, storage_reader=dcp_storage_reader(Path(checkpoint_dir) / DCP_DIR), planner=dcp_load_planner())
        self.load_dcp_state(state["model"], state["optimizer"])

    def _check_readable(self, checkpoint_dir, metadata: dict) -> None:
        if saved_format(metadata) != self.checkpoint_format:
            raise ValueError(f"{checkpoint_dir} was written by the {metadata.get('engine')} engine; the "
                             f"{self.name} engine cannot resume it (export it and use model.init_from)")

    @classmethod
    def consolidate(cls, checkpoint_dir: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model state dict of a checkpoint written by this engine class, read on one
        process without a process group. `model` is a fresh, plain model of the checkpoint's
        config: its state_dict() keys and shapes are what is read (it is not modified)."""
        import torch.distributed.checkpoint as dcp

        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        holder = {"model": state}
        with warnings.catch_warnings():  # "no process group, loading in one process": intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(holder, storage_reader=dcp_storage_reader(Path(checkpoint_dir) / DCP_DIR),
                     planner=dcp_load_planner(), no_dist=True)
        return state


def saved_format(metadata: dict) -> str:
    return metadata.get("checkpoint_format") or (
        CHECKPOINT_FORMAT_DEEPSPEED if metadata.get("engine") == "deepspeed" else CHECKPOINT_FORMAT_DCP)


def dcp_storage_reader(path: str | Path):
    """The one place DCP files are opened for reading (resume and consolidation): `.metadata` is
    unpickled by a restricted unpickler, never by plain pickle (var_train.safe_dcp)."""
    from var_train.safe_dcp import SafeFileSystemReader
    return SafeFileSystemReader(str(path))


def dcp_load_planner():
    """Reads DCP byte entries (optimizer hyper-parameters, steps) as weights-only."""
    from var_train.safe_dcp import SafeLoadPlanner
    return SafeLoadPlanner()


def global_grad_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm of (possibly DTensor-sharded) parameters; clips in place when asked."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=parameters[0].device if parameters else "cpu")
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # partial per-shard sums -> the norm over all ranks
    if max_norm is not None and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total.float()
