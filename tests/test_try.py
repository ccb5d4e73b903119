"""Competition iteration: prediction variants stored beside a run's own probabilities, the paired verdict's
statistics on planted differences, and `seedlings try` lever studies (resumed after an interruption mid-fold)."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, Interrupted, stop_after
from seedlings.cli import main
from seedlings.lab.paired import Arm, paired_verdict

# the tiny recipe, shorter: a solved head, then two epochs of the network (a fold trains in about a second)
FAST = [*(t for t in TINY if not t.startswith("stages")), "precompute_d4=false",
        "stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
        " {size: 32, freeze: false, lr: 0.003, n_cycles: 1, cycle_len: 2}]"]  # fmt: skip
CLASSES = [f"c{i}" for i in range(5)]


def arm(seed: int, n: int = 400, accuracy: float = 0.8) -> Arm:
    """Out-of-fold predictions of n images: right on about `accuracy` of them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    probs = rng.dirichlet(np.ones(len(CLASSES)), n) * 0.5
    top = np.where(rng.random(n) < accuracy, labels, (labels + 1) % len(CLASSES))
    probs[np.arange(n), top] += 0.5
    return Arm([f"img{i:04d}.png" for i in range(n)], probs, labels)


def forced_wrong(a: Arm, count: int) -> Arm:
    """`a` with its first `count` right predictions made wrong (the top class moved to the next one)."""
    probs = a.probs.copy()
    for i in np.flatnonzero(a.right)[:count]:
        wrong = (a.labels[i] + 1) % len(CLASSES)
        probs[i, [a.labels[i], wrong]] = probs[i, [wrong, a.labels[i]]]
    return Arm(a.files, probs, a.labels)


def test_a_variant_with_planted_errors_is_worse_and_its_interval_excludes_zero():
    bases = [arm(0), arm(1)]
    v = paired_verdict(bases, [forced_wrong(b, 30) for b in bases], CLASSES)
    assert v["verdict"] == "worse"
    assert v["delta_f1"] == pytest.approx(-30 / 400)
    low, high = v["delta_f1_ci"]
    assert low <= -30 / 400 <= high < 0
    assert v["mcnemar"] == {"base_only": 60, "variant_only": 0, "p": pytest.approx(2 * 0.5**60)}
    assert sum(b for _, b in v["errors"].values()) - sum(a for a, _ in v["errors"].values()) == 60
    assert v["delta_log_loss"] > 0 and v["delta_log_loss_ci"][0] > 0  # the true class lost its mass
    flipped = paired_verdict([forced_wrong(b, 30) for b in bases], bases, CLASSES)  # the same, the other way
    assert flipped["verdict"] == "better" and flipped["delta_f1_ci"][0] > 0


def test_an_identical_variant_is_within_noise_with_the_interval_zero():
    bases = [arm(0), arm(1)]
    v = paired_verdict(bases, [Arm(b.files, b.probs.copy(), b.labels) for b in bases], CLASSES)
    assert v["verdict"] == "within noise"
    assert v["delta_f1_ci"] == (0.0, 0.0) and v["delta_log_loss_ci"] == (0.0, 0.0)
    assert v["mcnemar"]["p"] == 1.0


def test_two_images_of_800_are_within_noise():
    bases = [arm(0), arm(1)]
    v = paired_verdict(bases, [forced_wrong(bases[0], 2), bases[1]], CLASSES)
    assert v["verdict"] == "within noise"
    assert v["delta_f1_ci"][0] < 0 <= v["delta_f1_ci"][1]


def test_rows_are_compared_by_file_not_by_position():
    base = arm(0)
    order = np.random.default_rng(5).permutation(len(base.files))
    shuffled = Arm([base.files[i] for i in order], base.probs[order], base.labels[order])
    assert paired_verdict([base], [shuffled], CLASSES)["delta_f1_ci"] == (0.0, 0.0)
    with pytest.raises(ValueError, match="same folds"):
        paired_verdict([base], [Arm([f"x{f}" for f in base.files], base.probs, base.labels)], CLASSES)


