"""`var-train scaling fit`: runs -> OUT/fit.json, OUT/fit.md, OUT/scaling_params.png and
OUT/scaling_compute.png (the four metrics), OUT/scaling_losses.png (the two losses against N and C,
one small figure), and W&B when a project is given.

fit.json: `<metric>_vs_<params|compute>` -> {"alpha", "beta", "r", "alpha_ci", "points", ...} for
the metrics val_loss, val_loss_last_scale, val_error_rate, val_error_rate_last_scale (against
params: each run's latest validation; against compute: the frontier of all validation curves),
plus "runs" (what was fitted, finished or not) and "left_out" (each run not used, with why). Each
fit also says how many model sizes its points come from ("sizes") and, below 3, why it is not yet a
scaling law ("warning"); "warnings" holds what applies to the whole sweep. fit.md and the console
say the same: why a fit is missing, and what it rests on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from var_train.errors import UserError
from var_train.fileio import write_json_atomic, write_text_atomic

from .fit import MIN_SIZES, PAPER, PAPER_R, PowerLawFit, few_sizes_warning, fit_power_law, frontier
from .runs import METRICS, RunRecord, read_runs
from .summary import format_count


@dataclass
class FitReport:
    fits: dict[str, PowerLawFit]
    runs: list[RunRecord]
    left_out: list[RunRecord]
    files: dict[str, Path]
    warnings: list[str] = field(default_factory=list)  # about the sweep as a whole (too few sizes)


def _judged(fit: PowerLawFit, against: str, sizes: int) -> PowerLawFit:
    fit.sizes = sizes
    if fit.alpha is not None:  # a missing fit already says why in `problem`
        fit.warning = few_sizes_warning(against, sizes)
    return fit


def _sizes_on_frontier(runs: list[RunRecord], metric: str, front: list) -> int:
    """Model sizes (parameter counts) whose validations make up the frontier: a frontier of one
    model's points is its learning curve however many runs were given."""
    on_front = set(front)
    return len({run.params for run in runs for point in run.history
                if metric in point and (point["train_flops"], point[metric]) in on_front})


def sweep_warnings(runs: list[RunRecord]) -> list[str]:
    """What every fit of a sweep of fewer than MIN_SIZES model sizes lacks, in one line."""
    sizes = {run.params for run in runs}
    names = ", ".join(run.name for run in runs)
    advice = f"train at least {MIN_SIZES} sizes"
    if len(sizes) >= MIN_SIZES:
        return []
    if len(sizes) == 1:
        return [f"the fits rest on 1 model size ({names}): there is no law against parameters, and the fit "
                f"against compute is one model's learning curve, not a scaling law; {advice}"]
    return [f"the fits rest on 2 model sizes ({names}): two points always lie on a line, so r against parameters "
            f"is ±1 whatever the losses and alpha has no interval; {advice}"]


def fit_runs(runs: list[RunRecord], confidence: float = 0.95) -> tuple[dict[str, PowerLawFit], dict[str, list]]:
    fits, frontiers = {}, {}
    for metric in METRICS:
        points = [(r.params, r.final[metric]) for r in runs if metric in r.final]
        fit = fit_power_law([p for p, _ in points], [v for _, v in points], confidence)
        fits[f"{metric}_vs_params"] = _judged(fit, "params", len({x for x, _ in fit.points}))
        frontiers[metric] = frontier([(p["train_flops"], p[metric]) for p in r.history if metric in p] for r in runs)
        fit = fit_power_law([c for c, _ in frontiers[metric]], [v for _, v in frontiers[metric]], confidence)
        fits[f"{metric}_vs_compute"] = _judged(fit, "compute", _sizes_on_frontier(runs, metric, frontiers[metric]))
    return fits, frontiers


def _run_row(run: RunRecord) -> dict:
    return {"path": str(run.path), "depth": run.depth, "params": run.params, "train_flops": run.train_flops,
            "finished": run.finished, "status": run.status(), **({"final": run.final} if run.final else {})}


def _notes(fits: dict[str, PowerLawFit]) -> list[str]:
    """One line per distinct note (why a fit is missing or not to be trusted), naming its fits."""
    by_note: dict[str, list[str]] = {}
    for key, fit in fits.items():
        if fit.note:
            by_note.setdefault(fit.note, []).append(key)
    return [f"- {', '.join(keys)}: {note}" for note, keys in by_note.items()]


