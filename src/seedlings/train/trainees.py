"""What an SGDR stage trains and on what: the whole network on augmented images, the head alone on precomputed
features, or the layers after the frozen groups on their precomputed maps. fit_fold, the LR finder and the benchmark
build them with `trainee_for`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedlings.data.loaders import batch_slices
from seedlings.errors import UserError
from seedlings.optim import is_norm_param, param_groups
from seedlings.recipe.schema import Stage, lrs_of
from seedlings.train.features import FrozenCut, features_for
from seedlings.train.fold import FoldContext, eval_loader, predict_probs, training_batches
from seedlings.train.step import bf16_forwards


class WholeNet:
    """An SGDR stage on augmented images through the network (with freeze: the head and, with train_bn, the norm
    layers' affine parameters train; without it every layer group does, at its own learning rate)."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        recipe, stage = ctx.recipe, ctx.recipe.stages[stage_i]
        self.ctx, self.stage = ctx, stage
        lrs = lrs_of(stage.lr, recipe.layer_groups)
        self.param_groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, stage.freeze, recipe.train_bn,
                                         stage.frozen_groups)  # fmt: skip
        self.batches, self.steps_per_epoch = training_batches(ctx, stage.size)
        self.net = torch.compile(ctx.model) if recipe.compile else ctx.model
        self.mixes = bool(recipe.mixup_alpha or recipe.cutmix_alpha)
        frozen = {n for names in ctx.groups[: stage.frozen_groups] for n in names}
        # on a CPU the frozen groups run in bf16 (CUDA trains the whole network in bf16 already)
        self.bf16_modules = outermost_within(ctx.model, frozen) if ctx.device.type == "cpu" and recipe.bf16 else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with bf16_forwards(self.bf16_modules, self.ctx.device):
            return self.net(x)

    def train_mode(self) -> None:
        network_train_mode(self.ctx, self.stage)

    def val_probs(self) -> np.ndarray:
        self.ctx.model.eval()
        return predict_probs(self.ctx, self.forward, iter(eval_loader(self.ctx, self.stage.size, self.ctx.val_idx)))


def network_train_mode(ctx: FoldContext, stage: Stage) -> None:
    """Training mode, but the batch norms that must keep their running statistics in eval mode."""
    ctx.model.train()
    if ctx.recipe.bn_stats == "frozen":  # the features the head was fitted on stay the features it sees
        for m in ctx.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return
    if stage.freeze and not ctx.recipe.train_bn:  # frozen norm layers keep their running statistics too
        for m in frozen_norm_modules(ctx, len(ctx.groups) - 1):
            m.eval()
    elif stage.frozen_groups:  # so do the norms of the groups that stay frozen
        for m in frozen_norm_modules(ctx, stage.frozen_groups):
            m.eval()


