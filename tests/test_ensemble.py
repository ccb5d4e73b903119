import numpy as np
import pytest

from seedlings.ensemble import Blendable, blend, fit_weights, format_table


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
