"""Scaling laws: plan a sweep over model sizes, record each run's compute and test loss, fit and
plot the power laws L = (beta * X)^alpha of the paper.

    summary.py  what every training run records: cumulative compute, summary.json (imported by the
                trainer, so it stays light: no numpy/scipy/matplotlib)
    plan.py     `var-train scaling plan`: one valid job per depth for a cluster of W GPUs
    runs.py     reading run directories back (summary.json + the validation history)
    fit.py      least squares in log-log space, Pearson r, confidence intervals, the compute frontier
    plots.py    the paper's log-log figures (matplotlib)
    report.py   `var-train scaling fit`: fit.json, fit.md, plots, W&B
"""
