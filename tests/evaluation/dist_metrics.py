"""torchrun script (2 ranks): GenerativeMetrics over samples split unevenly between the ranks
(different counts and numbers of updates; rank 1's rows come in reverse order), against a
reference computed from an ADM-style `.npz` (arr_0), features extracted half per rank.
Rank 0 writes the metrics as JSON for the test to compare with one process.
Usage: dist_metrics.py REFERENCE_NPZ FAKE_NPZ OUT_JSON"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from tests.evaluation.helpers import PooledPixelExtractor
from var_train.evaluation.metrics import GenerativeMetrics
from var_train.evaluation.reference_stats import load_reference
from var_train.parallel import init_distributed


def main(reference_npz: str, fake_npz: str, out_json: str) -> None:
    info = init_distributed()
    assert dist.get_world_size() == 2, dist.get_world_size()
    extractor = PooledPixelExtractor()
    reference = load_reference(reference_npz, extractor, need_features=True, batch_size=7, progress=False)
    metrics = GenerativeMetrics(extractor, reference, precision_recall=True)
    fake = torch.from_numpy(np.load(fake_npz)["arr_0"]).permute(0, 3, 1, 2)
    split = 23  # of 37: rank 0 takes 23 rows in three updates, rank 1 the other 14 in one, reversed
    if info.rank == 0:
        for chunk in torch.arange(split).split(9):
            metrics.update(fake[chunk], chunk)
    else:
        rows = torch.arange(split, len(fake)).flip(0)
        metrics.update(fake[rows], rows)
    results = metrics.compute()
    if info.rank == 0:
        with open(out_json, "w") as f:
            json.dump({"metrics": results, "reference_count": reference.count,
                       "reference_mu": reference.mu.tolist()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
