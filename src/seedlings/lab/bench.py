"""`make bench`: throughput measured side by side in one run, reported as ratios (absolute numbers are this machine's).

Loader rows: images/s of (a) a naive loader that decodes each PNG with PIL every time and applies torchvision
transforms, against (b) the decode-once cache with the albumentations pipeline. Training row: images/s of a training
step fed by the full pipeline, against the bare model's forward+backward on tensors already in memory. Cache build row:
a full-size stand-in's plant-masked cache decoded by one process against one per core.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seedlings import paths
from seedlings.data.cache import build_cache, load_cache
from seedlings.data.competition import scan_competition
from seedlings.data.demo import make_demo
from seedlings.data.full_size import make_full_size
from seedlings.data.loaders import CachedImages, EpochSampler, make_loader, train_transform
from seedlings.optim import make_optimizer
from seedlings.precision import cpu_has_bf16
from seedlings.recipe.choices import CROP_SCALE
from seedlings.recipe.load import load_recipe
from seedlings.recipe.schema import CACHE_MARGIN
from seedlings.run import Run
from seedlings.train.engine import OnnxForward
from seedlings.train.fold import prepare_fold
from seedlings.train.model import body_sequence, frozen_prefix, layer_groups
from seedlings.train.step import autocast, train_step
from seedlings.train.trainees import trainee_for

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class NaivePNG(Dataset):
    """What a first notebook does: open the PNG with PIL for every sample, every epoch."""

    def __init__(self, files: list[Path], size: int):
        from torchvision import transforms as T

        self.files = files
        self.tf = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(CROP_SCALE, 1)),
                T.RandomHorizontalFlip(),
                T.RandomVerticalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.tf(Image.open(self.files[i]).convert("RGB")), 0


def images_per_s(loader, n_batches: int) -> float:
    seen, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(loader):
        seen += len(x)
        if i + 1 >= n_batches:
            break
    return seen / (time.perf_counter() - start)


def loader_row(name: str, data: Path, size: int, n_images: int) -> dict:
    comp = scan_competition(data)
    files = [comp.train_path(f) for f in comp.train_files][:n_images]
    n_batches = max(1, len(files) // 32)
    naive = DataLoader(NaivePNG(files, size), batch_size=32, shuffle=True, num_workers=0)
    start = time.perf_counter()
    cache = load_cache(comp, "train", int(size * CACHE_MARGIN))
    build = time.perf_counter() - start
    ds = CachedImages(cache.images, np.arange(len(files)), np.zeros(len(files), int), train_transform(size, MEAN, STD))
    cached = make_loader(ds, 32, torch.device("cpu"), EpochSampler(len(ds), 0, 0), num_workers=0)
    images_per_s(cached, 1)  # warm the page cache of the memmap like any later epoch
    a, b = images_per_s(naive, n_batches), images_per_s(cached, n_batches)
    return {
        "data": name,
        "median side": int(np.median([Image.open(f).size[0] for f in files])),
        "naive": a,
        "cached": b,
        "ratio": b / a,
        "cache build s": build,
    }


def training_row(
    data: Path, size: int, n_batches: int, augment: str = "albumentations", extra: tuple[str, ...] = ()
) -> dict:
    """The pipeline's training step (step.train_step on what train_fold's stage trains) fed by the full pipeline,
    against the same step repeated on one batch already in memory. extra: recipe overrides (a model, a stage)."""
    stages = f"stages=[{{size: {size}, freeze: false, lr: 0.001}}]"
    recipe = load_recipe(None, [stages, "optimizer=adamw", f"augment={augment}", *extra])
    ctx = prepare_fold(Run("bench", data, recipe), 0)
    trainee = trainee_for(ctx, 0)
    optimizer = make_optimizer(recipe.optimizer, trainee.param_groups, recipe.momentum)
    criterion = torch.nn.CrossEntropyLoss()

    def step(x, y) -> None:
        # .item(): wait for it
        train_step(trainee.forward, optimizer, criterion, x, y, ctx.device, ctx.precision.train).item()

    trainee.train_mode()
    x0, y0 = next(iter(trainee.batches(0)))
    step(x0, y0)  # warm-up
    bare_start = time.perf_counter()
    for _ in range(n_batches):
        step(x0, y0)
    bare = n_batches * len(x0) / (time.perf_counter() - bare_start)
    full_start, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(trainee.batches(1)):
        step(x, y)
        seen += len(x)
        if i + 1 >= n_batches:
            break
    full = seen / (time.perf_counter() - full_start)
    return {"augment": augment, "size": size, "bare model": bare, "full pipeline": full, "ratio": full / bare}


def frozen_groups_table(data: Path, n_batches: int, model: str = "tf_efficientnet_lite2", size: int = 160) -> None:
    """Training images/s of the pipeline's step with the first k of 5 layer groups frozen (stages.k.frozen_groups):
    no gradient flows into frozen groups, and on a CPU the early, high-resolution layers hold most of the backward.
    Each row twice: float32 throughout, and the frozen groups' forward in bf16 (what `precision: auto` does on a CPU
    with native bf16; the same on one without)."""
    rows = []
    for k in (0, 1, 2, 3):
        stage = f"stages=[{{size: {size}, freeze: false, lr: 0.001, frozen_groups: {k}}}]"
        extra = (f"model={model}", "layer_groups=5", stage)
        fp32, bf16 = (
            training_row(data, size, n_batches, "albumentations", (*extra, f"precision={p}")) for p in ("fp32", "auto")
        )
        rows.append((k, fp32["full pipeline"], bf16["full pipeline"]))
    print(f"\ntraining images/s, {model} at {size} px, batch 32, 5 layer groups: the first k frozen (native bf16 on "
          f"this CPU: {cpu_has_bf16()})")  # fmt: skip
    print(f"{'frozen groups':>13} {'float32':>8} {'vs none frozen':>15} {'frozen in bf16':>15} {'vs float32':>11}")
    none = rows[0][1]
    for k, fp32, bf16 in rows:
        print(f"{k:>13} {fp32:>8.1f} {fp32 / none:>15.2f} {bf16:>15.1f} {bf16 / fp32:>11.2f}")


def inference_row(model: str, size: int, n_batches: int) -> dict:
    """Forward-only images/s (prediction, validation, features) of `model`: float32 and bf16 autocast on the same
    batch, each timed twice in turn and its faster pass kept (this CPU's float32 speed wanders by a third)."""
    net = timm.create_model(model, num_classes=12).eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last)
    out = {"float32": 0.0, "bf16": 0.0}
    with torch.no_grad():
        for name, bf16 in (("float32", False), ("bf16", True)) * 2:
            with autocast(torch.device("cpu"), torch.bfloat16 if bf16 and cpu_has_bf16() else None):
                net(x)  # warm-up
                start = time.perf_counter()
                for _ in range(n_batches):
                    net(x)
            out[name] = max(out[name], n_batches * len(x) / (time.perf_counter() - start))
    return out


