"""The Makefile and the CLI must not drift apart: every target is listed and calls a stage the CLI knows."""

import re
import subprocess
from pathlib import Path

import pytest

from seedlings.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def make(*args):
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def documented_targets() -> dict[str, str]:
    """{target: its recipe} of every target the Makefile documents (`name: prerequisites ## what it does`)."""
    text = (REPO / "Makefile").read_text()
    out = {}
    for m in re.finditer(r"^([a-z][a-z-]*):[^\n]*## [^\n]*\n((?:\t[^\n]*\n|[^\n]*\\\n)*)", text, flags=re.M):
        out[m.group(1)] = m.group(2)
    return out


TARGETS = documented_targets()


def test_the_makefile_is_read():
    assert {"submit", "train", "demo", "test", "sweep", "help"} <= set(TARGETS)
    assert "$(SEEDLINGS) submit" in TARGETS["submit"]


def test_the_makefiles_defaults_are_the_packages():
    """Each default said once: the Makefile's variables hold the values the CLI falls back on (seedlings.defaults)."""
    from seedlings import defaults

    text = (REPO / "Makefile").read_text()
    made = dict(re.findall(r"^([A-Z_]+) *\?= *([^#\n]*?) *(?:#|$)", text, flags=re.M))
    expected = {"COMPETITION": defaults.COMPETITION, "CONFIG": defaults.CONFIG, "RECIPE": defaults.KAGGLE_RECIPE,
                "N_FOLDS": defaults.N_FOLDS, "FOLD_SEED": defaults.FOLD_SEED, "SEEDS": defaults.SEEDS,
                "TRIALS": defaults.TRIALS, "PRUNER": defaults.PRUNER, "SWEEP_FOLDS": defaults.SWEEP_FOLDS,
                "OBJECTIVE": defaults.OBJECTIVE}  # fmt: skip
    assert {k: made.get(k) for k in expected} == {k: str(v) for k, v in expected.items()}
    assert "DEFAULT_DATA := data/$(COMPETITION)" in text and defaults.DATA == f"data/{defaults.COMPETITION}"
    parser = build_parser()
    sweep = parser.parse_args(["sweep", "--space", "x.yaml"])
    assert (sweep.trials, sweep.pruner, sweep.sweep_folds, sweep.objective) == (
        defaults.TRIALS, defaults.PRUNER, defaults.SWEEP_FOLDS, defaults.OBJECTIVE)  # fmt: skip
    assert parser.parse_args(["try", "a=b"]).seeds == defaults.SEEDS


def test_help_lists_every_target():
    out = make("help").stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(TARGETS) <= listed


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_targets_call_known_stages(target):
    """Each target's dry run calls only commands the CLI declares; one whose recipe runs the CLI calls it."""
    stages = set(build_parser()._subparsers._group_actions[0].choices)
    dry = make("-n", "-W", ".venv/.installed", target, "DATA=data/demo", "FOLD=0").stdout
    called = re.findall(r"\.venv/bin/seedlings (\S+)", dry)
    assert set(called) <= stages
    if "$(SEEDLINGS)" in TARGETS[target] or target == "train":
        assert called, dry


def test_train_without_fold_trains_every_fold():
    dry = make("-n", "-W", ".venv/.installed", "train", "DATA=data/demo", "N_FOLDS=3").stdout
    assert sorted(re.findall(r"seedlings train .*--fold (\d)", dry)) == ["0", "1", "2"]
    assert "--n-folds 3" in dry


def test_parallel_folds_pinned_to_gpus():
    dry = make("-n", "-W", ".venv/.installed", "train", "DATA=data/demo", "N_FOLDS=3", "GPUS=0 1").stdout
    assert re.findall(r"CUDA_VISIBLE_DEVICES=(\d)", dry) == ["0", "1", "0"]


def test_parallel_folds_share_the_cpu():
    """make -j 3 train: every fold's process is told how many run at once (SEEDLINGS_JOBS), to take its share."""
    import os

    env = {**os.environ, "MAKEFLAGS": ""}
    dry = subprocess.run(
        ["make", "-s", "-n", "-j", "3", "-W", ".venv/.installed", "train", "DATA=data/demo", "N_FOLDS=3",
         "GPUS=0 0 0"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    ).stdout  # fmt: skip
    assert dry.count("SEEDLINGS_JOBS=") == 3 and dry.count("CUDA_VISIBLE_DEVICES=0") == 3


def test_jobs_share_threads_and_workers(monkeypatch):
    import torch

    from seedlings.data.loaders import default_workers, parallel_jobs

    monkeypatch.setenv("SEEDLINGS_JOBS", "3")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert parallel_jobs() == 3 and default_workers(torch.device("cuda")) == 5
    monkeypatch.setenv("SEEDLINGS_JOBS", "")
    assert parallel_jobs() == 1 and default_workers(torch.device("cuda")) == 8
    assert default_workers(torch.device("cpu")) == 0


def test_parallel_sweep_starts_one_worker_per_job(tmp_path):
    """make -j 3 sweep: the study is created once, then three workers start, each told how many share the machine
    and given GPU k mod len(GPUS)."""
    import os

    fake = tmp_path / "seedlings"
    fake.write_text('#!/bin/sh\necho "CUDA=$CUDA_VISIBLE_DEVICES JOBS=$SEEDLINGS_JOBS $1 $2"\n')
    fake.chmod(0o755)
    out = subprocess.run(
        ["make", "-s", "-j", "3", "-W", ".venv/.installed", "sweep", f"SEEDLINGS={fake}", "GPUS=0 1", "DATA=data/demo"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""},
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0].endswith("sweep --create-only")
    workers = ["CUDA=0 JOBS=3 sweep --data", "CUDA=0 JOBS=3 sweep --data", "CUDA=1 JOBS=3 sweep --data"]
    assert sorted(lines[1:]) == workers


@pytest.mark.parametrize("status,ok", [(0, True), (3, True), (2, False)])
def test_make_train_takes_a_fold_held_elsewhere_as_done(tmp_path, status, ok):
    """`seedlings train --fold k` exits 3 when the fold is held by another process or host (a script can tell);
    `make train` over several machines takes that as trained elsewhere, and any other failure as one."""
    import os

    fake = tmp_path / "seedlings"
    fake.write_text(f"#!/bin/sh\nexit {status}\n")
    fake.chmod(0o755)
    done = subprocess.run(
        ["make", "-s", "-W", ".venv/.installed", "-o", "folds", "train", f"SEEDLINGS={fake}", "DATA=data/demo",
         "FOLD=0"], cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""},
    )  # fmt: skip
    assert (done.returncode == 0) == ok, done.stderr


@pytest.mark.parametrize("target", ["dashboard", "mlflow-ui"])
def test_the_uis_take_a_port(target):
    assert "--port 8123" in make("-n", "-W", ".venv/.installed", target, "PORT=8123", "SWEEP=s").stdout
    assert "--port" not in make("-n", "-W", ".venv/.installed", target, "SWEEP=s").stdout
