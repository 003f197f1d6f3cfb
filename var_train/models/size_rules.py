"""The paper's model-size rules: one row of hyperparameters per VAR depth, the only copy of them.

    rule = size_rule(20)          # SizeRule(depth=20, embed_dim=1280, num_heads=20, ...)
    rule.peak_lr                  # base_lr * global_batch_size / 256 = 3.0e-4

Who reads it: `VAR` (width, heads and drop-path when they are not given), the trainer (AdaLN gamma
init `alng` when `model.alng` is unset), the recipes (`recipes/d16.yaml` ... `d30.yaml` are pinned
to their rows by tests), `var-train train --dry-run` (it shows the row and where a recipe departs
from it) and `var-train scaling plan` (one job per depth, hyperparameters from the row).

The rules (REFERENCE.md, "VAR transformer" and "Training recipe of the paper"):
- width = 64 * depth, heads = depth (head dim 64), MLP ratio 4;
- drop-path = 0.1 * depth / 24 (the deepest block's rate; it rises linearly from 0 over the blocks);
- AdaLN gamma init `alng`: 1e-3 below d24, 1e-4 from d24, 1e-5 from d30;
- base LR 1e-4 (8e-5 from d24); peak LR = base_lr * global_batch_size / 256;
- final LR fraction `wpe`: 0.1 below d24, 0.01 from d24;
- global batch 768 (1024 from d30); weight decay 0.05 (from d30 rising to 0.08 on a cosine);
- epochs: 200 (d16), 250 (d20), 350 (d24, d30) in the released recipes. The paper does not list the
  epochs of its other scaling-law sizes; this table extends the released ones by depth: 200 up to
  d16, 250 up to d20, 350 above (so a sweep's larger models train longer, as the released ones do).
Depths the paper uses for its scaling laws: `PAPER_DEPTHS` (18M to 2B parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PAPER_DEPTHS = (6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27, 30)
IMAGENET_TRAIN_IMAGES = 1_281_167  # the default dataset size of planning when no shards are given


@dataclass(frozen=True)
class SizeRule:
    depth: int
    embed_dim: int
    num_heads: int
    drop_path_rate: float
    alng: float
    base_lr: float
    wpe: float
    global_batch_size: int
    epochs: float
    weight_decay: float
    weight_decay_end: float | None

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.global_batch_size / 256

    def as_dict(self) -> dict:
        return asdict(self)

    def overrides(self) -> list[str]:
        """The row as `section.key=value` recipe overrides (model and optim sections)."""
        model = ("embed_dim", "num_heads", "drop_path_rate", "alng")
        optim = ("base_lr", "wpe", "global_batch_size", "epochs", "weight_decay", "weight_decay_end")
        values = self.as_dict()
        return ([f"model.depth={self.depth}"] + [f"model.{k}={_yaml(values[k])}" for k in model]
                + [f"optim.{k}={_yaml(values[k])}" for k in optim])


def _yaml(value) -> str:
    if value is None:
        return "null"
    return f"{value:.10g}" if isinstance(value, float) else str(value)  # 0.025, not 0.025000000000000005


def size_rule(depth: int) -> SizeRule:
    """The hyperparameters of a VAR of this depth (any depth >= 1; exact for d16/d20/d24/d30)."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    return SizeRule(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        alng=1e-3 if depth < 24 else (1e-4 if depth < 30 else 1e-5),
        base_lr=1e-4 if depth < 24 else 8e-5,
        wpe=0.1 if depth < 24 else 0.01,
        global_batch_size=768 if depth < 30 else 1024,
        epochs=200.0 if depth <= 16 else (250.0 if depth <= 20 else 350.0),
        weight_decay=0.05,
        weight_decay_end=None if depth < 30 else 0.08,
    )