def engine_rows(n_batches: int, model: str = "tf_efficientnet_lite2") -> list[dict]:
    """Forward-only images/s through fixed weights, torch float32 (channels_last, as the pipeline runs it) against
    onnxruntime (recipe key `engine`), on one batch of 64, each timed twice in turn and its faster pass kept: the
    frozen groups that configs/cpu.yaml precomputes (3 of 5) at 192 px, and the whole network at 224 px (a
    `predict_size` variant). Export s: torch's export plus the session's start, paid once per graph."""
    net = timm.create_model(model, num_classes=12).eval().to(memory_format=torch.channels_last)
    trunk = nn.Sequential(
        *[m for _, m in body_sequence(net, "bench")[: frozen_prefix(net, layer_groups(net, 5), 3, "bench")]]
    )
    rows = []
    for name, module, size in (("frozen groups 1-3", trunk, 192), ("whole network", net, 224)):
        x = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last)
        onnx = OnnxForward(module)
        start = time.perf_counter()
        onnx(x[:2])
        export = time.perf_counter() - start
        best = {"torch": 0.0, "onnx": 0.0}
        with torch.no_grad():
            for engine, forward in (("torch", module), ("onnx", onnx)) * 2:
                forward(x)  # warm-up
                start = time.perf_counter()
                for _ in range(n_batches):
                    forward(x)
                best[engine] = max(best[engine], n_batches * len(x) / (time.perf_counter() - start))
        rows.append({"what": f"{name}, {size} px", **best, "export s": export})
    return rows


def memory_format_row(size: int, n_batches: int) -> dict:
    """Bare tf_efficientnet_lite0 training steps, NCHW against channels_last, same batch."""
    out = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", num_classes=12).to(memory_format=fmt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(32, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, 12, (32,))
        for i in range(n_batches + 1):
            if i == 1:
                start = time.perf_counter()  # the first step warms up
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out["channels_last" if fmt == torch.channels_last else "NCHW"] = n_batches * 32 / (time.perf_counter() - start)
    return out


