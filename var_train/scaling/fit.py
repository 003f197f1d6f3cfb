"""Power laws L = (beta * X)^alpha fitted by least squares in log-log space, as in the paper.

log L = alpha * log X + alpha * log beta is a straight line: ordinary least squares on
(log X, log L) gives the slope alpha and the intercept b = alpha * log beta, so beta = exp(b / alpha).
r is Pearson's correlation of log X and log L (the paper reports about -0.998 against N and -0.99
against C); the confidence interval of alpha is slope +- t(n-2) x its standard error.

Against compute the paper fits the frontier: at each compute, the lowest test loss that any model
has reached with at most that compute. `frontier` keeps the points of all runs' validation curves
that are lower than every point at smaller or equal compute.

A fit on fewer than 3 model sizes is made but carries a warning: two points always lie on a line
(r = +-1 whatever the losses, no interval for alpha), and a frontier drawn from one model is that
model's learning curve, not a law across sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# The paper's fits (REFERENCE.md, "Scaling laws of the paper"): metric_vs_x -> (alpha, beta).
# Error-rate coefficients are not in REFERENCE.md. The units of N and C behind the paper's betas
# are not stated there either, so compare the exponents; the betas only within one setup.
PAPER = {
    "val_loss_last_scale_vs_params": (-0.23, 2.0),
    "val_loss_vs_params": (-0.20, 2.5),
    "val_loss_last_scale_vs_compute": (-0.13, 2.2e-5),
    "val_loss_vs_compute": (-0.16, 1.5e-5),
}
PAPER_R = {"params": -0.998, "compute": -0.99}
# Two sizes always fit a line exactly: the third is the first that can disagree with the law.
MIN_SIZES = 3


@dataclass
class PowerLawFit:
    alpha: float | None
    beta: float | None
    r: float | None
    alpha_ci: list[float] | None  # [low, high] at `confidence`
    points: list[list[float]]  # [[x, L], ...] that were fitted
    confidence: float = 0.95
    problem: str | None = None  # why there is no fit
    sizes: int | None = None  # model sizes the points come from (None: not known)
    warning: str | None = None  # why a fit that was made is not yet a scaling law

    def predict(self, x) -> np.ndarray:
        return (self.beta * np.asarray(x, dtype=float)) ** self.alpha

    def formula(self, x_name: str = "X", y_name: str = "L") -> str:
        if self.alpha is None:
            return f"{y_name}: no fit ({self.problem})"
        return f"{y_name} = ({self.beta:.3g}·{x_name})^{self.alpha:.3f}"

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def note(self) -> str | None:
        """What a reader must know beside the numbers: why there is no fit, or why not to trust it."""
        return f"no fit: {self.problem}" if self.alpha is None else self.warning


def few_sizes_warning(against: str, sizes: int) -> str | None:
    """Why a fit against "params" or "compute" on `sizes` model sizes is not yet a scaling law
    (None: enough sizes)."""
    if sizes >= MIN_SIZES:
        return None
    advice = f"train at least {MIN_SIZES} sizes"
    if against == "compute":
        if sizes == 1:
            return f"the frontier is one model's learning curve, not a scaling law: {advice}"
        return f"the frontier comes from only {sizes} model sizes, mostly their learning curves: {advice}"
    if sizes < 2:
        return f"one model size: a law against parameters needs 2 sizes to be drawn and 3 to be tested: {advice}"
    return (f"only 2 model sizes: two points always lie on a line (r = ±1 whatever the losses, no interval "
            f"for alpha): {advice}")


def fit_power_law(x, y, confidence: float = 0.95) -> PowerLawFit:
    """Least squares of log y on log x; needs at least 2 positive points (3 for an interval)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    points = [[float(a), float(b)] for a, b in zip(x, y)]
    if len(x) < 2 or np.ptp(np.log(x)) == 0:
        return PowerLawFit(None, None, None, None, points, confidence,
                           problem=f"needs at least 2 points with different x, got {len(x)}")
    if np.ptp(np.log(y)) == 0:
        return PowerLawFit(None, None, None, None, points, confidence,
                           problem=f"the values are all {y[0]:g}: no power law (L = (beta X)^alpha) fits them")
    result = stats.linregress(np.log(x), np.log(y))
    alpha, intercept = float(result.slope), float(result.intercept)
    try:
        beta = math.exp(intercept / alpha) if alpha != 0 else math.inf
    except OverflowError:
        beta = math.inf
    if not 0 < beta < math.inf:  # a flat curve: L = (beta X)^alpha needs beta beyond floating point
        return PowerLawFit(None, None, float(result.rvalue), None, points, confidence,
                           problem=f"the values barely change with x (slope {alpha:.2g} in log-log): no power law "
                                   f"fits them; train longer, or over a wider range of sizes")
    ci = None
    if len(x) > 2 and math.isfinite(result.stderr):
        t = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 2))
        ci = [alpha - t * float(result.stderr), alpha + t * float(result.stderr)]
    return PowerLawFit(alpha, beta, float(result.rvalue), ci, points, confidence)


def frontier(curves) -> list[tuple[float, float]]:
    """curves: iterables of (compute, loss) -> the points lower than every point at smaller or
    equal compute, in order of compute."""
    points = sorted((float(c), float(l)) for curve in curves for c, l in curve
                    if c is not None and l is not None and c > 0 and math.isfinite(l))
    best, kept = math.inf, []
    for compute, loss in points:
        if loss < best:
            kept.append((compute, loss))
            best = loss
    # Equal compute: keep only the lowest loss (it came first in the sort).
    return [p for i, p in enumerate(kept) if i == 0 or p[0] != kept[i - 1][0]]