def outermost_within(model: nn.Module, names: set[str]) -> list[nn.Module]:
    """The outermost submodules whose parameters are all in `names` (tf_efficientnet_lite2 with 3 of 5 groups frozen:
    conv_stem, bn1, blocks.0 to blocks.4)."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = [prefix + n for n, _ in module.named_parameters()]
        if params and all(n in names for n in params):
            found.append(module)
            return
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return found


def frozen_norm_modules(ctx: FoldContext, n_groups: int) -> list[nn.Module]:
    """The norm layers of the first n_groups layer groups."""
    names = {n.rsplit(".", 1)[0] for g in ctx.groups[:n_groups] for n in g if is_norm_param(ctx.model, n)}
    return [ctx.model.get_submodule(n) for n in sorted(names)]


class HeadOnFeatures:
    """An SGDR stage of the classifier alone on pooled features precomputed once (fast.ai's precompute=True): the
    frozen backbone runs once per image, not once per epoch."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        recipe = ctx.recipe
        self.ctx, self.head = ctx, ctx.model.get_classifier()
        feats = features_for(ctx, stage_i)
        head_names = {f"{ctx.model.default_cfg['classifier']}.{n}" for n, _ in self.head.named_parameters()}
        if head_names != set(ctx.groups[-1]):
            raise UserError(f"stages.{stage_i}.precompute: the head group of {recipe.model} holds more than its "
                            "classifier; use precompute: false")  # fmt: skip
        lrs = lrs_of(recipe.stages[stage_i].lr, recipe.layer_groups)
        self.param_groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, freeze=True, train_bn=False)
        n_views = feats.shape[1]
        self.x_train = feats[ctx.train_idx].reshape(-1, feats.shape[-1])  # each view a sample of its own
        self.y_train = torch.from_numpy(np.repeat(ctx.labels[ctx.train_idx], n_views))
        self.x_val = feats[ctx.val_idx, 0]  # the image as it is
        self.steps_per_epoch = -(-len(self.x_train) // recipe.batch_size)
        self.mixes = False  # pooled features are not images: nothing to mix

    def batches(self, epoch: int) -> Iterator:
        recipe = self.ctx.recipe
        order = np.random.default_rng([recipe.seed, self.ctx.fold, epoch]).permutation(len(self.x_train))
        for i in range(0, len(order), recipe.batch_size):
            j = torch.from_numpy(order[i : i + recipe.batch_size])
            yield self.x_train[j], self.y_train[j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(x, p=self.ctx.recipe.drop_rate, training=self.head.training))

    def train_mode(self) -> None:
        self.ctx.model.eval()
        self.head.train()

    def val_probs(self) -> np.ndarray:
        self.head.eval()
        return predict_probs(self.ctx, self.head, iter([(self.x_val, None)]))


class AfterFrozenMaps:
    """An SGDR stage whose frozen groups (`frozen_groups`) ran once, not once per epoch (`precompute` without
    `freeze`): their output for the 8 dihedral views of every image is computed once (features.FrozenCut), and each
    epoch trains the layers after them on one view of each image, drawn by (seed, fold, epoch); mixup and cutmix mix
    those maps. The views are the whole of its augmentation: no crop, no colour jitter."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        recipe, stage = ctx.recipe, ctx.recipe.stages[stage_i]
        self.ctx, self.stage = ctx, stage
        self.cut = FrozenCut.of(ctx, stage_i)
        self.maps = self.cut.train_maps()
        lrs = lrs_of(stage.lr, recipe.layer_groups)
        self.param_groups = param_groups(ctx.model, ctx.groups, lrs, recipe.weight_decay, False, recipe.train_bn,
                                         stage.frozen_groups)  # fmt: skip
        self.steps_per_epoch = len(batch_slices(len(ctx.train_idx), recipe.batch_size))
        self.mixes = bool(recipe.mixup_alpha or recipe.cutmix_alpha)
        self.forward = self.cut.top

    def batches(self, epoch: int) -> Iterator:
        ctx, recipe = self.ctx, self.ctx.recipe
        rng = np.random.default_rng([recipe.seed, ctx.fold, epoch])
        rows = ctx.train_idx[rng.permutation(len(ctx.train_idx))]
        views = rng.integers(0, self.maps.shape[1], len(rows))
        for s in batch_slices(len(rows), recipe.batch_size):
            yield self.maps[rows[s], views[s]].float(), torch.from_numpy(ctx.labels[rows[s]])

    def train_mode(self) -> None:
        network_train_mode(self.ctx, self.stage)

    def val_probs(self) -> np.ndarray:
        self.ctx.model.eval()
        return predict_probs(self.ctx, self.forward, self.cut.view_batches(self.maps, self.ctx.val_idx, 0))


def trainee_for(ctx: FoldContext, stage_i: int) -> WholeNet | HeadOnFeatures | AfterFrozenMaps:
    """What stage `stage_i` trains (an SGDR stage), as fit_fold builds it: the LR finder and the benchmark use it."""
    stage = ctx.recipe.stages[stage_i]
    if not stage.precompute:
        return WholeNet(ctx, stage_i)
    return HeadOnFeatures(ctx, stage_i) if stage.freeze else AfterFrozenMaps(ctx, stage_i)
