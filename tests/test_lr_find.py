import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, tiny_run
from seedlings.cli import main
from seedlings.train.fold import prepare_fold
from seedlings.train.lr_find import lr_sweep, suggestions, sweep_lrs

FIRST_STAGE_UNFROZEN = "stages=[{size: 32, freeze: false, lr: {max: 0.01, mult: 10}, n_cycles: 1, cycle_len: 1}]"


@pytest.mark.parametrize("stage", [None, FIRST_STAGE_UNFROZEN])
def test_sweep_restores_weights_bit_identical(demo_master, stage):
    ctx = prepare_fold(tiny_run(demo_master, "lrf", *([stage] if stage else [])), 0)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    df = lr_sweep(ctx, 1e-6, 10.0, 40)
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics included
    assert list(df.columns) == ["step", "lr", "loss", "smoothed_loss"]
    np.testing.assert_allclose(df.lr, sweep_lrs(1e-6, 10.0, 40)[: len(df)])
    assert len(df) <= 40


def test_sweep_stops_when_loss_explodes(demo_master):
    ctx = prepare_fold(tiny_run(demo_master, "lrf"), 0)
    df = lr_sweep(ctx, 1e-4, 1e6, 100)
    assert len(df) < 100
    last = df.smoothed_loss.iloc[-1]
    assert not np.isfinite(last) or last > 4 * df.smoothed_loss.iloc[:-1].min()


def test_suggestions_on_a_known_curve():
    lr = sweep_lrs(1e-6, 1.0, 61)
    x = np.log10(lr)
    loss = 2.5 - 2.0 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, (x + 1) ** 2 * 10, 0)  # drop around 1e-3
    s = suggestions(pd.DataFrame({"lr": lr, "smoothed_loss": loss}))
    assert 1e-4 < s["steepest"] < 1e-2
    assert 1e-4 < s["valley"] < 1e-1
    assert s["minimum/10"] == pytest.approx(lr[np.argmin(loss)] / 10)


def test_cli_writes_plot_and_csv(demo_master, home, capsys):
    overrides = TINY + ["lr_find_steps=30"]
    assert main(["lr-find", "--data", str(demo_master), "--run", "lrf", "--n-folds", "3", *overrides]) == 0
    out = capsys.readouterr().out
    assert "suggested lr: " in out
    df = pd.read_csv(home / "runs" / "lrf" / "lr_find-stage0.csv")
    assert len(df) <= 30 and (home / "runs" / "lrf" / "lr_find-stage0.png").stat().st_size > 1000
    printed = out.split("suggested lr: ")[1].split()[0]
    valley = suggestions(df)["valley"]
    assert printed == f"{valley:.3g}"  # the suggestion is the valley of the sweep the CSV holds
    at = df.smoothed_loss[df.lr == valley].iloc[0]
    assert at < df.smoothed_loss.iloc[0]  # on the descent: training at it lowers the loss


def test_later_stage_sweeps_from_the_weights_it_starts_with(demo_master, home, capsys):
    """--stage 1 first trains stage 0 as `make train` would (checkpointed at the stage boundary), then sweeps stage 1
    from those weights: its first losses differ from a sweep of stage 1 from the untrained head."""
    from seedlings.train.checkpoint import load_checkpoint

    overrides = [*TINY, "lr_find_steps=8", "lr_find_end=1e-6"]  # tiny steps: the losses show the starting weights
    args = ["lr-find", "--data", str(demo_master), "--n-folds", "3", *overrides]
    assert main([*args, "--run", "later", "--stage", "1"]) == 0
    assert "stage 1, fold 0" in capsys.readouterr().out
    ckpt = load_checkpoint(home / "runs" / "later" / "fold0" / "checkpoint.pt")
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 0) and len(ckpt["metrics"]) == 1
    fresh = prepare_fold(tiny_run(demo_master, "fresh", *overrides[len(TINY) :]), 0)
    untrained = lr_sweep(fresh, 1e-7, 1e-6, 8, stage=1)
    trained = pd.read_csv(home / "runs" / "later" / "lr_find-stage1.csv")
    assert abs(trained.loss.iloc[0] - untrained.loss.iloc[0]) > 1e-3
    assert untrained.loss.iloc[0] == pytest.approx(np.log(12), abs=0.05)  # the zero-initialised head: uniform
