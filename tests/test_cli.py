"""The CLI as users type it: the foundation's acceptance commands, bad input as one line and exit 2, Kaggle I/O."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seedlings.cli import main
from seedlings.data import kaggle as kaggle_client
from seedlings.errors import UserError
from seedlings.predict.blend import assemble
from seedlings.predict.members import Member, Probs, load_probs, run_members, save_probs


def test_foundation_acceptance_commands(tmp_path, home, capsys):
    """The foundation's commands, in process (each as a subprocess paid torch's import five times over)."""
    d, f = tmp_path / "D", tmp_path / "F.csv"
    assert main(["demo-data", "--out", str(d), "--per-class", "6", "--seed", "7"]) == 0
    assert main(["folds", "--data", str(d), "--n-folds", "3", "--fold-seed", "0", "--out", str(f)]) == 0
    assert f.read_text().startswith("file,species,fold\n")
    capsys.readouterr()
    assert main(["check-data", "--data", str(d)]) == 0 and "train:" in capsys.readouterr().out
    victim = sorted((d / "train" / "Fat Hen").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated PNG
    assert main(["check-data", "--data", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and err.strip().count("\n") == 0
    (tmp_path / "skip.yaml").write_text("skip_bad_images: true\n")
    assert main(["check-data", "--data", str(d), "--config", str(tmp_path / "skip.yaml")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable" in out and str(victim) in out


@pytest.mark.parametrize("args,key", [
    (["train", "--data", "nowhere", "--config", "configs/cpu.yaml"], "nowhere"),
    (["train", "--config", "configs/cpu.yaml", "bogus_key=1"], "bogus_key"),
    (["check-data", "--data", "nowhere"], "nowhere"),
])  # fmt: skip
def test_bad_input_exits_2_naming_it(args, key, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert key in err and err.count("\n") == 1


class FakeKaggle:
    def __init__(self):
        self.sent = []

    def submit(self, csv, message):
        self.sent.append((csv, message))

    def submissions(self):
        return [
            {
                "date": "2026-11-26 10:00:00",
                "description": "x",
                "status": "complete",
                "public_score": "0.97",
                "private_score": "0.96",
            }
        ]


def test_upload_message_from_provenance(home, capsys):
    sub = home / "submissions"
    sub.mkdir()
    (sub / "r.csv").write_text("file,species\n")
    (sub / "r.json").write_text(
        json.dumps({"members": {"a": {}, "blend": {"micro_f1": 0.91234}}, "git_commit": "0123456789abcdef"})
    )
    fake = FakeKaggle()
    kaggle_client.upload("r", client=fake)
    assert fake.sent == [(sub / "r.csv", "r: OOF micro-F1 0.9123, 1 members, commit 0123456789")]
    assert kaggle_client.leaderboard(client=fake)[0]["public_score"] == "0.97"
    assert "public 0.97" in capsys.readouterr().out
    with pytest.raises(UserError, match="make submit"):
        kaggle_client.upload("missing", client=fake)


def test_upload_without_credentials(home, monkeypatch, tmp_path):
    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    (home / "submissions").mkdir()
    (home / "submissions" / "r.csv").write_text("file,species\n")
    (home / "submissions" / "r.json").write_text(
        json.dumps({"members": {"blend": {"micro_f1": 0.5}}, "git_commit": "abc"})
    )
    with pytest.raises(UserError, match="kaggle.json"):
        kaggle_client.upload("r")
    assert main(["leaderboard"]) == 2


def test_blending_two_runs_uses_both(home):
    """Runs that share folds blend member by member; a snapshot some folds lack is left out."""
    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    fold_files = {0: ["x1", "x2"], 1: ["x3", "x4"]}
    members = []
    for run in ("r1", "r2"):
        for fold, files in fold_files.items():
            for name in ("stage1-cycle0", "stage1-cycle1"):
                if run == "r2" and fold == 1 and name == "stage1-cycle0":
                    continue
                m = Member(run, fold, name, Path("unused.pt"))
                m.save("oof", Probs(rng.dirichlet(np.ones(3), len(files)), files, classes))
                m.save("test", Probs(rng.dirichlet(np.ones(3), 5), [f"t{i}" for i in range(5)], classes))
                members.append(m)
    files, parts = assemble(members)
    assert files == ["x1", "x2", "x3", "x4"]
    assert [p.name for p in parts] == ["r1/stage1-cycle0", "r1/stage1-cycle1", "r2/stage1-cycle1"]
    r1 = [m for m in members if (m.run, m.name) == ("r1", "stage1-cycle1")]
    np.testing.assert_allclose(parts[1].test, (r1[0].load("test").values + r1[1].load("test").values) / 2)
    r2 = next(m for m in members if (m.run, m.fold) == ("r2", 1))
    np.testing.assert_allclose(parts[2].oof[2:], r2.load("oof").values)


def test_probabilities_round_trip_exactly(home):
    """One format for every member's probabilities: a CSV with file names and classes that gives back every float32
    bit for bit (the blend, hence the submission, does not depend on whether probabilities were reloaded)."""
    values = np.random.default_rng(1).dirichlet(np.ones(12) * 0.05, 500).astype(np.float32)
    values[0, :2] = [1e-30, 1 - 1e-7]
    path = home / "p.csv"
    save_probs(path, Probs(values, [f"f{i}.png" for i in range(500)], [f"class {c}" for c in "abcdefghijkl"]))
    back = load_probs(path)
    assert back.values.dtype == np.float32 and np.array_equal(back.values, values)
    assert back.files[3] == "f3.png" and back.classes[0] == "class a"
    lines = path.read_text().splitlines()
    lines[4] = "f3.png,torn," + lines[4].split(",", 2)[2]  # a cell that is not a number
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="p.csv: unreadable probabilities"):
        load_probs(path)


def test_holdout_competition_and_member_grading(demo_master, tmp_path, home):
    import pandas as pd

    from conftest import tiny_recipe
    from seedlings.data.competition import scan_competition
    from seedlings.lab.holdout import grade_members, make_holdout
    from seedlings.run import Run

    out = make_holdout(demo_master, tmp_path / "ho", fraction=0.25, seed=0)
    src, comp = scan_competition(demo_master), scan_competition(out)
    answers = pd.read_csv(out / "answers.csv")
    assert len(comp.train_files) + len(comp.test_files) == len(src.train_files)
    assert sorted(answers.file) == comp.test_files and set(answers.species) <= set(src.classes)
    assert all((out / "test" / f).is_symlink() for f in comp.test_files)  # nothing copied
    classes = comp.classes
    y = np.array([classes.index(s) for s in answers.species])
    right = np.eye(len(classes))[y]
    wrong = np.eye(len(classes))[(y + 1) % len(classes)]
    run = Run("h", out, tiny_recipe("snapshots=false"), n_folds=2)
    for fold, probs in ((0, right), (1, wrong * 0.6 + right * 0.4)):
        (run.fold_dir(fold) / "done.json").parent.mkdir(parents=True)
        (run.fold_dir(fold) / "done.json").write_text("{}")
        (member,) = run_members(run, fold)
        member.save("test", Probs(probs, answers.file.tolist(), classes))
    graded = grade_members(run, out / "answers.csv")
    assert graded["fold0-final"] == 1.0 and graded["fold1-final"] == 0.0
    assert graded["all folds, final"] == 1.0 and graded["all folds x snapshots"] == 1.0


def subcommands() -> dict:
    from seedlings.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices


def test_help_loads_nothing_of_the_pipeline():
    """`seedlings --help` and every command's help are parsed without torch, OpenCV, Optuna or the pipeline's
    modules: the parser imports none of them (each command imports what it runs)."""
    names = list(subcommands())
    code = (
        "import sys\nfrom seedlings.cli import main\n"
        f"for args in [['--help'], ['--version'], *[[n, '--help'] for n in {names!r}]]:\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'cv2', 'optuna', 'timm', 'albumentations', 'sqlalchemy', 'seedlings.run',"
        " 'seedlings.recipe.schema') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "seedlings 0.1.0" in done.stdout and "usage: seedlings sweep-report" in done.stdout


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_says_what_it_is_and_its_default(name):
    from seedlings.cli import Help

    for action in subcommands()[name]._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        shown = Help("seedlings")._get_help_string(action)
        if action.option_strings and action.nargs != 0 and not action.required:
            assert "default" in shown, f"{name} {action.option_strings}: default not shown"


def test_recipe_prints_every_key_with_its_role_and_meaning(capsys):
    import dataclasses

    from seedlings.recipe.load import load_recipe
    from seedlings.recipe.schema import Recipe, Stage

    assert main(["recipe", "--config", "configs/cpu.yaml", "stages.1.size=160"]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe("configs/cpu.yaml")
    keys = [f.name for f in dataclasses.fields(Recipe) if f.name != "stages"]
    keys += [f"stages.{i}.{f.name}" for i in range(len(recipe.stages)) for f in dataclasses.fields(Stage)]
    lines = out.splitlines()
    for key in keys:
        (at,) = [i for i, line in enumerate(lines) if line.startswith(f"{key}: ")]
        role = lines[at + 1].split(";")[0]
        assert role.startswith("    ") and role.strip() in ("trains", "predicts", "runs")
    assert "stages.1.size: 160\n" in out and "model: tf_efficientnet_lite2\n" in out
    assert "tta: d4\n    predicts; allowed none | flip | d2 | d4 | d4+scales" in out
    assert "dropout before the classifier" in out  # the field's own comment in schema.py


def test_upload_defaults_the_run_like_every_other_command(home, capsys):
    assert main(["upload", "--config", "configs/cpu.yaml"]) == 2
    assert "submissions/cpu.csv: not found (make submit RUN=cpu first)" in capsys.readouterr().err
