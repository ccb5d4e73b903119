"""The recipe's optional levers: frozen leading layer groups, mixup/cutmix, the green plant mask, stochastic depth."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_run
from seedlings.data.cache import BACKGROUND, green_only, load_cache
from seedlings.errors import UserError
from seedlings.recipe.load import load_recipe
from seedlings.train.fit import train_fold
from seedlings.train.fold import prepare_fold
from seedlings.train.mixing import mix_batch, mixed_criterion
from seedlings.train.trainees import WholeNet

UNFROZEN = "stages=[{size: 32, freeze: false, lr: 0.01, n_cycles: 1, cycle_len: %d, cycle_mult: 1}]"


def test_frozen_groups_train_nothing_and_the_rest_trains(demo_master, home):
    """frozen_groups: 2 of 4: the first two groups' weights (norms included) end as they began, the others move."""
    run = tiny_run(demo_master, "fz", UNFROZEN % 1, "layer_groups=4", "stages.0.frozen_groups=2")
    ctx = prepare_fold(run, 0)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    train_fold(run, 0)
    after = torch.load(run.fold_dir(0) / "final.pt", weights_only=True)
    names = [[n for n in g if n in before] for g in ctx.groups]
    assert all(torch.equal(after[n], before[n]) for g in names[:2] for n in g)
    for g in names[2:]:
        assert any(not torch.equal(after[n], before[n]) for n in g)
    lrs = pd.read_csv(run.fold_dir(0) / "lrs.csv")
    assert (lrs.lr_g0 == 0).all() and (lrs.lr_g1 == 0).all() and (lrs.lr_g3 > 0).any()
    trainee = WholeNet(prepare_fold(run, 1), 0)
    params = dict(trainee.ctx.model.named_parameters())
    assert not any(params[n].requires_grad for g in trainee.ctx.groups[:2] for n in g)
    assert trainee.param_groups[0]["params"] == [] and trainee.param_groups[-1]["params"]


def test_frozen_groups_must_leave_the_head(tmp_path):
    with pytest.raises(UserError, match="stages.0.frozen_groups: must be below layer_groups"):
        load_recipe(None, ["layer_groups=3", "stages=[{size: 64, frozen_groups: 3}]"])


def test_mixup_blends_pairs_and_weights_the_loss():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    y = torch.tensor([0, 1, 2, 3])
    mixed, y_a, y_b, lam = mix_batch(x, y, 0.4, 0.0, (0, 0, 0, 5))
    assert torch.equal(y_a, y) and torch.equal(y_b, y.flip(0)) and 0 <= lam <= 1
    torch.testing.assert_close(mixed[:, 0, 0, 0], lam * y.float() + (1 - lam) * y.flip(0).float())
    again = mix_batch(x, y, 0.4, 0.0, (0, 0, 0, 5))
    assert again[3] == lam and torch.equal(again[0], mixed)  # the same key mixes the same way (resume)
    logits = torch.randn(4, 4)
    ce = torch.nn.CrossEntropyLoss()
    expected = lam * ce(logits, y) + (1 - lam) * ce(logits, y.flip(0))
    torch.testing.assert_close(mixed_criterion(ce, y_a, y_b, lam)(logits, y), expected)


def test_cutmix_pastes_a_box_whose_area_is_the_weight():
    x = torch.zeros(2, 3, 20, 20)
    x[1] = 1.0
    y = torch.tensor([0, 1])
    for step in range(20):
        mixed, _, _, kept = mix_batch(x, y, 0.0, 1.0, (0, 0, 0, step))
        pasted = float(mixed[0, 0].mean())  # image 0 is zeros: the box of image 1's ones is what was pasted
        assert pasted == pytest.approx(1 - kept, abs=1e-6)
        assert float(mixed[1, 0].mean()) == pytest.approx(kept, abs=1e-6)


def test_mixing_trains_and_resumes_the_same(demo_master, home):
    """A fold with mixup and cutmix trains; the same recipe trained twice gives the same scores (seeded mixing)."""
    a = tiny_run(demo_master, "mix-a", UNFROZEN % 2, "mixup_alpha=0.4", "cutmix_alpha=1.0")
    b = tiny_run(demo_master, "mix-b", UNFROZEN % 2, "mixup_alpha=0.4", "cutmix_alpha=1.0")
    plain = tiny_run(demo_master, "plain", UNFROZEN % 2)
    ra, rb, rp = train_fold(a, 0), train_fold(b, 0), train_fold(plain, 0)
    assert ra["val_loss"] == pytest.approx(rb["val_loss"]) and ra["val_loss"] != pytest.approx(rp["val_loss"])


def test_green_mask_keeps_the_plant_and_blacks_out_the_gravel():
    img = np.full((100, 100, 3), (150, 120, 90), np.uint8)  # brown soil
    img[30:70, 40:60] = (60, 170, 60)  # a green leaf
    out = green_only(img)
    assert (out[35:65, 45:55] == img[35:65, 45:55]).all()  # the leaf kept
    assert (out[:10, :10] == 0).all() and (out[90:, 90:] == 0).all()  # the soil gone
    bare = np.full((100, 100, 3), (150, 120, 90), np.uint8)
    assert (green_only(bare) == bare).all()  # no plant found: the image as it is


