import math

import pandas as pd
import pytest
import torch

from seedlings.train.schedule import cycle_end_epochs, make_scheduler, sgdr_lr


def closed_form(step, peak, steps_per_epoch, cycle_len, cycle_mult):
    """SGDR written out independently: find the cycle by its start step, then the cosine within it."""
    start, length = 0, cycle_len * steps_per_epoch
    while step >= start + length:
        start, length = start + length, length * cycle_mult
    return peak * 0.5 * (1 + math.cos(math.pi * (step - start) / length))


def closed_form_warmup(step, peak, steps_per_epoch, cycle_len, cycle_mult, warmup):
    """The same with a linear warm-up over the first `warmup` steps, the first cosine squeezed into what is left of
    the first cycle; later cycles as without warm-up."""
    first = cycle_len * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < first:
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (first - warmup)))
    return closed_form(step, peak, steps_per_epoch, cycle_len, cycle_mult)


@pytest.mark.parametrize("cycle_len,cycle_mult,n_cycles,steps_per_epoch", [
    (1, 1, 3, 5), (1, 2, 3, 7), (2, 2, 2, 3), (1, 3, 3, 4), (3, 1, 1, 11),
])  # fmt: skip
def test_torch_scheduler_matches_closed_form(cycle_len, cycle_mult, n_cycles, steps_per_epoch):
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-2}], lr=1e-2)
    sched = make_scheduler(opt, steps_per_epoch, cycle_len, cycle_mult)
    total = cycle_end_epochs(n_cycles, cycle_len, cycle_mult)[-1] * steps_per_epoch
    for step in range(total):
        for g, peak in zip(opt.param_groups, (1e-3, 1e-2)):
            assert g["lr"] == pytest.approx(closed_form(step, peak, steps_per_epoch, cycle_len, cycle_mult), abs=1e-12)
        opt.step()
        sched.step()


def test_warmup_then_cosine():
    """4 warm-up steps of a 20-step first cycle: a linear rise to the peak, then the cosine over the 16 steps left;
    the next cycle restarts at the peak with no warm-up."""
    lr = [sgdr_lr(step, 1.0, 10, 2, 1, warmup=4) for step in range(40)]
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr[12] == pytest.approx(0.5)  # half way through the 16 cosine steps
    assert lr[20] == pytest.approx(1.0)  # warm restart
    assert lr[30] == pytest.approx(0.5)
    assert max(lr[5:20]) < 1.0 and all(a > b for a, b in zip(lr[4:19], lr[5:20]))


def test_scheduler_with_warmup_matches_closed_form():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 1e-3}])
    sched = make_scheduler(opt, 7, 2, 2, warmup=5)
    for step in range(cycle_end_epochs(2, 2, 2)[-1] * 7):
        for g, peak in zip(opt.param_groups, (1e-4, 1e-3)):
            assert g["lr"] == pytest.approx(closed_form_warmup(step, peak, 7, 2, 2, warmup=5), abs=1e-15)
        opt.step()
        sched.step()


def test_cycle_ends():
    assert cycle_end_epochs(3, 1, 2) == [1, 3, 7]
    assert cycle_end_epochs(3, 2, 1) == [2, 4, 6]
    assert cycle_end_epochs(3, 1, 2)[-1] == 7


def test_restart_values():
    assert sgdr_lr(0, 0.1, 10, 1, 2) == pytest.approx(0.1)
    assert sgdr_lr(5, 0.1, 10, 1, 2) == pytest.approx(0.05)
    assert sgdr_lr(10, 0.1, 10, 1, 2) == pytest.approx(0.1)  # warm restart
    assert sgdr_lr(20, 0.1, 10, 1, 2) == pytest.approx(0.05)  # middle of the second, twice as long cycle


def test_logged_trace_of_a_real_fold(trained_fold):
    """lrs.csv of a trained fold (a short last batch, cycle_mult 1 and 2, three groups) equals the formula."""
    recipe, out, steps = trained_fold["recipe"], trained_fold["dir"], trained_fold["steps_per_epoch"]
    lrs = pd.read_csv(out / "lrs.csv")
    assert list(lrs.columns) == ["step", "epoch", "stage", "lr_g0", "lr_g1", "lr_g2"]
    assert lrs.step.tolist() == list(range(len(lrs)))
    for stage_i, stage in enumerate(recipe.stages):
        rows = lrs[lrs.stage == stage_i].reset_index(drop=True)
        n = steps[stage_i]
        assert len(rows) == cycle_end_epochs(stage.n_cycles, stage.cycle_len, stage.cycle_mult)[-1] * n
        from seedlings.recipe.schema import lrs_of

        peaks = lrs_of(stage.lr, 3)
        for i, row in rows.iterrows():
            for g in range(3):
                expect = closed_form(i, peaks[g], n, stage.cycle_len, stage.cycle_mult)
                if stage.freeze and stage.precompute and g < 2:
                    expect = 0.0  # frozen groups have nothing to train on precomputed features
                assert row[f"lr_g{g}"] == pytest.approx(expect, rel=1e-9, abs=1e-15), (stage_i, i, g)
