"""The two models of VAR: the multi-scale VQVAE tokenizer and the next-scale transformer."""

from .quantizer import DEFAULT_PATCH_NUMS, MultiScaleQuantizer, QuantizerOutput
from .sampling import (SamplingSettings, decode_tokens, filter_top_k_top_p, generate_batch, sample_generator,
                       sample_tokens)
from .size_rules import PAPER_DEPTHS, SizeRule, size_rule
from .var import VAR
from .vqvae import VQVAE, VQVAEOutput

__all__ = [
    "DEFAULT_PATCH_NUMS", "MultiScaleQuantizer", "QuantizerOutput", "VAR", "VQVAE", "VQVAEOutput",
    "PAPER_DEPTHS", "SamplingSettings", "SizeRule", "decode_tokens", "filter_top_k_top_p", "generate_batch",
    "sample_generator", "sample_tokens", "size_rule",
]
