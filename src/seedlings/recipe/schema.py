"""A recipe: typed dataclasses with every key's unit, role (trains / predicts / runs) and allowed range; load.py
reads them from YAML files and key=value overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from seedlings.errors import UserError
from seedlings.recipe.choices import CROP_SCALE, ENGINES, OPTIMIZERS, PLANT_MASKS, PRECISIONS, TTA, TTA_MEANS

LR = float | list | dict  # one number | one per group (earliest first) | {max, mult}, like fast.ai's slice
CACHE_MARGIN = 1.15  # cached side / largest size used: random crops of a 1.15x image keep their detail

# A key's role, declared once beside it (field metadata): the run check, free keys and prediction keys derive from it
TRAINS = "trains"  # shapes the trained models: a trained run refuses another value
PREDICTS = "predicts"  # changes predictions only: recorded with each prediction, which is made again when it changes
RUNS = "runs"  # changes how the pipeline runs (which folds, loader processes, the LR finder), never a model


def predicts(default: Any) -> Any:
    return field(default=default, metadata={"role": PREDICTS})


def runs(default: Any) -> Any:
    return field(default=default, metadata={"role": RUNS})


# What a stage trains, and on what: its kind, read from its keys (freeze, precompute, frozen_groups, fit) here only;
# train/trainees.py gives each kind that trains by epochs its trainee
SOLVED_HEAD = "solved head"  # fit: logistic (with freeze and precompute): the classifier solved on pooled features
HEAD_ON_FEATURES = "head on features"  # freeze and precompute: SGDR epochs of the classifier on pooled features
NETWORK = "network"  # no precompute: SGDR on augmented images through the network (freeze: only the head and norms
#   train; else every layer group after the first `frozen_groups`)
BODY_ON_MAPS = "body on maps"  # precompute with frozen_groups: SGDR of the layers after the frozen groups, on their
#   outputs for the 8 dihedral views of every image, computed once
STAGE_KINDS = (SOLVED_HEAD, HEAD_ON_FEATURES, NETWORK, BODY_ON_MAPS)


@dataclass
class Stage:
    """One SGDR schedule at one image size."""

    size: int = 128  # px, square side of the training crop and of evaluation
    freeze: bool = False  # true: train only the head (last layer group)
    precompute: bool = False  # with freeze: compute pooled backbone features once, train the head on them; with
    #   frozen_groups (EfficientNet family): the frozen groups' maps of the 8 dihedral views of each image computed
    #   once, the later layers trained on one view per image and epoch (no crop or colour jitter; docs/recipe.md)
    lr: LR = 1.0e-3  # peak learning rate of each cycle (see LR above)
    n_cycles: int = 1  # cosine cycles with warm restarts
    cycle_len: int = 1  # epochs in the first cycle
    cycle_mult: int = 1  # each cycle is this many times longer than the one before
    warmup: float = 0.0  # epochs of linear warm-up at the stage's start (the first cycle's cosine follows it)
    frozen_groups: int = 0  # with freeze: false, the first k layer groups stay frozen, norm layers too: no gradient
    #   flows into them (on a CPU most of the backward time: make bench's table in docs/results.md)
    fit: str = "sgdr"  # sgdr: epochs of SGDR | logistic: (precompute only) the head solved to convergence on the
    #   features by multinomial logistic regression, L2 strength chosen by cross-validation (seconds, no epochs)

    @property
    def kind(self) -> str:
        """One of STAGE_KINDS (validate refuses the combinations that are none of them)."""
        if self.fit == "logistic":
            return SOLVED_HEAD
        if not self.precompute:
            return NETWORK
        return HEAD_ON_FEATURES if self.freeze else BODY_ON_MAPS

    @property
    def cycles(self) -> int:
        """SGDR cycles the stage runs, each ending in a snapshot; a solved head is one."""
        return 1 if self.kind == SOLVED_HEAD else self.n_cycles


@dataclass
class Recipe:
    """Everything a run needs; every field a recipe may set."""

    model: str = "tf_efficientnet_lite0"  # any timm model name
    pretrained: str = "bundled"  # bundled | hub | path/to/weights.(pth|safetensors) | none
    drop_rate: float = 0.25  # dropout before the classifier (fast.ai's ps)
    drop_path_rate: float = 0.0  # stochastic depth: each residual block skipped with up to this probability (timm)
    ema: float = 0.0  # decay per step of an exponential moving average of the weights a stage trains (timm's
    #   --model-ema-decay; 0.99: about the last 100 steps): validation and snapshots read it, a stage ends on it; 0: off
    mixup_alpha: float = 0.0  # mixup: training images blended in pairs, weight ~ Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # cutmix: a box of one image pasted into another, area ~ Beta(alpha, alpha); 0: off
    #   (both on: each batch takes one of them at even odds; neither touches a precomputed-features stage)
    plant_mask: str = "none"  # none | green: the cached images keep only the green plant (HSV threshold, the gravel
    #   and soil set to black), as many competitors did; every stage, TTA and probe sees the masked image | dim: the
    #   gravel and soil kept at a quarter of their brightness (cache.BACKGROUND)
    batch_size: int = 32  # images per optimizer step
    optimizer: str = "adamw"  # sgd (momentum, nesterov) | adamw (SGD collapsed at fast.ai's rates: docs/history.md)
    momentum: float = 0.9  # SGD momentum (adamw: beta1)
    weight_decay: float = 1.0e-2  # decoupled (AdamW) or L2 (SGD) per step; not on biases and norm layers
    label_smoothing: float = 0.1  # cross-entropy target smoothing, 0 to 1
    layer_groups: int = 3  # parameter groups for differential learning rates (early body, late body, head)
    seed: int = 0  # training seed: weights init, shuffling, augmentation
    tta: str = predicts("d4")  # used by predict: none | flip | d2 (4 views) | d4 (8) | d4+scales (16)
    tta_mean: str = predicts("arith")  # arith | geom: how TTA copies' probabilities are averaged
    predict_size: int = predicts(0)  # px of prediction (TTA); 0: the last stage's size. Random crops zoom in during
    #   training, so a model often scores best a little above its training size (FixRes)
    pseudo_label: float = runs(0.0)  # > 0: after the chain, a second round trained on the training images plus the
    #   test images whose blended probability reaches this (their predicted species as label; the test pixels,
    #   never test labels), written as submissions/<run>-pseudo.csv, the chain's answer; 0: off
    full_fit: bool = runs(False)  # true: after the folds, one more model on every training image with the same
    #   schedule (fast.ai's final fit): its test probabilities join the blend as one more fold's (no out-of-fold score)
    train_folds: int = runs(0)  # 0: train every fold; k: only the first k folds (fewer models, each trained longer)
    specialist: str = runs("")  # a recipe file whose `classes` are a few confused species (configs/grass.yaml): its
    #   folds train on those species' images only and, where the blend's top classes are exactly them, their share of
    #   the blend's probability is divided as the specialist divides it (out of fold too: each fold by its own model);
    #   "": none
    teacher: list[str] = field(default_factory=list)  # distillation: finished runs on the same data and folds whose
    #   probabilities (each fold's final model on its own training images, the mean of the 8 dihedral views; the runs
    #   averaged) are mixed into the training targets; fold k learns from the teachers' fold k, trained without fold
    #   k's images, so the out-of-fold score stays honest; a solved head learns the labels alone; []: none
    distill: float = 0.0  # with teacher: the teachers' share of each training target (the label has the rest)
    calibrate: str = runs("none")  # none | bias: the blend's log-probabilities rescaled by one temperature plus a bias
    #   per class, fitted by log loss on the out-of-fold probabilities and applied to the test ones (mixup, cutmix and
    #   label smoothing leave a blend under-confident and leaning to the large classes; docs/recipe.md)
    tracking: str = runs("none")  # none | mlflow: every run, fold, epoch and chain logged on MLflow (a SQLite store in
    #   runs/mlflow.db, or the server MLFLOW_TRACKING_URI names, which turns tracking on by itself)
    validate: str = runs("epoch")  # epoch: the validation images scored after every epoch (the loss plots; a sweep's
    #   pruner always gets every epoch's score) | cycle: only after each SGDR cycle's last epoch, where the snapshots
    #   the chain blends are taken (per-epoch validation was 66 s of the default chain's 372 s of training on a
    #   2-core CPU)
    stages: list[Stage] = field(default_factory=lambda: [Stage()])  # run in order
    classes: list[str] = field(default_factory=list)  # the species this run learns (a specialist's); empty: every
    #   species. Its folds train and validate on those species' images, and predict every image over them
    crop_scale: float = CROP_SCALE  # RandomResizedCrop's smallest area fraction
    cache_margin: float = CACHE_MARGIN  # cached side = largest stage size x this, so crops keep detail
    precompute_d4: bool = False  # precompute: add the 8 dihedral copies of each image as fixed samples (8x the
    #   feature time; the solved head is only a warm start)
    num_workers: int = runs(-1)  # loader worker processes; -1: none on CPU (the model needs both cores), 8 on CUDA
    compile: bool = False  # torch.compile the model (CUDA)
    precision: str = "auto"  # auto: bf16 on a GPU that computes it natively (compute capability 8.0+), fp16 with a
    #   gradient scaler on older GPUs (T4, V100, P100); on a CPU float32 training, the forwards without gradients
    #   (features, validation, prediction, a stage's frozen groups) in bf16 where it computes bf16 natively
    #   (AVX512-BF16, AMX) | bf16 | fp16 (gradient scaler; skipped steps counted in metrics.csv) | fp32. Refused where
    #   the device cannot compute it. Replaces `bf16` (true: auto, false: fp32), still read with a note
    engine: str = runs("auto")  # the forwards through fixed weights (frozen maps, features, prediction through the
    #   network): onnx (onnxruntime, CPU, float32) | torch | auto: onnx on a CPU computing float32 (train/engine.py)
    train_bn: bool = True  # frozen stages: norm layers of frozen groups still train their affine parameters
    head_c: float = 0.0  # fit: logistic stages: inverse L2 strength on standardised features; 0: chosen by
    #   cross-validated log loss (a calibrated head, docs/history.md: the transition)
    bn_stats: str = "frozen"  # frozen: batch norms keep their pretrained running statistics in every stage (eval
    #   mode), so the features the head was fitted on do not shift when the body starts training | batch: torch's
    #   default, normalise by batch statistics and update the running ones
    augment: str = "auto"  # where training batches are made: albumentations (CPU loader processes) | tensor (batched
    #   tensor operations on the model's device, the cache uploaded once) | auto: tensor on CUDA, albumentations on CPU
    skip_bad_images: bool = False  # true: unreadable images are listed and skipped; false: exit 2 naming the file
    snapshots: bool = True  # save weights at the end of every cycle for snapshot ensembles
    lr_find_start: float = runs(1.0e-7)  # LR finder sweep start
    lr_find_end: float = runs(10.0)  # LR finder sweep end
    lr_find_steps: int = runs(100)  # LR finder steps

    @property
    def max_size(self) -> int:
        return max([s.size for s in self.stages] + [self.predict_size])

    @property
    def eval_size(self) -> int:
        """px at which predict runs: predict_size, or the last stage's size."""
        return self.predict_size or self.stages[-1].size

    def folds(self, n_folds: int) -> list[int]:
        """The folds this recipe trains, predicts and blends."""
        return list(range(min(self.train_folds, n_folds) if self.train_folds else n_folds))

    @property
    def cache_size(self) -> int:
        return int(round(self.max_size * self.cache_margin))


