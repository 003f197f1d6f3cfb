"""`precision=auto`: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from var_train.config import ConfigError, load_config
from var_train.precision import autocast, cpu_has_native_bf16, resolve_precision


def _cpuinfo_flags() -> set[str]:
    """This test's own reading of /proc/cpuinfo (the oracle for the probe)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_resolves_by_device_and_cpu_support():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_precision("auto", "cpu", cpu_bf16=True) == "bf16"
    assert resolve_precision("auto", "cpu", cpu_bf16=False) == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu", cpu_bf16=False) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() not in ("x86_64", "AMD64"),
                    reason="the oracle reads x86 flags from Linux's /proc/cpuinfo")
def test_cpu_probe_agrees_with_cpuinfo_flags():
    flags = _cpuinfo_flags()
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert resolve_precision("auto", "cpu") == ("bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32")


def test_autocast_context_follows_the_resolution():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "auto"):
        assert (a @ b).dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_config_accepts_auto_and_defaults_to_it():
    assert load_config().parallel.precision == "auto"
    assert load_config(overrides=["parallel.precision=fp32"]).parallel.precision == "fp32"
    with pytest.raises(ConfigError, match="parallel.precision"):
        load_config(overrides=["parallel.precision=fp16"])


def test_sampling_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    from var_train.precision import resolve_sampling_precision

    assert resolve_sampling_precision("auto", "cpu") == "fp32"
    assert resolve_sampling_precision("auto", "cuda") == "bf16"
    assert resolve_sampling_precision("bf16", "cpu") == "bf16" and resolve_sampling_precision("fp32", "cuda") == "fp32"
