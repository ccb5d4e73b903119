"""`seedlings <command> ...`: one command per pipeline step; bad input exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import torch

from seedlings.data.competition import check_competition, scan_competition
from seedlings.data.demo import make_demo
from seedlings.data.fetch import fetch
from seedlings.data.folds import make_folds
from seedlings.data.kaggle import leaderboard, upload
from seedlings.data.loaders import parallel_jobs
from seedlings.errors import Busy, UserError
from seedlings.lab.bench import bench
from seedlings.lab.compare import PROBE_MODEL, compare
from seedlings.lab.holdout import grade, grade_members, make_holdout
from seedlings.lab.probe import linear_probe
from seedlings.lab.sweep.report import finish_sweep, write_sweep_report
from seedlings.lab.sweep.space import GRACE_S, HEARTBEAT_S, OBJECTIVES, PRUNERS, sweep_from_args
from seedlings.lab.sweep.study import open_study, safe_url, serve_dashboard
from seedlings.lab.sweep.worker import run_worker
from seedlings.predict.blend import print_oof_summary
from seedlings.predict.infer import predict_run
from seedlings.predict.submission import validate_submission
from seedlings.predict.submit import submit
from seedlings.recipe.load import load_recipe
from seedlings.run import Run, open_run, saved_run
from seedlings.train.fit import train_fold
from seedlings.train.lr_find import lr_find

DEFAULT_DATA = "data/plant-seedlings-classification"
DEFAULT_CONFIG = "configs/cpu.yaml"


def _run_args(p: argparse.ArgumentParser, fold: bool = True) -> None:
    """The arguments every recipe-driven command shares (the Makefile's DATA, CONFIG, RUN, N_FOLDS, FOLD_SEED)."""
    p.add_argument("--data", default=DEFAULT_DATA, help="competition folder")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe (YAML)")
    p.add_argument("--run", default=None, help="run name (default: the recipe's file name)")
    p.add_argument("--n-folds", type=int, default=5, help="number of folds")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold split (not the training seed)")
    if fold:
        p.add_argument("--fold", type=int, default=None, help="one fold only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted: stages.1.size=160")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    """The Makefile's SPACE, TRIALS, SWEEP, STORAGE, PRUNER, SWEEP_FOLDS, OBJECTIVE, HOLDOUT beside the run's
    arguments."""
    _run_args(p, fold=False)
    p.add_argument("--space", required=True, help="search space (YAML): recipe key -> choices or a range")
    p.add_argument("--trials", type=int, default=20, help="trials in the study in all, however many workers share it")
    p.add_argument("--sweep", default=None, help="study name and folder runs/<sweep>/ (default: the space's file name)")
    p.add_argument("--storage", default="", help="postgresql://... or mysql://... across machines (default: a journal "
                   "file in runs/<sweep>/, one machine)")  # fmt: skip
    p.add_argument("--pruner", choices=PRUNERS, default="sha", help="sha (successive halving), hyperband or none")
    p.add_argument("--min-resource", type=int, default=4, help="epochs (metrics rows) before a trial may be pruned")
    p.add_argument("--reduction-factor", type=int, default=2, help="the pruner keeps 1/this at each rung")
    p.add_argument("--sweep-folds", type=int, default=1, help="a trial's value comes from this many folds")
    p.add_argument("--objective", choices=OBJECTIVES, default="fold", help="fold: the folds' mean last-epoch val "
                   "micro-F1; chain: OOF micro-F1 of their blend as make submit blends them")  # fmt: skip
    p.add_argument("--holdout", action="store_true", help="search on make compare's held-out split of --data")
    p.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, help="seconds between a trial's heartbeats (RDB)")
    p.add_argument("--grace", type=int, default=GRACE_S, help="seconds without one before a trial is retried (RDB)")
    p.add_argument("--no-grade", dest="grade", action="store_false", help="on a held-out split, leave the report's "
                   "grade out (it trains the base and the best recipe's chains afresh)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seedlings", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    p = sub.add_parser("fetch", help="download (or unpack --archive) the competition into --data and verify it")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--archive", default=None, help="a bundle downloaded by hand from the competition page")
    p.add_argument("--max-expand", type=float, default=20, help="extracted bytes allowed per archive byte")

    p = sub.add_parser("demo-data", help="generate a small synthetic competition")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--per-class", type=int, default=10, help="images of the smallest species (others up to ~3x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=50, help="px, smallest image side")
    p.add_argument("--max-size", type=int, default=600, help="px, largest image side")

    p = sub.add_parser("holdout", help="a competition whose test set is held-out labelled images (answers.csv)")
    p.add_argument("--data", required=True, help="competition folder to take the labelled images from")
    p.add_argument("--out", required=True)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("check-data", help="check layout, decode every image, report counts, sizes, duplicates")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--config", default=None, help="recipe (for skip_bad_images)")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser("folds", help="write the stratified, duplicate-grouped folds CSV")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold split")
    p.add_argument("--out", default=None, help="CSV path (default: data/folds/<dataset>-<hash>-k<K>-s<S>.csv)")
    p.add_argument("--force", action="store_true", help="overwrite a folds file made with other parameters")

    add_model_commands(sub)
    add_tool_commands(sub)
    return parser


