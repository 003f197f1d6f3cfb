import collections

import numpy as np
import pytest
import torch

from data_prep.shards import shard_name, write_shard
from tests.data.synthetic_shards import make_token_shards, record_tokens
from var_train.data import CorruptRecordError, build_token_loader
from var_train.data.loader import resume_position, plan_worker_ranges, split_evenly
from var_train.data.records import TokenRecord

PATCH_NUMS = (1, 2, 3)
VOCAB = 4096


def make(path, **kw):
    return make_token_shards(path, patch_nums=PATCH_NUMS, vocab_size=VOCAB, **kw)


def loader_for(path, **kw):
    args = dict(batch_size=4, patch_nums=PATCH_NUMS, vocab_size=VOCAB, num_classes=10, rank=0, world_size=1,
                num_workers=0, seed=0, shuffle_buffer=8)
    args.update(kw)
    return build_token_loader(path, **args)


def batch_ids(batch):
    """Record index and variant of each row (synthetic tokens carry both)."""
    first = batch.tokens_per_scale[0][:, 0]
    variant = batch.tokens_per_scale[1][:, 0]
    return list(zip(first.tolist(), variant.tolist()))


def check_batch(batch, num_tokens=14, flip=False):
    assert [t.shape[1] for t in batch.tokens_per_scale] == [1, 4, 9]
    assert all(t.dtype == torch.int64 for t in batch.tokens_per_scale) and batch.labels.dtype == torch.int64
    tokens = torch.cat(batch.tokens_per_scale, dim=1).numpy()
    for row, label in zip(tokens, batch.labels.tolist()):
        index, variant = int(row[0]), int(row[1])
        assert label == index % 10
        np.testing.assert_array_equal(row, record_tokens(index, num_tokens, VOCAB, variant))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_covers_every_record_once(tmp_path, num_workers):
    make(tmp_path, num_records=48, shard_size=7)
    loader = loader_for(tmp_path, num_workers=num_workers)
    assert loader.batches_per_epoch == 12 and len(loader) == 12
    seen = []
    for batch in loader:
        check_batch(batch)
        seen += [index for index, _ in batch_ids(batch)]
    assert sorted(seen) == list(range(48))
    assert loader.epoch == 1 and loader.batches_consumed == 0
    second = [i for batch in loader for i, _ in batch_ids(batch)]
    assert sorted(second) == list(range(48)) and second != seen  # reshuffled each epoch


def test_plan_covers_records_exactly_once_across_ranks_and_workers():
    shards = [(f"s{i}", n) for i, n in enumerate([10, 10, 10, 3, 0, 10])]
    for world_size, workers, batch in [(2, 2, 3), (3, 4, 2), (1, 3, 5)]:
        per_rank = sum(n for _, n in shards) // (world_size * batch)
        covered = collections.Counter()
        for rank in range(world_size):
            plans = plan_worker_ranges(shards, epoch=3, seed=1, rank=rank, world_size=world_size, num_workers=workers,
                                       batch_size=batch, batches_per_epoch=per_rank, resampled=False)
            assert [sum(r.count for r in p) for p in plans] == [b * batch for b in split_evenly(per_rank, workers)]
            for plan in plans:
                for r in plan:
                    covered.update((r.url, i) for i in range(r.start, r.start + r.count))
        assert max(covered.values()) == 1
        assert sum(covered.values()) == per_rank * world_size * batch


def test_skip_counts_follow_round_robin():
    assert resume_position([3, 2], 0) == ([0, 0], 0)
    assert resume_position([3, 2], 3) == ([2, 1], 1)
    assert resume_position([3, 2], 4) == ([2, 2], 0)
    assert resume_position([3, 2], 5) == ([3, 2], 0)
    assert resume_position([2, 2, 1], 4) == ([2, 1, 1], 1)


@pytest.mark.parametrize("resampled,stop_after", [(False, 7), (False, 10), (True, 4)])
def test_resume_equals_uninterrupted(tmp_path, resampled, stop_after):
    make(tmp_path, num_records=44, shard_size=6, flip=True)
    kw = dict(num_workers=2, resampled=resampled, seed=5)
    reference = loader_for(tmp_path, **kw)
    assert reference.batches_per_epoch == 11  # odd: the workers have 6 and 5 batches
    uninterrupted = [batch_ids(b) for _ in range(2) for b in reference]

    first = loader_for(tmp_path, **kw)
    got = []
    for batch in first:
        got.append(batch_ids(batch))
        if len(got) == stop_after:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == stop_after
    resumed = loader_for(tmp_path, **kw)
    resumed.load_state_dict(state)
    got += [batch_ids(b) for b in resumed]
    got += [batch_ids(b) for b in resumed]
    assert got == uninterrupted


