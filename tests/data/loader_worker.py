"""torchrun worker: read one epoch of token shards on this rank (2 DataLoader workers), write what it saw.

Usage: loader_worker.py SHARDS_DIR OUT_JSON_PREFIX [SHARDS_DIR OUT_JSON_PREFIX ...]
"""

import json
import os
import sys

import torch.distributed as dist

from var_train.command_line import exit_process
from var_train.data import build_token_loader
from var_train.parallel import destroy_distributed


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == int(os.environ["WORLD_SIZE"]) == 2, world_size
    for shards_dir, prefix in zip(sys.argv[1::2], sys.argv[2::2]):
        read_two_epochs(shards_dir, prefix, rank, world_size)
    dist.barrier()
    destroy_distributed()


def read_two_epochs(shards_dir: str, prefix: str, rank: int, world_size: int) -> None:
    loader = build_token_loader(shards_dir, batch_size=4, patch_nums=(1, 2, 3), vocab_size=4096, num_classes=10,
                                rank=rank, world_size=world_size, num_workers=2, seed=3, shuffle_buffer=16)
    seen = []
    for epoch in range(2):
        indices = []
        for batch in loader:
            indices.append(batch.tokens_per_scale[0][:, 0].tolist())
        seen.append(indices)
    with open(f"{prefix}-rank{rank}.json", "w") as f:
        json.dump({"batches_per_epoch": loader.batches_per_epoch, "epochs": seen}, f)


if __name__ == "__main__":
    main()
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
