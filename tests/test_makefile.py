"""The Makefile and the CLI must not drift apart: every target is listed and calls a stage the CLI knows."""

import re
import subprocess
from pathlib import Path

import pytest

from seedlings.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
TARGETS = (
    "setup data demo-data check-data folds lr-find train predict submit compare upload leaderboard demo test bench lint"
    " clean"
)


def make(*args):
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_help_lists_every_target():
    out = make("help").stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(TARGETS.split()) <= listed


@pytest.mark.parametrize(
    "target",
    [
        "data",
        "demo-data",
        "check-data",
        "folds",
        "lr-find",
        "predict",
        "submit",
        "compare",
        "upload",
        "leaderboard",
        "bench",
    ],
)
def test_targets_call_known_stages(target):
    stages = set(build_parser()._subparsers._group_actions[0].choices)
    dry = make("-n", "-W", ".venv/.installed", target, "DATA=data/demo", "FOLD=0").stdout
    called = re.findall(r"\.venv/bin/seedlings (\S+)", dry)
    assert called, dry
    assert set(called) <= stages


def test_train_without_fold_trains_every_fold():
    dry = make("-n", "-W", ".venv/.installed", "train", "DATA=data/demo", "N_FOLDS=3").stdout
    assert sorted(re.findall(r"seedlings train .*--fold (\d)", dry)) == ["0", "1", "2"]
    assert "--n-folds 3" in dry


def test_parallel_folds_pinned_to_gpus():
    dry = make("-n", "-W", ".venv/.installed", "train", "DATA=data/demo", "N_FOLDS=3", "GPUS=0 1").stdout
    assert re.findall(r"CUDA_VISIBLE_DEVICES=(\d)", dry) == ["0", "1", "0"]
