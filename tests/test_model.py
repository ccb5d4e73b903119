import pytest
import timm
import torch

from seedlings import optim as O
from seedlings.errors import UserError
from seedlings.recipe.load import load_recipe
from seedlings.train import model as M


@pytest.mark.parametrize(
    "name,n_tensors,width",
    [("tf_efficientnet_lite0", 296, 1280), ("tf_efficientnet_lite1", 386, 1280), ("tf_efficientnet_lite2", 386, 1280)],
)
def test_bundled_weights_land_in_every_tensor(name, n_tensors, width):
    import importlib

    module, cls = M.BUNDLED[name]
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = M.create_model(load_recipe(None, [f"model={name}", "pretrained=bundled"]), num_classes=12)
    own = model.state_dict()
    mapped = M.bundled_state_dict(name)
    assert len(mapped) == len(source) == n_tensors
    landed = 0
    for src, (dst_key, dst) in zip(source.values(), mapped.items()):
        assert torch.equal(src, dst)
        if not dst_key.startswith("classifier"):
            assert torch.equal(own[dst_key], src), dst_key
            landed += 1
    assert landed == n_tensors - 2  # all but the 1000-class classifier, replaced by a new 12-class head
    assert own["classifier.weight"].shape == (12, width)
    assert M.model_mean_std(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_bundled_only_for_packaged_models():
    with pytest.raises(UserError, match="pretrained"):
        M.create_model(load_recipe(None, ["model=resnet18", "pretrained=bundled"]), 12)


def test_hub_offline_is_a_clear_error(monkeypatch):
    real = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    monkeypatch.setattr(M.timm, "create_model", offline)
    with pytest.raises(UserError, match="pretrained: none"):
        M.create_model(load_recipe(None, ["model=resnet18", "pretrained=hub"]), 12)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_file(tmp_path, suffix):
    src = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    model = M.create_model(load_recipe(None, ["model=test_resnet", f"pretrained={path}"]), 12)
    assert torch.equal(
        model.conv1[0].weight if hasattr(model.conv1, "__getitem__") else model.conv1.weight,
        src.conv1[0].weight if hasattr(src.conv1, "__getitem__") else src.conv1.weight,
    )


def test_bad_weights_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.pth"):
        M.create_model(load_recipe(None, ["model=test_resnet", f"pretrained={bad}"]), 12)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), other)
    with pytest.raises(UserError, match="other.pth"):
        M.create_model(load_recipe(None, ["model=test_resnet", f"pretrained={other}"]), 12)
    with pytest.raises(UserError, match="not found"):
        M.create_model(load_recipe(None, ["model=test_resnet", f"pretrained={tmp_path / 'none.pth'}"]), 12)


@pytest.mark.parametrize("name,head", [
    ("tf_efficientnet_lite0", {"classifier.weight", "classifier.bias"}),
    ("resnet18", {"fc.weight", "fc.bias"}),
    ("convnext_atto", {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}),
    ("vit_tiny_patch16_224", {"head.weight", "head.bias"}),
])  # fmt: skip
@pytest.mark.parametrize("n", [2, 3, 4])
def test_layer_groups_across_families(name, head, n):
    model = timm.create_model(name, num_classes=12)
    groups = M.layer_groups(model, n)
    names = [p for p, _ in model.named_parameters()]
    assert len(groups) == n and all(groups)
    assert sorted(p for g in groups for p in g) == sorted(names)  # disjoint and complete
    assert set(groups[-1]) == head
    order = {p: i for i, p in enumerate(names)}
    assert max(order[p] for p in groups[0]) < min(order[p] for p in groups[1])  # earliest layers first


def test_freeze_trains_head_and_norms_only():
    model = timm.create_model("test_efficientnet", num_classes=12)
    groups = M.layer_groups(model, 3)
    opt_groups = O.param_groups(model, groups, [1e-3, 1e-2, 1e-1], 1e-4, freeze=True, train_bn=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups[-1]) <= trainable
    assert all(O.is_norm_param(model, n) for n in trainable - set(groups[-1]))
    assert any("bn" in n for n in trainable)
    assert {g["layer_group"]: g["lr"] for g in opt_groups} == {0: 1e-3, 1: 1e-2, 2: 1e-1}
    assert all(g["weight_decay"] == 0 for g in opt_groups if any(p.ndim <= 1 for p in g["params"]))
    O.param_groups(model, groups, [1e-3] * 3, 1e-4, freeze=False)
    assert all(p.requires_grad for p in model.parameters())
    O.param_groups(model, groups, [1e-3] * 3, 1e-4, freeze=True, train_bn=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(groups[-1])
