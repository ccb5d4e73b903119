import pandas as pd
import pytest

from seedlings.cli import main
from seedlings.data.competition import scan_competition
from seedlings.errors import UserError
from seedlings.lab.holdout import grade
from seedlings.predict.submission import validate_submission, write_submission


@pytest.fixture
def good(demo_master, tmp_path):
    comp = scan_competition(demo_master)
    sample = pd.read_csv(demo_master / "sample_submission.csv")
    path = tmp_path / "sub.csv"
    write_submission(
        path,
        sample.file.tolist()[::-1],
        [comp.classes[i % 12] for i in range(len(sample))],
        demo_master / "sample_submission.csv",
    )
    return path


def test_written_in_sample_order_and_valid(good, demo_master):
    df = pd.read_csv(good)
    assert list(df.columns) == ["file", "species"]
    assert df.file.tolist() == pd.read_csv(demo_master / "sample_submission.csv").file.tolist()
    assert validate_submission(demo_master, good) == len(df)


def mutate(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize("fn,why", [
    (lambda ls: ["id,label"] + ls[1:], "header"),
    (lambda ls: ls[:-1], "missing"),
    (lambda ls: ls + ["zzz.png,Maize"], "not in the test set"),
    (lambda ls: ls + [ls[1]], "duplicate"),
    (lambda ls: [ls[0], ls[1].split(",")[0] + ",Rose"] + ls[2:], "unknown species"),
    (lambda ls: [ls[0], ls[1].split(",")[0] + ","] + ls[2:], "empty field"),
    (lambda ls: [ls[0], ls[1] + ",extra"] + ls[2:], "3 fields"),
    (lambda ls: [], "empty file"),
])  # fmt: skip
def test_each_malformed_case(good, demo_master, fn, why, capsys):
    mutate(good, fn)
    with pytest.raises(UserError, match=why):
        validate_submission(demo_master, good)
    assert main(["validate-submission", "--data", str(demo_master), "--submission", str(good)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(good) in err


def test_grade(demo_master, tmp_path):
    answers = demo_master / "answers.csv"
    assert grade(answers, answers) == 1.0
    df = pd.read_csv(answers)
    df.loc[: len(df) // 2 - 1, "species"] = "Nope"
    df.to_csv(tmp_path / "half.csv", index=False)
    assert grade(tmp_path / "half.csv", answers) == pytest.approx((len(df) - len(df) // 2) / len(df))
    df.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(UserError, match="no prediction"):
        grade(tmp_path / "short.csv", answers)
