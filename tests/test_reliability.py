"""Bad competitions, changed data, damaged files, concurrent writers: each exits 2 with one line naming the culprit,
before any training where the input tells, and leaves nothing half-written behind."""

import io
import json
import os
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import DEFAULTS, TINY
from seedlings.cli import main
from seedlings.errors import UserError

HEAD_ONLY = "stages=[{size: 32, freeze: true, precompute: true, fit: logistic}]"  # a fold in seconds


def cli(stage: str, data, *extra: str, run: str = "tiny") -> list[str]:
    return [stage, "--data", str(data), "--run", run, "--config", DEFAULTS, "--n-folds", "3", *TINY, *extra]


def error_of(argv: list[str], capsys) -> str:
    """The one line a refused command prints (it must exit 2)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ bad competitions
@pytest.mark.parametrize("name,stray", [("zz_empty", False), ("aa_empty", False), ("zz_stray", True)])
def test_empty_species_folder_is_refused_wherever_it_sorts(demo, home, capsys, name, stray):
    (demo / "train" / name).mkdir()
    if stray:
        (demo / "train" / name / ".DS_Store").write_bytes(b"x")
    for argv in (
        ["check-data", "--data", str(demo)],
        ["folds", "--data", str(demo)],
        cli("submit", demo),
        ["validate-submission", "--data", str(demo), "--submission", str(demo / "sample_submission.csv")],
    ):
        assert f"train/{name}: empty species folder" in error_of(argv, capsys)
    assert not (home / "runs").exists() and not (home / "data" / "folds").exists()


def test_sample_submission_without_file_column(demo, home, capsys):
    sample = pd.read_csv(demo / "sample_submission.csv").rename(columns={"file": "name"})
    sample.to_csv(demo / "sample_submission.csv", index=False)
    for argv in (
        ["check-data", "--data", str(demo)],
        cli("submit", demo),
        ["validate-submission", "--data", str(demo), "--submission", str(demo / "sample_submission.csv")],
    ):
        assert "sample_submission.csv: no 'file' column (columns: name,species)" in error_of(argv, capsys)
    assert not (home / "runs").exists()


def test_sample_naming_a_missing_image_stops_submit_before_training(demo, home, capsys):
    sorted((demo / "test").iterdir())[0].unlink()
    assert "1 listed files are not in test/" in error_of(cli("submit", demo), capsys)
    assert not (home / "runs").exists()


def test_test_images_one_folder_down(demo, home, capsys):
    (demo / "test" / "test").mkdir()
    for p in list((demo / "test").glob("*.png")):
        p.rename(demo / "test" / "test" / p.name)
    for argv in (["check-data", "--data", str(demo)], cli("submit", demo)):
        err = error_of(argv, capsys)
        assert "test: no test images" in err and "test/test/ (" in err and "move them up" in err
    assert not (home / "runs").exists()


def test_subfolders_are_reported(demo, capsys):
    (demo / "train" / "Maize" / "more").mkdir()
    shutil.copy(sorted((demo / "train" / "Maize").glob("*.png"))[0], demo / "train" / "Maize" / "more" / "x.png")
    assert main(["check-data", "--data", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "ignored 1 entries" in out and "train/Maize/more/ (1 files)" in out


def test_bad_test_image_stops_submit_before_training(demo, home, capsys):
    sorted((demo / "test").glob("*.png"))[2].write_bytes(b"not a png")
    assert "not a readable image" in error_of(cli("submit", demo), capsys)
    assert not (home / "runs" / "tiny" / "fold0").exists()


def test_refused_first_run_pins_no_recipe(demo, home, capsys):
    """A bad training image refuses the first training; the same run then goes ahead with skip_bad_images=true, and
    the skipped images are named in the output, the provenance and the report."""
    bad_train = sorted((demo / "train" / "Maize").glob("*.png"))[0]
    bad_test = sorted((demo / "test").glob("*.png"))[1]
    bad_train.write_bytes(b"")
    bad_test.write_bytes(b"garbage")
    assert "empty file" in error_of(cli("train", demo, HEAD_ONLY, "train_folds=1", "--fold", "0"), capsys)
    assert not (home / "runs" / "tiny" / "config.yaml").exists()
    assert main(cli("submit", demo, HEAD_ONLY, "train_folds=1", "skip_bad_images=true")) == 0
    err = capsys.readouterr().err
    assert f"Maize/{bad_train.name}" in err and f"predicted from a blank image: {bad_test.name}" in err
    prov = json.loads((home / "submissions" / "tiny.json").read_text())
    assert prov["skipped_images"] == {"train": [f"Maize/{bad_train.name}"], "test": [bad_test.name]}
    report = (home / "runs" / "tiny" / "report" / "report.md").read_text()
    assert f"- `{bad_test.name}`" in report and "Unreadable test images" in report


# ---------------------------------------------------------------------------------------------- data changed later
@pytest.fixture
def trained_copy(trained_fold, demo, home):
    """The session's trained fold 0 of run `tiny` in this test's home, on a private copy of the data it was trained
    on (copytree keeps the files' times: the same data)."""
    shutil.copytree(trained_fold["home"] / "runs", home / "runs")
    return demo


@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_changed_training_images_are_refused(trained_copy, capsys, change):
    maize = sorted((trained_copy / "train" / "Maize").glob("*.png"))
    if change == "added":
        shutil.copy(maize[0], maize[0].with_name("new.png"))
    elif change == "removed":
        maize[1].unlink()
    else:
        maize[1].write_bytes(maize[2].read_bytes())
    for stage in ("train", "predict", "submit", "evaluate"):
        err = error_of(cli(stage, trained_copy), capsys)
        assert f"the training images changed since run 'tiny' was trained (1 {change} (e.g. Maize/" in err


def test_changed_test_image_is_predicted_again(trained_copy, home, capsys):
    argv = cli("predict", trained_copy, "--fold", "0")
    assert main(argv) == 0
    probs = home / "runs" / "tiny" / "probs" / "fold0-stage2-cycle1.test.csv"
    before = pd.read_csv(probs).set_index("file")
    tests = sorted((trained_copy / "test").glob("*.png"))
    tests[0].write_bytes(tests[1].read_bytes())
    assert main(argv) == 0
    assert "fold 0 stage2-cycle1" in capsys.readouterr().out  # predicted again, not "nothing to do"
    after = pd.read_csv(probs).set_index("file")
    assert not np.allclose(after.loc[tests[0].name], before.loc[tests[0].name])
    assert np.allclose(after.loc[tests[1].name], before.loc[tests[1].name], atol=1e-6)


# ------------------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_weights_are_named(trained_copy, home, capsys, damage):
    path = home / "runs" / "tiny" / "fold0" / "snapshots" / "stage2-cycle1.pt"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    err = error_of(cli("predict", trained_copy, "--fold", "0"), capsys)
    said = "missing" if damage == "missing" else "not the weights fold 0 of run 'tiny' saved"
    assert str(path) in err and said in err


def test_damaged_features_are_named(trained_copy, home, capsys):
    (features,) = (home / "runs" / "tiny" / "features").iterdir()
    features.write_bytes(b"\0" * 64)
    err = error_of(cli("train", trained_copy, "--fold", "1"), capsys)
    assert str(features) in err and "not readable precomputed features" in err


def test_checkpoint_of_another_run_is_refused(trained_fold, demo, home, capsys):
    ckpt = home / "runs" / "other" / "fold0" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(trained_fold["dir"] / "checkpoint.pt", ckpt)
    err = error_of(cli("train", demo, "--fold", "0", run="other"), capsys)
    assert str(ckpt) in err and "written by run 'tiny' fold 0" in err


# ------------------------------------------------------------------------------------------------- one writer
def test_a_fold_held_by_another_writer_is_skipped_and_named(demo, home, capsys):
    import socket

    from seedlings.storage import exclusive

    with exclusive(home / "runs" / "tiny" / "fold0" / ".lock", "fold 0"):
        assert main(cli("train", demo, HEAD_ONLY, "--fold", "0")) == 3  # the one fold asked for: none trained here
        out = capsys.readouterr().out
        assert "fold 0: skipped," in out and f"is in use by host {socket.gethostname()} process {os.getpid()}" in out
        assert not (home / "runs" / "tiny" / "fold0" / "done.json").exists()
        assert main(cli("train", demo, HEAD_ONLY, "--fold", "1")) == 0  # another fold: its own lock
    assert main(cli("train", demo, HEAD_ONLY, "--fold", "0")) == 0  # released


# ------------------------------------------------------------------------------------------------------ archives
def test_damaged_zip_member_is_named_and_nothing_is_left(tmp_path):
    from seedlings.data.fetch import fetch

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("train/Maize/a.png", b"A" * 5000)
    data = bytearray(buf.getvalue())
    data[100] ^= 0xFF  # inside the stored member's bytes: its CRC no longer matches
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "bundle.zip").write_bytes(bytes(data))
    with pytest.raises(UserError, match="member 'train/Maize/a.png' is damaged"):
        fetch(tmp_path / "dl" / "comp", archive=tmp_path / "dl" / "bundle.zip")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["bundle.zip"]


