"""torchrun worker: every engine on a tiny VAR over 2 CPU ranks (gloo).

Checks that each engine's training equals the same training in one process on the whole global
batch (fp32, within 1e-5; the oracle is a plain model with torch's AdamW over the reference's
weight-decay groups written out here), that FSDP2 really shards (half the rows of each block weight
per rank, DTensor Shard(0)) and HSDP replicates, that gradients are reduced on the last micro-batch
only, that `full_model()` gives a directly callable model, that any nn.Module with `block_classes`
trains the same way, and that the bf16 variants train (loss falls on a fixed batch). Run by
tests/distributed/test_engines.py.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from worker_common import (MICRO_BATCH, global_batch, log, loss_fn, max_difference, micro_batches, optim_cfg,
                           parallel_cfg, tiny_var, train_step)
from var_train.command_line import exit_process
from var_train.parallel import build_engine, destroy_distributed, init_distributed

STEPS = 3
TOLERANCE = 1e-5

# The reference's AdamW groups (VAR's `filter_params`), written out here rather than taken from
# the project, so that a grouping bug in the project cannot move the oracle with it: no weight
# decay for 1-D parameters, biases, and any parameter whose name contains one of these.
REFERENCE_NO_DECAY_NAMES = ("pos_start", "pos_1LC", "lvl_embed", "gamma", "ada_gss", "scale_mul")


def reference_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = param.ndim == 1 or name.endswith(".bias") or any(k in name for k in REFERENCE_NO_DECAY_NAMES)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def reference_steps(num_steps: int, world_size: int, accumulation: int, lr: float = 3e-3
                    ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training in one process on the whole global batch: a plain model, torch's AdamW
    over the reference's groups, no engine and no parallelism at all."""
    model = tiny_var()
    cfg = optim_cfg(world_size, accumulation)
    optimizer = torch.optim.AdamW(reference_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas, eps=cfg.eps)
    losses = []
    for step in range(num_steps):
        labels, teacher_input, targets = global_batch(step, MICRO_BATCH * world_size * accumulation)
        loss = loss_fn(model(labels, teacher_input), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_matches_reference(info, name: str, accumulation: int, **parallel_overrides):
    started = time.perf_counter()
    engine = build_engine(tiny_var(), parallel_cfg(**parallel_overrides), optim_cfg(info.world_size, accumulation),
                          info.device)
    losses = [train_step(engine, step, info.rank, info.world_size, accumulation) for step in range(STEPS)]
    state = engine.full_state_dict()
    ref_losses, ref_state = reference_steps(STEPS, info.world_size, accumulation)
    loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses))
    param_gap = max_difference(state, ref_state)
    assert loss_gap < TOLERANCE and param_gap < TOLERANCE, (
        f"{name}: differs from single-process training: losses {losses} vs {ref_losses}, "
        f"max parameter difference {param_gap:.3g}")
    log(info.rank, f"OK {name}: matches the single-process reference (loss gap {loss_gap:.2g}, "
                   f"parameter gap {param_gap:.2g}, {time.perf_counter() - started:.1f}s)")
    return engine


def check_full_model(info, engine, name: str) -> None:
    """Inside `full_model()` the model's pieces are callable directly (as KV-cached sampling calls
    its embeddings and head) and the whole model gives the logits of an unsharded copy."""
    plain = tiny_var()
    plain.load_state_dict(engine.full_state_dict())
    plain.eval()
    labels, teacher_input, _ = global_batch(50, 3)
    labels, teacher_input = labels.to(engine.device), teacher_input.to(engine.device)
    with torch.no_grad():
        expected_logits = plain(labels, teacher_input)
        expected_embedding = plain.class_emb(labels)
        with engine.full_model() as model:
            was_training = model.training
            model.eval()
            assert not isinstance(model.head.weight, DTensor), f"{name}: head weight is still sharded"
            assert tuple(model.head.weight.shape) == tuple(plain.head.weight.shape), model.head.weight.shape
            embedding = model.class_emb(labels)
            logits = model(labels, teacher_input)
            model.train(was_training)
    gap = max((embedding - expected_embedding).abs().max().item(), (logits - expected_logits).abs().max().item())
    assert gap < TOLERANCE, f"{name}: the full model differs from an unsharded copy by {gap}"
    log(info.rank, f"OK {name}: full_model() is callable piece by piece and matches an unsharded copy")


class MLPBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class GenericModel(torch.nn.Module):
    """Not a VAR: blocks nested in a Sequential, no parameter_groups of its own."""

    block_classes = (MLPBlock,)

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = torch.nn.Linear(4, width)
        self.trunk = torch.nn.Sequential(MLPBlock(width), MLPBlock(width), torch.nn.GELU())
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.out(self.trunk(self.stem(x)))


