"""A run is one value (data, name, folds, recipe), checked against its recorded recipe once, and the owner of its files:
runs/<run>/config.yaml, its members' weights and their probabilities.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from seedlings import paths
from seedlings.data.competition import Competition, parallel_map, scan_competition
from seedlings.data.folds import default_folds_path, load_folds
from seedlings.defaults import FOLD_SEED, N_FOLDS
from seedlings.errors import UserError
from seedlings.recipe import schema
from seedlings.recipe.load import dump_yaml, recipe_from_dict
from seedlings.recipe.saved import differences, read_config
from seedlings.recipe.schema import FREE_KEYS, PROVENANCE_KEYS, SPLIT_KEYS, Recipe, recipe_dict
from seedlings.storage import file_sha256, read_json, write_json, write_text

KEYS_ADDED_LATER = ("teacher", "distill")  # after runs recorded their training key (checkpoints name it)


def check_name(name: str, flag: str = "--run") -> None:
    """A run's (or a sweep's) name: a folder under runs/, never outside it."""
    if not name or any(not part or part.startswith(".") for part in name.split("/")):
        raise UserError(f"{flag}: {name!r} is not a usable folder name under runs/")


@dataclass(frozen=True)
class Run:
    name: str
    data: Path
    recipe: Recipe
    n_folds: int = N_FOLDS
    fold_seed: int = FOLD_SEED

    def __post_init__(self) -> None:
        if not 2 <= self.n_folds <= 100:
            raise UserError(f"--n-folds: must be in [2, 100], got {self.n_folds}")
        if not 0 <= self.fold_seed < 2**32:
            raise UserError(f"--fold-seed: must be in [0, {2**32 - 1}], got {self.fold_seed}")
        check_name(self.name)

    @cached_property
    def comp(self) -> Competition:
        """The competition folder, scanned once per command (train/, test/ and the sample checked against it)."""
        return scan_competition(self.data)

    @cached_property
    def fold_table(self) -> pd.DataFrame:
        """file, species, fold of every training image, in the competition's file order (made when missing)."""
        return load_folds(self.comp, self.n_folds, self.fold_seed)

    @property
    def dir(self) -> Path:
        return paths.run_dir(self.name)

    @property
    def config_path(self) -> Path:
        return self.dir / paths.CONFIG

    def fold_dir(self, fold: int) -> Path:
        return paths.full_dir(self.name) if fold == self.full else paths.fold_dir(self.name, fold)

    def folds(self) -> list[int]:
        """The folds this run's recipe trains, predicts and blends."""
        return self.recipe.folds(self.n_folds)

    @property
    def pseudo_path(self) -> Path:
        """pseudo.csv (file, species, probability): test images this run trains on as well (a pseudo-label round)."""
        return self.dir / "pseudo.csv"

    @property
    def full(self) -> int:
        """The index of the model on every training image (full_fit): its seeds, and no image of its in validation."""
        return self.n_folds

    def models(self) -> list[int]:
        """What the chain trains: the recipe's folds, then the full fit when the recipe asks for it."""
        return self.folds() + ([self.full] if self.recipe.full_fit else [])

    def check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.n_folds:
            raise UserError(f"--fold: {fold} is not in 0..{self.n_folds - 1}")

    def is_trained(self, fold: int) -> bool:
        return (self.fold_dir(fold) / paths.DONE).exists()

    @property
    def data_record_path(self) -> Path:
        """What the run was trained on: size, mtime and sha256 of every image, and the folds file's sha256."""
        return self.dir / paths.DATA_RECORD

    def training_key(self) -> str:
        """A short hash of what shapes the run's models: the recipe less the free keys, and the split."""
        default = recipe_dict(Recipe())  # keys added since: at their default they leave the key as it was
        trained = {k: v for k, v in recipe_dict(self.recipe).items()
                   if k not in FREE_KEYS and not (k in KEYS_ADDED_LATER and v == default[k])}  # fmt: skip
        legacy = {"auto": True, "fp32": False}  # precision as the bf16 key it replaced: runs keep their keys
        if trained.get("precision") in legacy:
            trained["bf16"] = legacy[trained.pop("precision")]
        key = json.dumps([trained, self.n_folds, self.fold_seed], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:10]

    def check(self) -> None:
        """Exit 2 naming every recorded key this run's recipe or split differs in (prediction-only keys may differ:
        each prediction records its own), or what changed in its training images or folds since it was trained."""
        saved = read_config(self.config_path)
        if saved is None:
            return
        recorded = self.data_record().get("config_sha256")
        if recorded and file_sha256(self.config_path) != recorded:
            raise UserError(f"{self.config_path}: not the config this run recorded (cut short or edited); restore it, "
                            f"or delete runs/{self.name} to train the run again")  # fmt: skip
        self.check_config(saved)
        self.check_data()

    def check_config(self, saved: dict) -> None:
        split = {k: getattr(self, k) for k in SPLIT_KEYS}
        diffs = [f"--{k.replace('_', '-')} {saved[k]} (given {v})" for k, v in split.items() if saved.get(k, v) != v]
        ignored = (*FREE_KEYS, *SPLIT_KEYS, *PROVENANCE_KEYS)
        now = {k: v for k, v in recipe_dict(self.recipe).items() if k not in ignored}
        # a key the recipe gained after the run was recorded ran at its default then
        old = {**{k: v for k, v in recipe_dict(Recipe()).items() if k not in ignored}, **saved}
        old = {k: v for k, v in old.items() if k not in ignored}
        diffs += [f"{key}: {a!r} (given {b!r})" for key, a, b in differences(old, now)]
        if diffs:
            raise UserError(
                f"{self.config_path}: run {self.name!r} was trained with {'; '.join(diffs)}; "
                f"use those values, another RUN, or delete runs/{self.name}"
            )

    def record(self) -> None:
        """Write config.yaml (the resolved recipe, the split, git commit, data) and data.json unless there already."""
        if self.config_path.exists():
            return
        extra = {"n_folds": self.n_folds, "fold_seed": self.fold_seed, "git_commit": git_commit()}
        extra["data"] = str(Path(self.data).resolve())
        comp = self.comp
        record = {split: digests(comp, split, {}) for split in ("train", "test")}
        record["folds"] = file_sha256(default_folds_path(comp, self.n_folds, self.fold_seed))
        if self.pseudo_path.exists():
            record["pseudo"] = file_sha256(self.pseudo_path)
        config = dump_yaml({**recipe_dict(self.recipe), **extra}, sort_keys=False)
        record["config_sha256"] = hashlib.sha256(config.encode()).hexdigest()  # a config.yaml cut short is told
        write_json(self.data_record_path, record)
        write_text(self.config_path, config)

    def check_data(self) -> None:
        """The training images and the folds file must be those the run was trained on: a model of other images
        would be blended and graded as if it were of these."""
        recorded = self.data_record()
        comp = self.comp
        changes = describe_changes(recorded["train"], digests(comp, "train", recorded["train"]))
        if changes:
            raise UserError(
                f"{self.data / 'train'}: the training images changed since run {self.name!r} was trained ({changes});"
                f" start a new RUN, or delete runs/{self.name} to train it again"
            )
        pseudo = file_sha256(self.pseudo_path) if self.pseudo_path.exists() else None
        if pseudo != recorded.get("pseudo"):
            raise UserError(f"{self.pseudo_path}: not the pseudo-labels run {self.name!r} was trained with (changed or "
                            f"missing); delete runs/{self.name} to train the round again")  # fmt: skip
        folds = default_folds_path(comp, self.n_folds, self.fold_seed)
        if folds.exists() and file_sha256(folds) != recorded["folds"]:
            raise UserError(f"{folds}: not the folds run {self.name!r} was trained with; start a new RUN")

    def data_record(self) -> dict:
        """data.json: what the run was trained on. Missing beside a recorded config.yaml, or damaged, the run's
        training data can no longer be checked: exit 2 (training on unchecked data would blend other images' models)."""
        fix = f"delete runs/{self.name} to train the run again"
        if not self.data_record_path.exists():
            raise UserError(f"{self.data_record_path}: missing, so the training images of run {self.name!r} cannot be "
                            f"checked; {fix}")  # fmt: skip
        return read_json(self.data_record_path, "record of the run's data", fix, ("train", "test", "folds"))

    def test_key(self) -> str:
        """A short hash of the test images' contents: predictions of other test images are made again."""
        recorded = self.data_record()["test"] if self.config_path.exists() else {}
        now = digests(self.comp, "test", recorded)
        return hashlib.sha256(json.dumps(sorted((f, d[2]) for f, d in now.items())).encode()).hexdigest()[:12]

    def variant_keys(self, keys: tuple[str, ...] = schema.VARIANT_KEYS) -> dict:
        """The prediction and blend keys (or `keys` of them) this run is opened with at other values than its
        config.yaml recorded: {} for the run's own predictions, and for a run not recorded yet."""
        saved = read_config(self.config_path)
        if saved is None:
            return {}
        default, now = recipe_dict(Recipe()), recipe_dict(self.recipe)
        return {k: now[k] for k in keys if saved.get(k, default[k]) != now[k]}

    @cached_property
    def variant(self) -> str:
        """The chain's variant, named by the keys that differ (`tta=d4+scales`); "": the run's own chain. Its
        members' variant (member_variant) is named by the prediction keys alone: a blend key changes none."""
        return paths.variant_name(self.variant_keys())

    @cached_property
    def member_variant(self) -> str:
        return paths.variant_name(self.variant_keys(schema.PREDICTION_KEYS))

    @property
    def submission_path(self) -> Path:
        return paths.submission_path(self.name)

    def snapshot_path(self, fold: int, stage: int, cycle: int) -> Path:
        """The weights at the end of SGDR cycle `cycle` of stage `stage` (one file per cycle: the snapshot ensemble's
        members, and where a later stage or the LR finder starts from)."""
        return self.fold_dir(fold) / paths.SNAPSHOTS / f"{snapshot_name(stage, cycle)}.pt"

    def final_path(self, fold: int) -> Path:
        """The fold's weights when training ended."""
        return self.fold_dir(fold) / paths.FINAL


