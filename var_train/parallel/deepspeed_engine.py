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

import logging

import torch
import torch.nn as nn

from .activation_checkpoint import apply_activation_checkpointing, apply_compile
from .engine import CHECKPOINT_FORMAT_DEEPSPEED, Engine
from .optimizer import build_optimizer

# Big enough that DeepSpeed never prints its own progress lines; the trainer logs.
_NEVER = 1 << 30


def deepspeed_config(parallel_cfg, optim_cfg, world_size: int, grad_accumulation_steps: int) -> dict:
    if parallel_cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 1, 2 or 3 for the deepspeed engine, "
                         f"got {parallel_cfg.zero_stage}")
    if parallel_cfg.precision not in ("bf16", "fp32"):
        raise ValueError(f"parallel.precision must be 'bf16' or 'fp32', got {parallel_cfg.precision!r}")
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

    def __init__(self, model: nn.Module, parallel_cfg, optim_cfg, device: torch.device,
                 world_size: int, grad_accumulation_steps: int):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if device.type == "cpu":
            # On CPU ranks DeepSpeed JIT-compiles a shared-memory all-reduce kernel when its
            # communication backend starts (minutes on a small machine); gloo does the job.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        model.to(device)
        if parallel_cfg.activation_checkpointing:
            apply_activation_checkpointing(model.blocks)
        if parallel_cfg.compile:
            apply_compile(model.blocks)
        optimizer = build_optimizer(model, optim_cfg)
        self.zero_stage = parallel_cfg.zero_stage
        self.config = deepspeed_config(parallel_cfg, optim_cfg, world_size, grad_accumulation_steps)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                  dist_init_required=False)
        self.ds = ds_engine
        self._step_pending = False  # a boundary backward happened and its step is not taken yet
        # The torch AdamW stays the optimizer the trainer sees: ZeRO keeps its param_groups
        # (one flat fp32 partition per group) and reads "lr"/"weight_decay" from them each step.
        super().__init__(ds_engine, ds_engine.module, optimizer, device, parallel_cfg.precision,
                         grad_accumulation_steps)

    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(sync_gradients)
        self.ds.backward(loss, scale_wrt_gas=False)
        if sync_gradients:
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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        module = self.ds.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def dcp_state(self):
        raise TypeError("the deepspeed engine saves through DeepSpeed's own checkpoints")

    def load_dcp_state(self, model_state, optimizer_state):
        raise TypeError("the deepspeed engine loads through DeepSpeed's own checkpoints")

    # DeepSpeed's checkpoint files, used by var_train.checkpoint inside its atomic directories.
    def save_deepspeed_checkpoint(self, directory: str, tag: str) -> None:
        self.ds.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_deepspeed_checkpoint(self, directory: str, tag: str) -> None:
        load_path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        self._step_pending = False
