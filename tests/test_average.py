"""The weight average (recipe key ema): its arithmetic, where a fold uses it, and an exact resume."""

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import Interrupted, stop_after, tiny_run
from seedlings.errors import UserError
from seedlings.train.average import WeightAverage
from seedlings.train.checkpoint import load_checkpoint
from seedlings.train.fit import train_fold


def test_the_average_follows_every_step_with_its_warm_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen: not in the optimizer, not averaged
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    average = WeightAverage(model, opt, 0.8)
    assert average.names == ["1.weight", "1.bias"]
    expected = [p.detach().clone() for p in model[1].parameters()]
    for step in range(1, 6):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        average.update()
        decay = min(0.8, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model[1].parameters(), strict=True)]
    trained = [p.detach().clone() for p in model[1].parameters()]
    with average.swapped():
        for e, p in zip(expected, model[1].parameters(), strict=True):
            torch.testing.assert_close(p.detach(), e)
        assert not torch.equal(model[1].weight, trained[0])
    for t, p in zip(trained, model[1].parameters(), strict=True):
        assert torch.equal(p.detach(), t)  # the trained weights are back


def test_ema_is_refused_out_of_range(demo_master, home):
    for bad in ("ema=0.3", "ema=1.0"):
        with pytest.raises(UserError, match="ema"):
            tiny_run(demo_master, "bad", bad)


def test_a_fold_snapshots_the_average_and_resumes_it_exactly(demo_master, home):
    """Stage 1 of the tiny recipe has two cycles: the first cycle's snapshot holds the average, not the trained
    weights of that moment; the stage and the fold end on the average (final.pt is the last snapshot). A fold stopped
    inside stage 1 and resumed ends on the same weights and scores as one trained in one go."""
    whole = tiny_run(demo_master, "ema", "ema=0.7")
    final = train_fold(whole, 0)
    out = home / "runs" / "ema" / "fold0"
    last = torch.load(out / "snapshots" / "stage2-cycle1.pt", weights_only=True)
    weights = torch.load(out / "final.pt", weights_only=True)
    assert all(torch.equal(weights[k], last[k]) for k in weights)

    plain = tiny_run(demo_master, "plain")
    train_fold(plain, 0)
    a = torch.load(out / "snapshots" / "stage1-cycle0.pt", weights_only=True)
    b = torch.load(home / "runs" / "plain" / "fold0" / "snapshots" / "stage1-cycle0.pt", weights_only=True)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the average is not the plain run's weights

    cut = tiny_run(demo_master, "ema-cut", "ema=0.7")
    with pytest.raises(Interrupted):
        train_fold(cut, 0, on_epoch=stop_after(3))  # stage 1's second epoch: inside its second cycle
    ckpt = load_checkpoint(home / "runs" / "ema-cut" / "fold0" / "checkpoint.pt")
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 2) and ckpt["average"]["steps"] > 0
    resumed = train_fold(tiny_run(demo_master, "ema-cut", "ema=0.7"), 0)
    for key in ("val_loss", "val_f1"):
        assert resumed[key] == pytest.approx(final[key], abs=1e-6)
    again = torch.load(home / "runs" / "ema-cut" / "fold0" / "final.pt", weights_only=True)
    for k in weights:
        torch.testing.assert_close(again[k], weights[k], atol=1e-6, rtol=0)
    m1 = pd.read_csv(out / "metrics.csv")
    m2 = pd.read_csv(home / "runs" / "ema-cut" / "fold0" / "metrics.csv")
    pd.testing.assert_series_equal(m1.val_loss, m2.val_loss, atol=1e-6)
