"""The optimizer and its parameter groups: one pair per layer group (weights decayed; biases and norms not), the
frozen groups left out, each group at its own peak learning rate (differential learning rates)."""

from __future__ import annotations

import torch
from torch import nn


def is_norm_param(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def param_groups(
    model: nn.Module,
    groups: list[list[str]],
    lrs: list[float],
    weight_decay: float,
    freeze: bool,
    train_bn: bool = True,
    frozen_groups: int = 0,
) -> list[dict]:
    """Optimizer groups: one pair per layer group (decayed weights; biases and norms without decay).

    freeze: only the head (last group) trains; like fast.ai, the norm layers of frozen groups keep training their
    affine parameters when train_bn. frozen_groups: the first k groups train nothing at all (norms included), so no
    gradient needs to flow into them.
    """
    params = dict(model.named_parameters())
    out = []
    for g, (names, lr) in enumerate(zip(groups, lrs)):
        head = g == len(groups) - 1
        trainable = [n for n in names if not freeze or head or (train_bn and is_norm_param(model, n))]
        if g < frozen_groups:
            trainable = []
        for n in names:
            params[n].requires_grad_(n in trainable)
        decay = [params[n] for n in trainable if params[n].ndim > 1]
        no_decay = [params[n] for n in trainable if params[n].ndim <= 1]
        out.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "layer_group": g})
        out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "layer_group": g})
    return out


def sgd(groups: list[dict], momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=groups[-1]["lr"], momentum=momentum, nesterov=True)


def adamw(groups: list[dict], momentum: float) -> torch.optim.Optimizer:
    # fused: one kernel for every parameter's update instead of a loop of small ones (CUDA tensors only)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=groups[-1]["lr"], betas=(momentum, 0.999), fused=on_cuda or None)


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}  # the `optimizer` choices; momentum is SGD's, or AdamW's beta1


def make_optimizer(name: str, groups: list[dict], momentum: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over param_groups' groups (each at its layer group's peak rate)."""
    return OPTIMIZERS[name](groups, momentum)
