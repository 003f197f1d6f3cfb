"""Improved precision and recall (Kynkäänniemi et al., 2019) on extracted features.

Each set's manifold is the union of balls around its points, each ball's radius the distance to
the point's k-th nearest neighbour inside the same set (k=3, as the paper, ADM's evaluator and
VAR report it). Precision: the share of generated points inside the real manifold (how many
samples look real). Recall: the share of real points inside the generated manifold (how much of
the real variety the samples cover).

Distances are computed block by block (`block_size` rows against all columns), so 50,000 x 10,000
pairs of 2048-d features never materialise at once.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

DEFAULT_NEIGHBOURHOOD = 3


def _pairwise_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2ab in one matmul (what ADM's evaluator does), clamped against the
    # small negative values cancellation leaves for (near-)identical points.
    squared = rows.square().sum(1, keepdim=True) + columns.square().sum(1) - 2 * rows @ columns.T
    return squared.clamp_(min=0).sqrt_()


def kth_neighbour_radii(features: torch.Tensor, k: int = DEFAULT_NEIGHBOURHOOD, block_size: int = 4096) -> torch.Tensor:
    """(N, D) -> (N,): each point's distance to its k-th nearest other point of the set.

    Sorted distances include the point itself at index 0, so the k-th neighbour sits at index k."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} points, got {len(features)}")
    radii = [_pairwise_distances(features[start:start + block_size], features).kthvalue(k + 1, dim=1).values
             for start in range(0, len(features), block_size)]
    return torch.cat(radii)


def inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                    block_size: int = 4096) -> torch.Tensor:
    """(N,) bool: is each point within radii[j] of some centres[j]?"""
    inside = [(_pairwise_distances(points[start:start + block_size], centres) <= radii).any(dim=1)
              for start in range(0, len(points), block_size)]
    return torch.cat(inside) if inside else torch.zeros(0, dtype=torch.bool, device=points.device)


def improved_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_NEIGHBOURHOOD,
                              block_size: int = 4096) -> tuple[float, float]:
    """-> (precision, recall) of `fake` features against `real` features (both (N, D))."""
    real, fake = real.float(), fake.float()
    real_radii = kth_neighbour_radii(real, k, block_size)
    fake_radii = kth_neighbour_radii(fake, k, block_size)
    precision = inside_manifold(fake, real, real_radii, block_size).float().mean().item()
    recall = inside_manifold(real, fake, fake_radii, block_size).float().mean().item()
    return precision, recall


class ImprovedPrecisionRecall(Metric):
    """torchmetrics wrapper: every rank adds its generated features (with their global sample
    indices); `compute()` gathers them once across ranks, sorts them by index (so the result does
    not depend on how samples were split over ranks) and scores them against `real_features`."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, real_features: torch.Tensor, k: int = DEFAULT_NEIGHBOURHOOD, block_size: int = 4096, **kwargs):
        super().__init__(**kwargs)
        self.k, self.block_size = k, block_size
        self.register_buffer("real_features", real_features.float(), persistent=False)
        self.add_state("fake_features", [], dist_reduce_fx="cat")
        self.add_state("fake_indices", [], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        self.fake_features.append(features.float())
        self.fake_indices.append(indices.long())

    def compute(self) -> dict[str, torch.Tensor]:
        features, indices = dim_zero_cat(self.fake_features), dim_zero_cat(self.fake_indices)
        features = features[indices.argsort()]
        precision, recall = improved_precision_recall(self.real_features, features, self.k, self.block_size)
        return {"precision": torch.tensor(precision), "recall": torch.tensor(recall)}
