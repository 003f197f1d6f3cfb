"""The paper's scaling figures (matplotlib, Agg): log-log panels of the four test metrics against
parameters (one point per run) and against training compute (every run's validation curve, the
frontier highlighted), each with its fitted power law and the formula in the legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fit import PowerLawFit
from .runs import METRICS, RunRecord

LABELS = {"val_loss": "test loss, mean over scales", "val_loss_last_scale": "test loss, last scale",
          "val_error_rate": "token error rate, mean over scales",
          "val_error_rate_last_scale": "token error rate, last scale"}
SYMBOLS = {"val_loss": "L_avg", "val_loss_last_scale": "L_last", "val_error_rate": "Err_avg",
           "val_error_rate_last_scale": "Err_last"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax) -> None:
    """Log axes over a narrow range: plain numbers on the loss axis, not 5.5 x 10^0."""
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _fit_line(ax, fit: PowerLawFit, x_name: str, metric: str, x_range) -> None:
    if fit.alpha is None:
        return
    xs = np.geomspace(*x_range, 50)
    label = fit.formula(x_name, SYMBOLS[metric]) + (f", r = {fit.r:.3f}" if fit.r is not None else "")
    ax.plot(xs, fit.predict(xs), "--", color="black", linewidth=1.2, label=label)


def _params_panel(ax, runs: list[RunRecord], fits: dict[str, PowerLawFit], metric: str) -> None:
    finished = [(r.params, r.final[metric]) for r in runs if r.finished and metric in r.final]
    unfinished = [(r.params, r.final[metric]) for r in runs if not r.finished and metric in r.final]
    if finished:
        ax.scatter(*zip(*finished), s=36, color="tab:blue", zorder=3, label="runs")
    if unfinished:
        ax.scatter(*zip(*unfinished), s=36, facecolors="none", edgecolors="tab:red", zorder=3,
                   label="unfinished runs")
    for run in runs:
        if metric in run.final:
            ax.annotate(f"d{run.depth}", (run.params, run.final[metric]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    xs = [p for p, _ in finished + unfinished]
    if xs:
        _fit_line(ax, fits[f"{metric}_vs_params"], "N", metric, (min(xs) / 1.3, max(xs) * 1.3))
    ax.set(xscale="log", yscale="log", xlabel="parameters N", title=LABELS[metric])
    _plain_ticks(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _compute_panel(ax, runs: list[RunRecord], fits: dict[str, PowerLawFit], frontiers: dict[str, list],
                   metric: str, colours) -> None:
    all_x = []
    for run, colour in zip(runs, colours):
        curve = [(p["train_flops"], p[metric]) for p in run.history if metric in p and p["train_flops"] > 0]
        if not curve:
            continue
        all_x += [c for c, _ in curve]
        label = f"d{run.depth}" + ("" if run.finished else " (unfinished)")
        ax.plot(*zip(*curve), marker="o", color=colour, markersize=2.5, linewidth=1, alpha=0.8,
                linestyle=("-" if run.finished else ":") if len(curve) > 1 else "none", label=label)
    front = frontiers.get(metric) or []
    if front:
        ax.scatter(*zip(*front), s=16, color="black", zorder=4, label="frontier")
    if all_x:
        _fit_line(ax, fits[f"{metric}_vs_compute"], "C", metric, (min(all_x), max(all_x)))
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", title=LABELS[metric])
    _plain_ticks(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _save(fig, plt, path, dpi: int = 90) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_vs_params(runs: list[RunRecord], fits: dict[str, PowerLawFit], path: str | Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, metric in zip(axes, METRICS):
        _params_panel(ax, runs, fits, metric)
    return _save(fig, plt, path)


def plot_vs_compute(runs: list[RunRecord], fits: dict[str, PowerLawFit], frontiers: dict[str, list],
                    path: str | Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(runs))))
    for ax, metric in zip(axes, METRICS):
        _compute_panel(ax, runs, fits, frontiers, metric, colours)
    return _save(fig, plt, path)


def plot_losses(runs: list[RunRecord], fits: dict[str, PowerLawFit], frontiers: dict[str, list],
                path: str | Path) -> Path:
    """The two test losses (last scale, mean) against N and against C: one small figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(runs))))
    for column, metric in enumerate(("val_loss_last_scale", "val_loss")):
        _params_panel(axes[0][column], runs, fits, metric)
        _compute_panel(axes[1][column], runs, fits, frontiers, metric, colours)
    return _save(fig, plt, path, dpi=72)