def test_dim_mask_keeps_the_plant_and_a_quarter_of_the_gravel():
    img = np.full((100, 100, 3), (160, 120, 80), np.uint8)  # brown soil
    img[30:70, 40:60] = (60, 170, 60)  # a green leaf
    out = green_only(img, BACKGROUND["dim"])
    assert (out[35:65, 45:55] == img[35:65, 45:55]).all()  # the leaf kept
    assert (out[:10, :10] == (40, 30, 20)).all()  # the soil at a quarter of its brightness, its texture kept
    plant = green_only(img, BACKGROUND["green"]) > 0
    assert plant.any() and (out[plant] == img[plant]).all()  # green and dim keep the same plant pixels


def test_plant_mask_is_its_own_cache_and_trains(demo_master, home):
    from seedlings.data.competition import scan_competition

    comp = scan_competition(demo_master)
    plain, masked = load_cache(comp, "train", 36), load_cache(comp, "train", 36, mask="green")
    assert plain.images.shape == masked.images.shape and not np.array_equal(plain.images, masked.images)
    assert (np.asarray(masked.images) == 0).mean() > (np.asarray(plain.images) == 0).mean()
    dim = load_cache(comp, "train", 36, mask="dim")  # a third cache: neither the plain nor the masked one
    assert not np.array_equal(dim.images, masked.images) and not np.array_equal(dim.images, plain.images)
    run = tiny_run(demo_master, "masked", "plant_mask=green", UNFROZEN % 1)
    trained_on = prepare_fold(run, 0).cache.images  # the fold trains on the masked cache at the recipe's size
    assert np.array_equal(trained_on, load_cache(comp, "train", run.recipe.cache_size, mask="green").images)
    assert not np.array_equal(trained_on, load_cache(comp, "train", run.recipe.cache_size).images)
    final = train_fold(run, 0)
    rows = pd.read_csv(run.fold_dir(0) / "metrics.csv")
    assert len(rows) == 1 and final["val_f1"] == rows.val_f1.iloc[-1] and np.isfinite(final["val_loss"])


def test_drop_path_reaches_the_model(demo_master, home):
    from seedlings.train.model import create_model

    model = create_model(load_recipe(None, ["model=test_efficientnet", "pretrained=none", "bn_stats=batch",
                                            "drop_path_rate=0.2"]), 12)  # fmt: skip
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_full_fit_trains_on_every_image_and_joins_the_blend_as_one_more_fold(demo_master, home):
    """full_fit: after the folds, one model on every training image (no validation, no out-of-fold score); its test
    probabilities join the fold blend with weight 1/(k + 1)."""
    from seedlings.chain.submit import submit
    from seedlings.predict.members import load_probs, run_members

    run = tiny_run(demo_master, "full", UNFROZEN % 1, "train_folds=2", "full_fit=true", "tta=none")
    submit(run)
    full = run.fold_dir(run.full)
    assert full.name == "full" and (full / "done.json").exists()
    rows = pd.read_csv(full / "metrics.csv")
    assert rows.val_f1.isna().all()  # nothing held out
    members = run_members(run)
    assert [m.label for m in members] == ["fold0-stage0-cycle0", "fold1-stage0-cycle0", "full-stage0-cycle0"]
    assert not members[-1].probs_path("oof").exists() and members[-1].probs_path("test").exists()
    folds = [load_probs(m.probs_path("test")).values for m in members[:2]]
    blend = (folds[0] + folds[1]) / 2  # one snapshot: the fold blend is their mean
    expected = (2 * blend + load_probs(members[2].probs_path("test")).values) / 3
    np.testing.assert_allclose(load_probs(run.dir / "probs" / "blend.test.csv").values, expected, atol=1e-6)
    provenance = json.loads((home / "submissions" / "full.json").read_text())
    assert provenance["members"]["full fit (every training image)"]["weight"] == pytest.approx(1 / 3)
    from seedlings.predict.images import predict_images  # new photos: the full fit weighted as the chain weighs it

    got = predict_images("full", [str(demo_master / "test")]).set_index("file")
    got.index = [Path(f).name for f in got.index]
    chain = load_probs(run.dir / "probs" / "blend.test.csv")
    np.testing.assert_allclose(got.loc[chain.files, chain.classes].to_numpy(), chain.values, atol=1e-6, rtol=0)


def test_the_full_fit_trains_every_training_image(demo_master, home):
    from seedlings.train.fold import prepare_fold

    run = tiny_run(demo_master, "full", UNFROZEN % 1, "full_fit=true")
    ctx = prepare_fold(run, run.full)
    assert len(ctx.val_idx) == 0 and len(ctx.train_idx) == len(ctx.comp.train_files)


