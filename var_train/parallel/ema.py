"""An exponential moving average (EMA) of the trainable weights, kept the way the engine keeps them.

`optim.ema_decay = d` (off by default; 0.9999 is typical for fine-tuning): after every applied
optimizer step, ema = d * ema + (1 - d) * param, in fp32, starting from the weights training
starts from. Each rank holds the EMA of exactly what it holds of the parameters: under FSDP2 the
EMA tensors are DTensors with the parameters' placements (sharded, no communication to update);
under DDP and DeepSpeed ZeRO-1/2 the parameters are replicated and so is the EMA. (ZeRO-3 keeps
flat partitions outside the module; it is refused with a pointer to FSDP2.) Frozen parameters
never change, so they have no EMA: their own values are the average.

Checkpoints: `save(checkpoint_dir)` writes `ema/` with torch.distributed.checkpoint next to the
engine's state (so it reshards to another world size like the model does), `load` restores it;
`consolidate_ema(checkpoint_dir, template)` rebuilds the full EMA weights on one process for
`var-train export --ema`. Evaluation uses `with ema.applied():`, which swaps the averaged weights
into the model and back.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from var_train.errors import MissingInputError

from .engine import dcp_load_planner, dcp_storage_reader
from .optimizer import clean_parameter_name

EMA_DIR = "ema"  # inside a checkpoint directory
NAMES_FILE = "ema.json"


class ParameterEMA:
    def __init__(self, model: nn.Module, decay: float):
        """`model`: the engine's `unwrapped_model` after `build_engine` (FSDP2: its parameters are the shards)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params: dict[str, nn.Parameter] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if hasattr(param, "ds_tensor"):
                raise ValueError("optim.ema_decay with DeepSpeed ZeRO-3 is not supported (its parameters live in "
                                 "flat partitions outside the module): use parallel.engine=fsdp2 for a sharded EMA, "
                                 "or parallel.zero_stage=2")
            self.params[clean_parameter_name(name)] = param
        self.shadow: dict[str, torch.Tensor] = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current weights."""
        for name, param in self.params.items():
            self.shadow[name].copy_(param.detach().float())
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in: shadow += (1 - decay) * (param - shadow)."""
        weight = 1.0 - self.decay
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights inside the model for the duration of the context (evaluation), the
        training weights back afterwards, bit for bit."""
        backup = {name: param.detach().clone() for name, param in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.shadow[name].to(param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"weights": self.shadow, "updates": torch.tensor(self.updates), "decay": torch.tensor(self.decay)}

    def save(self, checkpoint_dir: str | Path) -> None:
        """Collective: every rank writes its part of `<checkpoint_dir>/ema/`, rank 0 the names."""
        import torch.distributed.checkpoint as dcp

        from var_train.fileio import write_json_atomic

        from .distributed import get_rank

        path = Path(checkpoint_dir) / EMA_DIR
        dcp.save(self.state_dict(), checkpoint_id=str(path))
        if get_rank() == 0:  # read back instead of DCP's pickled .metadata when consolidating
            write_json_atomic(path / NAMES_FILE, {"decay": self.decay, "updates": self.updates,
                                                  "names": sorted(self.shadow)})

    def load(self, checkpoint_dir: str | Path) -> bool:
        """Collective. Restore the EMA saved with a checkpoint; False (EMA left at the current
        weights) when the checkpoint has none, e.g. a run that enabled the EMA on resume."""
        import torch.distributed.checkpoint as dcp

        path = Path(checkpoint_dir) / EMA_DIR
        if not path.is_dir():
            self.reset()
            return False
        state = self.state_dict()
        dcp.load(state, storage_reader=dcp_storage_reader(path), planner=dcp_load_planner())  # "updates": weights-only
        self.updates = int(state["updates"])
        return True


def has_ema(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / EMA_DIR).is_dir()


def consolidate_ema(checkpoint_dir: str | Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full EMA weights of a checkpoint on one process (no process group), as a state dict over
    `template` (the checkpoint's consolidated model weights): EMA where there is one, the
    template's own tensors for frozen parameters and buffers."""
    import torch.distributed.checkpoint as dcp

    path = Path(checkpoint_dir) / EMA_DIR
    if not (path / NAMES_FILE).is_file():
        raise MissingInputError(f"{checkpoint_dir} has no EMA weights (export without --ema, or train with "
                                f"optim.ema_decay set)")
    names = json.loads((path / NAMES_FILE).read_text())["names"]
    unknown = [name for name in names if name not in template]
    if unknown:
        raise ValueError(f"{checkpoint_dir}: EMA weights for tensors the model lacks: {unknown[:5]}")
    weights = {name: torch.empty(template[name].shape, dtype=torch.float32) for name in names}
    state = {"weights": weights}
    with warnings.catch_warnings():  # "no process group, loading in one process": intended
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, storage_reader=dcp_storage_reader(path), planner=dcp_load_planner(), no_dist=True)
    return {key: (weights[key].to(value.dtype) if key in weights else value) for key, value in template.items()}
