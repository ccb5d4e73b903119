"""make mle: MLE-bench's own split (a plain train_test_split of the labelled photos), the chain on it, graded once."""

import json
import os
import re

import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from conftest import TINY
from seedlings.cli import main
from seedlings.lab.mle import KAGGLE_LINES


def mle_bench_split(root) -> tuple[set, set]:
    """MLE-bench's prepare step, written from its description: every PNG of train/<species>/, species and then files
    in sorted order, into a DataFrame split by train_test_split(test_size=0.14, random_state=0)."""
    rows = [{"file": f, "species": s} for s in sorted(os.listdir(root / "train"))
            for f in sorted(os.listdir(root / "train" / s)) if f.endswith(".png")]  # fmt: skip
    train, test = train_test_split(pd.DataFrame(rows), test_size=0.14, random_state=0)
    return set(train.file), set(test.file)


def test_mle_splits_as_mle_bench_does_and_grades_the_chain(demo_master, home, capsys):
    stages = "stages=[{size: 32, freeze: true, precompute: true, fit: logistic}, {size: 32, freeze: false, lr: 0.01}]"
    assert main(["mle", "--data", str(demo_master), "--run", "m", "--n-folds", "3", *TINY, stages,
                 "train_folds=2"]) == 0  # fmt: skip
    split = home / "data" / "comp-split-f14-s0"
    train, test = mle_bench_split(demo_master)
    assert {p.name for p in (split / "test").iterdir()} == test
    assert {p.name for p in (split / "train").rglob("*.png")} == train
    assert json.loads((split / "SOURCE.json").read_text())["stratified"] is False
    result = json.loads((home / "runs" / "m-mle" / "mle.json").read_text())
    sub = pd.read_csv(home / "submissions" / "m-mle.csv")
    answers = pd.read_csv(split / "answers.csv").set_index("file").species
    assert result["test_images"] == len(test) and result["train_images"] == len(train)
    assert result["micro_f1"] == pytest.approx((sub.species == answers.loc[sub.file].to_numpy()).mean())
    grasses = result["grasses"]
    is_grass = sub.species.isin(grasses["pair"]) & answers.loc[sub.file].isin(grasses["pair"]).to_numpy()
    crossed = (is_grass & (sub.species != answers.loc[sub.file].to_numpy())).sum()
    assert grasses["pair_errors"] == crossed and grasses["errors"] == int(
        (sub.species != answers.loc[sub.file].values).sum()
    )
    assert result["lines"] == {line: result["micro_f1"] >= score for line, score in KAGGLE_LINES.items()}
    out = capsys.readouterr().out
    assert "MLE-bench's split of" in out and "Kaggle's leaderboard: median 0.956" in out and "Black-grass vs" in out


def test_a_split_that_holds_a_species_out_whole_is_refused_leaving_nothing(demo, home):
    """MLE-bench's split is not stratified: a small species can fall wholly in the held-out share, and the chain would
    train on the other species only (it then died on the held-out photos' labels): refused, naming the species."""
    from seedlings.errors import UserError
    from seedlings.lab.holdout import make_holdout

    for extra in sorted((demo / "train" / "Maize").iterdir())[1:]:
        extra.unlink()  # one photo of Maize left
    refused = []
    for seed in range(20):
        out = home / f"split-s{seed}"
        try:
            make_holdout(demo, out, 0.5, seed, stratified=False)
        except UserError as e:
            refused.append(str(e))
            assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert 0 < len(refused) < 20  # some seeds keep the photo on the training side
    assert all(re.search(r"train/(.+): every image of \1 falls in the held-out share", e) for e in refused), refused
    assert any("Maize: every image of Maize" in e for e in refused)
