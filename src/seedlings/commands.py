"""What each `seedlings` command runs, one function per command (cli.py declares them and their arguments). Each
imports the step it calls when it is called, so that the command line answers `--help` without loading torch."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from seedlings.errors import Busy, UserError

Args = argparse.Namespace


def run_name(args: Args) -> str:
    return args.run or Path(args.config).stem


def opened_run(args: Args):
    """The run of a recipe-driven command, checked against what it recorded (and --fold against its split)."""
    from seedlings.recipe.load import load_recipe
    from seedlings.run import open_run

    recipe = load_recipe(args.config, args.overrides)
    return open_run(run_name(args), args.data, recipe, args.n_folds, args.fold_seed, getattr(args, "fold", None))


def unopened_run(args: Args):
    """A run that is never trained on DATA itself (the probe, compare's held-out split): not checked against it."""
    from seedlings.recipe.load import load_recipe
    from seedlings.run import Run

    return Run(run_name(args), Path(args.data), load_recipe(args.config, args.overrides), args.n_folds, args.fold_seed)


# ------------------------------------------------------------------------------------------------------------ data
def fetch(args: Args) -> None:
    from seedlings.data.fetch import fetch as fetch_competition

    fetch_competition(args.data, archive=args.archive, max_expand=args.max_expand, competition=args.competition)


def demo_data(args: Args) -> None:
    from seedlings.data.demo import make_demo

    out = Path(args.out)
    if out.exists():
        print(f"{out}: exists, nothing to do")
        return
    if args.full_size:
        from seedlings.data.full_size import MAX_SIDE, make_full_size

        make_full_size(out, args.fraction, args.seed, args.max_size or MAX_SIDE, args.source)
        return
    make_demo(out, args.per_class, args.seed, args.min_size, args.max_size or 600)
    print(f"{out}: demo competition written")


def check_data(args: Args) -> None:
    from seedlings.data.competition import check_competition
    from seedlings.recipe.load import load_recipe

    recipe = load_recipe(args.config, args.overrides)
    print("\n".join(check_competition(args.data, skip_bad_images=recipe.skip_bad_images).lines()))


def folds(args: Args) -> None:
    from seedlings.data.competition import scan_competition
    from seedlings.data.folds import make_folds

    make_folds(scan_competition(args.data, need_test=False), args.n_folds, args.fold_seed, args.out, args.force)


def recipe(args: Args) -> None:
    from seedlings.recipe.describe import describe
    from seedlings.recipe.load import load_recipe

    print(f"# {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print("\n".join(describe(load_recipe(args.config, args.overrides))))


# ------------------------------------------------------------------------------------------------ train, predict
def lr_find(args: Args) -> None:
    from seedlings.train.lr_find import lr_find as find

    find(opened_run(args), args.fold or 0, args.stage)


HELD_ELSEWHERE = 3  # `seedlings train`'s exit status when every fold it was asked for is held by another process


def train(args: Args) -> int:
    """Exit 3 when every fold asked for was held by another process or host: a script can tell that none was trained
    here, and `make train` over several machines takes it as a fold trained elsewhere."""
    from seedlings.train.fit import train_fold

    run = opened_run(args)
    asked = [args.fold] if args.fold is not None else run.models()
    held = 0
    for k in asked:
        if k not in run.models():
            print(f"fold {k}: not trained by this recipe (train_folds: {run.recipe.train_folds}), nothing to do")
            continue
        try:
            final = train_fold(run, k)
        except Busy as e:  # another process or host trains it: each fold is trained once
            print(f"fold {k}: skipped, {e}")
            held += 1
            continue
        print(f"fold {k}: val micro-F1 {final['val_f1']:.4f}, val loss {final['val_loss']:.4f}")
    return HELD_ELSEWHERE if asked and held == len(asked) else 0


def predict(args: Args) -> None:
    from seedlings.predict.infer import predict_run

    predict_run(opened_run(args), [args.fold] if args.fold is not None else None)


def evaluate(args: Args) -> None:
    from seedlings.predict.blend import print_oof_summary

    print_oof_summary(opened_run(args))


def split_runs(args: Args) -> None:
    """`--runs a b` takes every word after it: a key=value among them (make submit RUNS="a b" ARGS=k=v) is a recipe
    override, not a run's name."""
    args.overrides = [*args.overrides, *(w for w in args.runs or [] if "=" in w)]
    args.runs = [w for w in args.runs or [] if "=" not in w]


def submit(args: Args) -> None:
    from seedlings.chain.submit import submit as submit_chain
    from seedlings.recipe.load import variant_overrides
    from seedlings.run import saved_run

    split_runs(args)
    run = opened_run(args)
    names = [name for name in dict.fromkeys(args.runs) if name != run.name]
    variant = variant_overrides(args.overrides)  # each other run predicted with the keys asked for, as this one
    others = [saved_run(name, args.data, args.n_folds, args.fold_seed, variant) for name in names]
    submit_chain(run, others, weights=args.weights, command=sys.argv, train=not args.blend_only)


def validate_submission(args: Args) -> None:
    from seedlings.predict.submission import validate_submission as validate

    print(f"{args.submission}: valid ({validate(args.data, args.submission)} rows)")


# ---------------------------------------------------------------------------------------------------------- Kaggle
def upload(args: Args) -> None:
    from seedlings.data.kaggle import upload as send

    send(run_name(args), args.message, competition=args.competition)


def leaderboard(args: Args) -> None:
    from seedlings.data.kaggle import leaderboard as show
    from seedlings.track.table import save_leaderboard

    save_leaderboard(show(competition=args.competition))  # the runs table reads each run's scores from it


def kaggle_bundle(args: Args) -> None:
    from seedlings.bundle.kaggle import build_bundle

    build_bundle(args.config, args.overrides, run_name(args), args.n_folds, args.fold_seed,
                 Path(args.out) if args.out else None)  # fmt: skip


def kaggle_push(args: Args) -> None:
    from seedlings.bundle.push import push

    push(Path(args.bundle) if args.bundle else None)


def kaggle_output(args: Args) -> None:
    from seedlings.bundle.push import fetch_output

    fetch_output(run_name(args))


# --------------------------------------------------------------------------------------------------------- results
def runs(args: Args) -> None:
    from seedlings.track.table import runs_table, show

    table = runs_table(args.config, args.sweep, args.sort, args.ascending)
    print(show(table, args.csv, args.wide), end="" if args.csv else "\n")


def mlflow_ui(args: Args) -> int:
    from seedlings.track.ui import serve_ui

    return serve_ui(args.port)


def predict_images(args: Args) -> None:
    from seedlings.predict.images import predict_images as predict
    from seedlings.storage import write_csv

    table = predict(args.run, args.paths, args.out)
    if args.out:
        write_csv(args.out, table, float_format="%.9g")  # whole or not at all: written beside it, then renamed
        print(f"{args.out}: {len(table)} photos")
    else:
        sys.stdout.write(table.to_csv(index=False, float_format="%.9g", lineterminator="\n"))


def export(args: Args) -> None:
    from seedlings.predict.export import export as write_export
    from seedlings.predict.images import submitted_run

    write_export(submitted_run(args.run)[0], args.out)


# ------------------------------------------------------------------------------------------------------------- lab
def holdout(args: Args) -> None:
    from seedlings.lab.holdout import make_holdout

    out = make_holdout(args.data, args.out, args.fraction, args.seed)
    print(f"{out}: test set of held-out labelled images, labels in {out / 'answers.csv'}")


def grade(args: Args) -> None:
    from seedlings.lab.holdout import grade as grade_submission
    from seedlings.lab.holdout import grade_members
    from seedlings.run import saved_run

    if not (args.run or args.submission):
        raise UserError("grade: give --submission FILE or --run NAME")
    if args.run:
        for name, f1 in grade_members(saved_run(args.run), args.answers).items():
            print(f"{name:<36} held-out micro-F1 {f1:.4f}")
    if args.submission:
        print(f"{args.submission}: held-out micro-F1 {grade_submission(args.submission, args.answers):.4f}")


def try_(args: Args) -> None:
    from seedlings.lab.tries import study_from_args, try_command

    try_command(study_from_args(args.data, args.config, args.overrides, args.levers, args.seeds, args.n_folds,
                                args.name))  # fmt: skip


def probe(args: Args) -> None:
    from seedlings.lab.probe import linear_probe

    run = unopened_run(args)
    res = linear_probe(run, args.fold or 0, args.size)
    print(f"linear probe, {run.recipe.model} features at {res['size']} px (image + mirror, C={res['c']:g} by CV), "
          f"fold {args.fold or 0}: val micro-F1 {res['val_f1']:.4f} ({res['seconds']:.0f} s)")  # fmt: skip


def compare(args: Args) -> None:
    from seedlings.lab.ablations import ablations_path, load_ablations
    from seedlings.lab.compare import compare as run_compare
    from seedlings.recipe.load import load_recipe

    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--sizes: expected px sizes separated by commas (160,224), got {args.sizes!r}") from None
    if any(not 16 <= s <= 1024 for s in sizes):
        raise UserError(f"--sizes: each size must be in [16, 1024] px, got {args.sizes!r}")
    baseline = load_recipe(args.baseline) if args.baseline else None
    label = Path(args.baseline).stem if args.baseline else ""
    ablations = None
    if args.ablations or args.ablations_file:
        ablations = load_ablations(args.ablations_file or ablations_path(args.config))
    run_compare(unopened_run(args), args.fraction, args.holdout_seed, ablations, sizes, args.probes_only,
                (label, baseline), args.probe_model)  # fmt: skip


def mle(args: Args) -> None:
    from seedlings.lab.mle import mle as run_mle

    run_mle(unopened_run(args))


def bench(args: Args) -> None:
    from seedlings.lab.bench import bench as run_bench

    run_bench(Path(args.data) if args.data else None, quick=args.quick)


def sweep(args: Args) -> None:
    from seedlings.data.competition import scan_competition
    from seedlings.lab.sweep.report import finish_sweep
    from seedlings.lab.sweep.space import sweep_from_args
    from seedlings.lab.sweep.study import open_study, safe_url
    from seedlings.lab.sweep.worker import run_worker

    sweep = sweep_from_args(args)
    scan_competition(sweep.data)  # a missing or broken data folder stops here, not in every trial
    if args.create_only:
        open_study(sweep)
        print(f"study {sweep.name!r}: ready in {sweep.storage and safe_url(sweep.storage) or sweep.journal}")
        return
    # `make sweep` starts its workers with & in a non-interactive shell, which makes them ignore SIGINT: a terminal's
    # Ctrl-C would stop make and leave them training. Each worker takes SIGINT back (KeyboardInterrupt, exit 130).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ran = run_worker(sweep)
    print(f"study {sweep.name!r}: this worker ran {ran} trial(s); the study holds {sweep.trials}")
    finish_sweep(sweep, grade=args.grade)


def sweep_report(args: Args) -> None:
    from seedlings.lab.sweep.report import write_sweep_report
    from seedlings.lab.sweep.study import load_sweep

    given = [flag for flag in ("data", "config", "run", "n_folds", "fold_seed", "space", "trials", "pruner",
             "min_resource", "reduction_factor", "sweep_folds", "objective", "holdout", "heartbeat", "grace")
             if getattr(args, flag) is not None]  # fmt: skip
    if given or args.overrides:
        print(f"note: sweep-report reads the sweep's settings from its study; {', '.join(given) or 'overrides'} "
              "ignored (give --sweep, and --storage where it is not the journal file)", file=sys.stderr)  # fmt: skip
    name = args.sweep or (Path(args.space).stem if isinstance(args.space, str) else None)
    if not name:
        raise UserError("--sweep: the sweep's name is needed (runs/<sweep>/)")
    write_sweep_report(*load_sweep(name, args.storage), grade=args.grade)


def dashboard(args: Args) -> int:
    from seedlings.lab.sweep.study import serve_dashboard

    return serve_dashboard(args.sweep, args.storage, args.port)
