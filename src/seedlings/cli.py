"""`seedlings <command> ...`: one command per pipeline step; bad input exits 2 with one line on stderr.

The parser imports nothing of the pipeline: each command's function imports what it runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from seedlings import __version__, commands, defaults
from seedlings.errors import UserError
from seedlings.lab.sweep import settings as sweep_settings


class Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already; a flag is off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        return f"{text} (default: %(default)s)"


def run_args(p: argparse.ArgumentParser, fold: bool = True) -> None:
    """The arguments every recipe-driven command shares (the Makefile's DATA, CONFIG, RUN, N_FOLDS, FOLD_SEED)."""
    p.add_argument("--data", default=defaults.DATA, help="competition folder: train/<Species>/*, test/*, sample CSV")
    p.add_argument("--config", default=defaults.CONFIG, help="recipe (YAML), or a run's runs/<run>/config.yaml")
    p.add_argument("--run", default=None, help="run name, runs/<run>/ (default: the recipe's file name)")
    p.add_argument("--n-folds", type=int, default=defaults.N_FOLDS, help="folds of the split")
    p.add_argument(
        "--fold-seed", type=int, default=defaults.FOLD_SEED, help="seed of the split (not the training seed)"
    )
    if fold:
        p.add_argument("--fold", type=int, default=None, help="one fold only (default: every fold the recipe trains)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted: stages.1.size=160")


def command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=Help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seedlings", description=__doc__.splitlines()[0], formatter_class=Help)
    parser.add_argument("--version", action="version", version=f"seedlings {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    add_data_commands(sub)
    add_model_commands(sub)
    add_kaggle_commands(sub)
    add_results_commands(sub)
    add_lab_commands(sub)
    add_sweep_commands(sub)
    return parser


def add_data_commands(sub) -> None:
    p = command(
        sub, "fetch", commands.fetch, "download (or unpack --archive) the competition into --data and verify it"
    )
    p.add_argument("--data", default=defaults.DATA, help="where the competition folder goes")
    p.add_argument("--competition", default=defaults.COMPETITION, help="Kaggle's name of the competition")
    p.add_argument("--archive", default=None, help="a bundle downloaded by hand (default: the kaggle API downloads it)")
    p.add_argument("--max-expand", type=float, default=20, help="extracted bytes allowed per archive byte")

    p = command(sub, "demo-data", commands.demo_data, "generate a small synthetic competition")
    p.add_argument("--out", default="data/demo", help="the competition folder to write (nothing is done if it exists)")
    p.add_argument("--per-class", type=int, default=10, help="images of the smallest species (others up to ~3x)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawing")
    p.add_argument("--min-size", type=int, default=50, help="px, smallest image side")
    p.add_argument("--max-size", type=int, default=None, help="px, largest image side (default 600; full size 2800)")
    p.add_argument("--full-size", action="store_true", help="a stand-in at Kaggle's counts and photo sizes")
    p.add_argument("--fraction", type=float, default=1.0, help="full size: the share of Kaggle's counts to write")
    p.add_argument("--source", default=None, help="full size: real photos to upsample (default: drawn plants)")

    p = command(
        sub, "check-data", commands.check_data, "check layout, decode every image, report counts, sizes, duplicates"
    )
    p.add_argument("--data", default=defaults.DATA, help="competition folder")
    p.add_argument("--config", default=None, help="recipe, for skip_bad_images (default: the recipe defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")

    p = command(sub, "folds", commands.folds, "write the stratified, duplicate-grouped folds CSV")
    p.add_argument("--data", default=defaults.DATA, help="competition folder")
    p.add_argument("--n-folds", type=int, default=defaults.N_FOLDS, help="folds of the split")
    p.add_argument("--fold-seed", type=int, default=defaults.FOLD_SEED, help="seed of the fold split")
    p.add_argument("--out", default=None, help="CSV path (default: data/folds/<dataset>-<hash>-k<K>-s<S>.csv)")
    p.add_argument("--force", action="store_true", help="overwrite a folds file made with other parameters")

    p = command(
        sub, "recipe", commands.recipe, "print a resolved recipe: every key's value, unit, range or choices, role"
    )
    p.add_argument("--config", default=defaults.CONFIG, help="recipe (YAML), or a run's config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted: stages.1.size=160")


def add_model_commands(sub) -> None:
    """The commands that train, predict and blend a run's models."""
    p = command(
        sub, "lr-find", commands.lr_find, "LR range test at one stage's settings, from the weights it starts with"
    )
    run_args(p)
    p.add_argument("--stage", type=int, default=None, help="the recipe stage to sweep (default: its first SGDR stage)")
    run_args(command(sub, "train", commands.train, "train folds (every fold the recipe trains, or --fold K)"))
    run_args(command(sub, "predict", commands.predict, "TTA probabilities per fold and snapshot"))
    p = command(sub, "submit", commands.submit, "folds, train, predict, blend: submissions/<run>.csv")
    run_args(p, fold=False)
    p.add_argument(
        "--runs", nargs="*", default=None, help="other finished runs on the same folds to blend in (default: none)"
    )
    p.add_argument("--weights", choices=["equal", "fit"], default="fit", help="blend weights (fit: OOF log loss)")
    p.add_argument("--blend-only", action="store_true", help="train no fold: blend those already trained and name "
                   "the others (a cluster's job after its fold array)")  # fmt: skip
    run_args(
        command(sub, "evaluate", commands.evaluate, "out-of-fold scores of a predicted run: TTA, folds, blends"), False
    )
    p = command(
        sub, "validate-submission", commands.validate_submission, "check a submission CSV against a competition folder"
    )
    p.add_argument("--data", default=defaults.DATA, help="competition folder whose sample_submission.csv it must match")
    p.add_argument("--submission", required=True, help="the CSV to check")


def add_kaggle_commands(sub) -> None:
    p = command(sub, "upload", commands.upload, "submit submissions/<run>.csv to Kaggle")
    p.add_argument("--config", default=defaults.CONFIG, help="recipe whose file name is the run's default name")
    p.add_argument("--run", default=None, help="run name (default: the recipe's file name)")
    p.add_argument("--message", default=None, help="submission message (default: the run's OOF score and commit)")
    p.add_argument("--competition", default=defaults.COMPETITION, help="Kaggle's name of the competition")
    p = command(
        sub, "leaderboard", commands.leaderboard, "list your Kaggle submissions and their public and private scores"
    )
    p.add_argument("--competition", default=defaults.COMPETITION, help="Kaggle's name of the competition")
    p = command(sub, "kaggle-bundle", commands.kaggle_bundle, "kaggle/: a notebook and its wheel dataset that run a "
                "recipe on Kaggle's GPUs with no internet (make kaggle)")  # fmt: skip
    p.add_argument("--config", default=defaults.KAGGLE_RECIPE, help="recipe: a file, a run's config.yaml, a best.yaml")
    p.add_argument("--run", default=None, help="the run's name on Kaggle (default: the recipe's file name)")
    p.add_argument("--n-folds", type=int, default=defaults.N_FOLDS, help="folds of the split")
    p.add_argument("--fold-seed", type=int, default=defaults.FOLD_SEED, help="seed of the split")
    p.add_argument("--out", default=None, help="the bundle's folder (default: kaggle/ in the checkout)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted: stages.1.size=160")
    p = command(sub, "kaggle-push", commands.kaggle_push, "send kaggle/ to Kaggle: hub weights once, wheels, notebook")
    p.add_argument("--bundle", default=None, help="the bundle's folder (default: kaggle/ in the checkout)")
    p = command(sub, "kaggle-output", commands.kaggle_output, "fetch a finished notebook's runs/<run>/ and submission")
    p.add_argument("--config", default=defaults.KAGGLE_RECIPE, help="recipe whose file name is the run's default name")
    p.add_argument("--run", default=None, help="run name (default: the recipe's file name)")


def add_results_commands(sub) -> None:
    """What the runs left behind, side by side."""
    what = ("a table of every run under runs/ (or of a sweep's trials): what differs from a reference recipe, folds "
            "trained, out-of-fold scores, time, submission, Kaggle's scores")  # fmt: skip
    p = command(sub, "runs", commands.runs, what)
    p.add_argument("--config", default=defaults.CONFIG, help="the reference recipe the differs column compares with")
    p.add_argument("--sweep", default=None, help="list this sweep's trials, runs/<sweep>/trial-<n> (default: none)")
    p.add_argument("--sort", default="oof_f1", help="the column to sort by (runs without a value last)")
    p.add_argument("--ascending", action="store_true", help="smallest first (default: largest first)")
    p.add_argument("--csv", action="store_true", help="CSV on standard output, for scripts")
    p.add_argument("--wide", action="store_true", help="all columns, differs whole (default: cut to the terminal)")
    p = command(sub, "mlflow-ui", commands.mlflow_ui, "MLflow's UI on the runs' embedded store, on 127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one, printed)")
    p = command(sub, "predict-images", commands.predict_images, "a finished run's chain on any photos: file, species "
                "and the probability of each class, as make submit predicts its test images")  # fmt: skip
    p.add_argument("--run", required=True, help="the run (its submission records the blend: make submit first)")
    p.add_argument("--out", default=None, help="CSV file to write (default: standard output)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders of them, or quoted globs")
    p = command(sub, "export", commands.export, "a finished run's chain as one ONNX graph with a model card beside it")
    p.add_argument("--run", required=True, help="the run (its submission records the blend: make submit first)")
    p.add_argument("--out", default=None, help="folder for model.onnx and model.json (default: runs/<run>/export/)")


def add_lab_commands(sub) -> None:
    """Held-out grading, the baselines, the accuracy benchmark and the throughput benchmark."""
    p = command(
        sub, "holdout", commands.holdout, "a competition whose test set is held-out labelled images (answers.csv)"
    )
    p.add_argument("--data", required=True, help="competition folder to take the labelled images from")
    p.add_argument("--out", required=True, help="the new competition folder (images are links, nothing is copied)")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the labelled images held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")

    p = command(
        sub, "grade", commands.grade, "micro-F1 of a submission (or of every member of --run) on held-out labels"
    )
    p.add_argument("--submission", default=None, help="a submission CSV to grade (default: none)")
    p.add_argument("--run", default=None, help="grade each fold, snapshot and fold blend of this run (default: none)")
    p.add_argument("--answers", required=True, help="CSV file,species with the true labels")

    p = command(sub, "try", commands.try_, "is a change better? base and variant chains over fold seeds, compared "
                "image by image: intervals, McNemar, a verdict")  # fmt: skip
    p.add_argument("--data", default=defaults.DATA, help="competition folder")
    p.add_argument("--config", default=defaults.CONFIG, help="the base recipe (make try's BASE)")
    p.add_argument("--n-folds", type=int, default=defaults.N_FOLDS, help="folds of each split")
    p.add_argument("--seeds", default=defaults.SEEDS, help="fold seeds, each a split of its own: '0 1 2' or 0,1,2")
    p.add_argument("--levers", default=None, help="a file of levers (a label, then the keys it changes, as "
                   "configs/cpu-ablations.yaml), each against the base; overrides then change the base "
                   "(default: none)")  # fmt: skip
    p.add_argument("--name", default=None, help="the study's name, runs/try/<data>/<name>/ (default: the keys, or "
                   "the levers file's name)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the change to try (with --levers: the base's)")

    p = command(sub, "probe", commands.probe, "baseline: logistic regression on frozen pooled features, one fold")
    run_args(p)
    p.add_argument("--size", type=int, default=224, help="px, image size for the features")

    p = command(
        sub, "compare", commands.compare, "accuracy benchmark: probes, one fold, the chain on one held-out split"
    )
    run_args(p, fold=False)
    p.add_argument("--fraction", type=float, default=0.2, help="share of the labelled images held out")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--ablations", action="store_true", help="also fold 0 with each technique switched, as the "
                   "recipe's ablations file says (configs/<recipe>-ablations.yaml beside it)")  # fmt: skip
    p.add_argument("--ablations-file", default=None, help="another ablations file (implies --ablations; default: none)")
    p.add_argument("--probes-only", action="store_true", help="only the linear probes (no training)")
    p.add_argument("--sizes", default="", help="probe sizes in px, comma-separated (default: the data's own, 224)")
    p.add_argument(
        "--baseline", default=None, help="another recipe (YAML) whose fold 0 and chain join the table (default: none)"
    )
    p.add_argument("--probe-model", default="tf_efficientnet_lite0", help="the baseline probe's backbone, on the "
                   "unmasked photos (the recipe's own backbone gets a probe row too when it differs)")  # fmt: skip

    p = command(sub, "mle", commands.mle, "MLE-bench's split of a labelled competition: the whole chain, graded once")
    run_args(p, fold=False)

    p = command(sub, "bench", commands.bench, "loader and training throughput, side by side")
    p.add_argument("--data", default=None, help="a competition folder of real images to measure too (default: none)")
    p.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")


def add_sweep_commands(sub) -> None:
    p = command(sub, "sweep", commands.sweep, "one worker of an Optuna study over recipes (make -j N sweep: N workers)")
    run_args(p, fold=False)
    worker_args(p)
    p = command(sub, "sweep-report", commands.sweep_report, "a study's trials.csv, best.yaml, plots and report.md")
    p.add_argument(
        "--sweep",
        default=None,
        help="the sweep's name, runs/<sweep>/; its settings are read from its study (default: none: required)",
    )
    p.add_argument("--storage", default="", help="the study's storage URL (default: the sweep's journal file)")
    grade_args(p)
    for flag in WORKER_FLAGS:  # what a worker is given; the report reads it from the study (kept for old scripts)
        p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    p = command(sub, "dashboard", commands.dashboard, "optuna-dashboard on a sweep's study, bound to 127.0.0.1")
    p.add_argument("--sweep", required=True, help="the sweep's name (runs/<sweep>/)")
    p.add_argument("--storage", default="", help="the study's storage URL (default: the sweep's journal file)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one, printed)")


def grade_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-grade", dest="grade", action="store_false", default=None, help="leave the report's "
                   "held-out grade out (it trains the base and the best recipe's chains afresh)")  # fmt: skip
    p.add_argument("--grade", dest="grade", action="store_true", default=None, help="grade on the answers beside "
                   "the data (default: only when the sweep searched a held-out split, --holdout)")  # fmt: skip