def check_generic_module(info, engine_name: str, **overrides) -> None:
    """Any nn.Module with `block_classes` trains through build_engine like one process with the
    plain rule (matrices decayed; biases and LayerNorm weights not), written out here."""
    def make():
        torch.manual_seed(11)
        return GenericModel()

    def batch(step, size):
        gen = torch.Generator().manual_seed(100 + step)
        return torch.randn(size, 4, generator=gen), torch.randn(size, 3, generator=gen)

    cfg = optim_cfg(info.world_size, 1)
    engine = build_engine(make(), parallel_cfg(engine=engine_name, **overrides), cfg, info.device)
    if engine_name == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in engine.unwrapped_model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 3, f"expected 2 blocks + root sharded, got {len(units)}"
    reference = make()
    decay = [p for n, p in reference.named_parameters() if n.endswith("weight") and p.ndim == 2]
    no_decay = [p for n, p in reference.named_parameters() if n.endswith("bias") or p.ndim == 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=3e-2, betas=cfg.betas, eps=cfg.eps)
    per_rank = MICRO_BATCH
    for step in range(3):
        x, y = batch(step, per_rank * info.world_size)
        mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        with engine.micro_batch(sync=True):
            engine.backward(torch.nn.functional.mse_loss(engine.model(x[mine].to(engine.device)), y[mine]))
        for group in engine.optimizer.param_groups:
            group["lr"] = 3e-2
        engine.clip_grad_norm(2.0)
        engine.optimizer_step()
        engine.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gap = max_difference(engine.full_state_dict(), reference.state_dict())
    assert gap < TOLERANCE, f"generic module under {engine_name}: differs from one process by {gap}"
    log(info.rank, f"OK {engine_name}: a generic module with block_classes trains like one process (gap {gap:.2g})")


def check_sync_only_on_the_last_micro_batch(info, engine_name: str) -> None:
    """`micro_batch(sync=False)` really skips the gradient reduction (the equivalence checks cannot
    tell: reducing every micro-batch gives the same sums, only slower)."""
    engine = build_engine(tiny_var(), parallel_cfg(engine=engine_name), optim_cfg(info.world_size, 2), info.device)
    reductions = []
    if engine_name == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            reductions.append(1)
            return allreduce_hook(state, bucket)

        engine.model.register_comm_hook(None, counting_hook)

    def reduced() -> bool:  # fsdp2: sharded gradients appear only when reduce-scattered
        if engine_name == "ddp":
            return bool(reductions)
        return any(p.grad is not None for p in engine.unwrapped_model.parameters())

    seen = []
    for index, (labels, teacher_input, targets) in enumerate(micro_batches(0, info.rank, info.world_size, 2)):
        with engine.micro_batch(sync=index == 1):
            engine.backward(loss_fn(engine.model(labels, teacher_input), targets) / 2)
        seen.append(reduced())
    assert seen == [False, True], f"{engine_name}: gradients reduced after micro-batches {seen}"
    log(info.rank, f"OK {engine_name}: gradients are reduced on the last micro-batch only")


def check_fsdp2_sharding(info, engine, placements) -> None:
    weight = engine.model.blocks[0].attn.mat_qkv.weight
    assert isinstance(weight, DTensor), f"block weight is {type(weight)}, not a DTensor"
    assert tuple(weight.placements) == placements, f"placements {weight.placements} != {placements}"
    shard_size = info.world_size // (2 if len(placements) == 2 else 1)
    rows = weight.shape[0]
    local_rows = weight.to_local().shape[0]
    assert local_rows == rows // shard_size, f"rank {info.rank} holds {local_rows} of {rows} rows"
    log(info.rank, f"OK fsdp2 placements {placements}: {local_rows} of {rows} rows per rank")


def check_wrapping_order(info) -> None:
    """activation checkpointing -> compile -> fully_shard per block -> root, and clean state names.
    (torch.compile is lazy: nothing is compiled unless the model runs.)"""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    engine = build_engine(tiny_var(), parallel_cfg(activation_checkpointing=True, compile=True),
                          optim_cfg(info.world_size), info.device)
    block = engine.model.blocks[0]
    assert isinstance(engine.model, FSDPModule) and isinstance(block, FSDPModule), type(block)
    assert isinstance(block, OptimizedModule) and isinstance(block._orig_mod, CheckpointWrapper), type(block)
    assert set(engine.full_state_dict()) == set(tiny_var().state_dict()), sorted(engine.full_state_dict())[:5]
    log(info.rank, "OK fsdp2 wrapping order: FSDP(compile(checkpoint(block))); state names stay clean")