def cache_build_row(source: Path | None, quick: bool) -> dict:
    """Seconds to build the 192 px plant-masked cache (cpu.yaml's) of a full-size stand-in's training photos (the
    source's real photos upsampled, or drawn plants): decoded by one process, then by one per core."""
    folder = paths.root() / "data" / f"bench-full-size-{'quick' if quick else 'f03'}"
    if not folder.exists():
        make_full_size(folder, 0.015 if quick else 0.03, seed=2, source=source)
    comp, cores = scan_competition(folder), os.cpu_count() or 1
    seconds = {}
    with tempfile.TemporaryDirectory(dir=paths.cache_dir().parent) as tmp:
        for workers in (1, cores):
            start = time.perf_counter()
            build_cache(comp, "train", 192, False, Path(tmp, f"{workers}.u8"), Path(tmp, f"{workers}.json"), "dim",
                        workers)  # fmt: skip
            seconds[workers] = time.perf_counter() - start
    return {"photos": len(comp.train_files), "cores": cores, "one": seconds[1], "all": seconds[cores]}


def bench(data: Path | None = None, quick: bool = False) -> None:
    """data: a competition folder of real images (docs/results.md's figures use ../shared/data/seedlings-150); without
    it only generated large images are measured."""
    torch.manual_seed(0)
    rows = []
    if data is not None:
        rows.append(loader_row(f"{Path(data).name} (real)", Path(data), 128, 128 if quick else 640))
    large = paths.root() / "data" / "bench-large"
    if not large.exists():
        make_demo(large, per_class=2 if quick else 4, seed=1, min_size=1000, max_size=1600)
    rows.append(loader_row("demo, large images", large, 128, 64 if quick else 192))
    print("\nloader images/s at 128 px, batch 32, 1 process (same machine, same run)")
    print(f"{'data':<22} {'median px':>9} {'(a) naive PIL':>14} {'(b) cached':>11} {'b/a':>6} {'cache build s':>14}")
    for row in rows:
        print(
            f"{row['data']:<22} {row['median side']:>9} {row['naive']:>14.1f} {row['cached']:>11.1f} "
            f"{row['ratio']:>6.1f} {row['cache build s']:>14.1f}"
        )
    c = cache_build_row(Path(data) if data is not None else None, quick)
    print(f"\ncache build, {c['photos']} full-size photos (49 to 2,800 px) at 192 px with the plant mask, seconds")
    print(f"{'1 process':>10} {c['cores']:>2} processes {'ratio':>6}")
    print(f"{c['one']:>10.1f} {c['all']:>12.1f} {c['one'] / c['all']:>6.2f}")
    source = Path(data) if data is not None else large
    rows = [training_row(source, 128, 3 if quick else 12, augment) for augment in ("albumentations", "tensor")]
    print(f"\ntraining images/s, tf_efficientnet_lite0 at 128 px, batch 32, {torch.get_num_threads()} threads")
    print(f"{'batches made by':<16} {'bare forward+backward':>22} {'full pipeline':>14} {'ratio':>6}")
    for t in rows:
        print(f"{t['augment']:<16} {t['bare model']:>22.1f} {t['full pipeline']:>14.1f} {t['ratio']:>6.2f}")
    frozen_groups_table(source, 2 if quick else 6)
    r = inference_row("tf_efficientnet_lite2", 160, 2 if quick else 6)
    print(f"\nprediction images/s, tf_efficientnet_lite2 at 160 px, batch 64 (native bf16: {cpu_has_bf16()})")
    print(f"{'float32':>8} {'bf16':>8} {'ratio':>6}")
    print(f"{r['float32']:>8.1f} {r['bf16']:>8.1f} {r['bf16'] / r['float32']:>6.2f}")
    print("\nforwards through fixed weights, images/s, tf_efficientnet_lite2, batch 64: torch float32 against "
          "onnxruntime (engine)")  # fmt: skip
    print(f"{'forward':<26} {'torch':>7} {'onnx':>7} {'ratio':>6} {'export s':>9}")
    for e in engine_rows(1 if quick else 3):
        print(
            f"{e['what']:<26} {e['torch']:>7.1f} {e['onnx']:>7.1f} {e['onnx'] / e['torch']:>6.2f} {e['export s']:>9.1f}"
        )
    m = memory_format_row(128, 2 if quick else 6)
    print("\nbare training images/s at 128 px, batch 32: memory format")
    print(f"{'NCHW':>10} {'channels_last':>14} {'ratio':>6}")
    print(f"{m['NCHW']:>10.1f} {m['channels_last']:>14.1f} {m['channels_last'] / m['NCHW']:>6.2f}")
