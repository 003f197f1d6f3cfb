"""Warm start: load a VAR checkpoint into a model with another class set or scale schedule.

`warm_start(model, state)` fills an already reference-initialised `model` from a checkpoint's
state dict. Every tensor of the model ends up in exactly one of four lists, which the trainer
logs once:
- loaded: same name and shape in the checkpoint, copied as is;
- reinitialised: its name starts with one of `reinit` (e.g. `class_emb`, `head`), so it keeps the
  model's fresh reference initialisation. `class_emb` is special: the null-class row (the last
  row, classifier-free guidance's unconditional input) is carried over from the checkpoint, and
  with `class_init="mean"` the new class rows are the mean of the old class rows plus noise;
- adapted: the scale schedule differs. `pos_1LC` is resampled scale by scale (bicubic on each
  scale's pn x pn grid; new finer scales are resampled from the checkpoint's finest scale),
  `pos_start` is kept (resampled only if the first scale's side changes), `lvl_embed` keeps the
  rows of common levels and extends new levels with a copy of the checkpoint's finest level;
- rebuilt: buffers that follow from the schedule (`lvl_1L`, `attn_bias_for_masking`).
Anything else that differs (width, depth, vocabulary, or a class count without the opt-in) is
refused with an error that names every tensor and what to do; nothing is partially loaded.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from var_train.errors import ConfigError, MismatchError

from .var import VAR

# Buffers computed from the scale schedule: never loaded, always the model's own.
SCHEDULE_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
CLASS_INITS = ("reference", "mean")


@dataclass
class WarmStartReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # "name: what was done"
    rebuilt: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"warm start from {self.source}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.reinitialised)} reinitialised, {len(self.adapted)} adapted, {len(self.rebuilt)} rebuilt"]
        for title, names in (("loaded", self.loaded), ("reinitialised", self.reinitialised),
                             ("adapted", self.adapted), ("rebuilt", self.rebuilt)):
            if names:
                lines.append(f"  {title}: " + ", ".join(names))
        return "\n".join(lines)


def _matches(name: str, prefixes: list[str]) -> bool:
    """A reinit entry is a parameter name prefix (`class_emb`, `blocks.0.`) or a glob (`blocks.*.ffn*`)."""
    for prefix in prefixes:
        if fnmatch.fnmatchcase(name, prefix) or name == prefix or name.startswith(prefix.rstrip(".") + "."):
            return True
    return False


def check_reinit(model: VAR, reinit: list[str] | tuple[str, ...]) -> None:
    """A misspelled `model.reinit` entry would silently reinitialise nothing: refuse it by name."""
    names = list(model.state_dict())
    unmatched = [entry for entry in reinit if not any(_matches(name, [entry]) for name in names)]
    if unmatched:
        top_level = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
        raise ConfigError(f"model.reinit {unmatched} names no tensor of the model: give parameter name prefixes or "
                          f"globs such as {', '.join(top_level[:8])}, blocks.0. or blocks.*.ffn*")


def _patch_nums_of(state: dict[str, torch.Tensor]) -> list[int] | None:
    if "lvl_1L" not in state:
        return None
    counts = torch.bincount(state["lvl_1L"].flatten().long()).tolist()
    return [math.isqrt(c) for c in counts]


def _resample_grid(tokens: torch.Tensor, side: int, new_side: int) -> torch.Tensor:
    """(side*side, C) positions of one scale -> (new_side*new_side, C), bicubic on the grid."""
    if side == new_side:
        return tokens.clone()
    width = tokens.shape[-1]
    grid = tokens.float().T.reshape(1, width, side, side)
    if side == 1:  # one position: bicubic of a 1x1 map is that value everywhere
        resized = grid.expand(1, width, new_side, new_side)
    else:
        resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return resized.reshape(width, new_side * new_side).T.to(tokens.dtype)


def resample_positions(pos_1LC: torch.Tensor, old_patch_nums: list[int], new_patch_nums: list[int]) -> torch.Tensor:
    """(1, L_old, C) -> (1, L_new, C): scale k of the new schedule from scale k of the old one
    (or from the old finest scale for new levels), each resampled on its own grid."""
    starts = [0]
    for pn in old_patch_nums:
        starts.append(starts[-1] + pn * pn)
    pieces = []
    for k, new_side in enumerate(new_patch_nums):
        source = min(k, len(old_patch_nums) - 1)
        side = old_patch_nums[source]
        pieces.append(_resample_grid(pos_1LC[0, starts[source]:starts[source + 1]], side, new_side))
    return torch.cat(pieces).unsqueeze(0)


@torch.no_grad()
def warm_start(model: VAR, state: dict[str, torch.Tensor], source: str = "<state dict>",
               reinit: list[str] | tuple[str, ...] = (), class_init: str = "reference",
               generator: torch.Generator | None = None) -> WarmStartReport:
    """Fill the (reference-initialised) `model` from `state`; see the module docstring."""
    if class_init not in CLASS_INITS:
        raise ValueError(f"class_init must be one of {CLASS_INITS}, got {class_init!r}")
    reinit = list(reinit)
    check_reinit(model, reinit)
    target = model.state_dict()
    report = WarmStartReport(source)
    new_values: dict[str, torch.Tensor] = {}
    problems: list[str] = []

    old_patch_nums = _patch_nums_of(state) or list(model.patch_nums)
    new_patch_nums = list(model.patch_nums)
    schedule_changed = old_patch_nums != new_patch_nums

    unexpected = sorted(k for k in set(state) - set(target) if not _matches(k, reinit))
    if unexpected:
        problems.append(f"the checkpoint has tensors the model lacks: {', '.join(unexpected[:10])}"
                        + (f" ... and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))

    for name, current in target.items():
        if name in SCHEDULE_BUFFERS:
            report.rebuilt.append(name)
            continue
        loaded = state.get(name)
        if name == "class_emb.weight" and _matches(name, reinit):
            new_values[name] = _new_class_table(current, loaded, class_init, generator)
            if loaded is not None and loaded.shape[1] == current.shape[1]:
                rows = "mean of the old rows + noise" if class_init == "mean" else "reference init"
                report.adapted.append(f"{name} ({loaded.shape[0] - 1} -> {current.shape[0] - 1} classes, "
                                      f"class rows {rows}, null row carried over)")
            else:
                report.reinitialised.append(name)
            continue
        if _matches(name, reinit):
            report.reinitialised.append(name)
            continue
        if loaded is None:
            problems.append(f"{name} is missing from the checkpoint (add it to model.reinit to initialise it fresh)")
            continue
        if loaded.shape == current.shape and not (schedule_changed and name == "pos_1LC"):
            new_values[name] = loaded
            report.loaded.append(name)
            continue
        width_ok = loaded.shape[-1] == current.shape[-1]
        if name == "class_emb.weight":
            problems.append(
                f"the checkpoint has {loaded.shape[0] - 1} classes, the model {current.shape[0] - 1} "
                f"(model.num_classes): add model.reinit=[class_emb] to start a new class table "
                f"(the null-class row is carried over)")
        elif name == "pos_1LC" and width_ok:
            new_values[name] = resample_positions(loaded, old_patch_nums, new_patch_nums)
            report.adapted.append(f"{name} (resampled {tuple(old_patch_nums)} -> {tuple(new_patch_nums)}, bicubic per scale)")
        elif name == "pos_start" and width_ok:
            new_values[name] = _resample_grid(loaded[0], old_patch_nums[0], new_patch_nums[0]).unsqueeze(0)
            report.adapted.append(f"{name} (resampled {old_patch_nums[0]}x{old_patch_nums[0]} -> "
                                  f"{new_patch_nums[0]}x{new_patch_nums[0]})")
        elif name == "lvl_embed.weight" and width_ok:
            common = min(loaded.shape[0], current.shape[0])
            extended = torch.cat([loaded[:common]] + [loaded[-1:]] * (current.shape[0] - common))
            new_values[name] = extended
            report.adapted.append(f"{name} ({common} levels kept"
                                  + (f", {current.shape[0] - common} new levels copied from the finest)"
                                     if current.shape[0] > common else f", {loaded.shape[0] - common} dropped)"))
        else:
            problems.append(f"{name}: checkpoint {tuple(loaded.shape)} vs model {tuple(current.shape)} "
                            f"(add {name.rsplit('.', 1)[0]} to model.reinit to initialise it fresh)")
    if problems:
        raise MismatchError(f"cannot warm-start from {source}: " + "; ".join(problems))
    for name, value in new_values.items():
        target[name].copy_(value.to(target[name].dtype))
    return report


def _new_class_table(current: torch.Tensor, old: torch.Tensor | None, class_init: str,
                     generator: torch.Generator | None) -> torch.Tensor:
    """The model's fresh (num_classes + 1, C) table with the checkpoint's null row at the end, and
    with `mean`, class rows = mean of the old class rows + noise of a tenth of their spread."""
    table = current.detach().clone()
    if old is None or old.shape[1] != current.shape[1]:
        return table
    old = old.to(table.dtype)
    table[-1] = old[-1]
    if class_init == "mean" and old.shape[0] > 1:
        old_classes = old[:-1].float()
        spread = old_classes.std(dim=0, unbiased=False) if old_classes.shape[0] > 1 else old_classes.abs().mean(0)
        noise = torch.randn(table.shape[0] - 1, table.shape[1], generator=generator) * (0.1 * spread)
        table[:-1] = (old_classes.mean(dim=0) + noise).to(table.dtype)
    return table
