"""Which precision a computation runs in: `auto` = bf16 where the hardware does bf16 natively.

    precision = resolve_precision("auto", device)        # -> "bf16" or "fp32"
    with autocast(device, precision): ...

On CUDA, `auto` is bf16. On a CPU it is bf16 only when the CPU has native bf16 arithmetic (x86
AVX512-BF16 or AMX-BF16, Arm's BF16 extension), where oneDNN runs bf16 matmuls and convolutions
faster than fp32 (measured in BENCHMARKS.md); elsewhere bf16 would be emulated, slower than fp32,
so `auto` is fp32. bf16 always means autocast: parameters and optimizer states stay fp32, and the
parts that need fp32 (the VAR's logits, the quantizer's distances) turn autocast off themselves.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

from var_train.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (x86 AVX512-BF16 / AMX-BF16, Arm BF16)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if any(probe is not None and probe() for probe in probes):
            return True
    except RuntimeError:
        pass
    return bool(_cpuinfo_bf16_flags())


def _cpuinfo_bf16_flags() -> list[str]:
    """The bf16 feature flags /proc/cpuinfo lists (Linux), e.g. ['avx512_bf16', 'amx_bf16']."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            flags = set(value.split())
            wanted = _X86_BF16_FLAGS if platform.machine() in ("x86_64", "AMD64", "i686") else ("bf16",)
            return [flag for flag in wanted if flag in flags]
    return []


def resolve_precision(precision: str, device: torch.device | str, cpu_bf16: bool | None = None) -> str:
    """'auto' | 'bf16' | 'fp32' -> 'bf16' or 'fp32' for `device` (`cpu_bf16` overrides the CPU probe)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16"
    if kind == "cpu":
        return "bf16" if (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"
    return "fp32"


def resolve_sampling_precision(precision: str, device: torch.device | str) -> str:
    """Like resolve_precision, but `auto` is fp32 on every CPU: KV-cached sampling runs small
    matmuls (a few rows per scale) where bf16 did not pay on this AVX512-BF16 CPU (0.53x-1.15x of
    fp32, BENCHMARKS.md "Precision"), while training steps (1.31x) and large decodes do."""
    if precision == "auto" and torch.device(device).type == "cpu":
        return "fp32"
    return resolve_precision(precision, device)


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `precision` resolves to bf16, else a no-op context."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_cpu_bf16() -> str:
    """One line for logs and benchmarks: what the probe found."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpuinfo_bf16_flags()
    return (f"CPU capability {capability}, bf16 flags {flags or 'none'}: "
            f"native bf16 {'yes' if cpu_has_native_bf16() else 'no'}")


def available_device(name: str) -> torch.device:
    """`name` (cpu, cuda, cuda:1, ...) as a device this machine has; a ConfigError naming it otherwise,
    so `--device cuda` without a GPU is one line, not a traceback from deep inside a model."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name}: no CUDA GPU is visible here; use cpu (or leave --device out)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device

