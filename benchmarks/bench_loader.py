"""Token loader throughput: samples/s of one training process reading 256px token shards.

Writes synthetic shards in the real record format (L = 680 uint16 tokens, with the flipped
variant, random class of 1000) to a temporary folder, then times full epochs of
`build_token_loader` for several DataLoader worker counts. Also prints the bytes a record takes
on disk. `--readers` compares the sources a training run can read (var_train/data/sources.py):
`local` (the fast tar reader on the folder), `http` (the folder served by `python -m http.server`
on 127.0.0.1, read with WebDataset's gopen (curl) and its streaming tar iterator) and `pipe`
(`pipe:cat .../shard-{...}.tar`, same reader). The server's own CPU is not counted.

  PYTHONPATH=. python benchmarks/bench_loader.py --records 60000 --batch-size 256
  PYTHONPATH=. python benchmarks/bench_loader.py --readers local,http,pipe --workers 0,2
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.shards import shard_name, write_shard
from var_train.data import build_token_loader
from var_train.data.manifest import Manifest, ShardInfo, write_manifest
from var_train.data.records import TokenRecord

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def write_synthetic_shards(out: Path, records: int, shard_size: int, flip: bool, vocab_size: int = 4096,
                           num_classes: int = 1000) -> Manifest:
    num_tokens = sum(p * p for p in PATCH_NUMS)
    rng = np.random.default_rng(0)
    shards = []
    for index, begin in enumerate(range(0, records, shard_size)):
        count = min(shard_size, records - begin)
        tokens = rng.integers(0, vocab_size, size=(count, 2, num_tokens)).astype(np.uint16)
        labels = rng.integers(0, num_classes, size=count)
        write_shard(out / shard_name(index), (
            TokenRecord(f"img{begin + i:09d}", tokens[i, 0], int(labels[i]), tokens[i, 1] if flip else None)
            for i in range(count)))
        shards.append(ShardInfo(shard_name(index), count))
    manifest = Manifest(num_records=records, num_shards=len(shards), shards=shards, num_classes=num_classes,
                        class_names=[str(c) for c in range(num_classes)], resolution=256, patch_nums=list(PATCH_NUMS),
                        vocab_size=vocab_size, num_tokens=num_tokens, has_flip=flip, tool="benchmarks/bench_loader.py")
    write_manifest(out, manifest)
    return manifest


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the per-epoch DataLoader workers).

    On a shared machine wall-clock rates depend on the neighbours; CPU time does not.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60000)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--readers", default="local", help="comma list of local, http, pipe")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        write_synthetic_shards(out, args.records, args.shard_size, flip=not args.no_flip)
        written = time.perf_counter() - started
        disk = sum(p.stat().st_size for p in out.glob("shard-*.tar"))
        print(f"wrote {args.records} records in {written:.1f} s; {disk / args.records:.0f} bytes/record on disk "
              f"({'with' if not args.no_flip else 'without'} tokens_flip)")
        readers = args.readers.split(",")
        server, port = None, None
        if "http" in readers:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                       "--directory", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        last = shard_name(-(-args.records // args.shard_size) - 1).split("-")[1].split(".")[0]
        sources = {"local": str(out), "http": f"http://127.0.0.1:{port}",
                   "pipe": f"pipe:cat {out}/shard-{{000000..{last}}}.tar"}
        try:
            for reader in readers:
                for workers in [int(w) for w in args.workers.split(",")]:
                    _time_loader(sources[reader], reader, workers, args)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=10)


def _time_loader(source: str, reader: str, workers: int, args) -> None:
    loader = build_token_loader(source, batch_size=args.batch_size, patch_nums=PATCH_NUMS, vocab_size=4096,
                                num_classes=1000, rank=0, world_size=1, num_workers=workers)
    rates, cpu_rates, main_rates = [], [], []
    for _ in range(args.epochs):
        started, cpu_started, main_started, samples = time.perf_counter(), _cpu_seconds(), time.process_time(), 0
        for batch in loader:
            samples += len(batch)
        rates.append(samples / (time.perf_counter() - started))
        cpu_rates.append(samples / (_cpu_seconds() - cpu_started))
        main_rates.append(samples / (time.process_time() - main_started))
    print(f"{reader:5s} num_workers={workers}: {max(rates):,.0f} samples/s wall (best of {args.epochs} epochs), "
          f"{max(cpu_rates):,.0f} samples per CPU-second (loader process + its workers), "
          f"{max(main_rates):,.0f} per CPU-second of the training process itself, "
          f"batch_size {args.batch_size}, L=680, cpus={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
