"""Out-of-fold and test probabilities with TTA, for every fold and every snapshot of its last stage."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from seedlings import paths
from seedlings.cache import load_cache
from seedlings.config import Recipe
from seedlings.errors import UserError
from seedlings.train import Fold, autocast, eval_loader, prepare_fold, to_device
from seedlings.tta import tta_predict


def fold_members(run: str, fold: int, recipe: Recipe) -> list[tuple[str, Path]]:
    """(name, weights) to predict with: the cycle-end snapshots of the last stage, whose last one is the final model."""
    out = paths.fold_dir(run, fold)
    if not (out / "done.json").exists():
        raise UserError(f"{out}: fold {fold} of run {run!r} is not trained yet (make train FOLD={fold})")
    last = len(recipe.stages) - 1
    snaps = sorted((out / "snapshots").glob(f"stage{last}-cycle*.pt"), key=lambda p: int(p.stem.split("cycle")[1]))
    if recipe.snapshots and snaps:
        return [(p.stem, p) for p in snaps]
    return [("final", out / "final.pt")]


def probs_dir(run: str) -> Path:
    return paths.run_dir(run) / "probs"


@dataclass
class Member:
    """One model's probabilities: `oof` on its fold's validation images, `test` on every test image."""

    run: str
    fold: int
    name: str  # stage<s>-cycle<c> or final

    @property
    def stem(self) -> Path:
        return probs_dir(self.run) / f"fold{self.fold}-{self.name}"

    def load(self, split: str) -> np.ndarray:
        return np.load(f"{self.stem}.{split}.npy")

    def load_files(self, split: str) -> list[str]:
        return pd.read_csv(f"{self.stem}.{split}.csv", usecols=["file"]).file.tolist()


@torch.no_grad()
def tta_probs(fd: Fold, images: np.ndarray | None, index: np.ndarray, size: int, tta: str) -> np.ndarray:
    model = fd.model.eval()
    out = []
    for x, _ in tqdm(eval_loader(fd, size, index, images), desc=f"predict {tta}", leave=False, disable=None):
        with autocast(fd):
            out.append(tta_predict(model, to_device(fd, x), tta, fd.recipe.tta_mean).float().cpu())
    return torch.cat(out).numpy()


def save_probs(stem: Path, split: str, probs: np.ndarray, files: list[str], classes: list[str]) -> None:
    """<stem>.<split>.npy and the same as a CSV with file names and class columns (written atomically)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{stem}.{split}.tmp{os.getpid()}.npy")
    np.save(tmp, probs.astype(np.float32))
    df = pd.DataFrame(probs, columns=classes)
    df.insert(0, "file", files)
    df.to_csv(f"{stem}.{split}.csv.tmp", index=False, float_format="%.6g", lineterminator="\n")
    os.replace(f"{stem}.{split}.csv.tmp", f"{stem}.{split}.csv")
    tmp.replace(f"{stem}.{split}.npy")


def predict_fold(recipe: Recipe, data: str | Path, run: str, fold: int, n_folds: int, fold_seed: int) -> list[Member]:
    """Probabilities of each member of one fold; members whose outputs are newer than their weights are skipped."""
    members = fold_members(run, fold, recipe)
    size = recipe.eval_size
    todo = []
    for name, weights in members:
        m = Member(run, fold, name)
        meta = Path(f"{m.stem}.json")
        want = {
            "weights_mtime_ns": weights.stat().st_mtime_ns,
            "tta": recipe.tta,
            "tta_mean": recipe.tta_mean,
            "size": size,
        }
        if not (meta.exists() and json.loads(meta.read_text()).get("inputs") == want):
            todo.append((m, weights, meta, want))
    if not todo:
        return [Member(run, fold, n) for n, _ in members]
    fd = prepare_fold(recipe, data, run, fold, n_folds, fold_seed)
    test = load_cache(fd.comp, "test", recipe.cache_size, recipe.skip_bad_images)
    val_files = [fd.comp.train_files[i] for i in fd.val_idx]
    for m, weights, meta, want in todo:
        fd.model.load_state_dict(torch.load(weights, map_location=fd.device, weights_only=True))
        start = time.perf_counter()
        oof = tta_probs(fd, None, fd.val_idx, size, recipe.tta)
        test_probs = tta_probs(fd, test.images, np.arange(len(test.files)), size, recipe.tta)
        seconds = time.perf_counter() - start
        save_probs(m.stem, "oof", oof, val_files, fd.comp.classes)
        save_probs(m.stem, "test", test_probs, test.files, fd.comp.classes)
        if m.name == members[-1][0] and recipe.tta != "none":  # the single model without TTA, for comparison
            save_probs(m.stem, "oof-notta", tta_probs(fd, None, fd.val_idx, size, "none"), val_files, fd.comp.classes)
        n_views = {"none": 1, "flip": 2, "d4": 8, "d4+scales": 16}[recipe.tta]
        info = {
            "inputs": want,
            "seconds": seconds,
            "images": len(oof) + len(test_probs),
            "images_per_s": (len(oof) + len(test_probs)) / seconds,
            "views": n_views,
            "classes": fd.comp.classes,
        }
        Path(meta).write_text(json.dumps(info, indent=1))
        print(
            f"fold {fold} {m.name}: {info['images']} images x {n_views} views in {seconds:.1f}s "
            f"({info['images_per_s']:.1f} images/s)"
        )
    return [Member(run, fold, n) for n, _ in members]


def predict_run(
    recipe: Recipe, data: str | Path, run: str, n_folds: int = 5, fold_seed: int = 0, folds: list[int] | None = None
) -> list[Member]:
    members = []
    for fold in folds if folds is not None else recipe.folds(n_folds):
        members += predict_fold(recipe, data, run, fold, n_folds, fold_seed)
    return members