def keys_with_role(role: str) -> tuple[str, ...]:
    """The Recipe keys of one role (TRAINS, PREDICTS or RUNS); a key without one trains."""
    return tuple(f.name for f in dataclasses.fields(Recipe) if f.metadata.get("role", TRAINS) == role)


PREDICTION_KEYS = keys_with_role(PREDICTS)
BLEND_KEYS = ("calibrate",)  # runs-role keys that change only how the chain blends its members' probabilities
# a trained run predicted or blended with other values of these is a variant: its probabilities and blend go beside
# the run's own (runs/<run>/probs/<variant>/), never over them
VARIANT_KEYS = (*PREDICTION_KEYS, *BLEND_KEYS)
FREE_KEYS = (*PREDICTION_KEYS, *keys_with_role(RUNS))  # a trained run may be opened with these changed
# a run's config.yaml holds its recipe and these: the split (fold k of another split is another model) and provenance
# (for the reader, never compared: a data folder may move)
SPLIT_KEYS = ("n_folds", "fold_seed")
PROVENANCE_KEYS = ("git_commit", "data")


MAX_SIZE = 1024  # px, largest training or prediction size: the cache then holds 4,750 images at 1,178 px (20 GB)

# [low, high] of every number a recipe holds (None: no bound); a value outside exits 2 naming the key
RANGES: dict[str, tuple[float | None, float | None]] = {
    "drop_rate": (0.0, 0.95),
    "batch_size": (1, 4096),
    "momentum": (0.0, 0.999),
    "weight_decay": (0.0, 1.0),
    "label_smoothing": (0.0, 0.5),
    "layer_groups": (1, 16),
    "seed": (0, 2**32 - 1),  # numpy's and torch's seeds are unsigned 32-bit
    "predict_size": (0, MAX_SIZE),
    "train_folds": (0, None),
    "crop_scale": (0.01, 1.0),
    "drop_path_rate": (0.0, 0.9),
    "ema": (0.0, 0.99999),
    "mixup_alpha": (0.0, 10.0),
    "pseudo_label": (0.0, 0.9999),
    "cutmix_alpha": (0.0, 10.0),
    "distill": (0.0, 1.0),
    "cache_margin": (1.0, 2.0),
    "num_workers": (-1, 256),
    "head_c": (0.0, 1e6),
    "lr_find_start": (1e-12, 1.0),
    "lr_find_end": (1e-6, 1000.0),
    "lr_find_steps": (4, 100_000),
}
STAGE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "size": (16, MAX_SIZE),
    "n_cycles": (1, 100),
    "cycle_len": (1, 1000),
    "cycle_mult": (1, 10),
    "warmup": (0.0, None),
    "frozen_groups": (0, 15),
}
STAGE_CHOICES = {
    "fit": ("sgdr", "logistic"),
}
CHOICES = {  # each choice key's values (recipe/choices.py: those a table elsewhere gives their behaviour)
    "optimizer": OPTIMIZERS,
    "tta": TTA,
    "tta_mean": TTA_MEANS,
    "bn_stats": ("frozen", "batch"),
    "augment": ("auto", "albumentations", "tensor"),
    "plant_mask": PLANT_MASKS,
    "calibrate": ("none", "bias"),
    "validate": ("epoch", "cycle"),
    "tracking": ("none", "mlflow"),
    "precision": PRECISIONS,
    "engine": ENGINES,
}


