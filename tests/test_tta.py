import pytest
import torch
from torch import nn

from seedlings.data.augment import dihedral
from seedlings.predict.tta import tta_predict, tta_views


class Invariant(nn.Module):
    """Logits from statistics that no rotation or flip changes: mean and max of each channel."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))


def test_dihedral_group_has_eight_distinct_members():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8
    assert torch.equal(dihedral(dihedral(x, 1), 3), x)


def test_d2_is_identity_both_flips_and_half_a_turn():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, k) for k, _ in tta_views("d2")]
    expected = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    assert len(views) == 4 and all(torch.equal(v, e) for v, e in zip(views, expected))


def test_invariant_model_gives_the_same_output_for_every_view():
    torch.manual_seed(0)
    model, x = Invariant(), torch.randn(3, 3, 16, 16)
    outs = [model(dihedral(x, k)) for k in range(8)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    torch.testing.assert_close(tta_predict(model, x, "d4"), outs[0].softmax(-1))


@pytest.mark.parametrize("name,mean", [("d4", "arith"), ("flip", "arith"), ("d2", "arith"), ("d4", "geom")])
def test_average_equals_views_one_by_one(name, mean):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(6))
    x = torch.randn(2, 3, 10, 10)
    model(x)
    views = [model(dihedral(x, k)).softmax(-1) for k, _ in tta_views(name)]
    if mean == "arith":
        expect = torch.stack(views).mean(0)
    else:
        g = torch.stack(views).log().mean(0).exp()
        expect = g / g.sum(-1, keepdim=True)
    torch.testing.assert_close(tta_predict(model, x, name, mean), expect)
    assert not torch.allclose(views[0], views[1])  # a random model is not invariant: the test has teeth


def test_scales_run_at_a_second_size():
    seen = []

    def forward(x):
        seen.append(x.shape[-1])
        return torch.zeros(x.shape[0], 3)

    p = tta_predict(forward, torch.zeros(2, 3, 64, 64), "d4+scales")
    assert sorted(set(seen)) == [64, 72] and p.shape == (2, 3)
    assert len(tta_views("d4+scales")) == 16 and len(tta_views("none")) == 1


@pytest.mark.parametrize("name", ["flip", "d4", "d4+scales"])
def test_stacked_views_equal_one_forward_per_view(name):
    """The GPU path puts every view of a scale in one batch: the same probabilities as one forward per view."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one_by_one = tta_predict(model, x, name)
        stacked = tta_predict(model, x, name, stack=True)
    torch.testing.assert_close(stacked, one_by_one, atol=1e-5, rtol=1e-4)
