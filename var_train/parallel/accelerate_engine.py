"""Hugging Face Accelerate drives the data parallelism: `parallel.engine=accelerate`.

The model and its AdamW are handed to `accelerate.Accelerator.prepare`, configured by the user's
Accelerate config, read from one of two places (the first one present wins):

  1. `parallel.accelerate_config=PATH`: an `accelerate config` YAML file (configs/accelerate/);
  2. the environment `accelerate launch --config_file PATH` sets for its processes
     (ACCELERATE_USE_FSDP / FSDP_*, ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_*,
     ACCELERATE_MIXED_PRECISION).

What it runs: FSDP2 through Accelerate's `FullyShardedDataParallelPlugin(fsdp_version=2)`,
wrapping the model's `block_classes` (one unit per block, as the native fsdp2 engine); DeepSpeed
ZeRO through its `DeepSpeedPlugin`; DDP otherwise. The step goes through `accelerator.backward`,
`accelerator.clip_grad_norm_`, `accelerator.autocast` and `accelerator.no_sync` (entered by
`micro_batch(sync=False)`, before the forward). Activation checkpointing and compilation stay
build_engine's (`parallel.activation_checkpointing`, `parallel.compile`): an Accelerate config
that asks for its own is refused rather than applied twice.

Precision: `parallel.precision` decides. An Accelerate config's `mixed_precision` may be `no`
(not set) or agree with it; fp16/fp8 are refused. Under FSDP2, Accelerate applies one
MixedPrecisionPolicy to every unit including the root, and the VAR computes its logits in fp32
with autocast off (a bf16 head would not accept the fp32 hidden state): parameters are therefore
gathered in fp32 and the compute is bf16 through autocast, gradients reduced in fp32. (The native
fsdp2 engine gathers the blocks in bf16: half the all-gather traffic.) DeepSpeed uses its
`torch_autocast` mode, as the native deepspeed engine does, never its bf16 mode.

Checkpoints: DDP and FSDP2 state goes through DCP into the step directory's `state/`, the same
layout as the native fsdp2 and ddp engines (each reads the others'); DeepSpeed state into
`deepspeed/state/`, DeepSpeed's own files, as the native deepspeed engine. Reads go through the
same safe DCP reader.

Accelerate turns FSDP off without a GPU (its CPU mode is plain DDP): an FSDP Accelerate config on
a CPU is refused, pointing at `parallel.engine=fsdp2`, which shards on CPUs too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from var_train.errors import ConfigError

from .deepspeed_engine import DEEPSPEED_DIR, DeepSpeedEngine, deepspeed_config
from .engine import (CHECKPOINT_FORMAT_DCP, CHECKPOINT_FORMAT_DEEPSPEED, Engine, EngineSetup, global_grad_norm)
from .optimizer import build_optimizer, clean_parameter_name

KINDS = ("ddp", "fsdp2", "deepspeed")
# Accelerate 1.15 hands DDP `broadcast_buffers` on every call (True by default), which torch 2.14
# deprecates with a FutureWarning per rank; our handler asks for no per-forward buffer sync either
# way. Nothing a user can act on.
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class AccelerateSettings:
    """The parts of an Accelerate config this engine acts on, from a file or the environment."""

    kind: str  # "ddp" | "fsdp2" | "deepspeed"
    source: str  # where they came from, for messages
    mixed_precision: str = "no"  # "no" | "bf16" (fp16/fp8 are refused)
    fsdp_version: int = 2
    reshard_after_forward: bool | None = None  # None: parallel.reshard_after_forward
    cpu_offload: bool = False
    activation_checkpointing: bool = False  # Accelerate's own: refused (parallel.activation_checkpointing)
    zero_stage: int | None = None  # None: parallel.zero_stage
    offload_optimizer_device: str = "none"
    offload_param_device: str = "none"
    deepspeed_config_file: str | None = None
    dynamo_backend: str = "no"


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def settings_from_file(path: str | Path) -> AccelerateSettings:
    """Read an `accelerate config` YAML file with Accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not Path(path).is_file():
        raise ConfigError(f"parallel.accelerate_config={path}: no such file (an `accelerate config` YAML, "
                          f"e.g. configs/accelerate/ddp.yaml)")
    try:
        config = load_config_from_file(str(path))
    except Exception as error:  # Accelerate raises ValueError / TypeError on bad keys or values
        raise ConfigError(f"parallel.accelerate_config={path}: not a valid Accelerate config ({error})") from None
    distributed = str(getattr(config.distributed_type, "value", config.distributed_type)).upper()
    mixed = str(getattr(config.mixed_precision, "value", config.mixed_precision) or "no").lower()
    dynamo = (getattr(config, "dynamo_config", None) or {}).get("dynamo_backend", "no")
    source = f"parallel.accelerate_config={path}"
    if distributed == "FSDP":
        fsdp = config.fsdp_config or {}
        reshard = fsdp.get("fsdp_reshard_after_forward")
        return AccelerateSettings(
            "fsdp2", source, mixed, fsdp_version=int(fsdp.get("fsdp_version", 1)),
            reshard_after_forward=None if reshard is None else _flag(reshard),
            cpu_offload=_flag(fsdp.get("fsdp_offload_params", False)),
            activation_checkpointing=_flag(fsdp.get("fsdp_activation_checkpointing", False)),
            dynamo_backend=str(dynamo).lower())
    if distributed == "DEEPSPEED":
        ds = config.deepspeed_config or {}
        stage = ds.get("zero_stage")
        return AccelerateSettings(
            "deepspeed", source, mixed, zero_stage=None if stage is None else int(stage),
            offload_optimizer_device=str(ds.get("offload_optimizer_device", "none")),
            offload_param_device=str(ds.get("offload_param_device", "none")),
            deepspeed_config_file=ds.get("deepspeed_config_file"), dynamo_backend=str(dynamo).lower())
    return AccelerateSettings("ddp", source, mixed, dynamo_backend=str(dynamo).lower())


