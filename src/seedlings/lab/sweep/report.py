"""`make sweep-report`: a study's trials.csv, the best trial's recipe as best.yaml, Optuna's plots and report.md (which
keys mattered, how many epochs pruning saved); on a held-out split, the best and the base recipe graded once."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from seedlings import paths
from seedlings.lab.compare import format_compare, recipe_rows
from seedlings.lab.sweep.settings import METRICS, OBJECTIVES, shown
from seedlings.lab.sweep.space import Sweep, recipe_with
from seedlings.lab.sweep.study import SweepLock, open_study
from seedlings.recipe.load import dump_yaml, recipe_from_dict
from seedlings.recipe.schema import recipe_dict
from seedlings.run import open_run
from seedlings.storage import pyplot, save_figure, write_csv, write_text
from seedlings.track.mlflow import track_sweep
from seedlings.train.fit import read_done

PLOTS = {
    "history": ("optimization history", optuna.visualization.matplotlib.plot_optimization_history),
    "importances": ("parameter importances", optuna.visualization.matplotlib.plot_param_importances),
    "parallel": ("parallel coordinates", optuna.visualization.matplotlib.plot_parallel_coordinate),
}


def trials_table(trials: list[FrozenTrial]) -> pd.DataFrame:
    """One row per trial: number, state, parameters, value, epochs run of those planned, seconds, worker host."""
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else np.nan
        rows.append({
            "number": t.number, "state": t.state.name.lower(), **{f"param {k}": v for k, v in t.params.items()},
            "value": t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else np.nan,
            "fold value": t.user_attrs.get("fold_value", np.nan), "log loss": t.user_attrs.get("log_loss", np.nan),
            "epochs": t.user_attrs.get("epochs", 0), "planned_epochs": t.user_attrs.get("planned_epochs", np.nan),
            "seconds": seconds, "host": t.user_attrs.get("host", ""),
            "retry_of": t.system_attrs.get("failed_trial", ""), "error": t.user_attrs.get("error", ""),
        })  # fmt: skip
    return pd.DataFrame(rows)


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # ties (a few hundred validation images: often) go to the lower OOF log loss where the objective has one
    return max(complete, key=lambda t: (t.value, -t.user_attrs.get("log_loss", 0.0), -t.number)) if complete else None


def pruning_savings(table: pd.DataFrame) -> tuple[int, int]:
    """(epochs run, epochs the same trials would have run to the end), over trials that ran."""
    ran = table[table.state.isin(["complete", "pruned"])]
    return int(ran.epochs.sum()), int(ran.planned_epochs.sum())


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importance of each key for the value (needs two finished trials that differ)."""
    try:
        with warnings.catch_warnings():  # "too few trials": the report says how many there are
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def choice_lines(table: pd.DataFrame, space: dict[str, BaseDistribution]) -> list[str]:
    """For each key with choices: per value, how many trials drew it, how many ran to the end (were not pruned or
    failed) and the best score any of them reached; what fANOVA over the complete trials cannot see."""
    lines = []
    for key in sorted(k for k, d in space.items() if isinstance(d, CategoricalDistribution)):
        col = f"param {key}"
        if col not in table or table[col].nunique() < 2:
            continue
        for value, rows in table.groupby(table[col].astype(str)):
            best = rows.value.max()
            lines.append(f"| `{key}` | {value} | {len(rows)} | {(rows.state == 'complete').sum()} | "
                         + (f"{best:.4f} |" if pd.notna(best) else "- |"))  # fmt: skip
    if not lines:
        return []
    return ["## Choices: how far each got", "", "| key | value | trials | complete | best score |",
            "|---|---|---|---|---|", *lines, ""]  # fmt: skip