def test_flip_variant_is_random_per_record_and_reproducible(tmp_path):
    make(tmp_path, num_records=40, shard_size=10, flip=True)
    runs = []
    for _ in range(2):
        loader = loader_for(tmp_path)
        rows = [row for batch in loader for row in batch_ids(batch)]
        for batch in loader_for(tmp_path):
            check_batch(batch)
        runs.append(rows)
    assert runs[0] == runs[1]
    variants = collections.Counter(v for _, v in runs[0])
    assert set(variants) == {0, 1} and min(variants.values()) >= 8
    plain = [v for b in loader_for(tmp_path, use_flip=False) for _, v in batch_ids(b)]
    assert set(plain) == {0}


def test_crops_pick_one_stored_crop(tmp_path):
    make(tmp_path, num_records=40, shard_size=10, crops=3)
    loader = loader_for(tmp_path)
    variants = collections.Counter()
    for batch in loader:
        check_batch(batch)
        variants.update(v for _, v in batch_ids(batch))
    assert set(variants) == {0, 2, 4}  # crop c is variant 2c in the synthetic data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_record_is_reported_with_shard_and_key(tmp_path, num_workers):
    make(tmp_path, num_records=8, shard_size=4)
    bad = [TokenRecord(f"r{i:07d}", record_tokens(i, 14, VOCAB), i % 10) for i in range(4, 8)]
    bad[2] = TokenRecord("r0000006", np.zeros(13, np.uint16), 6)  # wrong length
    write_shard(tmp_path / shard_name(1), bad)
    with pytest.raises(CorruptRecordError, match=r"r0000006.*shard-000001\.tar"):
        for _ in loader_for(tmp_path, batch_size=2, shuffle_buffer=0, num_workers=num_workers):
            pass


def test_shard_shorter_than_its_manifest_entry_fails_loudly(tmp_path):
    make(tmp_path, num_records=8, shard_size=4)
    write_shard(tmp_path / shard_name(1), [TokenRecord("r0000004", record_tokens(4, 14, VOCAB), 4)])
    with pytest.raises(CorruptRecordError, match="fewer records"):
        for _ in loader_for(tmp_path, batch_size=2, shuffle_buffer=0):
            pass


def test_pin_memory_and_to(tmp_path):
    make(tmp_path, num_records=8, shard_size=4)
    batch = next(iter(loader_for(tmp_path, pin_memory=True)))  # pinned only where CUDA exists
    moved = batch.to("cpu")
    assert torch.equal(torch.cat(moved.tokens_per_scale, 1), torch.cat(batch.tokens_per_scale, 1))
    assert torch.equal(moved.tokens, torch.cat(batch.tokens_per_scale, 1))
    assert [t.shape for t in moved.tokens_per_scale] == [(4, 1), (4, 4), (4, 9)] and len(moved) == 4
    plain = type(batch)(batch.tokens_per_scale, batch.labels).to("cpu")
    assert torch.equal(torch.cat(plain.tokens_per_scale, 1), moved.tokens)


def test_out_of_range_label_is_reported(tmp_path):
    make(tmp_path, num_records=4, shard_size=4)
    write_shard(tmp_path / shard_name(0), [TokenRecord(f"r{i:07d}", record_tokens(i, 14, VOCAB), 12 if i == 2 else i)
                                           for i in range(4)])
    with pytest.raises(CorruptRecordError, match=r"r0000002.*class 12 outside \[0, 10\)"):
        list(loader_for(tmp_path, batch_size=2))


def test_resume_with_another_batch_size_keeps_the_samples_seen(tmp_path):
    make(tmp_path, num_records=48, shard_size=8)
    loader = loader_for(tmp_path, batch_size=8)
    loader.load_state_dict({"epoch": 2, "batches_consumed": 5, "world_size": 1, "batch_size": 4, "num_workers": 0})
    assert (loader.epoch, loader.batches_consumed, len(loader)) == (2, 2, 4)
    assert len(list(loader)) == 4 and loader.epoch == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_global_torch_rng_alone(tmp_path, num_workers):
    make(tmp_path, num_records=16, shard_size=4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(loader_for(tmp_path, num_workers=num_workers))
    assert torch.equal(torch.rand(3), expected)
