"""The two models of VAR: the multi-scale VQVAE tokenizer and the next-scale transformer."""

from .quantizer import DEFAULT_PATCH_NUMS, MultiScaleQuantizer, QuantizerOutput
from .sampling import filter_top_k_top_p, sample_tokens
from .var import VAR, default_alng
from .vqvae import VQVAE, VQVAEOutput

__all__ = [
    "DEFAULT_PATCH_NUMS", "MultiScaleQuantizer", "QuantizerOutput", "VAR", "VQVAE", "VQVAEOutput",
    "default_alng", "filter_top_k_top_p", "sample_tokens",
]
