"""`make try`: is a change better? The base recipe and each variant (`key=value ...`, or every lever of a levers file)
run as whole chains on the same folds for each fold seed, and compared image by image on their out-of-fold
predictions (lab/paired.py). What is trained is shared: a run is named by the data, the recipe's file name and its
training key, so the base trains once per fold seed for every try on it, and a variant that changes prediction or
blend keys only is a prediction variant of the base's run (runs/<run>/probs/<variant>/), trained nothing.

Resumable and parallel: every fold trains under its lock and resumes from its checkpoint; a worker skips a fold held
by another (`make -j N try`, or other machines sharing runs/) and comes back for it; the table is computed from
what the runs recorded, so a study killed and resumed ends on the table of one run straight through."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seedlings import paths
from seedlings.chain.submit import evaluate_chain
from seedlings.errors import Busy, UserError
from seedlings.lab.ablations import load_ablations
from seedlings.lab.holdout import fold_seconds
from seedlings.lab.paired import Arm, changed_errors, paired_verdict, points, verdict_line
from seedlings.recipe.load import with_changes
from seedlings.recipe.saved import differences
from seedlings.recipe.schema import VARIANT_KEYS, Recipe, recipe_dict
from seedlings.run import Run, check_name, open_run
from seedlings.storage import write_csv, write_text
from seedlings.track.mlflow import track_try
from seedlings.train.fit import train_fold

GRASSES = ("Black-grass", "Loose Silky-bent")  # the pair most errors are (docs/results.md): named in every table
WAIT = 10.0  # s between looks at folds other workers are training


@dataclass
class Study:
    """A base recipe and its variants (label -> dotted recipe keys), judged over fold seeds on one data folder."""

    name: str  # runs/try/<data>/<name>/: the table and the report
    data: Path
    base: Recipe
    base_label: str  # the base recipe's file name: runs are named by it
    levers: dict[str, dict[str, Any]]
    seeds: list[int]
    n_folds: int
    recipes: dict[str, Recipe] = field(default_factory=dict)  # each lever's recipe, checked before anything trains

    def __post_init__(self) -> None:
        check_name(self.name, "--name")
        if not self.seeds:
            raise UserError("--seeds: give at least one fold seed")
        if not self.levers:
            raise UserError('make try: give the keys to try (ARGS="key=value ...") or a levers file (LEVERS=)')
        refuse_pseudo_labels(self.base, "the base recipe")
        for label, changes in self.levers.items():
            try:
                self.recipes[label] = with_changes(self.base, changes)
            except UserError as e:
                raise UserError(f"lever {label!r}: {e}") from None
            refuse_pseudo_labels(self.recipes[label], f"lever {label!r}")

    @property
    def run_name(self) -> str:
        return f"try/{self.data.name}/{self.name}"

    @property
    def dir(self) -> Path:
        return paths.run_dir(self.run_name)

    def run_of(self, recipe: Recipe, seed: int) -> Run:
        """The run that trains `recipe` on this fold seed, named by its training key (recipes that train alike share
        it), opened with the base's prediction and blend keys: the keys it records are the base's."""
        trains = with_changes(recipe, {k: getattr(self.base, k) for k in VARIANT_KEYS})  # what the run records
        key = Run("key", self.data, trains, self.n_folds, seed).training_key()
        name = f"try/{self.data.name}/{self.base_label}-{key}-fs{seed}"
        return open_run(name, self.data, trains, self.n_folds, seed)

    def units(self) -> list[tuple[int, str]]:
        """(fold seed, lever) in the order they are done: every base first, so that a run records the base's keys."""
        return [(s, "") for s in self.seeds] + [(s, label) for label in self.levers for s in self.seeds]


def refuse_pseudo_labels(recipe: Recipe, what: str) -> None:
    if recipe.pseudo_label:
        raise UserError(f"{what}: pseudo_label trains a second round that out-of-fold scores do not see; judge it "
                        "with make submit and grade it held out")  # fmt: skip


