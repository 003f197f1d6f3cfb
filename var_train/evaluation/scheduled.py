"""Evaluation during training: class-balanced samples from the model being trained, scored on all ranks.

    evaluator = ScheduledEvaluator(cfg.eval, cfg.model, device)   # decoder, features, reference: once
    if evaluator.due(step, last_step):
        with engine.full_model() as model:                     # collective: call on ALL ranks
            result = evaluator.evaluate(model, quantizer, step)
        logger.log(step, {f"eval/{k}": v for k, v in result.metrics.items()},
                   images={"eval/samples": result.grid} if result.grid else None)

Cost is bounded by the recipe: `eval.num_samples` images in batches of `eval.batch_size` per rank
(num_samples / world_size / batch_size sampling calls per rank), and `eval_seconds` reports how
long it took, to compare with the training time between evaluations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from PIL import Image

from var_train.errors import ConfigError
from var_train.models import generate_batch
from var_train.parallel.distributed import get_rank, get_world_size

from .features import FeatureExtractor, build_feature_extractor
from .grid import labelled_grid
from .metrics import GenerativeMetrics
from .reference_stats import ReferenceStatistics, load_reference
from .sampling import RankPlan, class_balanced_labels, eval_mode, find_var, sampling_settings

GRID_SIZE = 32


@dataclass
class EvalResult:
    metrics: dict[str, float]              # "fid", "inception_score", "precision", "recall", "eval_seconds", ...
    grid: Image.Image | None = None        # rank 0 only: the first samples, captioned with their class
    captions: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None     # rank 0 only: the grid's images, uint8 (N, 3, H, W) (the W&B table)
    labels: list[int] = field(default_factory=list)   # their class ids


class ScheduledEvaluator:
    """Built once per run on every rank (from the `eval` and `model` config sections)."""

    def __init__(self, eval_cfg, model_cfg, device: torch.device | str, *, class_names: list[str] | None = None,
                 extractor: FeatureExtractor | None = None, reference: ReferenceStatistics | None = None,
                 vae: nn.Module | None = None, progress: bool = False):
        from var_train.models.checkpoint_io import load_vae

        self.cfg = eval_cfg
        self.device = torch.device(device)
        self.num_classes = int(model_cfg.num_classes)
        self.class_names = class_names
        if vae is None:
            if not eval_cfg.vae:
                raise ConfigError("eval.vae (the full VQVAE used to decode samples) is not set")
            vae = load_vae(eval_cfg.vae, patch_nums=list(model_cfg.patch_nums))
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.extractor = extractor or build_feature_extractor(
            eval_cfg.feature_extractor, inception_weights=eval_cfg.inception_weights, device=self.device)
        self.extractor.to(self.device)
        if reference is None and eval_cfg.reference_stats:
            reference = load_reference(eval_cfg.reference_stats, self.extractor,
                                       need_features=bool(eval_cfg.precision_recall), progress=progress)
        self.reference = reference
        self.metrics = GenerativeMetrics(self.extractor, reference,
                                         precision_recall=bool(eval_cfg.precision_recall) and reference is not None,
                                         num_classes=self.num_classes, device=self.device)
        self.sampling = sampling_settings(eval_cfg)

    def due(self, step: int, last_step: bool = False) -> bool:
        every = int(self.cfg.every_steps or 0)
        return (every > 0 and step > 0 and step % every == 0) or (last_step and bool(self.cfg.at_end))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, quantizer: nn.Module | None = None, step: int | None = None) -> EvalResult:
        """Sample `eval.num_samples` images over all ranks, score them, return the same metrics on
        every rank (the grid on rank 0). A collective: every rank must call it. `model`: a plain
        VAR, or the one `engine.full_model()` yields for a distributed engine."""
        started = time.perf_counter()
        rank, world = get_rank(), get_world_size()
        var = find_var(model)
        quantizer = quantizer if quantizer is not None else self.vae.quantize
        plan = RankPlan.make(int(self.cfg.num_samples), int(self.cfg.batch_size), rank, world)
        labels_all = class_balanced_labels(int(self.cfg.num_samples), self.num_classes)
        self.metrics.reset()
        grid_images, grid_labels = [], []
        with eval_mode(var):
            for batch in range(plan.num_batches):
                indices = plan.batch_indices(batch)
                labels = labels_all[indices]
                images = generate_batch(var, self.vae, labels.to(self.device), indices, self.sampling,
                                        quantizer=quantizer, pad_to=plan.batch_size)
                if len(indices) == 0:
                    continue
                self.metrics.update(images, indices, labels)
                if rank == 0 and sum(len(x) for x in grid_images) < GRID_SIZE:
                    grid_images.append(images.cpu())
                    grid_labels.extend(labels.tolist())
        metrics = self.metrics.compute()
        metrics["num_samples"] = float(self.cfg.num_samples)
        metrics["eval_seconds"] = time.perf_counter() - started
        grid, captions, images = None, [], None
        if grid_images:
            images = torch.cat(grid_images)[:GRID_SIZE]
            captions = [self._class_name(label) for label in grid_labels[:GRID_SIZE]]
            grid = labelled_grid(images, captions, per_row=min(8, len(images)))
        return EvalResult(metrics=metrics, grid=grid, captions=captions, images=images,
                          labels=grid_labels[:GRID_SIZE] if grid_images else [])

    def _class_name(self, label: int) -> str:
        if self.class_names and label < len(self.class_names):
            return self.class_names[label]
        return str(label)
