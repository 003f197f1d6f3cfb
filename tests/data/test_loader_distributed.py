import json
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from tests.data.synthetic_shards import make_token_shards

WORKER = Path(__file__).with_name("loader_worker.py")


@pytest.mark.distributed
def test_two_ranks_two_workers_cover_each_record_once_per_epoch(tmp_path):
    args = []
    for num_records in (48, 53):  # divisible by world_size * batch_size, and not
        make_token_shards(tmp_path / f"shards{num_records}", num_records=num_records, shard_size=5,
                          patch_nums=(1, 2, 3))
        args += [str(tmp_path / f"shards{num_records}"), str(tmp_path / f"seen{num_records}")]
    run_torchrun(WORKER, *args, nproc=2, timeout=240)
    for num_records in (48, 53):
        check_coverage(tmp_path, num_records)


def check_coverage(tmp_path, num_records):
    ranks = [json.loads((tmp_path / f"seen{num_records}-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches_per_epoch"] == ranks[1]["batches_per_epoch"] == num_records // 8
    for epoch in range(2):
        per_rank = [ranks[r]["epochs"][epoch] for r in range(2)]
        assert [len(batches) for batches in per_rank] == [num_records // 8] * 2  # same count: no hanging collectives
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == 8 * (num_records // 8)
        if num_records % 8 == 0:
            assert sorted(seen) == list(range(num_records))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