def markdown(fits: dict[str, PowerLawFit], runs: list[RunRecord], left_out: list[RunRecord],
             warnings: list[str] = ()) -> str:
    lines = ["# Scaling-law fits: L = (beta * X)^alpha, least squares in log-log space", ""]
    lines += [line for warning in warnings for line in (f"**Warning:** {warning}.", "")]
    lines += ["| fit | alpha | 95% CI of alpha | beta | r | points | sizes | paper alpha | paper beta | paper r |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, fit in fits.items():
        paper_alpha, paper_beta = PAPER.get(key, (None, None))
        x = key.rsplit("_vs_", 1)[1]
        paper_r = PAPER_R[x] if key in PAPER else None

        def num(v, f):
            return "—" if v is None else format(v, f)

        ci = "—" if fit.alpha_ci is None else f"[{fit.alpha_ci[0]:.3f}, {fit.alpha_ci[1]:.3f}]"
        lines.append(f"| {key} | {num(fit.alpha, '.3f')} | {ci} | {num(fit.beta, '.3g')} | {num(fit.r, '.4f')} | "
                     f"{len(fit.points)} | {num(fit.sizes, 'd')} | {num(paper_alpha, '.2f')} | "
                     f"{num(paper_beta, '.2g')} | {num(paper_r, '.3f')} |")
    notes = _notes(fits)
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "Against params: each run's latest validation. Against compute: the frontier (the lowest loss "
              "reached by any run at each compute). The paper's betas depend on units of N and C that it "
              "does not state: compare exponents and r.", "", "## Runs", "", "| run | depth | params | train FLOPs | status |",
              "| --- | --- | --- | --- | --- |"]
    for run in [*runs, *left_out]:
        params = "—" if run.params is None else format_count(run.params)
        flops = "—" if run.train_flops is None else f"{run.train_flops:.3g}"
        lines.append(f"| {run.path} | {run.depth if run.depth is not None else '—'} | {params} | {flops} | "
                     f"{run.status()} |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs, out: str | Path, *, finished_only: bool = False, confidence: float = 0.95,
                 plots: bool = True, wandb_project: str | None = None, wandb_mode: str = "offline",
                 wandb_group: str | None = None) -> FitReport:
    runs, left_out = read_runs(run_dirs, finished_only=finished_only)
    if not runs:
        reasons = "; ".join(f"{r.path}: {r.problem}" for r in left_out) or "no run directories given"
        raise UserError(f"no run to fit ({reasons})")
    fits, frontiers = fit_runs(runs, confidence)
    warnings = sweep_warnings(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"fit.json": out / "fit.json", "fit.md": out / "fit.md"}
    write_json_atomic(files["fit.json"], {**{k: f.as_dict() for k, f in fits.items()},
                                          "runs": [_run_row(r) for r in runs],
                                          "left_out": [_run_row(r) for r in left_out], "warnings": warnings})
    table = markdown(fits, runs, left_out, warnings)
    write_text_atomic(files["fit.md"], table)
    if plots:
        from .plots import plot_losses, plot_vs_compute, plot_vs_params
        files["scaling_params.png"] = plot_vs_params(runs, fits, out / "scaling_params.png")
        files["scaling_compute.png"] = plot_vs_compute(runs, fits, frontiers, out / "scaling_compute.png")
        files["scaling_losses.png"] = plot_losses(runs, fits, frontiers, out / "scaling_losses.png")
    if wandb_project:
        _log_to_wandb(fits, files, wandb_project, wandb_mode, wandb_group, out)
    return FitReport(fits, runs, left_out, files, warnings)


def _log_to_wandb(fits, files, project: str, mode: str, group: str | None, out: Path) -> None:
    import wandb

    run = wandb.init(project=project, group=group, job_type="scaling-fit", mode=mode, dir=str(out),
                     name="scaling-fit", config={"fits": list(fits)})
    columns = ["fit", "alpha", "beta", "r", "alpha_ci_low", "alpha_ci_high", "points"]
    table = wandb.Table(columns=columns)
    for key, fit in fits.items():
        low, high = fit.alpha_ci or (None, None)
        table.add_data(key, fit.alpha, fit.beta, fit.r, low, high, len(fit.points))
    payload = {"scaling/fits": table}
    for name, path in files.items():
        if name.endswith(".png"):
            payload[f"scaling/{Path(name).stem}"] = wandb.Image(str(path))
    run.log(payload)
    for key, fit in fits.items():
        if fit.alpha is not None:
            run.summary[f"{key}/alpha"], run.summary[f"{key}/r"] = fit.alpha, fit.r
    run.finish()