def test_a_variant_that_trains_more_folds_is_compared_on_the_images_both_predicted():
    """train_folds: the base predicts two folds' images out of fold, the variant every fold's; fold seeds give
    splits of other sizes. Only the images both predicted count, each seed weighing the same."""
    big, small = arm(0, n=400), arm(1, n=300)
    part = Arm(big.files[:150], big.probs[:150], big.labels[:150])  # the base's two folds of five
    v = paired_verdict([part, small], [forced_wrong(big, 20), forced_wrong(small, 30)], CLASSES)
    wrong_in_part = int((~forced_wrong(big, 20).right[:150] & part.right).sum())
    assert v["images"] == 150 + 300
    assert v["delta_f1"] == pytest.approx((-wrong_in_part / 150 - 30 / 300) / 2)
    assert v["verdict"] == "worse" and v["mcnemar"]["base_only"] == wrong_in_part + 30


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.mark.slow  # three chains and a second run: about 40 s
def test_a_prediction_variant_goes_beside_the_runs_own_probabilities(demo_master, home, capsys):
    common = ["--data", demo_master, "--n-folds", "3", *FAST, "train_folds=2"]
    assert cli("submit", "--run", "tiny", *common) == 0
    probs = home / "runs" / "tiny" / "probs"
    own = {p: p.read_bytes() for p in probs.iterdir() if p.is_file()}
    weights = {p: p.stat().st_mtime_ns for p in (home / "runs" / "tiny").rglob("*.pt")}
    capsys.readouterr()
    assert cli("submit", "--run", "tiny", *common, "tta=d2") == 0
    out = capsys.readouterr().out
    assert out.count("finished, nothing to do") == 2  # trained nothing
    assert {p: p.read_bytes() for p in probs.iterdir() if p.is_file()} == own  # the run's own files as they were
    assert all(p.stat().st_mtime_ns == t for p, t in weights.items())
    variant = probs / "tta=d2"
    meta = json.loads((variant / "fold0-stage1-cycle0.json").read_text())
    assert meta["inputs"]["tta"] == "d2" and meta["views"] == 4
    assert (variant / "blend.oof.csv").exists() and (variant / "fold1-stage1-cycle0.test.csv").exists()
    provenance = json.loads((home / "submissions" / "tiny.json").read_text())
    assert provenance["variant"] == "tta=d2" and provenance["recipe"]["tta"] == "d2"
    capsys.readouterr()
    assert cli("runs", "--csv") == 0
    row = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out)).set_index("run").loc["tiny"]
    assert row.variant == "tta=d2"
    # another run blended in is predicted with the keys asked for too, beside its own probabilities
    assert cli("train", "--run", "other", *common, "seed=1") == 0
    assert cli("submit", "--run", "tiny", "--runs", "other", *common, "tta=d2") == 0
    assert (home / "runs" / "other" / "probs" / "tta=d2" / "fold1-stage1-cycle0.oof.csv").exists()
    assert json.loads((home / "submissions" / "tiny.json").read_text())["variants"] == {"tiny": "tta=d2",
                                                                                       "other": "tta=d2"}  # fmt: skip


LEVERS = {
    "no TTA": {"tta": "none"},
    "four views": {"tta": "d2"},
    "geometric mean": {"tta_mean": "geom"},
    "calibrated": {"calibrate": "bias"},
    "more dropout": {"drop_rate": 0.4},
}


def study(data, recipe, levers_file):
    return ["try", "--data", data, "--config", recipe, "--n-folds", "3", "--seeds", "0 1", "--levers", levers_file,
            "--name", "levers"]  # fmt: skip


def try_table(home) -> pd.DataFrame:
    table = pd.read_csv(home / "runs" / "try" / "comp" / "levers" / "try.csv")
    return table.drop(columns=["base_seconds", "variant_seconds"])  # what the work cost differs; nothing else may


