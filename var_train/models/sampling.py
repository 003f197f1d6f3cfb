"""KV-cached next-scale sampling with classifier-free guidance ramped over the scales.

Each of the K steps feeds only the new scale's tokens (the cache holds every earlier scale) for
2B rows: B conditional, B with the null class. At scale k the guided logits are
(1 + t) * cond - t * uncond with t = cfg * k / (K - 1), so guidance grows from 0 on the
coarsest map to `cfg` on the finest; then top-k and top-p filtering and a multinomial draw.

One generation path for the whole project: `var-train sample`, `var-train eval`, scheduled
evaluation during training and the demo all call `generate_batch` with a `SamplingSettings`.
Seeding rule: sample number i of a run (its global index) draws all its tokens from its own
generator, seeded from (settings.seed, i) alone. A sample is therefore the same whatever batch it
lands in, whichever rank makes it and however many ranks share the work: a 50,000-image
evaluation is one fixed set of images for a given seed. Exactly the same pixels also need the
arithmetic of a row not to depend on its batch: the transformer's is (fp32, CPU: measured), the
decoder's convolutions are not (their kernels change with the batch shape, moving pixels by one
level now and then), so tokens are always decoded in chunks of one fixed shape (`decode_rows`).
bf16 kernels on a GPU may still round a row differently with the batch size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from var_train.errors import ConfigError
from var_train.precision import PRECISIONS, resolve_sampling_precision

from .quantizer import MultiScaleQuantizer
from .var import VAR
from .vqvae import VQVAE

# The decoder always sees batches of this many rows (the last chunk padded), see the module doc. On a
# CPU one image at a time costs no more than batches (measured: 8 singles 0.90-1.01 s vs one batch
# of 8 0.75-0.93 s, tiny VQVAE at 64 px, 1 thread, 2-core box under load), so nothing is padded there.
DECODE_ROWS = {"cpu": 1}
DEFAULT_DECODE_ROWS = 8


def decode_rows(device: torch.device) -> int:
    return DECODE_ROWS.get(device.type, DEFAULT_DECODE_ROWS)


@dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled; the defaults are the paper's ImageNet 256x256 settings."""

    cfg: float = 1.5           # classifier-free guidance at the last scale (ramped from 0)
    top_k: int = 900           # keep the k most likely tokens; 0 = off
    top_p: float = 0.96        # keep the smallest nucleus of this probability; 0 = off
    seed: int = 0              # with a sample's global index, fixes its random draws
    precision: str = "auto"    # auto | bf16 | fp32 (see sampling_autocast)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.top_k < 0 or not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_k must be >= 0 and top_p in [0, 1], got {self.top_k}, {self.top_p}")
        if not math.isfinite(self.cfg):
            raise ConfigError(f"cfg must be a finite number, got {self.cfg}")


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of sample `index` in a run seeded with `seed`: a function of both alone.

    The CPU generator keeps only the low 32 bits of a seed, so (seed, index) is folded into 32 bits
    as seed * 2654435761 + index (mod 2^32): distinct indices of one run never share a stream, and
    other seeds start their windows far apart (Knuth's multiplicative hash)."""
    return torch.Generator(device=device).manual_seed((seed * 2654435761 + index) % 2**32)


def sampling_autocast(var: VAR, device: torch.device, precision: str = "auto"):
    """The autocast context of sampling. "auto": the project's rule (`var_train.precision`: bf16 on
    CUDA and on CPUs with native bf16), and bf16 wherever the weights already are bf16 (an FSDP2
    mixed-precision model); "bf16" / "fp32" force either."""
    low_precision = precision == "auto" and any(p.dtype == torch.bfloat16 for p in var.parameters())
    if low_precision or resolve_sampling_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (in place) logits (..., V) outside the top-k and outside the smallest set whose
    probability reaches top_p. 0 disables either filter."""
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_best, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(remove_sorted.scatter(-1, order, remove_sorted), -torch.inf)
    return logits


def _draw(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """probs (B, L, V) -> ids (B, L): one generator for the batch, or one per row."""
    batch, length, vocab = probs.shape
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs.view(-1, vocab), 1, generator=generator).view(batch, length)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for {batch} rows")
    return torch.stack([torch.multinomial(row, 1, generator=g).view(length) for row, g in zip(probs, generator)])


@torch.no_grad()
def sample_tokens(var: VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor, cfg: float = SamplingSettings.cfg,
                  top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | Sequence[torch.Generator] | None = None,
                  choose_tokens: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """labels (B,) int64 (the null class `num_classes` gives unconditional samples) ->
    K x (B, pn*pn) token ids. Decode with `vae.tokens_to_image`. `generator`: one for the whole
    batch, or one per row (row b then depends on generator b alone). `choose_tokens(k, drawn)`
    may replace scale k's drawn ids before the next scale sees them (editing: models/editing.py)."""
    batch = labels.shape[0]
    patch_nums, num_scales = var.patch_nums, len(var.patch_nums)
    null = torch.full_like(labels, var.num_classes)
    condition = var.class_emb(torch.cat((labels, null)))  # (2B, C)
    block_condition = var.shared_ada_lin(condition)
    level_and_position = var.lvl_embed(var.lvl_1L) + var.pos_1LC  # (1, L, C)
    first = var.first_scale_tokens
    x = condition.unsqueeze(1) + var.pos_start + level_and_position[:, :first]
    final = patch_nums[-1]
    f_hat = condition.new_zeros(batch, quantizer.z_channels, final, final, dtype=torch.float32)
    tokens_per_scale = []
    start = 0
    var.enable_kv_cache()
    try:
        for k, pn in enumerate(patch_nums):
            start += pn * pn
            for block in var.blocks:
                x = block(x, block_condition, None)
            logits = var.logits(x, condition)  # (2B, pn*pn, V)
            t = cfg * k / (num_scales - 1) if num_scales > 1 else cfg
            guided = (1 + t) * logits[:batch] - t * logits[batch:]
            probs = filter_top_k_top_p(guided, top_k, top_p).softmax(dim=-1)
            ids = _draw(probs, generator)
            if choose_tokens is not None:
                ids = choose_tokens(k, ids)
            tokens_per_scale.append(ids)
            codes = quantizer.embedding(ids).transpose(1, 2).reshape(batch, quantizer.z_channels, pn, pn)
            f_hat, next_input = quantizer.next_autoregressive_input(k, f_hat, codes)
            if next_input is not None:
                next_len = patch_nums[k + 1] ** 2
                x = var.word_embed(next_input) + level_and_position[:, start:start + next_len]
                x = x.repeat(2, 1, 1)  # conditional and unconditional rows
    finally:
        var.disable_kv_cache()
    return tokens_per_scale


@torch.no_grad()
def generate_batch(var: VAR, vae: VQVAE, labels: torch.Tensor, sample_indices: torch.Tensor | Sequence[int],
                   settings: SamplingSettings = SamplingSettings(), *, quantizer: MultiScaleQuantizer | None = None,
                   pad_to: int | None = None) -> torch.Tensor:
    """labels (N,) with their global sample indices (N,) -> uint8 images (N, 3, H, W) on the labels'
    device. Tokens are sampled under `settings.precision` and decoded in fp32.

    `pad_to`: sample that many rows (extra rows: class 0, never decoded or returned), so that
    every rank of a sharded model runs the same collectives (FSDP2 gathers inside the forward)."""
    device = labels.device
    indices = [int(i) for i in sample_indices]
    if len(indices) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(indices)} sample indices")
    generators = [sample_generator(settings.seed, index, device) for index in indices]
    padding = max(0, (pad_to or 0) - len(indices))
    if padding:  # padded rows draw from their own generators, so they cannot touch a real row
        labels = torch.cat((labels, labels.new_zeros(padding)))
        generators += [sample_generator(settings.seed, 0, device) for _ in range(padding)]
    if len(labels) == 0:
        return decode_tokens(vae, [labels.new_zeros(0, pn * pn) for pn in var.patch_nums])
    with sampling_autocast(var, device, settings.precision):
        tokens = sample_tokens(var, quantizer if quantizer is not None else vae.quantize, labels, cfg=settings.cfg,
                               top_k=settings.top_k, top_p=settings.top_p, generator=generators)
    return decode_tokens(vae, [t[:len(indices)] for t in tokens])


@torch.no_grad()
def decode_tokens(vae: VQVAE, tokens_per_scale: list[torch.Tensor]) -> torch.Tensor:
    """K x (N, pn*pn) ids -> uint8 images (N, 3, H, W), in fp32, decoded `decode_rows(device)` at
    a time (the last chunk padded with token 0), so an image does not depend on its neighbours."""
    count = tokens_per_scale[0].shape[0]
    step = decode_rows(tokens_per_scale[0].device)
    images = []
    for start in range(0, count, step):
        chunk = [t[start:start + step] for t in tokens_per_scale]
        rows = chunk[0].shape[0]
        if rows < step:
            chunk = [torch.cat((t, t.new_zeros(step - rows, t.shape[1]))) for t in chunk]
        images.append(vae.tokens_to_uint8_image(chunk)[:rows])
    if not images:
        return torch.empty(0, 3, vae.resolution, vae.resolution, dtype=torch.uint8,
                           device=tokens_per_scale[0].device)
    return torch.cat(images)