def test_zip_bomb_is_capped(tmp_path):
    from seedlings.data.fetch import fetch

    (tmp_path / "dl").mkdir()
    with zipfile.ZipFile(tmp_path / "dl" / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train/Maize/zeros.png", b"\0" * (40 << 20))  # 40 MB of zeros: about 40 KB packed
    with pytest.raises(UserError, match="expands past 20,971,520 bytes"):
        fetch(tmp_path / "dl" / "comp", archive=tmp_path / "dl" / "bomb.zip")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["bomb.zip"]


def test_archive_given_for_an_existing_folder_says_so(demo, tmp_path, capsys):
    from seedlings.data.fetch import fetch

    fetch(demo, archive=tmp_path / "never-read.zip")
    assert f"note: {demo} exists, so {tmp_path / 'never-read.zip'} was not unpacked" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- files and the disk
def test_no_room_for_the_cache_is_said_before_writing(demo, home, monkeypatch):
    import seedlings.storage as files
    from seedlings.data.cache import load_cache
    from seedlings.data.competition import scan_competition

    monkeypatch.setattr(files, "free_bytes", lambda folder: 10 << 20)
    with pytest.raises(UserError, match=r"needs \d+ MB \(and 64 MB spare\), 10 MB free"):
        load_cache(scan_competition(demo), "train", 300)
    assert not list((home / "data" / "cache").glob("*"))


def test_disk_full_write_exits_2_naming_the_file(home):
    import errno

    from seedlings.storage import atomic_write

    def fill(tmp):
        tmp.write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="out.csv: disk full"):
        atomic_write(home / "out.csv", fill)
    assert list(home.iterdir()) == []