def settings_from_environment(environ=None) -> AccelerateSettings:
    """What `accelerate launch --config_file ...` passed to this process (plain DDP without it)."""
    env = os.environ if environ is None else environ
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    source = "the environment of `accelerate launch`"
    if _flag(env.get("ACCELERATE_USE_FSDP", "false")):
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
        return AccelerateSettings(
            "fsdp2", source, mixed, fsdp_version=int(env.get("FSDP_VERSION", "1")),
            reshard_after_forward=None if reshard is None else _flag(reshard),
            cpu_offload=_flag(env.get("FSDP_OFFLOAD_PARAMS", "false")),
            activation_checkpointing=_flag(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false")), dynamo_backend=dynamo)
    if _flag(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return AccelerateSettings(
            "deepspeed", source, mixed, zero_stage=None if stage is None else int(stage),
            offload_optimizer_device=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
            offload_param_device=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
            deepspeed_config_file=env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None, dynamo_backend=dynamo)
    return AccelerateSettings("ddp", source, mixed, dynamo_backend=dynamo)


def read_settings(parallel_cfg, environ=None) -> AccelerateSettings:
    """The user's Accelerate config: `parallel.accelerate_config`, else `accelerate launch`'s environment."""
    path = getattr(parallel_cfg, "accelerate_config", None)
    return settings_from_file(path) if path else settings_from_environment(environ)


def accelerate_settings(parallel_cfg, device: torch.device | str, environ=None) -> AccelerateSettings:
    """The user's Accelerate config, checked against this run (ConfigError: one line, what to do)."""
    settings = read_settings(parallel_cfg, environ)
    where = settings.source
    if settings.mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"{where}: mixed_precision={settings.mixed_precision} is not supported; use bf16 "
                          f"(or no) and parallel.precision")
    if settings.mixed_precision == "bf16" and parallel_cfg.precision != "bf16":
        raise ConfigError(f"{where} asks for mixed_precision=bf16 but parallel.precision is "
                          f"{parallel_cfg.precision}: set parallel.precision=bf16, or mixed_precision 'no' "
                          f"(`accelerate launch --mixed_precision no`)")
    if settings.dynamo_backend not in ("no", "none", ""):
        raise ConfigError(f"{where}: dynamo_backend={settings.dynamo_backend}: compilation is parallel.compile=true "
                          f"(per block, before wrapping); set the Accelerate config's dynamo backend to NO")
    if settings.kind == "fsdp2":
        if torch.device(device).type != "cuda":
            raise ConfigError(f"{where} asks for FSDP, which Accelerate runs on GPUs only (on a CPU it would "
                              f"silently fall back to DDP): use parallel.engine=fsdp2, which shards on CPUs too")
        if settings.fsdp_version != 2:
            raise ConfigError(f"{where}: fsdp_version={settings.fsdp_version}: the accelerate engine runs FSDP2 "
                              f"only; set fsdp_version: 2")
        if settings.activation_checkpointing:
            raise ConfigError(f"{where}: fsdp_activation_checkpointing: use parallel.activation_checkpointing=true "
                              f"(applied per block before sharding) and set it false in the Accelerate config")
    if settings.kind == "deepspeed" and importlib.util.find_spec("transformers") is None:
        # accelerate's DeepSpeedPlugin.select() imports transformers.integrations.HfDeepSpeedConfig
        # unconditionally (accelerate 1.15), so its DeepSpeed path needs the package.
        raise ConfigError(f"{where} asks for DeepSpeed, and Accelerate's DeepSpeed plugin needs the transformers "
                          f"package: pip install 'var-train[accelerate-deepspeed]', or use parallel.engine=deepspeed "
                          f"(the same ZeRO without Accelerate)")
    if settings.kind == "deepspeed" and settings.deepspeed_config_file:
        raise ConfigError(f"{where}: deepspeed_config_file is not read by parallel.engine=accelerate (batch sizes, "
                          f"clipping and precision come from the recipe): give zero_stage and offload devices "
                          f"in the Accelerate config instead")
    return settings


class AccelerateEngine(Engine):
    name = "accelerate"

    def __init__(self, model: nn.Module, units: list[nn.Module], setup: EngineSetup):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.settings = accelerate_settings(setup.parallel, setup.device)
        self.kind = self.settings.kind
        self.checkpoint_format = CHECKPOINT_FORMAT_DEEPSPEED if self.kind == "deepspeed" else CHECKPOINT_FORMAT_DCP
        # One engine, one Accelerator: Accelerate keeps its state in process-wide singletons, which
        # a new engine replaces (the process group is ours, from init_distributed, and is reused).
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        cpu = setup.device.type == "cpu"
        if not cpu:  # Accelerate's device is this rank's (init_distributed chose it), not one it derives
            os.environ.setdefault("ACCELERATE_TORCH_DEVICE", str(setup.device))
        kwargs = dict(mixed_precision="bf16" if setup.parallel.precision == "bf16" else "no",
                      gradient_accumulation_steps=1,  # the trainer divides the loss itself
                      step_scheduler_with_optimizer=False)
        # The VAR's buffers are constants (scale index, mask): no need to broadcast them every forward.
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        if self.kind == "fsdp2":
            kwargs["fsdp_plugin"] = self._fsdp_plugin(model, units, setup)
        elif self.kind == "deepspeed":
            kwargs["deepspeed_plugin"] = self._deepspeed_plugin(setup)
            kwargs["mixed_precision"] = "no"  # DeepSpeed's torch_autocast does bf16 (see the docstring)
            if cpu:
                import deepspeed
                # As the native engine: no JIT-compiled shared-memory all-reduce on CPU ranks; and
                # Accelerate must not take its CPU (DDP-only) path, so name the backend: gloo.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
                cpu = False
        accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers, **kwargs)
        self.accelerator = accelerator
        optimizer = build_optimizer(model, setup.parameter_groups, setup.optim)
        prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
        self.torch_optimizer = optimizer  # AdamW itself (DCP state); the trainer sees Accelerate's wrapper
        if self.kind == "deepspeed":
            self.ds = prepared_model  # the DeepSpeedEngine
            unwrapped = prepared_model.module
        else:
            unwrapped = accelerator.unwrap_model(prepared_model)
        super().__init__(prepared_model, unwrapped, prepared_optimizer, setup)

    # -- the plugins ------------------------------------------------------------------------------
    def _fsdp_plugin(self, model: nn.Module, units: list[nn.Module], setup: EngineSetup):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # The units build_engine made (compiled blocks are OptimizedModules; checkpointed ones are
        # CheckpointWrappers, which Accelerate's policy looks through to the block class).
        names = sorted({type(unit).__name__ if type(unit).__name__ == "OptimizedModule" else
                        type(getattr(unit, "_checkpoint_wrapped_module", unit)).__name__ for unit in units})
        reshard = self.settings.reshard_after_forward
        return FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=names or None,
            reshard_after_forward=setup.parallel.reshard_after_forward if reshard is None else reshard,
            cpu_offload=self.settings.cpu_offload, state_dict_type="SHARDED_STATE_DICT",
            activation_checkpointing=False, cpu_ram_efficient_loading=False,
            # fp32 parameters everywhere (see the module docstring), fp32 gradient reduction.
            mixed_precision_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))

    def _deepspeed_plugin(self, setup: EngineSetup):
        from accelerate.utils import DeepSpeedPlugin

        stage = self.settings.zero_stage if self.settings.zero_stage is not None else setup.parallel.zero_stage
        if stage not in (1, 2, 3):
            raise ConfigError(f"{self.settings.source}: zero_stage={stage}: use 1, 2 or 3")
        self.zero_stage = stage
        config = deepspeed_config(replace(setup.parallel, zero_stage=stage), setup.optim, setup.world_size,
                                  setup.grad_accumulation_steps)
        config["bf16"] = {"enabled": False}  # torch_autocast instead (see the module docstring)
        config["fp16"] = {"enabled": False}
        for key, device in (("offload_optimizer", self.settings.offload_optimizer_device),
                            ("offload_param", self.settings.offload_param_device)):
            if device and device != "none":
                config["zero_optimization"][key] = {"device": device}
        # `accelerate launch` lists the config's DeepSpeed fields in ACCELERATE_CONFIG_DS_FIELDS, and the
        # plugin refuses a config dict while that list names zero_stage or offloads ("would be ignored").
        # They are not ignored: read_settings took them into `config` above.
        with _environment_without("ACCELERATE_CONFIG_DS_FIELDS"):
            return DeepSpeedPlugin(hf_ds_config=json.loads(json.dumps(config)), zero_stage=stage)

    @classmethod
    def shards_parameters(cls, parallel_cfg) -> bool:
        settings = read_settings(parallel_cfg)
        if settings.kind == "fsdp2":
            return True
        return settings.kind == "deepspeed" and (settings.zero_stage or parallel_cfg.zero_stage) == 3

    @staticmethod
    def state_bytes(num_params: float, unit_params: float, parallel_cfg, world_size: int,
                    compute_bytes: int) -> tuple[float, float, float]:
        """(parameters, gradients, AdamW states) bytes per GPU, by what the Accelerate config runs."""
        settings = read_settings(parallel_cfg)
        if settings.kind == "fsdp2":
            from .fsdp2 import FSDP2Engine
            return FSDP2Engine.state_bytes(num_params, unit_params, parallel_cfg, world_size, 4)  # fp32 gathers
        if settings.kind == "deepspeed":
            cfg = replace(parallel_cfg, zero_stage=settings.zero_stage or parallel_cfg.zero_stage)
            return DeepSpeedEngine.state_bytes(num_params, unit_params, cfg, world_size, compute_bytes)
        from .ddp import DDPEngine
        return DDPEngine.state_bytes(num_params, unit_params, parallel_cfg, world_size, compute_bytes)

    # -- the step ---------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        # Accelerate also wraps the prepared model's forward in the same autocast; this covers
        # anything the trainer computes around it. DeepSpeed: its torch_autocast does it.
        if self.kind == "deepspeed":
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        # Accelerate's own flag: its optimizer wrapper and DeepSpeed's boundary follow it.
        self.accelerator.gradient_state._set_sync_gradients(sync)
        try:
            if sync or self.kind == "deepspeed":
                yield
            else:
                with self.accelerator.no_sync(self.model):
                    yield
        finally:
            self.accelerator.gradient_state._set_sync_gradients(True)

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            # At the boundary Accelerate's DeepSpeed wrapper also takes DeepSpeed's step (clipping,
            # update, zeroing; a non-finite norm skips the update). The trainer set the learning
            # rate before the micro-batches. The trainer divides by the accumulation already.
            self.accelerator.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        if self.kind == "deepspeed":  # computed (and clipped) inside DeepSpeed's step
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm or 0.0)
            return torch.as_tensor(float("nan") if norm is None else float(norm), dtype=torch.float32)
        if max_norm is None or max_norm <= 0:
            return global_grad_norm(list(self.model.parameters()), None)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        from torch.distributed.tensor import DTensor
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return torch.as_tensor(norm).detach().float()

    def optimizer_step(self) -> None:
        if self.kind != "deepspeed":  # DeepSpeed stepped at the boundary's backward
            self.optimizer.step()

    def zero_grad(self) -> None:
        if self.kind == "deepspeed":
            self.ds.optimizer.zero_grad(set_to_none=True)  # gradients of an abandoned accumulation
        else:
            self.optimizer.zero_grad(set_to_none=True)

    # -- the full model ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        if self.kind == "fsdp2":  # as the native fsdp2 engine: root gathered, blocks in their forward
            self.model.unshard()
            try:
                yield self.model
            finally:
                self.model.reshard()
        elif self.kind == "deepspeed":
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.unwrapped_model.parameters()), modifier_rank=None,
                                                   enabled=self.zero_stage == 3):
                yield self.unwrapped_model
        else:
            yield self.unwrapped_model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind == "deepspeed":
            with self.full_model() as module:
                return {clean_parameter_name(k): v.detach().to("cpu", copy=True)
                        for k, v in module.state_dict().items()}
        return super().full_state_dict()

    # -- checkpoint state -------------------------------------------------------------------------
    def dcp_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(self.model, self.torch_optimizer)

    def load_dcp_state(self, model_state: dict, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.torch_optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)

    def state_metadata(self) -> dict:
        return {**super().state_metadata(), "accelerate": self.kind}

    def save_state(self, checkpoint_dir: str | Path, *, async_group=None, blocking: bool = True):
        if self.kind == "deepspeed":
            return DeepSpeedEngine.save_state(self, checkpoint_dir)
        return super().save_state(checkpoint_dir, async_group=async_group, blocking=blocking)

    def load_state(self, checkpoint_dir: str | Path, metadata: dict) -> None:
        if self.kind == "deepspeed":
            DeepSpeedEngine.load_state(self, checkpoint_dir, metadata)
            return
        super().load_state(checkpoint_dir, metadata)

    @classmethod
    def consolidate(cls, checkpoint_dir: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        if (Path(checkpoint_dir) / DEEPSPEED_DIR).is_dir():
            return DeepSpeedEngine.consolidate(checkpoint_dir, model)
        return super().consolidate(checkpoint_dir, model)


@contextlib.contextmanager
def _environment_without(name: str):
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value