def add_model_commands(sub) -> None:
    """The commands that train, predict and blend a run's models."""
    p = sub.add_parser("lr-find", help="LR range test at one stage's settings, from the weights it starts with")
    _run_args(p)
    p.add_argument("--stage", type=int, default=None, help="the recipe stage to sweep (default: its first SGDR stage)")
    _run_args(sub.add_parser("train", help="train folds (all, or --fold K)"))
    _run_args(sub.add_parser("predict", help="TTA probabilities per fold and snapshot"))
    p = sub.add_parser("submit", help="folds, train, predict, blend: submissions/<run>.csv")
    _run_args(p, fold=False)
    p.add_argument("--runs", nargs="*", default=None, help="blend these runs (default: --run)")
    p.add_argument("--weights", choices=["equal", "fit"], default="fit", help="blend weights")

    p = sub.add_parser("evaluate", help="out-of-fold scores of a predicted run: TTA, folds, snapshot blend")
    _run_args(p, fold=False)


def add_tool_commands(sub) -> None:
    """Submissions, Kaggle, baselines, the accuracy benchmark, sweeps and the throughput benchmark."""
    p = sub.add_parser("validate-submission", help="check a submission CSV against a competition folder")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--submission", required=True)

    p = sub.add_parser("grade", help="micro-F1 of a submission (or of every member of --run) against held-out labels")
    p.add_argument("--submission", default=None)
    p.add_argument("--run", default=None, help="grade each fold, snapshot and fold blend of this run instead")
    p.add_argument("--answers", required=True, help="CSV file,species with the true labels")

    p = sub.add_parser("upload", help="submit submissions/<run>.csv to Kaggle")
    p.add_argument("--run", required=True)
    p.add_argument("--message", default=None)

    sub.add_parser("leaderboard", help="list your Kaggle submissions and their public and private scores")

    p = sub.add_parser("probe", help="baseline: logistic regression on frozen pooled features, one fold")
    _run_args(p)
    p.add_argument("--size", type=int, default=224, help="px, image size for the features")

    p = sub.add_parser("compare", help="accuracy benchmark: probes, one fold, the whole chain on one held-out split")
    _run_args(p, fold=False)
    p.add_argument("--fraction", type=float, default=0.2, help="share of the labelled images held out")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--ablations", action="store_true", help="also fold 0 with each technique switched")
    p.add_argument("--probes-only", action="store_true", help="only the linear probes (no training)")
    p.add_argument("--sizes", default="", help="probe sizes in px, comma-separated (default: the data's own, 224)")
    p.add_argument("--baseline", default=None, help="another recipe (YAML) whose fold 0 and chain join the table")
    p.add_argument("--probe-model", default=PROBE_MODEL, help="the baseline probe's backbone, on the unmasked photos "
                   "(the recipe's own backbone gets a probe row too when it differs)")  # fmt: skip

    p = sub.add_parser("sweep", help="one worker of an Optuna study over recipes (make -j N sweep: N workers)")
    _sweep_args(p)
    p.add_argument("--create-only", action="store_true", help="create the study (once, before any worker) and stop")
    p = sub.add_parser("sweep-report", help="a study's trials.csv, best.yaml, plots and report.md")
    _sweep_args(p)
    p = sub.add_parser("dashboard", help="optuna-dashboard on a sweep's study, bound to 127.0.0.1")
    p.add_argument("--sweep", required=True, help="the sweep's name (runs/<sweep>/)")
    p.add_argument("--storage", default="", help="the study's storage URL (default: the sweep's journal file)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one, printed)")

    p = sub.add_parser("bench", help="loader and training throughput, side by side")
    p.add_argument("--data", default=None, help="a competition folder of real images to measure too")
    p.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")


def run_name(args: argparse.Namespace) -> str:
    return args.run or Path(args.config).stem