def test_temporary_files_of_dead_processes_are_removed(home):
    import subprocess
    import sys

    from seedlings.storage import write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = home / f"x.tmp{int(dead.stdout)}.csv"
    live = home / f"x.tmp{os.getppid()}.csv"  # a process that runs: maybe writing it now
    stale.write_text("half")
    live.write_text("half")
    write_text(home / "x.csv", "whole")
    assert sorted(p.name for p in home.iterdir()) == sorted(["x.csv", live.name])


def test_submission_with_a_byte_order_mark_is_accepted(demo, tmp_path):
    from seedlings.lab.holdout import grade
    from seedlings.predict.submission import validate_submission

    sample = (demo / "sample_submission.csv").read_text()
    (tmp_path / "bom.csv").write_text("\ufeff" + sample, encoding="utf-8")
    assert validate_submission(demo, tmp_path / "bom.csv") == len(sample.splitlines()) - 1
    assert grade(tmp_path / "bom.csv", tmp_path / "bom.csv") == 1.0


# ------------------------------------------------------------------------------------------------------- kaggle
def test_loose_credentials_warned_once(monkeypatch, tmp_path, capsys):
    from seedlings.data import kaggle as F

    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(F, "WARNED", set())
    (tmp_path / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    os.chmod(tmp_path / "kaggle.json", 0o644)
    for _ in range(3):
        F.credentials_source()
    assert capsys.readouterr().err.count("readable by other users") == 1


@pytest.mark.parametrize(
    "extra,key",
    [(["--n-folds", "1"], "--n-folds"), (["--fold-seed", "-1"], "--fold-seed"), (["--fold", "7"], "--fold")],
)
def test_split_arguments_are_range_checked(demo, capsys, extra, key):
    argv = cli("train", demo)
    argv[argv.index("--n-folds") : argv.index("--n-folds") + 2] = []
    assert error_of([*argv, "--n-folds", "3", *extra], capsys).startswith(f"error: {key}:")


def test_refused_training_leaves_no_run_folder(demo, home, capsys):
    assert "model: Unknown model" in error_of(cli("train", demo, "model=no_such_model", "--fold", "0"), capsys)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_single_species_is_refused(demo, capsys):
    for species in sorted((demo / "train").iterdir())[1:]:
        shutil.rmtree(species)
    assert "1 species folders; a classifier needs at least 2" in error_of(["check-data", "--data", str(demo)], capsys)


def test_held_out_split_of_other_images_is_refused(demo, home):
    from seedlings.lab.compare import ensure_holdout

    out = ensure_holdout(demo, 0.25, 0)
    assert ensure_holdout(demo, 0.25, 0) == out  # the same images: reused
    shutil.copy(sorted((demo / "train" / "Maize").glob("*.png"))[0], demo / "train" / "Maize" / "added.png")
    with pytest.raises(UserError, match="made from other images"):
        ensure_holdout(demo, 0.25, 0)