def chain_of(study: Study, seed: int, label: str) -> tuple[Arm, float, Run]:
    """The out-of-fold blend of one chain (trained and predicted where missing), its seconds (training and prediction,
    as the folds recorded them, so a resumed study reports what the work cost) and its run. Busy when a fold it
    needs is trained elsewhere now: the folds free here are trained first."""
    recipe = study.base if not label else study.recipes[label]
    trained = study.run_of(recipe, seed)
    held = []
    for fold in trained.models():
        try:
            train_fold(trained, fold)
        except Busy as e:
            held.append(str(e))
    if held:
        raise Busy("; ".join(held))
    run = replace(trained, recipe=recipe)  # the variant's prediction and blend keys: probs/<variant>/
    chain = evaluate_chain(run)
    seconds = sum(fold_seconds(run, fold) for fold in run.folds())
    return Arm(chain.oof.files, chain.oof.values, chain.labels), seconds, run


def run_study(study: Study) -> pd.DataFrame:
    """Every chain of the study, trained and predicted where missing (folds held by other workers waited for), then
    each lever against the base on every fold seed: the table, sorted by effect, written with its report (and
    written again as each lever finishes, so a long study shows what it has)."""
    todo = study.units()
    arms: dict[tuple[int, str], tuple[Arm, float, Run]] = {}
    while todo:
        waiting = []
        for seed, label in todo:
            try:
                arms[seed, label] = chain_of(study, seed, label)
            except Busy as e:
                waiting.append((seed, label))
                print(f"[try {study.name}] fold seed {seed}, {label or 'the base'}: waiting ({e})")
                continue
            print(f"[try {study.name}] fold seed {seed}, {label or 'the base'}: done "
                  f"({len(arms)} of {len(study.units())})")  # fmt: skip
            if label and all((s, label) in arms for s in study.seeds):
                write_table(study, arms)
        if len(waiting) == len(todo):
            time.sleep(WAIT)  # each fold left is trained by another worker now
        todo = waiting
    table = write_table(study, arms)
    track_try(study.run_name, study.base.tracking, study.levers, table, [study.dir / "try.md", study.dir / "try.csv"])
    return table


def write_table(study: Study, arms: dict) -> pd.DataFrame:
    """try.csv and try.md of the levers done on every fold seed, sorted by effect (micro-F1, then log loss)."""
    done = [label for label in study.levers if all((s, label) in arms for s in study.seeds)]
    classes = arms[study.seeds[0], ""][2].comp.classes
    table = pd.DataFrame([lever_row(study, label, arms, classes) for label in done])
    table = table.sort_values(["delta_f1", "delta_log_loss"], ascending=[False, True], kind="stable")
    table = table.reset_index(drop=True)
    write_csv(study.dir / "try.csv", table.drop(columns="verdict_line"), float_format="%.6g")
    write_text(study.dir / "try.md", report(study, table, arms))
    return table


def lever_row(study: Study, label: str, arms: dict, classes: list[str]) -> dict:
    """One lever against the base over the fold seeds: the paired verdict and what each costs."""
    bases = [arms[s, ""][0] for s in study.seeds]
    variants = [arms[s, label][0] for s in study.seeds]
    v = paired_verdict(bases, variants, classes)
    trains = arms[study.seeds[0], label][2].name != arms[study.seeds[0], ""][2].name
    grass = {c: v["errors"][c] for c in GRASSES if c in v["errors"]}
    return {
        "lever": label,
        "keys": " ".join(
            f"{k}={val}" for k, _, val in differences(recipe_dict(study.base), recipe_dict(study.recipes[label]))
        ),  # fmt: skip
        "verdict": v["verdict"],
        "delta_f1": v["delta_f1"],
        "delta_f1_low": v["delta_f1_ci"][0],
        "delta_f1_high": v["delta_f1_ci"][1],
        "delta_log_loss": v["delta_log_loss"],
        "delta_log_loss_low": v["delta_log_loss_ci"][0],
        "delta_log_loss_high": v["delta_log_loss_ci"][1],
        "base_f1": v["base_f1"],
        "variant_f1": v["variant_f1"],
        "only_variant_right": v["mcnemar"]["variant_only"],
        "only_base_right": v["mcnemar"]["base_only"],
        "mcnemar_p": v["mcnemar"]["p"],
        "errors": changed_errors(v, tuple(grass)),
        "trains": trains,  # False: a prediction variant of the base's runs, nothing trained
        "base_seconds": float(np.mean([arms[s, ""][1] for s in study.seeds])),
        "variant_seconds": float(np.mean([arms[s, label][1] for s in study.seeds])),
        "verdict_line": verdict_line(label, v),
    }


