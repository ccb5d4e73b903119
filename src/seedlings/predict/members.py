"""A run's members (each fold's snapshots or final weights, and the full fit's) and their probabilities: one CSV
format, checked against what predict recorded; weights checked against what their fold recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seedlings import paths
from seedlings.errors import UserError
from seedlings.run import Run, snapshot_name
from seedlings.storage import Probs, file_sha256, load_probs, read_json, save_probs
from seedlings.train.checkpoint import recorded_weights


@dataclass(frozen=True)
class Member:
    """One model of a run: a fold's snapshot (stage<s>-cycle<c>) or final weights, and its saved probabilities
    (`oof` on its fold's validation images, `test` on every test image, `oof-notta` without TTA)."""

    run: str
    fold: int
    name: str
    weights: Path
    full: bool = False  # the model on every training image (full_fit): test probabilities only
    variant: str = ""  # the prediction keys its probabilities were made with, where not the run's own (Run.variant)

    @property
    def label(self) -> str:
        return f"full-{self.name}" if self.full else f"fold{self.fold}-{self.name}"

    @property
    def dir(self) -> Path:
        return paths.full_dir(self.run) if self.full else paths.fold_dir(self.run, self.fold)

    def probs_path(self, split: str) -> Path:
        return paths.probs_file(paths.probs_dir(self.run, self.variant), self.label, split)

    @property
    def meta_path(self) -> Path:
        """What the probabilities were made from (weights, TTA, size), and how long it took."""
        return paths.probs_dir(self.run, self.variant) / f"{self.label}.json"

    @property
    def retrain(self) -> str:
        """The one command that repairs a fold whose weights are gone or wrong (its done.json says it is finished)."""
        which = f"RUN={self.run}" if self.full else f"RUN={self.run} FOLD={self.fold}"
        return f"rm -r {self.dir} && make train {which} trains it again"

    def state_dict(self, device="cpu") -> dict:
        """The member's weights, checked against the sha256 its fold recorded (weights.json) when it saved them: a
        missing, damaged or copied file exits 2 naming it and the command that trains the fold again."""
        return recorded_weights(self.dir, self.weights, f"fold {self.fold} of run {self.run!r}", self.retrain, device)

    def load(self, split: str) -> Probs:
        """Saved probabilities, checked against the sha256 predict recorded: a damaged file is never blended."""
        path = self.probs_path(split)
        fix = f"make predict RUN={self.run}{f' ARGS={self.variant_args}' if self.variant else ''} predicts it again"
        if self.meta_path.exists() and path.exists():
            recorded = read_json(self.meta_path, "record of a prediction", fix, ("sha256",))["sha256"].get(split)
            if recorded is not None and file_sha256(path) != recorded:
                raise UserError(f"{path}: not the probabilities predict wrote (cut short or edited); {fix}")
        return load_probs(path)

    @property
    def variant_args(self) -> str:
        """The variant's keys as make's ARGS: 'tta=d4+scales predict_size=224'."""
        return f'"{self.variant.replace(",", " ")}"'

    def save(self, split: str, probs: Probs) -> None:
        save_probs(self.probs_path(split), probs)


def run_members(run: Run, fold: int | None = None) -> list[Member]:
    """The models to predict with, of one fold or of every trained fold: the last stage's cycle-end snapshots (the
    last of which is the final model), or the final model alone when snapshots are off."""
    folds = run.models() if fold is None else [fold]
    last = len(run.recipe.stages) - 1
    variant = run.member_variant
    out = []
    for k in folds:
        if not run.is_trained(k):
            if fold is not None:
                raise UserError(f"{run.fold_dir(k)}: fold {k} of run {run.name!r} is not trained yet "
                                f"(make train FOLD={k})")  # fmt: skip
            continue
        if run.recipe.snapshots:
            out += [Member(run.name, k, snapshot_name(last, c), run.snapshot_path(k, last, c), k == run.full, variant)
                    for c in range(run.recipe.stages[last].cycles)]  # fmt: skip
        else:
            out.append(Member(run.name, k, "final", run.final_path(k), k == run.full, variant))
    return out
