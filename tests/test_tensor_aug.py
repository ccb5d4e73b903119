"""Training batches made with tensor operations (the GPU data path), checked on CPU tensors."""

import numpy as np
import pytest
import torch

from seedlings.data.device_batches import DeviceBatches, ItemParams, colour_jitter, sample_item
from seedlings.data.loaders import EpochSampler, item_seed

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def images(n=10, side=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def batches(imgs, size=24, crop_scale=0.35, seed=0, fold=0, batch_size=4, **kw):
    labels = np.arange(len(imgs)) % 3
    return DeviceBatches(imgs, np.arange(len(imgs)), labels, size, MEAN, STD, crop_scale, seed, fold, batch_size,
                         torch.device("cpu"), **kw)  # fmt: skip


def test_whole_crop_without_turn_or_jitter_is_the_image():
    imgs = images()
    made = batches(imgs).augment(torch.from_numpy(imgs[:2]), [ItemParams(0, 0, 1, 1, 0, None)] * 2)
    expect = (torch.from_numpy(imgs[:2]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(made, expect, atol=1e-5, rtol=0)
    assert made.is_contiguous(memory_format=torch.channels_last)


def test_the_eight_turns_are_the_dihedral_group():
    imgs = images(1)
    made = batches(imgs)
    x = torch.from_numpy(imgs[:1])
    outs = [made.augment(x, [ItemParams(0, 0, 1, 1, k, None)])[0] for k in range(8)]
    base = outs[0]
    group = [torch.rot90(base, r, (1, 2)) for r in range(4)] + [torch.rot90(base.flip(2), r, (1, 2)) for r in range(4)]
    for out in outs:
        assert sum(torch.allclose(out, g, atol=1e-5) for g in group) == 1
    assert all(not torch.allclose(outs[i], outs[j], atol=1e-5) for i in range(8) for j in range(i))


@pytest.mark.parametrize("crop_scale", [0.35, 0.8, 1.0])
def test_crops_keep_the_recipes_scale_and_aspect(crop_scale):
    params = [sample_item(item_seed(0, 0, 0, i), crop_scale) for i in range(2000)]
    area = np.array([p.w * p.h for p in params])
    aspect = np.array([p.w / p.h for p in params])
    assert area.min() >= crop_scale - 1e-9 and area.max() <= 1 + 1e-9
    assert aspect.min() >= 3 / 4 - 1e-9 and aspect.max() <= 4 / 3 + 1e-9
    assert all(0 <= p.x0 and p.x0 + p.w <= 1 + 1e-9 and 0 <= p.y0 and p.y0 + p.h <= 1 + 1e-9 for p in params)
    assert sorted({p.k for p in params}) == list(range(8))
    assert 0.75 < np.mean([p.jitter is not None for p in params]) < 0.85  # p = 0.8


def test_batches_replay_exactly_and_follow_the_sampler_order():
    imgs = images(10)
    a = list(batches(imgs, size=16, seed=3, fold=1).epoch(2))
    b = list(batches(imgs, size=16, seed=3, fold=1).epoch(2))  # a resumed process: a new object, same epoch
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other = next(batches(imgs, size=16, seed=3, fold=1).epoch(3))[0]
    assert not torch.equal(a[0][0], other)
    sampler = EpochSampler(10, 3, 1)
    sampler.set_epoch(2)
    assert list(batches(imgs, seed=3, fold=1).order(2)) == [i for i, _ in sampler]
    assert [len(y) for _, y in a] == [4, 4, 2] and a[0][0].shape == (4, 3, 16, 16)
    assert len(list(batches(imgs, drop_last=True).epoch(0))) == 2  # static shapes on a GPU: the ragged batch is dropped


def test_values_stay_in_range_and_the_dtype_is_asked_for():
    made = batches(images(12, side=40), size=32, out_dtype=torch.bfloat16)
    for x, _ in made.epoch(0):
        assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()
        pixels = x.float() * 0.5 + 0.5
        assert pixels.min() >= -0.01 and pixels.max() <= 1.01


def test_colour_jitter_factors():
    grey = torch.full((1, 3, 4, 4), 0.5)
    same = colour_jitter(grey, [ItemParams(0, 0, 1, 1, 0, (1.0, 1.0, 1.0, 0.0))])
    torch.testing.assert_close(same, grey, atol=1e-6, rtol=0)
    brighter = colour_jitter(grey, [ItemParams(0, 0, 1, 1, 0, (1.2, 1.0, 1.0, 0.0))])
    torch.testing.assert_close(brighter, torch.full_like(grey, 0.6), atol=1e-6, rtol=0)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 0.8
    shifted = colour_jitter(red, [ItemParams(0, 0, 1, 1, 0, (1.0, 1.0, 1.0, 0.02))])
    assert shifted[0, 1].mean() > 0.001 and (shifted[0, 0] - 0.8).abs().max() < 0.1  # the hue moved, a little


def test_a_fold_trains_on_device_made_batches(demo_master, home):
    from conftest import tiny_run
    from seedlings.train.fit import train_fold

    stages = "stages=[{size: 32, freeze: false, lr: 0.01, n_cycles: 1, cycle_len: 2}]"
    run = tiny_run(demo_master, "tensor", stages, "augment=tensor")
    final = train_fold(run, 0)
    assert 0 <= final["val_f1"] <= 1 and np.isfinite(final["val_loss"])


@pytest.mark.slow
def test_compiled_model_trains_and_predicts(demo_master, home):
    """compile: true (torch.compile, inductor) on CPU: the fold trains and predicts like the eager one, closely
    (slow: 2.5 minutes of compiling on 2 cores)."""
    from conftest import tiny_run
    from seedlings.predict.infer import predict_fold
    from seedlings.train.fit import train_fold

    stages = "stages=[{size: 32, freeze: false, lr: 0.01, n_cycles: 1, cycle_len: 1}]"
    finals = {}
    for compiled in ("false", "true"):
        run = tiny_run(demo_master, f"compile-{compiled}", stages, f"compile={compiled}", "tta=none")
        finals[compiled] = train_fold(run, 0)
        assert predict_fold(run, 0)[-1].load("test").values.shape[1] == 12
    assert finals["true"]["val_loss"] == pytest.approx(finals["false"]["val_loss"], abs=2e-3)