def report(study: Study, table: pd.DataFrame, arms: dict) -> str:
    """try.md: what was compared, on what, and the table."""
    runs = sorted({run.name for _, _, run in arms.values()})
    left = len(study.levers) - len(table)
    lines = [
        f"# make try: {study.name}" + (f" ({len(table)} of {len(study.levers)} levers done so far)" if left else ""),
        "",
        f"Base: `{study.base_label}`; data `{study.data}`; fold seeds {' '.join(map(str, study.seeds))} of "
        f"{study.n_folds} folds. Each lever's chain against the base's, image by image on the same out-of-fold "
        "predictions: the difference in micro-F1 (points) and log loss with a 95% paired bootstrap interval over "
        "the images and fold seeds, McNemar's exact test on the images one gets right and the other wrong. Sorted by "
        "effect. Seconds: training and prediction per fold seed, as the folds recorded them.",
        "",
        "| lever | verdict | micro-F1 (points) | interval | log loss | interval | only it right / only base | "
        "McNemar p | errors by class (base -> it) | trains | s (base / it) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.lever} (`{r.keys}`) | {r.verdict} | {points(r.delta_f1)} | [{points(r.delta_f1_low)}, "
            f"{points(r.delta_f1_high)}] | {r.delta_log_loss:+.4f} | [{r.delta_log_loss_low:+.4f}, "
            f"{r.delta_log_loss_high:+.4f}] | {r.only_variant_right} / {r.only_base_right} | {r.mcnemar_p:.3g} | "
            f"{r.errors} | {'yes' if r.trains else 'no'} | {r.base_seconds:.0f} / {r.variant_seconds:.0f} |"
        )
    lines += ["", "Runs: " + ", ".join(f"`runs/{name}`" for name in runs), ""]
    return "\n".join(lines)


def fold_seeds(text: str | list[int]) -> list[int]:
    """--seeds: '0 1 2' or 0,1,2 (a list passes as it is)."""
    if isinstance(text, list):
        return text
    words = text.replace(",", " ").split()
    if not words or not all(w.isdigit() for w in words):
        raise UserError(f"--seeds: expected fold seeds such as '0 1 2', got {text!r}")
    return [int(w) for w in words]


def study_from_args(data: str, config: str, overrides: list[str], levers: str | None, seeds: str | list[int],
                    n_folds: int, name: str | None) -> Study:  # fmt: skip
    """The study `seedlings try` describes: the overrides as one lever, or a levers file's levers (then overrides
    change the base)."""
    from seedlings.recipe.load import load_recipe, parse_overrides

    if levers:
        base = load_recipe(config, overrides)
        table = load_ablations(levers)
        default = Path(levers).stem
    else:
        base = load_recipe(config, [])
        table = {" ".join(overrides): dict(parse_overrides(overrides))} if overrides else {}
        default = " ".join(overrides).replace("/", "_").replace(" ", ",") or "nothing"
    return Study(name or default, Path(data), base, Path(config).stem, table, sorted(set(fold_seeds(seeds))), n_folds)


def try_command(study: Study) -> None:
    """Run the study, print each lever's verdict line, say where the table is."""
    table = run_study(study)
    for line in table.verdict_line:
        print(line)
    print(f"{study.dir / 'try.md'}: the table ({len(table)} lever(s), fold seeds {study.seeds})", file=sys.stderr)
