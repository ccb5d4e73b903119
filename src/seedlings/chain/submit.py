"""The one-command chain: folds, train every fold, predict, blend, write and validate submissions/<run>.csv."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from seedlings import paths
from seedlings.chain.specialist import specialist_run, with_specialist
from seedlings.data.cache import load_cache
from seedlings.data.competition import Competition
from seedlings.errors import Busy, UserError
from seedlings.metrics import val_scores
from seedlings.predict.blend import ChainBlend, blend_members, format_table
from seedlings.predict.infer import predict_run
from seedlings.predict.report import write_report
from seedlings.predict.submission import species_of, validate_submission, write_submission
from seedlings.recipe.schema import Recipe, recipe_dict
from seedlings.run import Run, git_commit
from seedlings.storage import Probs, exclusive, save_probs, write_csv, write_json
from seedlings.track.mlflow import track_chain
from seedlings.train.fit import train_fold


@contextmanager
def timed(timings: dict, step: str) -> Iterator[None]:
    """Wall seconds of the block, added to timings[step]."""
    start = time.perf_counter()
    yield
    timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def evaluate_chain(
    run: Run, others: list[Run] = (), folds: list[int] | None = None, weights: str = "fit", timings: dict | None = None
) -> ChainBlend:
    """What the chain makes of a run's trained folds (or of `folds` of them), with the members of `others` joined:
    each predicted with the recipe's TTA (skipped where up to date) and blended as `make submit` blends them. `make
    submit`, `make compare` and the sweep's chain objective all score a chain with this one function."""
    timings = {} if timings is None else timings
    with timed(timings, "predict"):
        members = [m for r in [run, *others] for m in predict_run(r, folds if r is run else None)]
    with timed(timings, "blend"):
        chain = blend_members(run.recipe, members, run.fold_table, run.comp.classes, weights)
    spec = specialist_run(run)
    if spec is None:
        return chain
    with timed(timings, "specialist"):  # its folds are trained here when missing: a sweep's trial trains only its own
        return with_specialist(
            chain,
            spec,
            folds if folds is not None else sorted({m.fold for m in members if not m.full and m.run == run.name}),
        )


def skipped_images(comp: Competition, split: str, recipe: Recipe) -> list[str]:
    """The split's unreadable images (skip_bad_images: true; otherwise the first exits 2), named where they go."""
    bad = load_cache(comp, split, recipe.cache_size, recipe.skip_bad_images, recipe.plant_mask).bad
    if bad:
        what = "left out of training" if split == "train" else "predicted from a blank image"
        print(f"warning: {len(bad)} unreadable {split} images {what}: {', '.join(bad)}", file=sys.stderr)
    return bad


def submit(
    run: Run, others: list[Run] = (), weights: str = "fit", command: list[str] | None = None, train: bool = True
) -> Path:
    """One submission of a run at a time (a second `submit` of it exits 2 naming the holder: two at once would each
    blend only the folds it trained, and the last writer's partial blend would be the submission); see blend_submit."""
    out = run.submission_path
    with exclusive(out.with_name(f".{out.stem}{paths.LOCK}"), f"the submission of run {run.name!r}"):
        return blend_submit(run, others, weights, command, train)


def blend_submit(
    run: Run, others: list[Run] = (), weights: str = "fit", command: list[str] | None = None, train: bool = True
) -> Path:
    """Every step skips what is up to date, so a second call with nothing changed takes seconds. `others`: finished
    runs on the same data and folds whose members join the blend. train=False (--blend-only) trains no fold: the
    folds other jobs trained are blended and the others named (a cluster's dependent job after a fold array)."""
    timings: dict[str, float] = {}
    comp = run.comp  # sample_submission.csv against test/: checked before anything trains
    with timed(timings, "folds"):
        print(f"{len(run.fold_table)} training images in {run.n_folds} folds (seed {run.fold_seed})")
        # every image decoded before the first fold trains: a bad one stops the chain in seconds, not hours
        skipped = {split: skipped_images(comp, split, run.recipe) for split in ("train", "test")}
    if comp.ignored:
        print(f"warning: not read (images go in train/<Species>/ and test/): {'; '.join(comp.ignored)}")
    missing = {}
    with timed(timings, "train"):
        for fold in run.models():
            if not train and not run.is_trained(fold):
                missing[fold] = "not trained (--blend-only trains none: its task failed or has not run)"
                continue
            try:
                train_fold(run, fold)
            except Busy as e:  # trained by another process or host (shared runs/): blended when it is done
                missing[fold] = str(e)
    if len(missing) == len(run.models()):
        raise UserError(f"run {run.name!r}: no fold to blend ({'; '.join(sorted(set(missing.values())))})")
    for fold, why in missing.items():
        print(f"warning: fold {fold} is not in this blend: {why}; make submit again when it is done", file=sys.stderr)
    done = [fold for fold in run.models() if fold not in missing]  # the folds it blends: not one held elsewhere
    chain = evaluate_chain(run, others, folds=done if missing else None, weights=weights, timings=timings)
    oof, test, table = chain.oof, chain.test, chain.table
    with timed(timings, "blend"):
        print(format_table(table))
        out = run.submission_path
        write_submission(out, test.files, species_of(test.values, comp.classes), run.data / "sample_submission.csv")
        n_rows = validate_submission(run.data, out)
    blend_dir = paths.probs_dir(run.name, run.variant)
    save_probs(paths.probs_file(blend_dir, paths.BLEND, "oof"), oof)
    save_probs(paths.probs_file(blend_dir, paths.BLEND, "test"), test)
    if run.variant:
        print(f"variant {run.variant}: its probabilities in {blend_dir}, beside the run's own")
    provenance = {
        "submission": str(out),
        "rows": n_rows,
        "run": run.name,
        "runs": [blended.name for blended in [run, *others]],
        "variant": run.variant,  # "": the run's own predictions; else the keys that differ, as probs/<variant>/ names
        "variants": {blended.name: blended.variant for blended in [run, *others]},
        "data": str(run.data.resolve()),
        "n_folds": run.n_folds,
        "fold_seed": run.fold_seed,
        "git_commit": git_commit(),
        "recipe": recipe_dict(run.recipe),
        "weights": weights,
        "members": table,
        "calibration": chain.calibration,
        "oof_files": len(oof.files),
        "skipped_images": skipped,
        "missing_folds": sorted(missing),
        "seconds": timings,
        "command": command or [],
    }
    write_json(out.with_suffix(".json"), provenance)
    report = write_report(run, comp, oof, chain.labels, table, skipped)
    scores = val_scores(oof.values, chain.labels)
    figures = {"micro_f1": scores["val_f1"], "macro_f1": scores["val_macro_f1"], "log_loss": scores["val_loss"]}
    track_chain(run, figures, timings, [out, out.with_suffix(".json"), *sorted(report.parent.iterdir())])
    print(
        f"{out}: {n_rows} rows, blend OOF micro-F1 {table['blend']['micro_f1']:.4f}; provenance in "
        f"{out.with_suffix('.json')}; report in {report}"
    )
    second = pseudo_round(run, test) if run.recipe.pseudo_label and not run.pseudo_path.exists() else None
    return out if second is None else submit(second, others, weights, command, train)  # round 2, confident images


def pseudo_round(run: Run, test: Probs) -> Run | None:
    """The pseudo-label round of a run: runs/<run>-pseudo/ with pseudo.csv (the test images whose blended probability
    reaches pseudo_label, labelled with the predicted species), trained like the first round. None when no test
    image reaches it: a second round would train on the first round's data again."""
    confident = test.values.max(1) >= run.recipe.pseudo_label
    second = Run(f"{run.name}-pseudo", run.data, run.recipe, run.n_folds, run.fold_seed)
    if not confident.any() and not second.pseudo_path.exists():
        print(f"pseudo-labels: no test image at probability >= {run.recipe.pseudo_label:g}; no second round, the "
              "submission is this round's")  # fmt: skip
        return None
    chosen = pd.DataFrame({"file": np.array(test.files)[confident], "species": species_of(test.values[confident],
                           run.comp.classes), "probability": test.values[confident].max(1)})  # fmt: skip
    if not second.pseudo_path.exists():
        write_csv(second.pseudo_path, chosen, float_format="%.6f")
    print(f"pseudo-labels: {int(confident.sum())} of {len(test.files)} test images at probability >= "
          f"{run.recipe.pseudo_label:g}; round 2 in {second.dir}")  # fmt: skip
    second.check()
    return second
