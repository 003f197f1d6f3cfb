"""torchrun script (2 ranks), two checks in one launch; rank 0 writes both results as JSON.

1. GenerativeMetrics over samples split unevenly between the ranks (rank 0: 23 rows in three
   updates; rank 1: 14 rows in one update, in reverse order), against a reference read from an
   ADM-style `.npz` (arr_0; features extracted half per rank). The test compares with one process.
2. ScheduledEvaluator.evaluate on a VAR sharded by the fsdp2 engine (`fully_shard` per block, then
   the root), handed over through `engine.full_model()`, with 13 samples in batches of 4 (rank 0: 7 samples, rank 1: 6; 2 batches each, padded),
   and the same evaluation of an unsharded copy of the same weights, which must agree.

Usage: dist_evaluation.py REFERENCE_NPZ FAKE_NPZ OUT_JSON"""

import copy
import json
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tests.evaluation.helpers import PooledPixelExtractor, blob_images
from tests.models.tiny import tiny_models
from var_train.command_line import exit_process
from var_train.evaluation.metrics import GenerativeMetrics
from var_train.evaluation.reference_stats import load_reference, statistics_of_images
from var_train.evaluation.scheduled import ScheduledEvaluator
from var_train.config import OptimConfig, ParallelConfig
from var_train.parallel import build_engine, destroy_distributed, init_distributed


def uneven_metrics(rank: int, reference_npz: str, fake_npz: str) -> dict:
    extractor = PooledPixelExtractor()
    reference = load_reference(reference_npz, extractor, need_features=True, batch_size=7, progress=False)
    metrics = GenerativeMetrics(extractor, reference, precision_recall=True)
    fake = torch.from_numpy(np.load(fake_npz)["arr_0"]).permute(0, 3, 1, 2)
    split = 23
    if rank == 0:
        for chunk in torch.arange(split).split(9):
            metrics.update(fake[chunk], chunk)
    else:
        rows = torch.arange(split, len(fake)).flip(0)
        metrics.update(fake[rows], rows)
    return {"metrics": metrics.compute(), "reference_count": reference.count, "reference_mu": reference.mu.tolist()}


def scheduled_on_fsdp2(device: torch.device) -> tuple[dict, ScheduledEvaluator]:
    vae, var = tiny_models(seed=0)
    plain = copy.deepcopy(var)
    engine = build_engine(var, ParallelConfig(engine="fsdp2", precision="fp32"),
                          OptimConfig(global_batch_size=dist.get_world_size(), micro_batch_size=1), device)
    assert type(var.blocks[0]).__name__.startswith("FSDP"), type(var.blocks[0])  # really sharded
    var.train()  # the trainer hands its model over in training mode; evaluation must switch it
    extractor = PooledPixelExtractor()
    reference = statistics_of_images(blob_images(64, seed=5, size=64).permute(0, 2, 3, 1).numpy(), extractor,
                                     resolution=64, progress=False)
    eval_cfg = SimpleNamespace(every_steps=10, at_end=True, num_samples=13, batch_size=4, cfg=1.5, top_k=0,
                               top_p=0.0, seed=3, vae=None, feature_extractor="unused", inception_weights=None,
                               reference_stats=None, precision_recall=True)
    model_cfg = SimpleNamespace(num_classes=10, patch_nums=(1, 2, 3, 4))
    evaluator = ScheduledEvaluator(eval_cfg, model_cfg, device, extractor=extractor, reference=reference, vae=vae)
    with engine.full_model() as model:
        sharded = evaluator.evaluate(model, vae.quantize, step=10)
    assert var.training, "evaluate() must restore the training mode"
    unsharded = evaluator.evaluate(plain, vae.quantize, step=10)
    assert (sharded.grid is not None) == (dist.get_rank() == 0)
    return {"sharded": sharded.metrics, "unsharded": unsharded.metrics, "captions": sharded.captions}


def main(reference_npz: str, fake_npz: str, out_json: str) -> None:
    info = init_distributed()
    assert dist.get_world_size() == 2, dist.get_world_size()
    results = {"uneven": uneven_metrics(info.rank, reference_npz, fake_npz), "fsdp2": scheduled_on_fsdp2(info.device)}
    if info.rank == 0:
        with open(out_json, "w") as f:
            json.dump(results, f)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
