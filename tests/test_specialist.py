"""A specialist: a run of a few species on the chain's folds, dividing their share of the blend where it ranks them
first; out of fold each fold's rows by that fold's own specialist."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY
from seedlings.chain.specialist import divide
from seedlings.cli import main

STAGES = "stages=[{size: 32, freeze: true, precompute: true, fit: logistic}, {size: 32, freeze: false, lr: 0.01}]"


def test_divide_moves_only_the_rows_that_rank_the_species_first():
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6]])
    shares = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    out = divide(probs, shares, [0, 1])
    np.testing.assert_allclose(out[0], [0.16, 0.64, 0.2])  # 0 and 1 first: their 0.8 divided 1:4
    np.testing.assert_array_equal(out[1:], probs[1:])  # 0 and 2 first; 2 and 1 first: left as they were


def test_a_specialist_learns_its_species_and_serves_the_chain_out_of_fold(demo_master, home, tmp_path):
    pair = ["Black-grass", "Loose Silky-bent"]
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: test_efficientnet\npretrained: none\nbn_stats: batch\nclasses: [Black-grass, Loose "
                    "Silky-bent]\nstages: [{size: 32, freeze: true, precompute: true, fit: logistic}, {size: 32, "
                    "freeze: false, lr: 0.01, cycle_len: 2}]\n")  # fmt: skip
    args = ["submit", "--data", str(demo_master), "--run", "sp", "--n-folds", "3", *TINY, STAGES, "train_folds=2"]
    assert main([*args, f"specialist={spec}"]) == 0
    provenance = json.loads((home / "submissions" / "sp.json").read_text())
    members = provenance["members"]
    assert "blend, before the specialist" in members and "blend" in members
    folds = pd.read_csv(next((home / "data" / "folds").glob("comp-*-k3-s0.csv"))).set_index("file")
    for fold in (0, 1):
        oof = pd.read_csv(home / "runs" / "sp-specialist" / "probs" / f"fold{fold}-stage1-cycle0.oof.csv")
        assert list(oof.columns[1:]) == pair  # two outputs
        assert set(oof.file) == set(folds.index[folds.fold == fold])  # every validation image of its fold, predicted
        metrics = pd.read_csv(home / "runs" / "sp-specialist" / f"fold{fold}" / "metrics.csv")
        assert metrics.val_f1.notna().any()  # validated on its species' images
    # the chain's OOF score is the score of the divided blend it wrote
    blend = pd.read_csv(home / "runs" / "sp" / "probs" / "blend.oof.csv")
    truth = folds.loc[blend.file].species.to_numpy()
    assert members["blend"]["micro_f1"] == pytest.approx((blend.columns[1:][blend.iloc[:, 1:].to_numpy().argmax(1)]
                                                          == truth).mean())  # fmt: skip


def test_a_specialist_names_what_it_cannot_learn(demo_master, home, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: test_efficientnet\npretrained: none\nbn_stats: batch\nclasses: [Black-grass, Rye]\n")
    args = ["train", "--data", str(demo_master), "--config", str(spec), "--run", "bad", "--n-folds", "3", "--fold", "0"]
    assert main(args) == 2
    assert "classes: 'Rye' is not a species of" in capsys.readouterr().err
    from seedlings.errors import UserError
    from seedlings.recipe.load import load_recipe

    with pytest.raises(UserError, match="classes: two species or more"):
        load_recipe(None, ["classes=[Black-grass]"])