def test_pseudo_label_round_trains_on_confident_test_images(demo_master, home):
    """pseudo_label: the chain's second round (runs/<run>-pseudo) trains every fold on the training images plus the
    test images the first round's blend gave at least that probability, labelled with their predicted species; its
    submission is the chain's answer, the first round's stays beside it."""
    from seedlings.chain.submit import pseudo_round, submit
    from seedlings.predict.members import Probs
    from seedlings.train.fold import prepare_fold

    confident = ["stages=[{size: 32, freeze: true, precompute: true, fit: logistic}]", "head_c=100"]  # a sure head
    run = tiny_run(demo_master, "pl", *confident, "train_folds=2", "pseudo_label=0.5", "tta=none")
    out = submit(run)
    assert out.name == "pl-pseudo.csv" and (home / "submissions" / "pl.csv").exists()
    second = run.dir.parent / "pl-pseudo"
    assert (second / "pseudo.csv").exists() and (second / "fold1" / "done.json").exists()
    # the round's data, from a blend whose confidence is known: two test images above the threshold
    comp = run.comp
    values = np.full((len(comp.test_files), 12), 1 / 12, dtype=np.float32)
    values[3], values[7] = np.eye(12)[2], np.eye(12)[5]
    made = pseudo_round(tiny_run(demo_master, "pl2", UNFROZEN % 1, "pseudo_label=0.9"),
                        Probs(values, comp.test_files, comp.classes))  # fmt: skip
    chosen = pd.read_csv(made.pseudo_path)
    assert chosen.file.tolist() == [comp.test_files[3], comp.test_files[7]]
    assert chosen.species.tolist() == [comp.classes[2], comp.classes[5]]
    ctx = prepare_fold(made, 0)
    n = len(comp.train_files)
    assert len(ctx.labels) == n + 2 and ctx.labels[n:].tolist() == [2, 5]
    assert {n, n + 1} <= set(ctx.train_idx) and max(ctx.val_idx) < n  # never validated on
    np.testing.assert_array_equal(ctx.cache.images[n], load_cache(comp, "test", made.recipe.cache_size).images[3])


def test_no_confident_test_image_makes_no_second_round(demo_master, home, capsys):
    """A blend that gives no test image the pseudo_label confidence used to retrain a whole second round on
    the first round's data."""
    from seedlings.chain.submit import pseudo_round
    from seedlings.predict.members import Probs

    run = tiny_run(demo_master, "pl3", UNFROZEN % 1, "pseudo_label=0.9")
    comp = run.comp
    flat = np.full((len(comp.test_files), 12), 1 / 12, dtype=np.float32)
    assert pseudo_round(run, Probs(flat, comp.test_files, comp.classes)) is None
    assert "no second round" in capsys.readouterr().out and not (home / "runs" / "pl3-pseudo").exists()


def test_pseudo_label_must_be_a_confidence():
    with pytest.raises(UserError, match="pseudo_label: 0 .off. or a confidence"):
        load_recipe(None, ["pseudo_label=0.2"])


def test_calibrate_bias_rescales_the_blend_by_a_fit_on_out_of_fold_probabilities(demo_master, home):
    """calibrate: bias: the submission comes from the fold blend's test probabilities after a temperature and class
    biases fitted on the out-of-fold ones; the OOF score is cross-fitted, the uncalibrated blend stays in the table."""
    from seedlings.chain.submit import submit
    from seedlings.data.folds import load_folds
    from seedlings.predict.blend import Calibration, oof_summary
    from seedlings.predict.members import load_probs, run_members

    run = tiny_run(demo_master, "cal", UNFROZEN % 1, "train_folds=2", "calibrate=bias", "tta=flip")
    submit(run)
    provenance = json.loads((home / "submissions" / "cal.json").read_text())
    cal = provenance["calibration"]
    classes = run.comp.classes
    assert cal["used"] and cal["temperature"] > 0 and list(cal["bias"]) == classes  # it lowered the OOF log loss
    blend_row, before = provenance["members"]["blend"], provenance["members"]["blend, uncalibrated"]
    assert blend_row["log_loss"] < before["log_loss"]
    assert set(provenance["members"]) >= {"blend", "blend, uncalibrated"}
    folds = [load_probs(m.probs_path("test")).values for m in run_members(run)]
    expected = Calibration(cal["temperature"], np.array(list(cal["bias"].values()))).apply(np.mean(folds, 0))
    blended = load_probs(run.dir / "probs" / "blend.test.csv").values
    np.testing.assert_allclose(blended, expected, atol=1e-6)
    assert not np.allclose(blended, np.mean(folds, 0), atol=1e-3)  # the calibration changed something
    answer = pd.read_csv(home / "submissions" / "cal.csv")
    assert (answer.species == np.array(classes)[expected.argmax(1)]).all()
    # make evaluate shows the same calibrated blend (one snapshot a fold: equal weights are the chain's weights)
    summary = {what: (f1, loss) for what, f1, loss in oof_summary(run, load_folds(run.data, run.n_folds, 0))}
    row = summary["all folds x 1 snapshots, equal blend (TTA), calibrated (each fold by a fit on the others)"]
    assert row == pytest.approx((blend_row["micro_f1"], blend_row["log_loss"]))


def test_calibrate_takes_none_or_bias():
    with pytest.raises(UserError, match="calibrate: expected none or bias, got 'platt'"):
        load_recipe(None, ["calibrate=platt"])