WORKER_FLAGS = ("--data", "--config", "--run", "--n-folds", "--fold-seed", "--space", "--trials", "--pruner",
                "--min-resource", "--reduction-factor", "--sweep-folds", "--objective", "--holdout", "--heartbeat",
                "--grace")  # fmt: skip


def worker_args(p: argparse.ArgumentParser) -> None:
    """The Makefile's SPACE, TRIALS, SWEEP, STORAGE, PRUNER, SWEEP_FOLDS, OBJECTIVE, HOLDOUT, GRADE."""
    s = sweep_settings
    p.add_argument("--space", required=True, help="search space (YAML): recipe key -> choices or a range")
    p.add_argument("--trials", type=int, default=defaults.TRIALS, help="the study's trials in all, over every worker")
    p.add_argument("--sweep", default=None, help="study name and folder runs/<sweep>/ (default: the space's file name)")
    p.add_argument("--storage", default="", help="postgresql://... or mysql://... across machines (default: a journal "
                   "file in runs/<sweep>/, one machine)")  # fmt: skip
    p.add_argument("--pruner", choices=s.PRUNERS, default=defaults.PRUNER, help="how trailing trials are stopped: "
                   + "; ".join(f"{k}: {f.__doc__}" for k, f in s.PRUNERS.items()))  # fmt: skip
    p.add_argument("--min-resource", type=int, default=4, help="epochs (metrics rows) before a trial may be pruned")
    p.add_argument("--reduction-factor", type=int, default=2, help="the pruner keeps 1/this at each rung")
    p.add_argument("--sweep-folds", type=int, default=defaults.SWEEP_FOLDS, help="folds a trial's value comes from")
    p.add_argument("--objective", choices=s.OBJECTIVES, default=defaults.OBJECTIVE, help="a trial's value: "
                   + "; ".join(f"{k}: {v}" for k, v in s.OBJECTIVES.items()))  # fmt: skip
    p.add_argument("--holdout", action="store_true", help="search on make compare's held-out split of --data")
    p.add_argument("--heartbeat", type=int, default=s.HEARTBEAT_S, help="seconds between a trial's heartbeats (RDB)")
    p.add_argument("--grace", type=int, default=s.GRACE_S, help="seconds without one before a trial is retried (RDB)")
    grade_args(p)
    p.add_argument("--create-only", action="store_true", help="create the study (once, before any worker) and stop")
    p.add_argument("--add-trials", action="store_true", help="a --trials above the study's raises its total")


def share_threads() -> None:
    """With SEEDLINGS_JOBS=N (make -j N train), this process takes 1/N of the cores for torch and OpenCV;
    SEEDLINGS_THREADS=T sets T threads outright (a sweep's best.yaml states the count its trial trained with: CPU
    results depend on it)."""
    given = os.environ.get("SEEDLINGS_THREADS", "")
    if given and (not given.isdigit() or int(given) < 1):
        raise UserError(f"SEEDLINGS_THREADS: a number of threads above 0, got {given!r}")
    jobs = defaults.parallel_jobs()
    if given or jobs > 1:  # else torch's own count: nothing imported (seedlings runs, recipe, --help stay quick)
        import cv2
        import torch

        threads = int(given) if given else max(1, (os.cpu_count() or 1) // jobs)
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        share_threads()
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `seedlings recipe | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a folder not writable, a file vanished: the path and the reason, not a traceback
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
