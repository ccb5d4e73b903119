import numpy as np
import pytest

from seedlings.metrics import log_loss
from seedlings.predict.blend import (
    Blendable,
    Calibration,
    blend,
    calibrate,
    calibrate_blend,
    fit_calibration,
    fit_weights,
    format_table,
    score,
)


def noisy(labels, n_classes, strength, rng):
    logits = rng.normal(0, 1, (len(labels), n_classes))
    logits[np.arange(len(labels)), labels] += strength
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def test_fitted_weights_favour_the_better_member_and_sum_to_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    good, bad = noisy(labels, 5, 3.0, rng), noisy(labels, 5, 0.2, rng)
    w = fit_weights([good, bad], labels)
    assert w.sum() == pytest.approx(1) and (w >= 0).all() and w[0] > 0.8


def test_blend_of_independent_members_beats_each():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 600)
    parts = [Blendable(f"m{i}", noisy(labels, 6, 1.2, rng), noisy(labels[:50], 6, 1.2, rng)) for i in range(5)]
    oof, test, table = blend(parts, labels, "equal")
    assert test.shape == (50, 6) and np.allclose(oof.sum(1), 1)
    assert all(table[p.name]["weight"] == pytest.approx(0.2) for p in parts)
    best_single = max(table[p.name]["micro_f1"] for p in parts)
    assert table["blend"]["micro_f1"] > best_single
    assert table["blend"]["log_loss"] < min(table[p.name]["log_loss"] for p in parts)
    assert "blend" in format_table(table)
    _, _, fitted = blend(parts, labels, "fit")
    assert fitted["blend"]["log_loss"] <= table["blend"]["log_loss"] + 1e-6


def shifted(rng, n, n_classes, temperature, bias):
    """Labels drawn from softmax(logits), and the probabilities of a model that saw softmax(logits / temperature -
    bias): under-confident by `temperature` and leaning away from the classes `bias` penalises."""
    logits = rng.normal(0, 2.5, (n, n_classes))
    true = np.exp(logits - logits.max(1, keepdims=True))
    true /= true.sum(1, keepdims=True)
    labels = np.array([rng.choice(n_classes, p=row) for row in true])
    seen = np.exp(logits / temperature - bias)
    return seen / seen.sum(1, keepdims=True), labels


def test_calibration_recovers_a_known_temperature_and_bias():
    rng = np.random.default_rng(0)
    bias = np.array([0.0, 0.8, -0.5, 0.0])
    probs, labels = shifted(rng, 4000, 4, 2.0, bias)
    cal = fit_calibration(probs, labels)
    assert cal.temperature == pytest.approx(2.0, rel=0.1)
    centred = cal.bias - cal.bias.mean()  # softmax ignores a common shift
    np.testing.assert_allclose(centred, 2.0 * (bias - bias.mean()), atol=0.2)  # T log p = logits - T bias + c
    assert log_loss(cal.apply(probs), labels) < log_loss(probs, labels) - 0.05
    assert (cal.apply(probs).argmax(1) == labels).mean() > (probs.argmax(1) == labels).mean()
    np.testing.assert_allclose(Calibration(1.0, np.zeros(4)).apply(probs), probs, atol=1e-9)  # identity


def test_each_folds_rows_are_calibrated_by_a_fit_on_the_other_folds():
    rng = np.random.default_rng(1)
    probs, labels = shifted(rng, 900, 5, 1.5, np.array([0.5, 0.0, 0.0, -0.5, 0.2]))
    fold_of = np.arange(900) % 3
    test = probs[:50]
    oof, test_cal, everything = calibrate(probs, test, labels, fold_of)
    for fold in range(3):
        rows = fold_of == fold
        alone = fit_calibration(probs[~rows], labels[~rows]).apply(probs[rows])
        np.testing.assert_allclose(oof[rows], alone, atol=1e-6)
        assert not np.allclose(oof[rows], everything.apply(probs[rows]), atol=1e-4)  # not the in-sample fit
    np.testing.assert_allclose(test_cal, fit_calibration(probs, labels).apply(test), atol=1e-6)
    single, _, _ = calibrate(probs, test, labels, np.zeros(900, int))  # one fold: nothing else to fit on
    np.testing.assert_allclose(single, everything.apply(probs), atol=1e-6)


def test_the_chain_keeps_the_calibration_only_when_it_lowers_the_cross_fitted_log_loss():
    rng = np.random.default_rng(2)
    classes = list("abcde")
    probs, labels = shifted(rng, 900, 5, 1.5, np.array([0.5, 0.0, 0.0, -0.5, 0.2]))
    fold_of = np.arange(900) % 3
    test = probs[:40]
    table = {"blend": {**score(probs, labels), "weight": 1.0}}
    oof, out, info = calibrate_blend(probs, test, labels, fold_of, table, classes)
    assert info["used"] and list(info["bias"]) == classes
    assert table["blend"]["log_loss"] < table["blend, uncalibrated"]["log_loss"]
    assert not np.allclose(out, test)
    # 30 images from a model calibrated as it is: a fit on 15 of them only adds noise to the other 15, left out
    few, truth = shifted(rng, 30, 5, 1.0, np.zeros(5))
    table = {"blend": {**score(few, truth), "weight": 1.0}}
    oof, out, info = calibrate_blend(few, test, truth, np.arange(30) % 2, table, classes)
    assert not info["used"] and np.array_equal(oof, few) and np.array_equal(out, test)
    assert table["blend, calibrated (left out)"]["log_loss"] >= table["blend"]["log_loss"]
    _, out, info = calibrate_blend(probs, test, labels, np.zeros(900, int), dict(blend=score(probs, labels)), classes)
    assert not info["used"] and np.array_equal(out, test)  # one fold: nothing to check the fit on