def write_plots(study: optuna.Study, out: Path, metric: str) -> list[str]:
    """The study's plots, drawn once two trials have scores (a plot of none or one says nothing), the value named
    `metric` on every axis (not "Objective Value"); Optuna's and matplotlib's warnings about experimental functions
    and flat axes are not the user's concern."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.value is not None]
    if len(finished) < 2:
        return [f"- plots: not drawn ({len(finished)} trial(s) with a score)"]
    lines = []
    for name, (title, plot) in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study, target_name=metric)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as e:
            lines.append(f"- {title}: not drawn ({e})")
            continue
        fig = (ax if not isinstance(ax, np.ndarray) else ax.flat[0]).get_figure()
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        save_figure(fig, out / f"{name}.png", dpi=80)
        pyplot().close(fig)
        lines.append(f"![{title}]({name}.png)")
    return lines


def objective_text(sweep: Sweep) -> str:
    return f"{OBJECTIVES[sweep.objective]}, over the first {sweep.sweep_folds} fold(s) of {sweep.n_folds}"


def write_best_yaml(sweep: Sweep, best: FrozenTrial, out: Path) -> Path:
    """The best trial's whole recipe, headed by the command that trains it again as the trial was trained: its data,
    split and CPU thread count (results on a CPU depend on it), into a run of its own (<sweep>-best)."""
    recipe = recipe_with(sweep.base, best.params)
    done = paths.fold_dir(str(best.user_attrs.get("run", "")), 0) / paths.DONE
    threads = read_done(done, 0).get("threads") if done.is_file() else None
    command = (f"make submit CONFIG={out} DATA={sweep.data} N_FOLDS={sweep.n_folds} FOLD_SEED={sweep.fold_seed} "
               f"RUN={sweep.name}-best")  # fmt: skip
    if threads:
        command = f"SEEDLINGS_THREADS={threads} {command}"
    head = (f"# The best recipe of sweep {sweep.name!r}: trial {best.number}, {objective_text(sweep)}: "
            f"{best.value:.4f}" + (f", trained with {threads} CPU thread(s)" if threads else "")
            + f".\n# {command}\n")  # fmt: skip
    return write_text(out, head + dump_yaml(recipe_dict(recipe), sort_keys=False))


def grade_on_holdout(sweep: Sweep, best: FrozenTrial) -> pd.DataFrame | None:
    """On a held-out split (answers.csv beside the data), fold 0 and the whole chain of the base recipe and of the
    best, each trained afresh in runs/<sweep>/{base,best}, graded once: kept in graded.csv for that best trial."""
    if not (Path(sweep.data) / "answers.csv").exists():
        return None
    graded = sweep.dir / "graded.csv"
    if graded.exists():
        table = pd.read_csv(graded)
        if int(table.best_trial.iloc[0]) == best.number:
            return table
    rows = []
    for label, recipe in (
        ("base recipe", recipe_from_dict(sweep.base)),
        (f"best (trial {best.number})", recipe_with(sweep.base, best.params)),
    ):
        name = f"{sweep.name}/{'base' if label == 'base recipe' else f'best-{best.number}'}"
        rows += recipe_rows(open_run(name, sweep.data, recipe, sweep.n_folds, sweep.fold_seed), label)
    table = pd.DataFrame(rows).assign(best_trial=best.number)
    write_csv(graded, table, float_format="%.4f")
    return table


def write_sweep_report(sweep: Sweep, study: optuna.Study, grade: bool | None = None) -> Path:
    """The report; `grade`: None grades the best once on held-out answers when the sweep searched a held-out split
    (HOLDOUT=1), True on any data folder with answers.csv (--grade), False never (--no-grade)."""
    grade = sweep.holdout if grade is None else grade
    out = sweep.dir
    trials = study.get_trials()
    table = trials_table(trials)
    write_csv(out / "trials.csv", table)
    best = best_trial(trials)
    lines = [f"# Sweep `{sweep.name}`", "", f"Data: `{sweep.data}`; objective: {objective_text(sweep)}; pruner: "
             f"{sweep.pruner} (on fold 0's validation micro-F1 after each epoch).", ""]  # fmt: skip
    counts = table.state.value_counts().to_dict() if len(table) else {}
    retried = sum("failed_trial" in t.system_attrs for t in trials)  # a stopped trial's retries count once
    again = f"; {retried} of them retries of a stopped trial, which count once in TRIALS" if retried else ""
    lines += [f"Trials: {len(table)} ({', '.join(f'{n} {s}' for s, n in counts.items())}){again}; `trials.csv`.", ""]
    run, planned = pruning_savings(table) if len(table) else (0, 0)
    if planned:
        lines += [f"Epochs: {run} run of the {planned} these trials would have run to the end: pruning saved "
                  f"{1 - run / planned:.0%}.", ""]  # fmt: skip
    if best is not None:
        best_yaml = write_best_yaml(sweep, best, out / "best.yaml")
        params = ", ".join(f"`{k}` = {shown(v)}" for k, v in best.params.items())
        lines += ["## Best trial", "", f"Trial {best.number}: {best.value:.4f} with {params}; its whole recipe: "
                  f"`{best_yaml}` (its second line: the command that trains it as the trial was).", ""]  # fmt: skip
    weights = importances(study)
    if weights:
        complete = int((table.state == "complete").sum())
        lines += ["## Which keys mattered", "", f"fANOVA importance of each key for the value (sums to 1), over the "
                  f"{complete} complete trials (pruned ones left out: see the choices below):", ""]  # fmt: skip
        lines += ["| key | importance |", "|---|---|", *[f"| `{k}` | {v:.2f} |" for k, v in weights.items()], ""]
    lines += choice_lines(table, sweep.space)
    lines += ["## Plots", "", *write_plots(study, out, METRICS[sweep.objective]), ""]
    if grade and best is not None:
        graded = grade_on_holdout(sweep, best)
        if graded is not None:
            lines += ["## Held-out grade (once, after the search)", "", "```",
                      format_compare(graded, Path(sweep.data)), "```", ""]  # fmt: skip
    elif best is not None and (Path(sweep.data) / "answers.csv").exists():
        lines += ["Held-out grade left out; `make sweep-report GRADE=1` trains the base and the best recipe's fold "
                  "and chain and grades them once on the answers beside the data.", ""]  # fmt: skip
    report = write_text(out / paths.REPORT_MD, "\n".join(lines))
    files = [report, out / "trials.csv", out / "best.yaml", *sorted(out.glob("*.png"))]
    track_sweep(sweep.name, sweep.base.get("tracking", "none"), best.value if best else None, len(table), files)
    print(f"{report}: {len(table)} trials" + (f", best {best.value:.4f} (trial {best.number})" if best else ""))
    return report


def finish_sweep(sweep: Sweep, grade: bool | None = None) -> None:
    """A worker that finds no trial left to run: the report, once the last running trial has ended (written by
    whichever worker gets there; the held-out grade is kept, so later ones only rewrite the tables)."""
    lock = SweepLock(sweep)
    study = open_study(sweep, lock)
    with lock.held_for():
        trials = study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            print(f"study {sweep.name!r}: trials still running elsewhere; the last worker writes the report")
            return
        write_sweep_report(sweep, study, grade)
