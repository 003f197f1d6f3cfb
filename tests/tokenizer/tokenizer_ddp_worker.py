"""torchrun worker: 2-rank tokenizer training; every rank must end with bit-identical weights.

Usage: torchrun --nproc-per-node 2 tokenizer_ddp_worker.py DATA_DIR OUTPUT_DIR
"""

import sys

import torch
import torch.distributed as dist

from var_train.command_line import exit_process
from var_train.parallel import destroy_distributed
from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer


def check_identical(result, what: str) -> None:
    assert result.exit_code == 0 and result.step == 4
    # Parameters only: the usage buffer ema_vocab_hit_SV counts each rank's own hits.
    flat = torch.cat([p.detach().float().flatten() for p in result.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), (gathered[0] - gathered[1]).abs().max()
    # Each rank trained on its own images: identical weights come from DDP's gradient averaging.
    print(f"rank {dist.get_rank()}: REPLICAS IDENTICAL ({what})", flush=True)


def main() -> None:
    data_dir, output_dir = sys.argv[1], sys.argv[2]
    # dead_code_steps=1 restarts codes at every step: the broadcast path must keep ranks in step.
    common = dict(data_dir=data_dir, vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2), batch_size=4,
                  lr=1e-3, max_steps=4, log_every=2, checkpoint_every=2, val_fraction=0.1, num_workers=0,
                  progress=False, wandb_mode="disabled")
    result = train_tokenizer(TokenizerTrainingConfig(output_dir=output_dir, dead_code_steps=1, **common))
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected a world of 2 processes"
    check_identical(result, "restarts")
    # The adversarial path: a second DDP engine for the discriminator from step 2 on, the frozen
    # plain module in the VQVAE's step.
    adversarial = train_tokenizer(TokenizerTrainingConfig(output_dir=f"{output_dir}/adversarial", disc_weight=0.5,
                                                          disc_start=2, **common))
    check_identical(adversarial, "adversarial")
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
