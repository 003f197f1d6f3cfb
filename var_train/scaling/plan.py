"""Plan the paper's scaling sweep for a cluster: one valid training job per depth.

For each depth the job is the base recipe (its data, engine, checkpoint and logging settings) plus
the depth's row of the size-rule table (models/size_rules.py: width, heads, drop-path, alng, base
LR, wpe, global batch, epochs, weight decay) plus the user's overrides (which win), and then:

- a micro-batch and accumulation valid for the world size W: micro x accumulation x W equals the
  global batch exactly (so W must divide the global batch);
- the largest such micro-batch whose memory per GPU, by the dry run's estimate
  (`var_train.dry_run.memory_per_gpu`), fits `gpu_memory_gib` less a headroom for what the
  estimate leaves out (allocator, communication buffers, CUDA context); activation checkpointing
  is switched on only when no micro-batch fits without it;
- nodes (W / GPUs per node), optimizer steps (as the trainer counts them, for the dataset's size:
  the manifest of `data.train_shards` when it is readable, else ImageNet-1k's 1,281,167 images),
  and the training compute of the whole run in PFLOP-days (steps x global batch x FLOPs per image).

A job that cannot be made valid keeps its reason in `problem`. Each job's overrides load with the
real config loader, exactly as `slurm/train.sbatch` will pass them to `var-train train`.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from var_train.config import ConfigError, load_config
from var_train.data import read_manifest
from var_train.dry_run import memory_per_gpu, meta_model, steps_per_epoch
from var_train.models import PAPER_DEPTHS, size_rule
from var_train.models.size_rules import IMAGENET_TRAIN_IMAGES

from .summary import format_count

SECONDS_PER_DAY = 86_400
PAPER_TFLOPS_PER_GPU = 78.0  # the authors' d16 run: about 78 TFLOP/s per A100 (REFERENCE.md)
USER_CHOSEN_KEYS = ("optim.micro_batch_size", "parallel.activation_checkpointing")


@dataclass
class PlannedJob:
    depth: int
    params: int
    flops_per_image: float
    world_size: int
    nodes: int
    gpus_per_node: int
    global_batch_size: int
    micro_batch_size: int | None
    accumulation: int | None
    activation_checkpointing: bool
    memory_gib: float | None
    dataset_images: int
    epochs: float
    steps: int | None
    pflop_days: float | None
    days: float | None  # at `tflops_per_gpu` sustained per GPU
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    def sbatch_command(self, recipe: str, root: str | Path, sbatch: str = "sbatch") -> list[str]:
        root = Path(root)
        tasks = min(self.world_size, self.gpus_per_node)
        return [sbatch, "--nodes", str(self.nodes), "--ntasks-per-node", str(tasks), "--gpus-per-node", str(tasks),
                "--job-name", f"var-d{self.depth}", "--export", f"ALL,RECIPE={recipe},VAR_TRAIN_ROOT={root}",
                str(root / "slurm" / "train.sbatch"), *self.overrides]

    def as_dict(self) -> dict:
        return asdict(self)


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _dataset_images(cfg) -> tuple[int, str]:
    if cfg.data.train_shards:
        try:
            return read_manifest(cfg.data.train_shards).num_records, f"records of {cfg.data.train_shards}"
        except (FileNotFoundError, ValueError, OSError):
            pass
    return IMAGENET_TRAIN_IMAGES, "ImageNet-1k train images (data.train_shards not readable here)"


def plan_job(recipe: str | Path, depth: int, world_size: int, *, gpu_memory_gib: float = 80.0,
             headroom: float = 0.1, gpus_per_node: int = 8, runs: str = "runs/scaling",
             wandb_group: str | None = "scaling", overrides: list[str] | tuple[str, ...] = (),
             dataset_images: int | None = None, tflops_per_gpu: float = PAPER_TFLOPS_PER_GPU) -> PlannedJob:
    """One depth's job (see the module docstring); raises ConfigError for a bad recipe/override."""
    user = list(overrides)
    user_keys = {text.split("=", 1)[0].strip() for text in user}
    fixed = [f"run.output_dir={runs}/d{depth}", f"logging.wandb_run_name=scaling-d{depth}"]
    if wandb_group:
        fixed.append(f"logging.wandb_group={wandb_group}")
    base = size_rule(depth).overrides() + fixed
    # Load once with micro-batch 1 (always a divisor of the global batch) to read the sizes.
    probe = load_config(recipe, base + ["optim.micro_batch_size=1"] + user)
    model = meta_model(probe)
    params = sum(p.numel() for p in model.parameters())
    flops = model.train_flops_per_image()
    images, _ = (dataset_images, "") if dataset_images else _dataset_images(probe)
    G = probe.optim.global_batch_size
    nodes = max(1, -(-world_size // gpus_per_node))
    job = PlannedJob(depth=depth, params=params, flops_per_image=flops, world_size=world_size, nodes=nodes,
                     gpus_per_node=gpus_per_node, global_batch_size=G, micro_batch_size=None, accumulation=None,
                     activation_checkpointing=probe.parallel.activation_checkpointing, memory_gib=None,
                     dataset_images=images, epochs=probe.optim.epochs, steps=None, pflop_days=None, days=None,
                     run_dir=probe.run.output_dir)
    if world_size > gpus_per_node and world_size % gpus_per_node:
        job.problem = f"world size {world_size} is not a whole number of {gpus_per_node}-GPU nodes"
        return job
    if G % world_size:
        job.problem = (f"global batch {G} is not divisible by world size {world_size}: use a world size that "
                       f"divides it (e.g. {max(d for d in _divisors_descending(G) if d <= world_size)})")
        return job
    per_rank = G // world_size
    budget = gpu_memory_gib * (1 - headroom) * 2**30
    if "optim.micro_batch_size" in user_keys:
        micro_choices = [probe.optim.micro_batch_size]
    else:
        micro_choices = _divisors_descending(per_rank)
    if "parallel.activation_checkpointing" in user_keys:
        ac_choices = [probe.parallel.activation_checkpointing]
    else:
        ac_choices = [False, True]
    chosen = None
    for ac in ac_choices:
        for micro in micro_choices:
            if per_rank % micro:
                continue
            cfg = load_config(recipe, base + [f"optim.micro_batch_size={micro}",
                                              f"parallel.activation_checkpointing={str(ac).lower()}"] + user)
            memory = memory_per_gpu(cfg, model, world_size)["total"]
            if memory <= budget:
                chosen = (micro, ac, memory, cfg)
                break
        if chosen:
            break
    if chosen is None:
        smallest = min(micro_choices)
        job.problem = (f"does not fit in {gpu_memory_gib:g} GiB per GPU (less {headroom:.0%} headroom) even with "
                       f"micro-batch {smallest}" + (" and activation checkpointing" if True in ac_choices else "")
                       + ": plan for more GPUs (FSDP shards the model states) or more memory per GPU")
        return job
    micro, ac, memory, cfg = chosen
    try:
        steps = max(1, round(cfg.optim.epochs * steps_per_epoch(images, cfg, world_size)))
    except ConfigError as error:  # too few images for one step at this world size: training would refuse it
        job.problem = f"{error} ({images:,} images over {world_size} GPUs)"
        return job
    if cfg.optim.max_steps:
        steps = min(steps, cfg.optim.max_steps)
    total_flops = steps * G * flops
    job.micro_batch_size, job.accumulation, job.activation_checkpointing = micro, per_rank // micro, ac
    job.memory_gib, job.steps = memory / 2**30, steps
    job.pflop_days = total_flops / (1e15 * SECONDS_PER_DAY)
    job.days = total_flops / (world_size * tflops_per_gpu * 1e12 * SECONDS_PER_DAY)
    chosen_keys = [f"optim.micro_batch_size={micro}", f"parallel.activation_checkpointing={str(ac).lower()}"]
    # The user's overrides last (they win), except the two the plan chose: those are already in.
    job.overrides = base + chosen_keys + [text for text in user
                                          if text.split("=", 1)[0].strip() not in USER_CHOSEN_KEYS]
    return job


def plan_sweep(recipe: str | Path, world_size: int, depths=PAPER_DEPTHS, **kwargs) -> list[PlannedJob]:
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    return [plan_job(recipe, depth, world_size, **kwargs) for depth in depths]


def format_table(jobs: list[PlannedJob], tflops_per_gpu: float = PAPER_TFLOPS_PER_GPU) -> str:
    header = ("depth", "params", "width", "batch", "micro x acc x W", "AC", "GiB/GPU", "nodes", "epochs", "steps",
              "PFLOP-days", f"days@{tflops_per_gpu:g}TF")
    rows = []
    for job in jobs:
        rule = size_rule(job.depth)
        if job.valid:
            split = f"{job.micro_batch_size} x {job.accumulation} x {job.world_size}"
            rows.append((f"d{job.depth}", format_count(job.params), str(rule.embed_dim), str(job.global_batch_size),
                         split, "on" if job.activation_checkpointing else "off", f"{job.memory_gib:.1f}",
                         str(job.nodes), f"{job.epochs:g}", f"{job.steps:,}", f"{job.pflop_days:,.2f}",
                         f"{job.days:,.1f}"))
        else:
            rows.append((f"d{job.depth}", format_count(job.params), str(rule.embed_dim), str(job.global_batch_size),
                         "INVALID: " + job.problem, "", "", "", "", "", "", ""))
    # an INVALID row prints its first 4 cells, then its message unpadded: it sets no column's width
    widths = [max([len(h), *(len(r[i]) for r in rows if r[5] or i < 4)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for row in rows:
        if row[5]:
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        else:
            lines.append("  ".join(c.rjust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    valid = [job for job in jobs if job.valid]
    if valid:
        total = sum(job.pflop_days for job in valid)
        lines.append(f"total: {len(valid)} jobs, {total:,.2f} PFLOP-days "
                     f"({valid[0].dataset_images:,} images per epoch)")
    return "\n".join(lines)


def sbatch_lines(jobs: list[PlannedJob], recipe: str, root: str | Path, sbatch: str = "sbatch") -> list[str]:
    return [shlex.join(job.sbatch_command(recipe, root, sbatch)) for job in jobs if job.valid]
