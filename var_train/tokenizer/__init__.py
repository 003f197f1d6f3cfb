"""Training VAR's multi-scale VQVAE tokenizer on the VAR trainer's machinery (engine, checkpointer,
metric logger, preemption, LR schedule).

    from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer
    result = train_tokenizer(TokenizerTrainingConfig(data_dir="images/", output_dir="runs/tok"))

Modules: config (the dataclass), data (ImageFolder, held-out split, resumable batch order),
losses (reconstruction, LPIPS from local files, PatchGAN hinge), codebook (usage, dead-code
restarts), trainer (TokenizerTrainer, train_tokenizer). `var-prep train-tokenizer` is the command.
"""

from .config import TokenizerTrainingConfig
from .trainer import FINAL_MODEL_FILE, FINAL_REFERENCE_FILE, TokenizerTrainer, TokenizerTrainingResult, train_tokenizer

__all__ = ["FINAL_MODEL_FILE", "FINAL_REFERENCE_FILE", "TokenizerTrainer", "TokenizerTrainingConfig",
           "TokenizerTrainingResult", "train_tokenizer"]
