"""Autocast to the precision's dtype, and a frozen prefix in bf16 inside a float32 training step (precision.py
says where each runs)."""

import pytest
import timm
import torch
from torch import nn

from seedlings import optim as O
from seedlings.train import model as M
from seedlings.train import step
from seedlings.train.trainees import outermost_within


def lite0(frozen_groups: int) -> tuple[nn.Module, set[str]]:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=12).eval()
    groups = M.layer_groups(model, 5)
    O.param_groups(model, groups, [1e-3] * 5, 0.0, freeze=False, frozen_groups=frozen_groups)
    return model, {n for g in groups[:frozen_groups] for n in g}


def test_outermost_modules_cover_exactly_the_frozen_groups():
    model, frozen = lite0(3)
    found = outermost_within(model, frozen)
    names = {n for n, m in model.named_modules() if any(m is f for f in found)}
    assert names == {"conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"}
    covered = {f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters()}
    assert covered == frozen
    assert outermost_within(model, set()) == []


def test_autocast_computes_in_the_dtype_it_is_given_and_float32_without():
    for dtype in (torch.bfloat16, torch.float16):
        with step.autocast(torch.device("cpu"), dtype):
            assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == dtype
    with step.autocast(torch.device("cpu"), None):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_frozen_prefix_runs_in_bf16_and_the_rest_trains_in_float32():
    # the caller asks for it only on a CPU with native bf16 (Precision.frozen_bf16); emulated elsewhere: same maths
    model, frozen = lite0(3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with step.bf16_forwards(outermost_within(model, frozen), torch.device("cpu")):
        out = model(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, reference)  # the prefix did run in bf16
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 keeps 8 bits of mantissa
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # the hooks are gone after the block
    assert not torch.is_autocast_enabled("cpu")


def test_a_forward_that_raises_leaves_no_autocast_behind():
    model, frozen = lite0(3)
    with pytest.raises(RuntimeError), step.bf16_forwards(outermost_within(model, frozen), torch.device("cpu")):
        model(torch.randn(2, 5, 64, 64))  # 5 channels: conv_stem's forward fails inside its autocast
    assert not torch.is_autocast_enabled("cpu")


def test_bench_times_prediction_in_both_precisions():
    from seedlings.lab.bench import inference_row

    row = inference_row("test_efficientnet", 32, 1)
    assert set(row) == {"float32", "bf16"} and all(v > 0 for v in row.values())
