import pandas as pd
import pytest

from conftest import tiny_recipe
from seedlings.cli import main
from seedlings.compare import ABLATIONS, variant

HEAD_THEN_BODY = (
    "stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
    " {size: 32, freeze: false, lr: {max: 0.01, mult: 3}, n_cycles: 2, cycle_len: 1, cycle_mult: 1, warmup: 0.5},"
    " {size: 40, freeze: false, lr: [0.001, 0.003, 0.01], n_cycles: 1, cycle_len: 1}]"
)


def test_compare_table_on_a_held_out_split(demo_master, home, capsys):
    from conftest import TINY

    args = ["compare", "--data", str(demo_master), "--run", "cmp", "--n-folds", "3", "--sizes", "32"]
    assert main([*args, *TINY, HEAD_THEN_BODY, "train_folds=2"]) == 0
    table = pd.read_csv(home / "runs" / "cmp-holdout" / "compare.csv")
    assert table.what.tolist() == [
        "linear probe, test_efficientnet features at 32 px",
        "recipe: fold 0 alone",
        "recipe: whole chain (make submit)",
    ]
    assert table.micro_f1.between(0, 1).all() and table.macro_f1.between(0, 1).all() and (table.seconds > 0).all()
    assert (home / "data" / "comp-holdout-f20-s0" / "answers.csv").is_file()
    assert sorted(p.name for p in (home / "runs" / "cmp-holdout").glob("fold*")) == ["fold0", "fold1"]
    out = capsys.readouterr().out
    assert "whole chain" in out and "held-out images of" in out


def test_ablation_variants_switch_one_thing_off():
    recipe = tiny_recipe(HEAD_THEN_BODY, "train_folds=2")
    one_lr = variant(recipe, ABLATIONS["one learning rate for all layer groups"])
    assert one_lr.stages[1].lr == 0.01 and one_lr.stages[2].lr == 0.01 and one_lr.stages[0] == recipe.stages[0]
    flat = variant(recipe, ABLATIONS["no restarts (one cosine cycle per stage)"])
    assert (flat.stages[1].n_cycles, flat.stages[1].cycle_len) == (1, 2)
    assert [s.size for s in variant(recipe, ABLATIONS["one size (no progressive resizing)"]).stages] == [40, 40, 40]
    assert variant(recipe, ABLATIONS["one fold"]).folds(3) == [0]
    no_pre = variant(recipe, ABLATIONS["no precompute (head trained by SGDR through the frozen net)"])
    assert not no_pre.stages[0].precompute and no_pre.stages[0].fit == "sgdr"
    assert variant(recipe, ["tta=none"]).tta == "none"
    with pytest.raises(Exception, match="nope"):
        variant(recipe, ["nope=1"])
