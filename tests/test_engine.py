"""The forwards through fixed weights in onnxruntime (recipe key `engine`): the same numbers as torch's within rounding,
exported again when the weights change or the shape does, and chosen only where it can run."""

import numpy as np
import pytest
import torch

from conftest import tiny_run
from seedlings.errors import UserError
from seedlings.precision import AUTO_MIN_WORK, Precision, choose_engine, runs_onnx
from seedlings.train.engine import OnnxForward

FP32 = Precision(None, None, False, "float32")
BF16 = Precision(None, torch.bfloat16, True, "bf16 forwards")
MAPS = ("stages=[{size: 32, freeze: true, precompute: true, fit: logistic}, {size: 32, freeze: false, frozen_groups: 1,"
        " precompute: true, lr: 0.01, n_cycles: 1, cycle_len: 1, cycle_mult: 1}]")  # fmt: skip


def small_net(seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=5).eval()


def test_onnxruntime_gives_torch_numbers_and_follows_the_weights_and_the_shape():
    net, x = small_net(0), torch.randn(3, 3, 48, 48)
    forward = OnnxForward(net)
    with torch.no_grad():
        before = net(x)
        assert torch.allclose(forward(x), before, atol=1e-4)
        assert torch.allclose(forward(x[:1]), before[:1], atol=1e-4)  # another batch size: the same graph
        assert len(forward.sessions) == 1
        net.load_state_dict(small_net(1).state_dict())  # another member's weights, loaded in place
        after = net(x)
        assert not torch.allclose(after, before, atol=1e-2)
        assert torch.allclose(forward(x), after, atol=1e-4)  # exported again, not the old graph
    assert list(forward.sessions) == [(3, 48, 48)]  # one graph a shape (another shape: the fold's test below)


def test_the_engine_is_chosen_where_it_can_run(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_engine("auto", cpu, FP32) == "auto"
    assert choose_engine("auto", cpu, BF16) == "torch"  # a CPU with native bf16 keeps its bf16 forwards
    assert choose_engine("auto", gpu, FP32) == "torch"
    assert choose_engine("torch", cpu, FP32) == "torch"
    assert choose_engine("onnx", cpu, FP32) == "onnx"
    for device, precision, why in ((gpu, FP32, "runs on the CPU"), (cpu, BF16, "computes float32")):
        with pytest.raises(UserError, match=f"engine: onnx {why}"):
            choose_engine("onnx", device, precision)
    monkeypatch.setattr("seedlings.precision.onnxruntime_installed", lambda: False)
    assert choose_engine("auto", cpu, FP32) == "torch"
    with pytest.raises(UserError, match="engine: onnx needs onnxruntime"):
        choose_engine("onnx", cpu, FP32)


def test_auto_runs_onnxruntime_only_where_the_export_pays():
    assert runs_onnx("auto", AUTO_MIN_WORK, 192) and not runs_onnx("auto", AUTO_MIN_WORK - 1, 192)
    assert not runs_onnx("auto", AUTO_MIN_WORK, 96) and runs_onnx("auto", 4 * AUTO_MIN_WORK, 96)
    assert runs_onnx("onnx", 1, 32) and not runs_onnx("torch", 10**9, 384)


def test_a_fold_computes_the_same_maps_features_and_probabilities_in_either_engine(demo):
    from seedlings.train.features import FrozenCut, frozen_maps, pooled_features
    from seedlings.train.fold import prepare_fold
    from seedlings.train.predictor import Predictor

    got = {}
    for engine in ("torch", "onnx"):
        ctx = prepare_fold(tiny_run(demo, f"engine-{engine}", MAPS, f"engine={engine}", "precision=fp32"), 0)
        assert ctx.engine == engine
        rows = np.arange(20)
        maps = frozen_maps(ctx, 32, FrozenCut.of(ctx, 1).n, rows)
        features = pooled_features(ctx, 32, rows)
        probs = Predictor(ctx, through_network=True).probs("train", rows, [(0, 1.0), (5, 1.0), (0, 1.15)], 40)
        got[engine] = maps, features, probs
    for torch_made, onnx_made in zip(got["torch"], got["onnx"]):
        assert torch_made.shape == onnx_made.shape and torch_made.dtype == onnx_made.dtype
        assert torch.allclose(torch_made, onnx_made, atol=1e-4, rtol=1e-4)
