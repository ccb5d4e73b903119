"""`make gpu-check` (scripts/gpu-check.sh): the GPU data path measured in one call on a lent GPU, side by side.

For each model and size: the bare model's forward+backward images/s on one batch already on the device, the device
data path alone (tensor_aug from the uploaded uint8 cache), a full training epoch of 4,750 images through both (the
pipeline/bare ratio, seconds per epoch), prediction views/s without and with stacked d4 TTA, and peak GPU memory;
then one shortened fold end to end on a generated competition (weights: none, the machine has no network).
Writes gpu-check.json and prints the table. `--dry-run`: the same code at toy sizes on CPU (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import timm
import torch

from seedlings import paths
from seedlings.data.demo import make_demo
from seedlings.data.device_batches import DeviceBatches
from seedlings.precision import choose_precision, scaler_for
from seedlings.predict.tta import tta_predict
from seedlings.recipe.choices import CROP_SCALE
from seedlings.recipe.load import load_recipe
from seedlings.recipe.schema import CACHE_MARGIN
from seedlings.run import Run
from seedlings.train.fit import train_fold
from seedlings.train.step import autocast, train_step

FULL = {"models": {"tf_efficientnet_lite0": 128, "convnext_small": 64}, "sizes": (224, 320, 384), "images": 4750}
DRY = {"models": {"test_efficientnet": 8}, "sizes": (32,), "images": 48}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(device: torch.device, fn, repeat: int) -> float:
    """Seconds per call of fn, after one warm-up call (cuDNN autotuning, compilation)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def measure(model_name: str, batch: int, size: int, n_images: int, device: torch.device, steps: int) -> dict:
    """One row of the table: bare, loader, full epoch, prediction, memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    precision = choose_precision("auto", device)  # what a recipe's precision: auto trains in on this device
    scaler = scaler_for(precision, device)
    model = timm.create_model(model_name, num_classes=12).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, y) -> None:  # the pipeline's own training step
        train_step(model, optimizer, criterion, x, y, device, precision.train, scaler)

    side = int(round(size * CACHE_MARGIN))
    cache = np.random.default_rng(0).integers(0, 256, (n_images, side, side, 3), dtype=np.uint8)
    made = DeviceBatches(cache, np.arange(n_images), np.arange(n_images) % 12, size, (0.5,) * 3, (0.5,) * 3,
                         CROP_SCALE, 0, 0, batch, device, precision.train or torch.float32,
                         drop_last=True)  # fmt: skip
    x0, y0 = next(made.epoch(0))
    bare = batch / seconds_per_call(device, lambda: step(x0, y0), steps)
    batches = iter(made.epoch(1))
    loader = batch / seconds_per_call(device, lambda: next(batches), min(steps, len(made) - 2))

    def epoch() -> None:
        for x, y in made.epoch(2):
            step(x, y)

    epoch_s = seconds_per_call(device, epoch, 1)  # the warm-up epoch tunes cuDNN for every shape; the second is timed
    full = len(made) * batch / epoch_s
    model.eval()
    with torch.no_grad(), autocast(device, precision.infer):
        plain = batch / seconds_per_call(device, lambda: model(x0), steps)
        d4 = 8 * batch / seconds_per_call(device, lambda: tta_predict(model, x0, "d4", stack=True), max(1, steps // 4))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {
        "model": model_name, "size": size, "batch": batch, "bare_img_s": bare, "loader_img_s": loader,
        "epoch_img_s": full, "ratio": full / bare, "epoch_s_4750": 4750 / full, "predict_views_s": plain,
        "predict_d4_views_s": d4, "peak_gib": peak,
    }  # fmt: skip


def end_to_end(out: Path, dry: bool, device: torch.device) -> dict:
    """One fold of a generated competition, configs/gpu.yaml shortened, weights none: seconds for the whole fold."""
    data = out / "demo-comp"
    if not data.exists():
        make_demo(data, per_class=5 if dry else 60, seed=0, max_size=300 if dry else 600)
    overrides = ["pretrained=none", "bn_stats=batch", "tta=d4", "compile=false"]
    if dry:
        overrides += ["model=test_efficientnet", "batch_size=8", "num_workers=0",
                      "stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
                      " {size: 32, freeze: false, lr: 0.001, cycle_len: 1}]"]  # fmt: skip
    else:
        overrides += ["model=convnext_small", "stages.1.cycle_len=1", "stages.1.n_cycles=1", "stages.1.warmup=0",
                      "stages.2.cycle_len=1", "stages.3.cycle_len=1"]  # fmt: skip
    recipe = load_recipe(paths.REPO / "configs" / "gpu.yaml", overrides)
    start = time.perf_counter()
    final = train_fold(Run("gpu-check", data, recipe), 0)
    return {"fold_seconds": time.perf_counter() - start, "val_f1": final["val_f1"], "device": str(device)}


def table(rows: list[dict]) -> str:
    head = (f"{'model':<22} {'px':>4} {'bare img/s':>11} {'loader img/s':>13} {'epoch img/s':>12} {'ratio':>6} "
            f"{'s/4750':>7} {'views/s':>9} {'d4 views/s':>11} {'peak GiB':>9}")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model']:<22} {r['size']:>4} {r['bare_img_s']:>11.0f} {r['loader_img_s']:>13.0f} "
            f"{r['epoch_img_s']:>12.0f} {r['ratio']:>6.2f} {r['epoch_s_4750']:>7.2f} {r['predict_views_s']:>9.0f} "
            f"{r['predict_d4_views_s']:>11.0f} {r['peak_gib']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="seedlings.lab.gpu_check", description=__doc__)
    p.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check.json (and the generated data)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on whatever device is there (tests)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan = DRY if args.dry_run else FULL
    steps = 2 if args.dry_run else 20
    rows = []
    for model_name, batch in plan["models"].items():
        for size in plan["sizes"]:
            rows.append(measure(model_name, batch, size, plan["images"], device, steps))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    precision = choose_precision("auto", device).why
    result = {"device": card, "torch": torch.__version__, "precision": precision, "rows": rows,
              "fold": end_to_end(out, args.dry_run, device)}  # fmt: skip
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1))
    print(f"\n{card}, torch {torch.__version__}, precision {precision}\n{table(rows)}")
    print(f"one shortened fold end to end: {result['fold']['fold_seconds']:.0f} s; {out / 'gpu-check.json'}")
    return result


if __name__ == "__main__":
    main()