def check_loss_falls(info, name: str, **parallel_overrides) -> None:
    engine = build_engine(tiny_var(), parallel_cfg(**parallel_overrides), optim_cfg(info.world_size), info.device)
    seen = []  # dtype of a block's weight and of its matmul output inside the forward
    linear = engine.unwrapped_model.blocks[0].attn.proj
    handle = linear.register_forward_hook(lambda module, args, out: seen.append((module.weight.dtype, out.dtype)))
    losses = [train_step(engine, 0, info.rank, info.world_size, 1, fixed=True) for _ in range(6)]
    handle.remove()
    assert seen and all(out == torch.bfloat16 for _, out in seen), f"{name}: block matmuls ran in {seen[0]}"
    if parallel_overrides.get("engine", "fsdp2") == "fsdp2":
        assert seen[0][0] == torch.bfloat16, f"{name}: FSDP2 gathered {seen[0][0]} block weights, not bf16"
    assert all(torch.isfinite(torch.tensor(losses))), f"{name}: non-finite loss {losses}"
    assert losses[-1] < losses[0] - 0.05, f"{name}: loss did not fall on a fixed batch: {losses}"
    for param in engine.optimizer.param_groups[0]["params"]:
        assert param.dtype == torch.float32, f"{name}: master parameter in {param.dtype}"
    log(info.rank, f"OK {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} on a fixed batch")


def check_nonfinite_step_is_skipped(info, name: str, **parallel_overrides) -> None:
    """A NaN loss gives a non-finite norm; skipping optimizer_step then leaves the weights as they
    were, and the next step trains normally."""
    engine = build_engine(tiny_var(), parallel_cfg(**parallel_overrides), optim_cfg(info.world_size), info.device)
    train_step(engine, 0, info.rank, info.world_size, 1)
    before = engine.full_state_dict()
    labels, teacher_input, targets = micro_batches(1, info.rank, info.world_size, 1)[0]
    with engine.micro_batch(sync=True):
        with engine.autocast():
            logits = engine.model(labels, teacher_input)
        engine.backward(loss_fn(logits.float(), targets) * float("nan"))
    norm = engine.clip_grad_norm(2.0)
    assert not torch.isfinite(norm), f"{name}: gradient norm {norm} of a NaN loss"
    engine.zero_grad()  # the trainer skips optimizer_step
    assert max_difference(engine.full_state_dict(), before) == 0.0, f"{name}: a skipped step changed the weights"
    loss = train_step(engine, 2, info.rank, info.world_size, 1)
    assert loss == loss and max_difference(engine.full_state_dict(), before) > 0, f"{name}: no recovery"
    log(info.rank, f"OK {name}: a non-finite step is skipped and training goes on")


def single_process() -> None:
    """A plain `python` run without any launcher: a world of one, every engine still works."""
    import os

    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ, "started by a launcher"
    info = init_distributed()
    assert (info.rank, info.world_size) == (0, 1), info
    for engine in ("fsdp2", "ddp", "deepspeed"):
        check_matches_reference(info, f"{engine} in a plain single process", 1, engine=engine)


def main(which: str) -> None:
    if which == "single":
        single_process()
        return destroy_distributed()
    info = init_distributed()
    assert info.world_size == 2, f"expected 2 ranks, got {info.world_size}"
    if which in ("all", "fsdp2"):
        engine = check_matches_reference(info, "fsdp2 fp32", 1)
        check_fsdp2_sharding(info, engine, (Shard(0),))
        check_full_model(info, engine, "fsdp2")
        check_generic_module(info, "fsdp2")
        check_sync_only_on_the_last_micro_batch(info, "fsdp2")
        check_matches_reference(info, "fsdp2 fp32, accumulation 2, activation checkpointing, no reshard", 2,
                                activation_checkpointing=True, reshard_after_forward=False)
        engine = check_matches_reference(info, "fsdp2 HSDP replicate_degree=2", 1, replicate_degree=2)
        check_fsdp2_sharding(info, engine, (Replicate(), Shard(0)))
        check_loss_falls(info, "fsdp2 bf16", precision="bf16")
        check_wrapping_order(info)
        check_nonfinite_step_is_skipped(info, "fsdp2")
    if which in ("all", "ddp"):
        engine = check_matches_reference(info, "ddp fp32, accumulation 2, activation checkpointing", 2,
                                         engine="ddp", activation_checkpointing=True)
        check_full_model(info, engine, "ddp")
        check_generic_module(info, "ddp", activation_checkpointing=True)
        check_sync_only_on_the_last_micro_batch(info, "ddp")
        check_loss_falls(info, "ddp bf16", engine="ddp", precision="bf16")
        check_nonfinite_step_is_skipped(info, "ddp", engine="ddp")
    if which in ("all", "deepspeed"):
        check_matches_reference(info, "deepspeed zero 2 fp32, accumulation 2", 2, engine="deepspeed", zero_stage=2)
        engine = check_matches_reference(info, "deepspeed zero 3 fp32, activation checkpointing", 1,
                                         engine="deepspeed", zero_stage=3, activation_checkpointing=True)
        check_full_model(info, engine, "deepspeed zero 3")
        check_loss_falls(info, "deepspeed zero 2 bf16", engine="deepspeed", zero_stage=2, precision="bf16")
        check_nonfinite_step_is_skipped(info, "deepspeed zero 2", engine="deepspeed", zero_stage=2)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
