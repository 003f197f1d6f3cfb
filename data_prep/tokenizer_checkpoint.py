"""Tokenizer-training checkpoints: `<output_dir>/checkpoints/step-00000100/` holding

- `vqvae.safetensors`: the VQVAE in our format (`save_model`: weights + constructor config),
- `training_state.pt`: everything else a resume needs (step, optimizers, discriminator, dead-code
  counters, RNG), made only of tensors and plain containers so `torch.load(weights_only=True)`
  reads it.
A checkpoint directory is written under a temporary name and renamed when complete, so a crash
never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from var_train.models import VQVAE
from var_train.models.checkpoint_io import load_state_dict_strict, read_checkpoint, save_model

MODEL_FILE = "vqvae.safetensors"
STATE_FILE = "training_state.pt"
_PREFIX = "step-"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{_PREFIX}{step:08d}"


def save_checkpoint(output_dir: str | Path, step: int, vae: VQVAE, training_state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint (call on one rank only) and delete all but the newest `keep_last`."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(vae, tmp / MODEL_FILE)
    torch.save(training_state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and not p.name.endswith(".tmp")
             and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, vae: VQVAE) -> dict:
    """Load the weights into `vae` (strictly; the architecture must match) -> the training state."""
    path = Path(path)
    state, config = read_checkpoint(path / MODEL_FILE)
    if config is not None and config != vae.config:
        differences = {k: (config.get(k), vae.config.get(k)) for k in set(config) | set(vae.config)
                       if config.get(k) != vae.config.get(k)}
        raise ValueError(f"checkpoint {path} was made for another VQVAE; (checkpoint, requested): {differences}")
    load_state_dict_strict(vae, state, str(path / MODEL_FILE))
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
