"""Shards streamed from URLs (http on 127.0.0.1, pipe:cat) give the local reader's batches, resume exactly,
and fail loudly (naming the URL) when the server or the shards are wrong."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

from tests.data.synthetic_shards import make_token_shards
from tests.data.test_loader import PATCH_NUMS, VOCAB, batch_ids, check_batch, loader_for
from var_train.data import CorruptRecordError, read_manifest
from var_train.data.sources import is_remote, parse_source, read_shard_manifest

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) URLs with curl")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def served(tmp_path):
    """(local shard folder, http base URL): the folder served by a real HTTP server on 127.0.0.1."""
    folder = tmp_path / "shards"
    make_token_shards(folder, num_records=44, shard_size=6, patch_nums=PATCH_NUMS, vocab_size=VOCAB, flip=True)
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def epochs(spec, count=2, **kw):
    loader = loader_for(spec, **kw)
    return [batch_ids(batch) for _ in range(count) for batch in loader]


def test_parse_source_forms():
    local = parse_source("/data/tokens")
    assert local.local and local.url("shard-000001.tar") == "/data/tokens/shard-000001.tar"
    base = parse_source("https://host:8000/tokens/")
    assert base.url("manifest.json") == "https://host:8000/tokens/manifest.json" and base.names is None
    pattern = parse_source("pipe:cat /d/tok/shard-{000000..000002}.tar | cat")
    assert pattern.names == ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")
    assert pattern.url("manifest.json") == "pipe:cat /d/tok/manifest.json | cat"
    assert pattern.url("shard-000001.tar") == "pipe:cat /d/tok/shard-000001.tar | cat"
    template = parse_source("pipe:aws s3 cp s3://b/tok/{file} -")
    assert template.url("shard-000007.tar") == "pipe:aws s3 cp s3://b/tok/shard-000007.tar -"
    assert is_remote("s3://b/x") and is_remote("pipe:cat x") and not is_remote("file:///x") and not is_remote("/x")
    with pytest.raises(ValueError, match=r"\{file\}"):
        parse_source("pipe:cat /data/tokens")


@needs_curl
@pytest.mark.parametrize("num_workers", [0, 2])
def test_http_batches_equal_local(served, num_workers):
    folder, base = served
    local = epochs(folder, num_workers=num_workers, seed=3)
    assert len(local) == 2 * 11
    assert epochs(base, num_workers=num_workers, seed=3) == local
    # The manifest is fetched the same way (read_shard_manifest: the dry run).
    assert read_shard_manifest(base) == read_manifest(folder)


@needs_curl
def test_brace_pattern_over_http_and_pipe_cat(served):
    folder, base = served
    local = epochs(folder, num_workers=0, seed=1)
    names = "shard-{000000..000007}.tar"
    assert epochs(f"{base}/{names}", num_workers=0, seed=1) == local
    assert epochs(f"pipe:cat {folder}/{names}", num_workers=0, seed=1) == local
    assert epochs(f"pipe:cat {folder}/{{file}}", num_workers=0, seed=1) == local
    for batch in loader_for(f"pipe:cat {folder}/{names}", num_workers=0, seed=1):
        check_batch(batch, flip=True)  # the tokens themselves, not only their ids, are the right ones


@needs_curl
@pytest.mark.parametrize("resampled,stop_after", [(False, 7), (True, 4)])
def test_http_resume_equals_uninterrupted(served, resampled, stop_after):
    folder, base = served
    kw = dict(num_workers=2, resampled=resampled, seed=5)
    uninterrupted = epochs(folder, **kw)
    first = loader_for(base, **kw)
    got = []
    for batch in first:
        got.append(batch_ids(batch))
        if len(got) == stop_after:
            break
    resumed = loader_for(base, **kw)
    resumed.load_state_dict(first.state_dict())
    got += [batch_ids(b) for _ in range(2) for b in resumed]
    assert got == uninterrupted


@needs_curl
def test_missing_manifest_and_pattern_mismatch_name_the_url(served):
    folder, base = served
    with pytest.raises(FileNotFoundError, match=r"127\.0\.0\.1.*/nowhere/manifest\.json"):
        loader_for(f"{base}/nowhere")
    with pytest.raises(ValueError, match="not in the pattern"):
        loader_for(f"{base}/shard-{{000000..000005}}.tar")
    with pytest.raises(FileNotFoundError, match="manifest"):
        loader_for(f"pipe:cat {folder}/missing/{{file}}")


@needs_curl
def test_truncated_streamed_shard_fails_loudly(served):
    folder, base = served
    shard = folder / "shard-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # cut mid-archive: the server sends a short tar
    with pytest.raises((CorruptRecordError, ValueError, OSError), match="shard-000003"):
        epochs(base, count=1, num_workers=0, seed=0, shuffle_buffer=0)
