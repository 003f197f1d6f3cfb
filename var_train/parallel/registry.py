"""The engines by name: adding an engine is a module in var_train/parallel/ and one line here."""

from __future__ import annotations

from .accelerate_engine import AccelerateEngine
from .ddp import DDPEngine
from .deepspeed_engine import DeepSpeedEngine
from .engine import Engine
from .fsdp2 import FSDP2Engine

ENGINES: dict[str, type[Engine]] = {
    "fsdp2": FSDP2Engine,
    "deepspeed": DeepSpeedEngine,
    "ddp": DDPEngine,
    "accelerate": AccelerateEngine,
}


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass of `parallel.engine` (ValueError naming the choices otherwise)."""
    if name not in ENGINES:
        raise ValueError(f"parallel.engine must be one of {tuple(ENGINES)}, got {name!r}")
    return ENGINES[name]
