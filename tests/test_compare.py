import pandas as pd
import pytest

from conftest import tiny_recipe
from seedlings.cli import main
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


@pytest.mark.parametrize("config", ["configs/cpu.yaml", "configs/cpu-v2.yaml"])
def test_each_shipped_ablation_switches_its_recipe(config):
    """The ablations beside a recipe are data: every row applies to the recipe, changes exactly the keys it names
    (a stage list replaced counts as `stages`), and leaves a valid recipe; the file is found from the recipe's path."""
    from seedlings.lab.ablations import ablations_path, load_ablations
    from seedlings.recipe.load import load_recipe, with_changes
    from seedlings.recipe.saved import differences
    from seedlings.recipe.schema import recipe_dict

    recipe = load_recipe(config)
    ablations = load_ablations(ablations_path(config))
    assert len(ablations) >= 10
    for label, changes in ablations.items():
        changed = with_changes(recipe, changes)
        moved = {
            key.split(".")[0]
            if key.startswith("stages") and len(recipe_dict(changed)["stages"]) != len(recipe.stages)
            else key
            for key, _, _ in differences(recipe_dict(recipe), recipe_dict(changed))
        }
        named = {("stages" if k == "stages" else k) for k in changes}
        assert moved and moved <= named | {"stages"}, label  # fmt: skip


def test_ablation_files_refuse_what_they_cannot_do(tmp_path):
    from seedlings.errors import UserError
    from seedlings.lab.ablations import ablation_row, load_ablations
    from seedlings.run import Run

    with pytest.raises(UserError, match="no ablations for this recipe"):
        load_ablations(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("no TTA: tta=none\n")  # a string, not the keys it changes
    with pytest.raises(UserError, match="maps each row's label"):
        load_ablations(tmp_path / "bad.yaml")
    held = Run("x", tmp_path, tiny_recipe(HEAD_THEN_BODY))
    with pytest.raises(UserError, match="ablation 'typo': nope: unknown key"):
        ablation_row(held, 0, "typo", {"nope": 1})
    assert ablation_row(held, 0, "same", {"seed": 0})["how"] == "same as the recipe here: not run"


def test_ablation_rows_train_or_only_predict(demo_master, home):
    """A training switch trains fold 0 anew under its own run; a prediction switch (TTA) reuses the recipe's fold 0."""
    import seedlings.lab.compare as C

    ablations = {"no TTA": {"tta": "none"}, "bn": {"crop_scale": 0.9}, "same": {"seed": 0}}
    recipe = tiny_recipe(HEAD_THEN_BODY, "train_folds=1")
    table = C.compare(Run("abl", demo_master, recipe, 3), ablations=ablations, sizes=(32,))
    assert table.what.tolist()[-3:] == [
        "ablation: no TTA: fold 0 alone",
        "ablation: bn: fold 0 alone",
        "ablation: same",
    ]
    assert table.how.iloc[-1] == "same as the recipe here: not run"
    runs = {p.name for p in (home / "runs").iterdir()}
    assert "abl-holdout-ablation1" in runs and "abl-holdout-ablation0" not in runs  # no training for the TTA switch
    assert table.micro_f1.iloc[-3:-1].between(0, 1).all()


def test_blend_ablation_grades_the_recipes_chain_blended_again(demo_master, home):
    """Switching calibration off trains nothing: the recipe's two folds are blended again, and the row grades what
    `make submit` with calibrate=none writes from the same folds."""
    import dataclasses
    import json

    import seedlings.lab.compare as C
    from seedlings.chain.submit import submit
    from seedlings.lab.holdout import grade

    recipe = tiny_recipe(HEAD_THEN_BODY, "train_folds=2", "calibrate=bias")
    table = C.compare(
        Run("cal", demo_master, recipe, 3), ablations={"no calibration": {"calibrate": "none"}}, sizes=(32,)
    )
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
