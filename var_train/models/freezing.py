"""Freezing parameters for fine-tuning: `optim.freeze` globs on parameter names.

`freeze_parameters(model, patterns)` sets requires_grad=False on every parameter whose name
matches a pattern (fnmatch: `blocks.[0-7].*`, `word_embed.*`, `pos_1LC`). It runs on the plain
model before any engine wraps it, so every engine sees the final flags: frozen parameters get no
gradient and are left out of the optimizer (no AdamW state), under FSDP2, DeepSpeed and DDP alike.
A pattern that matches nothing is an error (a typo would otherwise silently train everything).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch.nn as nn

from var_train.errors import ConfigError


@dataclass
class FreezeSummary:
    trainable: int = 0  # parameter counts (elements)
    frozen: int = 0
    frozen_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        total = self.trainable + self.frozen
        if not self.frozen:
            return f"trainable parameters: {self.trainable:,} (nothing frozen)"
        return (f"trainable parameters: {self.trainable:,} of {total:,} ({self.frozen:,} frozen in "
                f"{len(self.frozen_names)} tensors, {self.frozen / max(total, 1):.1%})")


def frozen_names(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the parameters `patterns` select; ConfigError for a pattern matching none."""
    names = [name for name, _ in model.named_parameters()]
    selected = set()
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            examples = ", ".join(names[:3] + names[-2:])
            raise ConfigError(f"optim.freeze pattern {pattern!r} matches no parameter (names look like {examples}; "
                              f"use globs such as 'blocks.[0-7].*' or 'word_embed.*')")
        selected.update(hits)
    if names and len(selected) == len(names):
        raise ConfigError(f"optim.freeze={list(patterns)} freezes every parameter: nothing would train")
    return [name for name in names if name in selected]


def freeze_parameters(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> FreezeSummary:
    """Set requires_grad=False on the parameters `patterns` select; return the counts."""
    chosen = set(frozen_names(model, patterns)) if patterns else set()
    summary = FreezeSummary()
    for name, parameter in model.named_parameters():
        if name in chosen:
            parameter.requires_grad_(False)
            summary.frozen += parameter.numel()
            summary.frozen_names.append(name)
        else:
            summary.trainable += parameter.numel()
    return summary