def check_range(key: str, value: float, low: float | None, high: float | None) -> None:
    def shown(v: float | None, unbounded: str) -> str:
        return unbounded if v is None else str(v) if isinstance(v, int) else f"{v:g}"

    if (low is not None and value < low) or (high is not None and value > high):
        raise UserError(f"{key}: must be in [{shown(low, '-inf')}, {shown(high, 'inf')}], got {shown(value, '')}")


def validate(recipe: Recipe) -> None:
    """Every range, choice and combination a recipe must respect; the first broken one exits 2 naming its key."""

    def bad(key: str, why: str) -> None:
        raise UserError(f"{key}: {why}")

    for key, (low, high) in RANGES.items():
        check_range(key, getattr(recipe, key), low, high)
    for key, allowed in CHOICES.items():
        if getattr(recipe, key) not in allowed:
            bad(key, f"expected {' or '.join(allowed)}, got {getattr(recipe, key)!r}")
    if recipe.pretrained not in ("bundled", "hub", "none") and not recipe.pretrained.endswith(
        (".pth", ".pt", ".safetensors")
    ):
        bad("pretrained", f"expected bundled, hub, none or a .pth/.safetensors path, got {recipe.pretrained!r}")
    if 0 < recipe.predict_size < 16:
        bad("predict_size", f"must be 0 (the last stage's size) or at least 16 px, got {recipe.predict_size}")
    if 0 < recipe.ema < 0.5:
        bad("ema", f"0 (off) or a decay in [0.5, 1), got {recipe.ema:g}")
    if 0 < recipe.pseudo_label < 0.5:
        bad("pseudo_label", f"0 (off) or a confidence in [0.5, 1), got {recipe.pseudo_label:g}")
    if recipe.lr_find_start >= recipe.lr_find_end:
        bad("lr_find_start", f"must be below lr_find_end ({recipe.lr_find_end:g}), got {recipe.lr_find_start:g}")
    if recipe.bn_stats == "frozen" and recipe.pretrained == "none":
        bad("bn_stats", "frozen keeps pretrained statistics, and pretrained: none has none; use bn_stats: batch")
    if recipe.classes and (len(recipe.classes) < 2 or len(set(recipe.classes)) != len(recipe.classes)):
        bad("classes", f"two species or more, each once, got {recipe.classes}")
    if recipe.classes and (recipe.specialist or recipe.pseudo_label or recipe.full_fit):
        bad("classes", "a specialist (a run of some classes) has no specialist, pseudo-labels or full fit of its own")
    if bool(recipe.teacher) != (recipe.distill > 0):
        bad("distill", f"a share in (0, 1] with a teacher, 0 without; got {recipe.distill:g}, teacher {recipe.teacher}")
    if not recipe.stages:
        bad("stages", "at least one stage is needed")
    for i, stage in enumerate(recipe.stages):
        _validate_stage(recipe, i, stage)


