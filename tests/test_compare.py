import pandas as pd
import pytest

from conftest import tiny_recipe
from seedlings.cli import main
from seedlings.lab.ablations import ABLATIONS, variant
from seedlings.run import Run

HEAD_THEN_BODY = (
    "stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
    " {size: 32, freeze: false, lr: {max: 0.01, mult: 3}, n_cycles: 2, cycle_len: 1, cycle_mult: 1, warmup: 0.5},"
    " {size: 40, freeze: false, lr: [0.001, 0.003, 0.01], n_cycles: 1, cycle_len: 1}]"
)


def test_compare_table_on_a_held_out_split(demo_master, home, capsys):
    import yaml

    from conftest import TINY
    from seedlings.recipe.schema import recipe_dict

    old = home / "old.yaml"  # the recipe this one replaced: its rows join the same table
    old.write_text(yaml.safe_dump(recipe_dict(tiny_recipe(HEAD_THEN_BODY.replace("0.01", "0.02"), "train_folds=1"))))
    args = ["compare", "--data", str(demo_master), "--run", "cmp", "--n-folds", "3", "--sizes", "32"]
    assert main([*args, "--baseline", str(old), *TINY, HEAD_THEN_BODY, "train_folds=2"]) == 0
    table = pd.read_csv(home / "runs" / "cmp-holdout" / "compare.csv")
    assert table.what.tolist() == [
        "linear probe, tf_efficientnet_lite0 features at 32 px",  # the bar: Lite0's probe, whatever the recipe
        "linear probe, test_efficientnet features at 32 px",  # the recipe's own backbone
        "old: fold 0 alone",
        "old: whole chain (make submit)",
        "recipe: fold 0 alone",
        "recipe: whole chain (make submit)",
    ]
    assert sorted(p.name for p in (home / "runs" / "cmp-holdout-old").glob("fold*")) == ["fold0"]
    # each row recomputed from what the chain left behind: the submission, fold 0's test probabilities, the answers
    answers = pd.read_csv(home / "data" / "comp-holdout-f20-s0" / "answers.csv").set_index("file").species
    sub = pd.read_csv(home / "submissions" / "cmp-holdout.csv")
    assert table.micro_f1.iloc[5] == pytest.approx((sub.species == answers.loc[sub.file].to_numpy()).mean(), abs=1e-4)
    (last,) = sorted((home / "runs" / "cmp-holdout" / "probs").glob("fold0-*.test.csv"))[-1:]
    probs = pd.read_csv(last).set_index("file")
    predicted = probs.columns[probs.to_numpy().argmax(1)]
    assert table.micro_f1.iloc[4] == pytest.approx((predicted == answers.loc[probs.index].to_numpy()).mean(), abs=1e-4)
    assert (table.seconds > 0).all()
    assert (home / "data" / "comp-holdout-f20-s0" / "answers.csv").is_file()
    assert sorted(p.name for p in (home / "runs" / "cmp-holdout").glob("fold*")) == ["fold0", "fold1"]
    out = capsys.readouterr().out
    assert "whole chain" in out and "held-out images of" in out


def test_ablation_variants_switch_one_thing_off():
    recipe = tiny_recipe(HEAD_THEN_BODY, "train_folds=2")
    one_lr = variant(recipe, ABLATIONS["one learning rate for all layer groups"])
    assert one_lr.stages[1].lr == 0.01 and one_lr.stages[2].lr == 0.01 and one_lr.stages[0] == recipe.stages[0]
    flat = variant(recipe, ["@restarts"])
    assert (flat.stages[1].n_cycles, flat.stages[1].cycle_len) == (1, 2)
    assert variant(flat, ["@restarts"]).stages[1] == recipe.stages[1]  # and back: two cycles of half the length
    assert [s.size for s in variant(recipe, ["@sizes"]).stages] == [40, 40, 40]
    grown = variant(
        tiny_recipe("stages=[{size: 64, freeze: false, lr: {max: 0.01, mult: 3}, cycle_len: 6}]"), ["@sizes"]
    )
    assert [(s.size, s.cycle_len, s.lr) for s in grown.stages] == [
        (64, 4, {"max": 0.01, "mult": 3.0}),
        (80, 2, {"max": 0.0025, "mult": 3.0}),
    ]
    frozen = tiny_recipe("stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
                         " {size: 32, freeze: false, lr: 0.01, frozen_groups: 2}]")  # fmt: skip
    assert [
        s.frozen_groups for s in variant(frozen, ABLATIONS["every layer group trains (no frozen groups)"]).stages
    ] == [0, 0]
    maps = tiny_recipe("stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
                       " {size: 32, freeze: false, lr: 0.01, frozen_groups: 2, precompute: true}]")  # fmt: skip
    unfrozen = variant(maps, ABLATIONS["every layer group trains (no frozen groups)"]).stages[1]
    assert (unfrozen.frozen_groups, unfrozen.precompute) == (0, False)  # a valid recipe: nothing left to precompute
    no_maps = variant(maps, ABLATIONS["frozen groups run every epoch (no precomputed maps; crops, colour jitter)"])
    assert [(s.precompute, s.frozen_groups) for s in no_maps.stages] == [(True, 0), (False, 2)]
    assert variant(recipe, ABLATIONS["no mixup or cutmix"]) == recipe  # the tiny recipe mixes nothing: not run
    no_pre = variant(recipe, ABLATIONS["no precompute: head by 2 SGDR epochs through the frozen net"])
    assert not no_pre.stages[0].precompute and no_pre.stages[0].fit == "sgdr" and no_pre.stages[0].cycle_len == 2
    assert variant(recipe, ["tta=none"]).tta == "none"
    long = tiny_recipe("stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
                       " {size: 32, freeze: false, lr: 0.01, cycle_len: 20, warmup: 2}]")  # fmt: skip
    short = variant(long, ABLATIONS["the last stage's schedule a fifth shorter (the time the chain would save)"])
    assert [(s.cycle_len, s.warmup) for s in short.stages] == [(long.stages[0].cycle_len, 0.0), (16, 2.0)]
    assert variant(recipe, ["@shorter"]) == recipe  # a 1-epoch schedule keeps its epoch: not run
    with pytest.raises(Exception, match="nope"):
        variant(recipe, ["nope=1"])