def share_threads() -> None:
    """With SEEDLINGS_JOBS=N (make -j N train), this process takes 1/N of the cores for torch and OpenCV."""
    jobs = parallel_jobs()
    if jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    share_threads()
    try:
        return dispatch(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder not writable, a file vanished: the path and the reason, not a traceback
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int | None:
    command = args.command
    if command == "fetch":
        fetch(args.data, archive=args.archive, max_expand=args.max_expand)
    elif command == "demo-data":
        out = Path(args.out)
        if out.exists():
            print(f"{out}: exists, nothing to do")
            return 0
        make_demo(out, args.per_class, args.seed, args.min_size, args.max_size)
        print(f"{out}: demo competition written")
    elif command == "holdout":
        out = make_holdout(args.data, args.out, args.fraction, args.seed)
        print(f"{out}: test set of held-out labelled images, labels in {out / 'answers.csv'}")
    elif command == "check-data":
        recipe = load_recipe(args.config, args.overrides)
        report = check_competition(args.data, skip_bad_images=recipe.skip_bad_images)
        print("\n".join(report.lines()))
    elif command == "folds":
        make_folds(args.data, args.n_folds, args.fold_seed, args.out, args.force)
    else:
        return dispatch_training(args)
    return 0


def dispatch_training(args: argparse.Namespace) -> int | None:
    command = args.command
    if command in ("validate-submission", "grade", "upload", "leaderboard", "bench"):
        return dispatch_tools(args)
    if command in ("sweep", "sweep-report", "dashboard"):
        return dispatch_sweep(args)
    recipe = load_recipe(args.config, args.overrides)
    fold = getattr(args, "fold", None)
    if command in ("probe", "compare"):  # baselines and the held-out split: they never open the run trained on DATA
        run = Run(run_name(args), Path(args.data), recipe, args.n_folds, args.fold_seed)
    else:
        run = open_run(run_name(args), args.data, recipe, args.n_folds, args.fold_seed, fold)
    if command == "lr-find":
        lr_find(run, fold or 0, args.stage)
    elif command == "train":
        for k in [fold] if fold is not None else run.models():
            if k not in run.models():
                print(f"fold {k}: not trained by this recipe (train_folds: {recipe.train_folds}), nothing to do")
                continue
            try:
                final = train_fold(run, k)
            except Busy as e:  # another process or host trains it: each fold is trained once
                print(f"fold {k}: skipped, {e}")
                continue
            print(f"fold {k}: val micro-F1 {final['val_f1']:.4f}, val loss {final['val_loss']:.4f}")
    elif command == "predict":
        predict_run(run, [fold] if fold is not None else None)
    elif command == "evaluate":
        print_oof_summary(run)
    elif command == "probe":
        res = linear_probe(run, fold or 0, args.size)
        print(
            f"linear probe, {recipe.model} features at {res['size']} px (image + mirror, C={res['c']:g} by CV), "
            f"fold {fold or 0}: val micro-F1 {res['val_f1']:.4f} ({res['seconds']:.0f} s)"
        )
    elif command == "compare":
        sizes = tuple(int(s) for s in args.sizes.split(",") if s)
        baseline = load_recipe(args.baseline) if args.baseline else None
        label = Path(args.baseline).stem if args.baseline else ""
        compare(run, args.fraction, args.holdout_seed, args.ablations, sizes, args.probes_only, (label, baseline),
                args.probe_model)  # fmt: skip
    elif command == "submit":
        names = [name for name in dict.fromkeys(args.runs or []) if name != run.name]
        others = [saved_run(name, args.data, args.n_folds, args.fold_seed) for name in names]
        submit(run, others, weights=args.weights, command=sys.argv)
    return 0


def dispatch_sweep(args: argparse.Namespace) -> int | None:
    if args.command == "dashboard":
        return serve_dashboard(args.sweep, args.storage, args.port)
    sweep = sweep_from_args(args)
    scan_competition(sweep.data)  # a missing or broken data folder stops here, not in every trial
    if args.command == "sweep" and args.create_only:
        open_study(sweep)
        print(f"study {sweep.name!r}: ready in {sweep.storage and safe_url(sweep.storage) or sweep.journal}")
    elif args.command == "sweep":
        ran = run_worker(sweep)
        print(f"study {sweep.name!r}: this worker ran {ran} trial(s); the study holds {sweep.trials}")
        finish_sweep(sweep, grade=args.grade)
    else:
        write_sweep_report(sweep, open_study(sweep), grade=args.grade)
    return 0


def dispatch_tools(args: argparse.Namespace) -> int | None:
    command = args.command
    if command == "validate-submission":
        n = validate_submission(args.data, args.submission)
        print(f"{args.submission}: valid ({n} rows)")
    elif command == "grade":
        if args.run:
            for name, f1 in grade_members(saved_run(args.run), args.answers).items():
                print(f"{name:<36} held-out micro-F1 {f1:.4f}")
        if args.submission:
            print(f"{args.submission}: held-out micro-F1 {grade(args.submission, args.answers):.4f}")
        if not (args.run or args.submission):
            raise UserError("grade: give --submission FILE or --run NAME")
    elif command == "upload":
        upload(args.run, args.message)
    elif command == "leaderboard":
        leaderboard()
    elif command == "bench":
        bench(Path(args.data) if args.data else None, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
