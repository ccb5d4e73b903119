"""What an SGDR stage trains and on what, one trainee per stage kind (recipe.schema.STAGE_KINDS): the network on
augmented images, the head alone on precomputed pooled features, or the layers after the frozen groups on their
precomputed maps. A solved head has no epochs (features.fit_head). fit_fold, the LR finder and the benchmark build
them with `trainee_for`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedlings.data.loaders import batch_slices
from seedlings.errors import UserError
from seedlings.optim import is_norm_param, param_groups
from seedlings.recipe.schema import BODY_ON_MAPS, HEAD_ON_FEATURES, NETWORK, Stage, lrs_of
from seedlings.train.features import FrozenCut, features_for
from seedlings.train.fold import FoldContext, eval_loader, training_batches, view_probs
from seedlings.train.step import bf16_forwards


class Trainee:
    """A stage's training: its parameter groups (each layer group at its own peak rate), its batches per epoch and
    their count, the forward from a batch to logits, the modules' train mode, and its validation probabilities."""

    mixes = False  # mixup and cutmix of its batches (images or maps; pooled features are not mixed)
    steps_per_epoch: int

    def __init__(self, ctx: FoldContext, stage_i: int):
        self.ctx, self.stage_i, self.stage = ctx, stage_i, ctx.recipe.stages[stage_i]
        self.lrs = lrs_of(self.stage.lr, ctx.recipe.layer_groups)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def val_batches(self) -> Iterator:
        """The validation images as this stage's inputs, in order."""
        raise NotImplementedError

    def train_mode(self) -> None:
        network_train_mode(self.ctx, self.stage)

    def val_probs(self) -> np.ndarray:
        self.ctx.model.eval()
        return view_probs(self.ctx, self.forward, self.val_batches())[0].numpy()


class BodyTrainee(Trainee):
    """A stage that trains layers of the body: every layer group after the first `frozen_groups` (with freeze, the
    head and the norms' affine parameters), mixing its batches when the recipe mixes."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        super().__init__(ctx, stage_i)
        recipe, stage = ctx.recipe, self.stage
        self.param_groups = param_groups(ctx.model, ctx.groups, self.lrs, recipe.weight_decay, stage.freeze,
                                         recipe.train_bn, stage.frozen_groups)  # fmt: skip
        self.mixes = bool(recipe.mixup_alpha or recipe.cutmix_alpha)


class WholeNet(BodyTrainee):
    """An SGDR stage on augmented images through the network."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        super().__init__(ctx, stage_i)
        recipe = ctx.recipe
        self.batches, self.steps_per_epoch = training_batches(ctx, self.stage.size)
        self.net = torch.compile(ctx.model) if recipe.compile else ctx.model
        frozen = {n for names in ctx.groups[: self.stage.frozen_groups] for n in names}
        # on a CPU with native bf16 the frozen groups run in bf16 (a GPU trains the whole network in bf16 or fp16)
        self.bf16_modules = outermost_within(ctx.model, frozen) if ctx.precision.frozen_bf16 else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with bf16_forwards(self.bf16_modules, self.ctx.device):
            return self.net(x)

    def val_batches(self) -> Iterator:
        return iter(eval_loader(self.ctx, self.stage.size, self.ctx.val_idx))


class AfterFrozenMaps(BodyTrainee):
    """An SGDR stage whose frozen groups (`frozen_groups`) ran once, not once per epoch (`precompute` without
    `freeze`): their output for the 8 dihedral views of every image is computed once (features.FrozenCut), and each
    epoch trains the layers after them on one view of each image, drawn by (seed, fold, epoch); mixup and cutmix mix
    those maps. The views are the whole of its augmentation: no crop, no colour jitter."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        super().__init__(ctx, stage_i)
        self.cut = FrozenCut.of(ctx, stage_i)
        self.maps = self.cut.train_maps()  # now, in eval mode: before any epoch sets the train mode
        self.steps_per_epoch = len(batch_slices(len(ctx.train_idx), ctx.recipe.batch_size))
        self.forward = self.cut.top

    def batches(self, epoch: int) -> Iterator:
        ctx, recipe = self.ctx, self.ctx.recipe
        rng = np.random.default_rng([recipe.seed, ctx.fold, epoch])
        rows = ctx.train_idx[rng.permutation(len(ctx.train_idx))]
        views = rng.integers(0, self.maps.shape[1], len(rows))
        for s in batch_slices(len(rows), recipe.batch_size):
            yield self.maps[rows[s], views[s]].float(), torch.from_numpy(ctx.train_targets(rows[s]))

    def val_batches(self) -> Iterator:
        return self.cut.view_batches(self.maps, self.ctx.val_idx, 0)


class HeadOnFeatures(Trainee):
    """An SGDR stage of the classifier alone on pooled features precomputed once (fast.ai's precompute=True): the
    frozen backbone runs once per image, not once per epoch."""

    def __init__(self, ctx: FoldContext, stage_i: int):
        super().__init__(ctx, stage_i)
        recipe = ctx.recipe
        self.head = ctx.model.get_classifier()
        feats = features_for(ctx, stage_i)
        head_names = {f"{ctx.model.default_cfg['classifier']}.{n}" for n, _ in self.head.named_parameters()}
        if head_names != set(ctx.groups[-1]):
            raise UserError(f"stages.{stage_i}.precompute: the head group of {recipe.model} holds more than its "
                            "classifier; use precompute: false")  # fmt: skip
        self.param_groups = param_groups(ctx.model, ctx.groups, self.lrs, recipe.weight_decay, freeze=True,
                                         train_bn=False)  # fmt: skip
        n_views = feats.shape[1]
        self.x_train = feats[ctx.train_idx].reshape(-1, feats.shape[-1])  # each view a sample of its own
        self.y_train = torch.from_numpy(np.repeat(ctx.train_targets(ctx.train_idx), n_views, axis=0))
        self.x_val = feats[ctx.val_idx, 0]  # the image as it is
        self.steps_per_epoch = -(-len(self.x_train) // recipe.batch_size)

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

    def val_batches(self) -> Iterator:
        return iter([(self.x_val, None)])

    def val_probs(self) -> np.ndarray:
        self.head.eval()
        return view_probs(self.ctx, self.head, self.val_batches())[0].numpy()


TRAINEES = {NETWORK: WholeNet, HEAD_ON_FEATURES: HeadOnFeatures, BODY_ON_MAPS: AfterFrozenMaps}  # by stage kind


def trainee_for(ctx: FoldContext, stage_i: int) -> Trainee:
    """What stage `stage_i` trains (a stage with epochs), as fit_fold builds it: the LR finder and the benchmark too."""
    kind = ctx.recipe.stages[stage_i].kind
    if kind not in TRAINEES:
        raise UserError(f"stages.{stage_i}: a {kind} has no epochs to train")
    return TRAINEES[kind](ctx, stage_i)


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
