"""DeepSpeed ZeRO-1/2/3 with a plain torch AdamW (no fused Adam, nothing to compile).

Precision: bf16 runs through DeepSpeed's `torch_autocast` mode, which keeps fp32 parameters and
computes the forward under autocast: DeepSpeed's own `bf16` mode would cast the whole module to
bf16, and the VAR computes its logits in fp32 with autocast off.

DeepSpeed computes the gradient norm inside its step (and clips there, with the ZeRO partitions
it owns), so `clip_grad_norm` takes the optimizer step and returns that norm, and the following
`optimizer_step` has nothing left to do. The learning rate must therefore be set before
`clip_grad_norm`. A step whose norm is not finite is skipped by DeepSpeed itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
import torch.nn as nn

from var_train.errors import ConfigError, CorruptFileError, MismatchError

from .engine import CHECKPOINT_FORMAT_DEEPSPEED, Engine, EngineSetup
from .optimizer import build_optimizer, clean_parameter_name

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"  # <checkpoint>/deepspeed/state/: DeepSpeed's files
# Big enough that DeepSpeed never prints its own progress lines; the trainer logs.
_NEVER = 1 << 30


def deepspeed_config(parallel_cfg, optim_cfg, world_size: int, grad_accumulation_steps: int) -> dict:
    micro = optim_cfg.micro_batch_size
    zero = {"stage": parallel_cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if parallel_cfg.zero_stage == 3:
        # Gather-on-demand as FSDP does with reshard_after_forward; keep tiny tensors resident.
        zero["stage3_param_persistence_threshold"] = 1e4
    return {
        "train_batch_size": micro * grad_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accumulation_steps,
        "gradient_clipping": float(optim_cfg.clip_grad_norm or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "torch_autocast": {"enabled": parallel_cfg.precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    checkpoint_format = CHECKPOINT_FORMAT_DEEPSPEED
    uses_autocast = False  # DeepSpeed's torch_autocast wraps the forward itself

    def __init__(self, model: nn.Module, units: list[nn.Module], setup: EngineSetup):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if setup.device.type == "cpu":
            # On CPU ranks DeepSpeed JIT-compiles a shared-memory all-reduce kernel when its
            # communication backend starts (minutes on a small machine); gloo does the job.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        optimizer = build_optimizer(model, setup.parameter_groups, setup.optim)
        self.zero_stage = setup.parallel.zero_stage
        self.config = deepspeed_config(setup.parallel, setup.optim, setup.world_size, setup.grad_accumulation_steps)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                  dist_init_required=False)
        self.ds = ds_engine
        self._step_pending = False  # a boundary backward happened and its step is not taken yet
        # The torch AdamW stays the optimizer the trainer sees: ZeRO keeps its param_groups
        # (one flat fp32 partition per group) and reads "lr"/"weight_decay" from them each step.
        super().__init__(ds_engine, ds_engine.module, optimizer, setup)

    @classmethod
    def check_config(cls, parallel_cfg) -> None:
        super().check_config(parallel_cfg)
        if parallel_cfg.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3 for the deepspeed engine, "
                              f"got {parallel_cfg.zero_stage}")

    @classmethod
    def shards_parameters(cls, parallel_cfg) -> bool:
        return parallel_cfg.zero_stage == 3

    # -- the step ---------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.ds.set_gradient_accumulation_boundary(self._sync)
        self.ds.backward(loss, scale_wrt_gas=False)
        if self._sync:
            self._step_pending = True
        else:
            self.ds.step()  # bookkeeping only: not a boundary, no update

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        clip = float(max_norm) if max_norm is not None and max_norm > 0 else 0.0
        self.ds.optimizer.clip_grad = clip
        self._take_step()
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()

    def _take_step(self) -> None:
        if self._step_pending:
            self.ds.step()  # zeroes DeepSpeed's gradient buffers too
            self._step_pending = False

    def optimizer_step(self) -> None:
        self._take_step()

    def zero_grad(self) -> None:
        if self._step_pending:
            # A boundary without a step (the trainer skipped it) must still reach DeepSpeed's
            # step, which clears the reduced gradient partitions; a non-finite norm makes it
            # skip the update itself.
            self._take_step()
        else:
            # Drop gradients of micro-batches whose step was abandoned before its boundary.
            self.ds.optimizer.zero_grad(set_to_none=True)

    # -- the full model ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_model(self):
        import deepspeed

        module = self.ds.module
        # ZeRO-3 partitions every parameter: gather them all for the context (every rank).
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.zero_stage == 3):
            yield module

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        with self.full_model() as module:
            return {clean_parameter_name(k): v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    # -- checkpoint state: DeepSpeed's own files --------------------------------------------------
    def dcp_state(self):
        raise TypeError("the deepspeed engine saves through DeepSpeed's own checkpoints")

    def load_dcp_state(self, model_state, optimizer_state):
        raise TypeError("the deepspeed engine loads through DeepSpeed's own checkpoints")

    def save_state(self, checkpoint_dir: str | Path, *, async_group=None, blocking: bool = True):
        """DeepSpeed writes its ZeRO partitions synchronously (no asynchronous mode): returns None."""
        self.ds.save_checkpoint(str(Path(checkpoint_dir) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        return None

    def load_state(self, checkpoint_dir: str | Path, metadata: dict) -> None:
        self._check_readable(checkpoint_dir, metadata)
        saved_world = metadata.get("world_size")
        if saved_world != self.world_size:
            raise MismatchError(f"{checkpoint_dir} holds DeepSpeed ZeRO partitions of {saved_world} ranks; "
                                f"resume it on {saved_world} ranks, not {self.world_size}")
        load_path, _ = self.ds.load_checkpoint(str(Path(checkpoint_dir) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CorruptFileError(f"no DeepSpeed checkpoint {DEEPSPEED_TAG!r} in {checkpoint_dir}/{DEEPSPEED_DIR}")
        self._step_pending = False

    @classmethod
    def consolidate(cls, checkpoint_dir: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """fp32 weights from the ZeRO partitions (DeepSpeed's zero_to_fp32), on one process."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates every shard
            weights = get_fp32_state_dict_from_zero_checkpoint(str(Path(checkpoint_dir) / DEEPSPEED_DIR),
                                                               tag=DEEPSPEED_TAG)
        weights = {clean_parameter_name(k): v for k, v in weights.items()}
        # Buffers are derived from the config (scale index, mask): take the model's own for any
        # that DeepSpeed's consolidation leaves out.
        state = {key: weights.get(key, value) for key, value in model.state_dict().items()}
        unexpected = sorted(set(weights) - set(state))
        if unexpected:
            raise MismatchError(f"{checkpoint_dir}: DeepSpeed state has keys the model lacks: {unexpected[:10]}")
        missing = sorted(name for name, _ in model.named_parameters() if name not in weights)
        if missing:
            raise MismatchError(f"{checkpoint_dir}: DeepSpeed state lacks parameters: {missing[:10]}")
        return state

    @staticmethod
    def state_bytes(num_params: float, unit_params: float, parallel_cfg, world_size: int,
                    compute_bytes: int) -> tuple[float, float, float]:
        """(parameters, gradients, AdamW states) bytes per GPU under ZeRO-1/2/3."""
        stage = parallel_cfg.zero_stage
        params = 4 * num_params / world_size + 2 * unit_params * 4 if stage == 3 else 4 * num_params
        grads = 4 * num_params / world_size + 2 * unit_params * 4 if stage >= 2 else 4 * num_params
        return params, grads, 12 * num_params / world_size  # fp32 master partition + two moments