@pytest.mark.slow  # about a minute: two studies of five levers on two fold seeds
def test_a_lever_study_interrupted_mid_fold_ends_on_the_table_of_one_run_straight_through(
    demo, tmp_path, home, monkeypatch, capsys
):
    import yaml

    from seedlings.lab import tries
    from seedlings.recipe.load import load_recipe
    from seedlings.recipe.schema import recipe_dict

    recipe = tmp_path / "fast.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(load_recipe(None, FAST)), sort_keys=False))
    levers_file = tmp_path / "levers.yaml"
    levers_file.write_text(yaml.safe_dump(LEVERS, sort_keys=False))
    straight = tmp_path / "straight"
    monkeypatch.setenv("SEEDLINGS_HOME", str(straight))
    assert cli(*study(demo, recipe, levers_file)) == 0
    expected = try_table(straight)
    assert len(expected) == 5 and set(expected.lever) == set(LEVERS)
    assert expected.set_index("lever").trains.to_dict() == {k: k == "more dropout" for k in LEVERS}
    capsys.readouterr()

    monkeypatch.setenv("SEEDLINGS_HOME", str(home))
    real, stopped = tries.train_fold, []

    def interrupted_once(run, fold):
        if run.recipe.drop_rate == 0.4 and not stopped:  # the lever's first fold, stopped after one SGDR epoch
            stopped.append(fold)
            return real(run, fold, on_epoch=stop_after(1))
        return real(run, fold)

    monkeypatch.setattr(tries, "train_fold", interrupted_once)
    with pytest.raises(Interrupted):
        tries.try_command(tries.study_from_args(demo, recipe, [], str(levers_file), [0, 1], 3, "levers"))
    assert stopped  # the levers that train nothing were done before it: the table so far is written
    assert "(4 of 5 levers done so far)" in (home / "runs" / "try" / "comp" / "levers" / "try.md").read_text()
    assert list((home / "runs" / "try" / "comp").glob("*/fold0/checkpoint.pt"))  # stopped mid-fold
    assert cli(*study(demo, recipe, levers_file)) == 0
    pd.testing.assert_frame_equal(try_table(home), expected)
    printed = capsys.readouterr().out
    assert sum(line.startswith(tuple(f"{k}: " for k in LEVERS)) for line in printed.splitlines()) == 5

    # another try on the same base trains nothing: the base is shared, and tta is a prediction key
    runs = sorted(p.name for p in (home / "runs" / "try" / "comp").iterdir())
    assert cli("try", "--data", demo, "--config", recipe, "--n-folds", "3", "--seeds", "0,1", "tta=d4") == 0
    out = capsys.readouterr().out
    assert "train_loss" not in out and out.count("finished, nothing to do") == 2 * 3 * 2  # base and variant, 2 seeds
    assert sorted(p.name for p in (home / "runs" / "try" / "comp").iterdir()) == [*runs, "tta=d4"]
    (line,) = [line for line in out.splitlines() if line.startswith("tta=d4: ")]
    assert "within noise" in line or "better" in line or "worse" in line
    assert "points [" in line and "McNemar" in line


@pytest.mark.parametrize(
    "argv, said",
    [
        ([], "give the keys to try"),
        (["--seeds", "0 x"], "--seeds: expected fold seeds"),
        (["pseudo_label=0.9"], "pseudo_label trains a second round"),
        (["no_such_key=1"], "no_such_key"),
    ],
)
def test_a_try_that_cannot_be_judged_is_refused_before_any_training(demo_master, home, capsys, argv, said):
    assert cli("try", "--data", demo_master, "--config", "tests/defaults.yaml", *argv) == 2
    assert said in capsys.readouterr().err
    assert not (home / "runs").exists()


def test_a_levers_file_is_checked_lever_by_lever(demo_master, tmp_path, home, capsys):
    levers = tmp_path / "levers.yaml"
    levers.write_text("fine: {tta: d2}\nbroken: {stages.7.size: 64}\n")
    assert cli("try", "--data", demo_master, "--config", "tests/defaults.yaml", "--levers", levers) == 2
    assert "lever 'broken': stages.7" in capsys.readouterr().err
