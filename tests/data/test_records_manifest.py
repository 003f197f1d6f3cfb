import io

import numpy as np
import pytest

from data_prep.shards import shard_name, write_shard
from tests.data.synthetic_shards import make_token_shards
from var_train.data import build_token_loader, read_manifest
from var_train.data.records import (CorruptRecordError, TokenRecord, decode_record, decode_tokens, encode_record,
                                    safe_key)
from var_train.data.tar_reader import iter_tar_samples


def test_record_roundtrip_through_a_shard(tmp_path):
    one = np.arange(30, dtype=np.uint16)
    crops = np.stack([one, one[::-1].copy()])
    records = [TokenRecord("a", one, 3), TokenRecord("b", crops, 7, tokens_flip=crops + 1)]
    write_shard(tmp_path / shard_name(0), records)
    samples = list(iter_tar_samples(tmp_path / shard_name(0)))
    assert [s["__key__"] for s in samples] == ["a", "b"]
    decoded = [decode_record(s, num_tokens=30) for s in samples]
    np.testing.assert_array_equal(decoded[0].tokens, one)
    assert decoded[0].tokens_flip is None and decoded[0].label == 3
    np.testing.assert_array_equal(decoded[1].tokens, crops)
    np.testing.assert_array_equal(decoded[1].tokens_flip, crops + 1)
    assert decoded[1].label == 7
    assert not (tmp_path / (shard_name(0) + ".tmp")).exists()


def test_decode_tokens_matches_numpy_and_rejects_bad_bytes():
    array = np.random.default_rng(0).integers(0, 4096, size=680).astype(np.uint16)
    buffer = io.BytesIO()
    np.save(buffer, array)
    np.testing.assert_array_equal(decode_tokens(buffer.getvalue()), array)
    with pytest.raises(ValueError, match="truncated"):
        decode_tokens(buffer.getvalue()[:-2])
    with pytest.raises(ValueError, match="magic"):
        decode_tokens(b"hello world")
    wrong = io.BytesIO()
    np.save(wrong, array.astype(np.int32))
    with pytest.raises(ValueError, match="uint16"):
        decode_tokens(wrong.getvalue())


def test_encode_rejects_unsafe_keys_and_wrong_dtype():
    with pytest.raises(ValueError, match="key"):
        encode_record(TokenRecord("a.b", np.zeros(3, np.uint16), 0))
    with pytest.raises(TypeError):
        encode_record(TokenRecord("a", np.zeros(3, np.int64), 0))
    assert safe_key("n01440764/img.0001.JPEG") == "n01440764_img_0001_JPEG"


def test_decode_record_names_shard_and_key():
    sample = {"__key__": "k42", "__url__": "/x/shard-000003.tar", "tokens.npy": b"garbage", "cls": b"1"}
    with pytest.raises(CorruptRecordError, match=r"'k42'.*shard-000003\.tar"):
        decode_record(sample)
    with pytest.raises(CorruptRecordError, match="missing member 'cls'"):
        decode_record({"__key__": "k", "__url__": "u", "tokens.npy": encode_record(
            TokenRecord("k", np.zeros(3, np.uint16), 0))["tokens.npy"]})


def test_manifest_mismatch_lists_every_difference(tmp_path):
    make_token_shards(tmp_path, num_records=8, shard_size=4, patch_nums=(1, 2), vocab_size=64, num_classes=5)
    manifest = read_manifest(tmp_path)
    manifest.check_compatible((1, 2), 64, 5)
    with pytest.raises(ValueError) as error:
        build_token_loader(tmp_path, batch_size=2, patch_nums=(1, 2, 3), vocab_size=4096, num_classes=10,
                           rank=0, world_size=1)
    message = str(error.value)
    assert "patch_nums: shards (1, 2), model (1, 2, 3)" in message
    assert "vocab_size: shards 64, model 4096" in message
    assert "num_classes: shards 5, model 10" in message


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)


def test_truncated_shard_is_reported_with_its_name(tmp_path):
    make_token_shards(tmp_path, num_records=6, shard_size=6, patch_nums=(1, 2), vocab_size=64)
    shard = tmp_path / shard_name(0)
    data = shard.read_bytes()
    shard.write_bytes(data[:2048 + 700])  # cut inside the second record
    with pytest.raises(ValueError, match="shard-000000.tar"):
        list(iter_tar_samples(shard))
