"""torchrun script (2 ranks): ScheduledEvaluator.evaluate on a VAR sharded with FSDP2 `fully_shard`
(per block, then the root), with a sample count that does not divide evenly over ranks and
batches. The same evaluation with an unsharded copy of the same weights must give the same
metrics (same samples: the rank plan and the generators do not depend on sharding).
Usage: dist_scheduled_fsdp.py OUT_JSON NUM_SAMPLES BATCH_SIZE"""

import copy
import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from tests.evaluation.helpers import PooledPixelExtractor, blob_images
from tests.models.tiny import tiny_models
from var_train.evaluation.reference_stats import statistics_of_images
from var_train.evaluation.scheduled import ScheduledEvaluator
from var_train.parallel import init_distributed


def main(out_json: str, num_samples: int, batch_size: int) -> None:
    info = init_distributed()
    assert dist.get_world_size() == 2, dist.get_world_size()
    vae, var = tiny_models(seed=0)
    plain = copy.deepcopy(var)
    for block in var.blocks:
        fully_shard(block)
    fully_shard(var)
    var.train()  # the trainer hands its model over in training mode; evaluation must switch it
    extractor = PooledPixelExtractor()
    reference = statistics_of_images(blob_images(64, seed=5, size=64).permute(0, 2, 3, 1).numpy(), extractor,
                                     resolution=64, progress=False)
    eval_cfg = SimpleNamespace(every_steps=10, at_end=True, num_samples=num_samples, batch_size=batch_size, cfg=1.5,
                               top_k=0, top_p=0.0, seed=3, vae=None, feature_extractor="unused",
                               inception_weights=None, reference_stats=None, precision_recall=True)
    model_cfg = SimpleNamespace(num_classes=10, patch_nums=(1, 2, 3, 4))
    evaluator = ScheduledEvaluator(eval_cfg, model_cfg, info.device, extractor=extractor, reference=reference, vae=vae)
    sharded = evaluator.evaluate(var, vae.quantize, step=10)
    assert var.training, "evaluate() must restore the training mode"
    unsharded = evaluator.evaluate(plain, vae.quantize, step=10)
    if info.rank == 0:
        assert sharded.grid is not None
        with open(out_json, "w") as f:
            json.dump({"sharded": sharded.metrics, "unsharded": unsharded.metrics,
                       "grid_size": list(sharded.grid.size), "captions": sharded.captions}, f)
    else:
        assert sharded.grid is None
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