def test_ablation_rows_train_or_only_predict(demo_master, home, monkeypatch):
    """A training switch trains fold 0 anew under its own run; a prediction switch (TTA) reuses the recipe's fold 0."""
    import seedlings.lab.compare as C

    monkeypatch.setattr(C, "ABLATIONS", {"no TTA": ["tta=none"], "bn": ["crop_scale=0.9"], "same": ["seed=0"]})
    recipe = tiny_recipe(HEAD_THEN_BODY, "train_folds=1")
    table = C.compare(Run("abl", demo_master, recipe, 3), ablations=True, sizes=(32,))
    assert table.what.tolist()[-3:] == [
        "ablation: no TTA: fold 0 alone",
        "ablation: bn: fold 0 alone",
        "ablation: same",
    ]
    assert table.how.iloc[-1] == "same as the recipe here: not run"
    runs = {p.name for p in (home / "runs").iterdir()}
    assert "abl-holdout-ablation1" in runs and "abl-holdout-ablation0" not in runs  # no training for the TTA switch
    assert table.micro_f1.iloc[-3:-1].between(0, 1).all()


def test_blend_ablation_grades_the_recipes_chain_blended_again(demo_master, home, monkeypatch):
    """Switching calibration off trains nothing: the recipe's two folds are blended again, and the row grades what
    `make submit` with calibrate=none writes from the same folds."""
    import dataclasses
    import json

    import seedlings.lab.compare as C
    from seedlings.lab.holdout import grade
    from seedlings.predict.submit import submit

    monkeypatch.setattr(C, "ABLATIONS", {"no calibration": ["calibrate=none"]})
    recipe = tiny_recipe(HEAD_THEN_BODY, "train_folds=2", "calibrate=bias")
    table = C.compare(Run("cal", demo_master, recipe, 3), ablations=True, sizes=(32,))
    assert table.what.tolist()[-2:] == [
        "recipe: whole chain (make submit)",
        "ablation: no calibration: whole chain (make submit)",
    ]
    assert {p.name for p in (home / "runs").iterdir()} == {"cal-holdout"}  # nothing trained for it
    assert json.loads((home / "submissions" / "cal-holdout.json").read_text())["calibration"]["used"]
    held = home / "data" / "comp-holdout-f20-s0"
    uncalibrated = submit(Run("cal-holdout", held, dataclasses.replace(recipe, calibrate="none"), 3))
    # (here the calibrated chain grades 0.17, the uncalibrated 0.11: a row that kept the calibration would fail)
    assert table.micro_f1.iloc[-1] == pytest.approx(grade(uncalibrated, held / "answers.csv"))
    assert table.seconds.iloc[-1] >= table.seconds.iloc[-2] * 0.5  # the chain's seconds, not the blend's


def test_probe_rows_name_the_mask_the_recipes_probe_saw(demo_master, home):
    """The bar's probe sees the unmasked photos; the recipe's own probe row says which mask its features came from."""
    import seedlings.lab.compare as C

    recipe = tiny_recipe(HEAD_THEN_BODY, "plant_mask=dim")
    table = C.compare(Run("msk", demo_master, recipe, 3), sizes=(32,), probes_only=True)
    assert table.what.tolist() == [
        "linear probe, tf_efficientnet_lite0 features at 32 px",
        "linear probe, test_efficientnet features with plant_mask=dim at 32 px",
    ]