def snapshot_name(stage: int, cycle: int) -> str:
    return f"stage{stage}-cycle{cycle}"


def open_run(
    name: str,
    data: str | Path,
    recipe: Recipe,
    n_folds: int = N_FOLDS,
    fold_seed: int = FOLD_SEED,
    fold: int | None = None,
) -> Run:
    """The run of every stage's command line, checked against what it recorded (and the fold against the split)."""
    run = Run(name, Path(data), recipe, n_folds, fold_seed)
    if fold is not None:
        run.check_fold(fold)
    run.check()
    return run


def saved_run(
    name: str,
    data: str | Path | None = None,
    n_folds: int | None = None,
    fold_seed: int | None = None,
    variant: dict | None = None,
) -> Run:
    """A run opened with the recipe it recorded (blending another run into a submission, grading one), or with
    `variant`'s prediction and blend keys in place of its own; the data and split it recorded unless given (given
    ones must match)."""
    saved = read_config(paths.run_dir(name) / paths.CONFIG)
    if saved is None:
        raise UserError(f"{paths.run_dir(name) / paths.CONFIG}: run {name!r} not found (train it first)")
    other = set(variant or {}) - set(schema.VARIANT_KEYS)
    if other:
        raise UserError(f"{', '.join(sorted(other))}: not a prediction or blend key; run {name!r} keeps the recipe "
                        "it was trained with")  # fmt: skip
    recipe = recipe_from_dict({**{k: v for k, v in saved.items() if k not in SPLIT_KEYS + PROVENANCE_KEYS},
                               **(variant or {})})  # fmt: skip
    data = data if data is not None else saved.get("data", ".")
    n_folds = n_folds if n_folds is not None else saved.get("n_folds", N_FOLDS)
    fold_seed = fold_seed if fold_seed is not None else saved.get("fold_seed", FOLD_SEED)
    return open_run(name, data, recipe, n_folds, fold_seed)


def digests(comp: Competition, split: str, known: dict[str, list]) -> dict[str, list]:
    """{file: [bytes, mtime_ns, sha256]} of a split; files whose size and mtime match `known` keep its hash."""
    files, folder = comp.split(split)
    stats = {f: (folder / f).stat() for f in files}
    out = {f: [st.st_size, st.st_mtime_ns] for f, st in stats.items()}
    for f, entry in out.items():
        if f in known and known[f][:2] == entry:
            entry.append(known[f][2])
    todo = [f for f, entry in out.items() if len(entry) == 2]
    for f, digest in zip(todo, parallel_map(file_sha256, [folder / f for f in todo], desc=f"hash {split}")):
        out[f].append(digest)
    return out


def describe_changes(before: dict[str, list], after: dict[str, list]) -> str:
    """'2 added (e.g. a.png), 1 removed (e.g. b.png), 1 changed (e.g. c.png)', or '' when the contents are equal."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(f for f in set(before) & set(after) if before[f][2] != after[f][2])
    parts = [f"{len(fs)} {what} (e.g. {fs[0]})" for fs, what in ((added, "added"), (removed, "removed"),
             (changed, "changed")) if fs]  # fmt: skip
    return ", ".join(parts)


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=paths.REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=paths.REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
