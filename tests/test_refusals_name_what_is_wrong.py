"""Refusals: each case ends as one line naming the flag, key or file at fault,
exit 2, nothing written."""

from pathlib import Path

import pandas as pd
import pytest

from seedlings.cli import build_parser, main
from seedlings.errors import UserError


def test_a_blend_of_runs_on_other_folds_is_refused_naming_them():
    """Run a trained folds 0 and 1, run b folds 0 to 2: a's members used to drop out of the blend without a word."""
    from seedlings.predict.blend import assemble
    from seedlings.predict.members import Member

    members = [Member("a", k, "stage1-cycle0", Path("w")) for k in (0, 1)]
    members += [Member("b", k, "stage1-cycle0", Path("w")) for k in (0, 1, 2)]
    with pytest.raises(UserError, match=r"--runs: .*a: folds 0, 1; b: folds 0, 1, 2"):
        assemble(members)


def test_runs_and_overrides_together():
    """make submit RUNS="a b" ARGS=calibrate=none: the override is not taken for a run's name."""
    from seedlings.commands import split_runs

    args = build_parser().parse_args(["submit", "--run", "a", "--runs", "a", "b", "calibrate=none"])
    split_runs(args)
    assert args.runs == ["a", "b"] and args.overrides == ["calibrate=none"]


@pytest.mark.parametrize("step", ["-1", "abc", "-0.1", "0"])
def test_a_range_step_must_be_a_positive_number(tmp_path, capsys, step):
    from seedlings.lab.sweep.space import load_space
    from seedlings.recipe.load import load_recipe
    from seedlings.recipe.schema import recipe_dict

    space = tmp_path / "space.yaml"
    space.write_text(f"drop_rate: {{low: 0.1, high: 0.5, step: {step}}}\n")
    with pytest.raises(UserError, match=r"drop_rate.step: must be a number above 0"):
        load_space(space, recipe_dict(load_recipe(None, [])))


@pytest.mark.parametrize("fraction, said", [("0.99", "--fraction 0.99"), ("0.01", "--fraction 0.01")])
def test_holdout_fractions_that_leave_a_half_empty(demo_master, tmp_path, capsys, fraction, said):
    out = tmp_path / "split"
    assert main(["holdout", "--data", str(demo_master), "--out", str(out), "--fraction", fraction]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


def test_holdout_refuses_a_species_of_one_image(demo, tmp_path, capsys):
    species = sorted((demo / "train").iterdir())[0]
    for extra in sorted(species.iterdir())[1:]:
        extra.unlink()
    assert main(["holdout", "--data", str(demo), "--out", str(tmp_path / "split")]) == 2
    assert f"{species}: 1 image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", ["abc", "0", "160,-5"])
def test_compare_sizes_are_checked(demo_master, capsys, sizes):
    assert main(["compare", "--data", str(demo_master), "--probes-only", "--sizes", sizes]) == 2
    err = capsys.readouterr().err
    assert "--sizes" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def graded_run(demo_master, tmp_path_factory):
    """A held-out split of the demo and one tiny trained, predicted run on it (its own SEEDLINGS_HOME)."""
    from conftest import TINY, seedlings_home

    home = tmp_path_factory.mktemp("graded-home")
    with seedlings_home(home):
        split = home / "split"
        assert main(["holdout", "--data", str(demo_master), "--out", str(split)]) == 0
        stages = "stages=[{size: 32, freeze: true, precompute: true, fit: logistic}]"
        args = ["--data", str(split), "--run", "g", "--n-folds", "3", *TINY, stages, "train_folds=1"]
        assert main(["train", *args]) == 0 and main(["predict", *args]) == 0
    return home, split


@pytest.mark.parametrize("case", ["missing", "unknown", "twice", "header", "empty", "binary"])
def test_grade_run_checks_the_answers(graded_run, tmp_path, monkeypatch, capsys, case):
    home, split = graded_run
    monkeypatch.setenv("SEEDLINGS_HOME", str(home))
    answers = pd.read_csv(split / "answers.csv")
    bad = tmp_path / "answers.csv"
    if case == "missing":
        answers.iloc[1:].to_csv(bad, index=False)
    elif case == "unknown":
        answers.assign(species=["Oak"] + answers.species.tolist()[1:]).to_csv(bad, index=False)
    elif case == "twice":
        pd.concat([answers, answers.iloc[:1]]).to_csv(bad, index=False)
    elif case == "header":
        answers.rename(columns={"species": "label"}).to_csv(bad, index=False)
    elif case == "empty":
        bad.write_text("")
    else:
        bad.write_bytes(bytes(range(256)))
    assert main(["grade", "--run", "g", "--answers", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1
    assert main(["grade", "--run", "g", "--answers", str(split / "answers.csv")]) == 0


def test_a_trial_retried_twice_takes_one_place_in_trials():
    """Trial 0 killed, its retry 1 killed, its retry 2 complete (Optuna's failed_trial is 0 on both retries), and a
    trial 3 of its own: two places, not three."""
    from types import SimpleNamespace

    from seedlings.lab.sweep.worker import slots_taken

    retry_of = {1: 0, 2: 0}
    trials = [SimpleNamespace(number=n, system_attrs={"failed_trial": retry_of[n]} if n in retry_of else {})
              for n in range(4)]  # fmt: skip
    assert slots_taken(trials) == 2


@pytest.mark.parametrize("port, said", [("99999", "--port: must be in [0, 65535]"), ("-1", "--port: must be in")])
def test_ui_ports_out_of_range(home, capsys, port, said):
    assert main(["mlflow-ui", "--port", port]) == 2
    err = capsys.readouterr().err
    assert said in err and "http" not in err


def test_a_taken_port_is_named(home, capsys):
    import socket

    (home / "runs").mkdir()
    (home / "runs" / "mlflow.db").write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["mlflow-ui", "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert f"--port {port}: 127.0.0.1:{port}" in out.err and "http" not in out.out


def test_a_split_the_data_cannot_give_stops_the_sweep_before_any_trial(demo, tmp_path, home, capsys):
    """--n-folds 5 on a species of 3 images: one line naming --n-folds, exit 2, no study; --sweep-folds above
    --n-folds names --sweep-folds."""
    from conftest import DEFAULTS, TINY

    species = sorted((demo / "train").iterdir())[0]
    for extra in sorted(species.iterdir())[3:]:
        extra.unlink()
    space = tmp_path / "space.yaml"
    space.write_text("drop_rate: [0.1, 0.3]\n")
    args = ["sweep", "--data", str(demo), "--config", DEFAULTS, "--space", str(space), "--trials", "2", "--sweep", "s",
            *TINY]  # fmt: skip
    assert main([*args, "--n-folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "--n-folds" in err and len(err.strip().splitlines()) == 1 and not (home / "runs" / "s").exists()
    assert main([*args, "--n-folds", "3", "--sweep-folds", "4"]) == 2
    assert "--sweep-folds: 4" in capsys.readouterr().err


def test_a_dashboard_on_a_storage_without_the_study_or_unreachable_prints_no_address(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'other.db'}"
    import optuna

    optuna.create_study(study_name="another", storage=store)
    assert main(["dashboard", "--sweep", "s", "--storage", store]) == 2
    out = capsys.readouterr()
    assert "no study named 's'" in out.err and "http" not in out.out
    unreachable = "postgresql+psycopg://user:secret@127.0.0.1:1/db"
    assert main(["dashboard", "--sweep", "s", "--storage", unreachable]) == 2
    out = capsys.readouterr()
    assert "127.0.0.1:1" in out.err and "secret" not in out.err and "http" not in out.out
