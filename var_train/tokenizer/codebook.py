"""Codebook health for tokenizer training: per-scale usage metrics and dead-code restarts.

A VQ codebook trained by gradient descent loses codes: an entry that no encoder vector picks gets
no gradient and never moves towards the data again. In VAR's multi-scale quantizer the coarse
scales see only pn^2 vectors per image (one at 1x1), so without a remedy they end up using a
handful of codes. The remedy here: a code unused (on every rank, at every scale) for
`dead_after_steps` optimizer steps is re-initialised to a quantizer input vector drawn from the
current batch. Rank 0 draws the vectors and broadcasts them, so every rank applies the same
change and the replicas stay identical.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from var_train.models import MultiScaleQuantizer
from var_train.parallel.distributed import all_reduce_sum, get_rank, get_world_size


def code_hits_per_scale(tokens_per_scale: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """K x (B, pn*pn) ids -> (K, vocab_size) hit counts (float32, on the tokens' device)."""
    return torch.stack([torch.bincount(t.flatten(), minlength=vocab_size).float() for t in tokens_per_scale])


class CodebookUsageWindow:
    """Code hit counts per scale over a logging window, summed over ranks when reported."""

    def __init__(self, patch_nums: tuple[int, ...], vocab_size: int, device: torch.device):
        self.patch_nums, self.vocab_size = tuple(patch_nums), vocab_size
        self.hits = torch.zeros(len(self.patch_nums), vocab_size, device=device)

    def update(self, tokens_per_scale: list[torch.Tensor]) -> None:
        self.hits += code_hits_per_scale(tokens_per_scale, self.vocab_size)

    def report(self, prefix: str = "") -> dict[str, float]:
        """Collective when distributed. Per scale: the fraction of the vocabulary hit in the window
        and the perplexity exp(H) of the window's code distribution (1 = one code, V = uniform)."""
        hits = all_reduce_sum(self.hits)
        metrics = {}
        for pn, counts in zip(self.patch_nums, hits):
            total = counts.sum()
            probs = counts / total.clamp_min(1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
            metrics[f"{prefix}codebook_usage_pn{pn}"] = (counts > 0).float().mean().item()
            metrics[f"{prefix}codebook_perplexity_pn{pn}"] = math.exp(entropy.item()) if total > 0 else 0.0
        self.hits.zero_()
        return metrics


@torch.no_grad()
def quantizer_inputs_per_scale(quantizer: MultiScaleQuantizer, features: torch.Tensor,
                               tokens_per_scale: list[torch.Tensor]) -> list[torch.Tensor]:
    """The vectors each scale's nearest-code search saw: K x (B * pn * pn, z).

    Scale k quantizes the residual f - f_hat_{<k} area-downsampled to pn_k; f_hat_{<k} is rebuilt
    from the scale's tokens, so these are the vectors that restarted codes should be able to win.
    """
    features = features.detach().float()
    vectors = []
    for k, pn in enumerate(quantizer.patch_nums):
        residual = features if k == 0 else features - quantizer.tokens_to_features(tokens_per_scale, num_scales=k)
        if k != quantizer.num_scales - 1:
            residual = F.interpolate(residual, size=(pn, pn), mode="area")
        vectors.append(residual.permute(0, 2, 3, 1).reshape(-1, quantizer.z_channels))
    return vectors


def draw_restart_vectors(candidates_per_scale: list[torch.Tensor], count: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` vectors from the candidates, each scale weighted equally (not each vector): the
    coarse scales, which have the fewest vectors and collapse first, get their share of new codes.
    Without replacement while the pool allows it; beyond that, duplicates get a little noise so
    they are not exact ties."""
    pool = torch.cat(candidates_per_scale)
    weights = torch.cat([torch.full((len(c),), 1.0 / len(c)) for c in candidates_per_scale])
    replacement = count > len(pool)
    chosen = torch.multinomial(weights, count, replacement=replacement, generator=generator)
    vectors = pool[chosen.to(pool.device)].clone()
    if replacement:
        noise = torch.randn(vectors.shape, generator=generator).to(vectors)
        vectors += noise * 0.01 * pool.std().clamp_min(1e-6)
    return vectors


class DeadCodeRestarter:
    """Counts, per code, the optimizer steps since any rank used it at any scale; restarts the
    codes that reach `dead_after_steps`."""

    def __init__(self, vocab_size: int, dead_after_steps: int, device: torch.device, seed: int = 0):
        if dead_after_steps < 1:
            raise ValueError(f"dead_after_steps must be >= 1, got {dead_after_steps}")
        self.vocab_size, self.dead_after_steps = vocab_size, dead_after_steps
        self.steps_since_used = torch.zeros(vocab_size, dtype=torch.long, device=device)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: draws happen on rank 0 only

    def update(self, tokens_per_scale: list[torch.Tensor]) -> None:
        """Record one optimizer step's tokens (collective when distributed: hits are summed so
        every rank holds the same counters and so the same dead set)."""
        hits = torch.zeros(self.vocab_size, device=self.steps_since_used.device)
        for tokens in tokens_per_scale:
            hits += torch.bincount(tokens.flatten(), minlength=self.vocab_size).float()
        hits = all_reduce_sum(hits)
        self.steps_since_used += 1
        self.steps_since_used[hits > 0] = 0

    def dead_codes(self) -> torch.Tensor:
        return torch.nonzero(self.steps_since_used >= self.dead_after_steps).flatten()

    @torch.no_grad()
    def restart(self, quantizer: MultiScaleQuantizer, candidates_per_scale: list[torch.Tensor],
                optimizer: torch.optim.Optimizer | None = None) -> int:
        """Re-initialise every dead code (identically on all ranks); -> how many were restarted.

        Collective when distributed, and every rank must call it after the same `update` calls.
        The restarted rows' optimizer moments are zeroed too: stale Adam momentum would otherwise
        push a fresh code straight back to where it died.
        """
        dead = self.dead_codes()
        if dead.numel() == 0:
            return 0
        weight = quantizer.embedding.weight
        if get_rank() == 0:
            vectors = draw_restart_vectors(candidates_per_scale, dead.numel(), self.generator).to(weight)
        else:
            vectors = torch.empty(dead.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
        if get_world_size() > 1:
            dist.broadcast(vectors, src=0)
        weight[dead] = vectors
        if optimizer is not None:
            for moment in optimizer.state.get(weight, {}).values():
                if isinstance(moment, torch.Tensor) and moment.shape == weight.shape:
                    moment[dead] = 0
        self.steps_since_used[dead] = 0
        return dead.numel()

    def state_dict(self) -> dict:
        return {"steps_since_used": self.steps_since_used.cpu(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_used.copy_(state["steps_since_used"])
        self.generator.set_state(state["generator"])