def _validate_stage(recipe: Recipe, i: int, s: Stage) -> None:
    key = f"stages.{i}"
    for name, (low, high) in STAGE_RANGES.items():
        check_range(f"{key}.{name}", getattr(s, name), low, high)
    if not s.warmup < s.cycle_len:
        raise UserError(f"{key}.warmup: must be in [0, cycle_len) epochs, got {s.warmup}")
    if s.frozen_groups >= recipe.layer_groups:
        raise UserError(f"{key}.frozen_groups: must be below layer_groups ({recipe.layer_groups}): the head trains, "
                        f"got {s.frozen_groups}")  # fmt: skip
    for name, allowed in STAGE_CHOICES.items():
        if getattr(s, name) not in allowed:
            raise UserError(f"{key}.{name}: expected {' or '.join(allowed)}, got {getattr(s, name)!r}")
    if s.kind == SOLVED_HEAD and not (s.precompute and s.freeze):
        raise UserError(f"{key}.fit: logistic needs freeze: true and precompute: true (it solves the head alone on "
                        "precomputed pooled features)")  # fmt: skip
    if s.kind == BODY_ON_MAPS and not s.frozen_groups:
        raise UserError(f"{key}.precompute: needs freeze: true or frozen_groups (what trains cannot be precomputed)")
    if isinstance(s.lr, list) and len(s.lr) != recipe.layer_groups:
        raise UserError(f"{key}.lr: has {len(s.lr)} values for {recipe.layer_groups} layer groups")
    if isinstance(s.lr, dict) and not 1 <= s.lr["mult"] <= 1000:
        raise UserError(f"{key}.lr.mult: must be in [1, 1000] (each earlier group's rate is the next one's / mult), "
                        f"got {s.lr['mult']:g}")  # fmt: skip
    for lr in lrs_of(s.lr, recipe.layer_groups):
        if not 0 < lr < 100:
            raise UserError(f"{key}.lr: every learning rate must be in (0, 100), got {lr}")


def lrs_of(lr: LR, n_groups: int) -> list[float]:
    """Peak learning rate per layer group, earliest group first."""
    if isinstance(lr, float):
        return [lr] * n_groups
    if isinstance(lr, list):
        return list(lr)
    return [lr["max"] / lr["mult"] ** (n_groups - 1 - g) for g in range(n_groups)]


def recipe_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
