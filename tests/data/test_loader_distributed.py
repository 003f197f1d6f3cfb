import json
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from tests.data.synthetic_shards import make_token_shards

WORKER = Path(__file__).with_name("loader_worker.py")


@pytest.mark.distributed
@pytest.mark.parametrize("num_records", [48, 53])
def test_two_ranks_two_workers_cover_each_record_once_per_epoch(tmp_path, num_records):
    make_token_shards(tmp_path / "shards", num_records=num_records, shard_size=5, patch_nums=(1, 2, 3))
    run_torchrun(WORKER, str(tmp_path / "shards"), str(tmp_path / "seen"), nproc=2, timeout=240)
    ranks = [json.loads((tmp_path / f"seen-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches_per_epoch"] == ranks[1]["batches_per_epoch"] == num_records // 8
    for epoch in range(2):
        per_rank = [ranks[r]["epochs"][epoch] for r in range(2)]
        assert [len(batches) for batches in per_rank] == [num_records // 8] * 2  # same count: no hanging collectives
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == 8 * (num_records // 8)
        if num_records % 8 == 0:
            assert sorted(seen) == list(range(num_records))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
