"""`make sweep`: recipes searched with Optuna. A sweep is a base recipe and a search space of recipe keys; its study
(study.py) lives in a storage every worker shares, and each trial is an ordinary run under the sweep
(runs/<sweep>/trial-<n>), trained by train_fold, which reports every epoch's validation micro-F1 to the pruner.
A trial's value, over its first `sweep_folds` folds: `fold`, the mean of their last-epoch validation micro-F1 (one
view, no blend); `chain`, the out-of-fold micro-F1 of what `make submit` would blend from them (TTA, snapshot
weights, calibration when it lowers the cross-fitted log loss). Held-out answers never choose.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning

from seedlings import paths
from seedlings.defaults import FOLD_SEED, N_FOLDS
from seedlings.errors import UserError
from seedlings.lab.holdout import ensure_holdout
from seedlings.lab.sweep.settings import GRACE_S, HEARTBEAT_S, OBJECTIVES, PRUNERS, shown
from seedlings.recipe.load import apply_override, dump_yaml, load_recipe, parse_value, read_yaml, recipe_from_dict
from seedlings.recipe.schema import FREE_KEYS, SOLVED_HEAD, Recipe, recipe_dict
from seedlings.run import Run, check_name
from seedlings.train.schedule import cycle_end_epochs

SETTINGS_BEFORE = {"objective": "fold"}  # what a study recorded before a setting existed ran with
MAX_RETRY = 3  # a trial whose worker died is retried this many times at most
COMBINATIONS = 256  # the space's combinations of bounds and choices tried before a study is made (all, up to this)


class TrialRefused(UserError):
    """A trial's recipe refused (its combination of the space's values): that trial fails and the sweep goes on."""


class KnownFailures(logging.Filter):
    """Optuna logs every failed trial with its traceback; a refused or interrupted trial has its own line already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (UserError, KeyboardInterrupt)):
            return False
        return not re.fullmatch(r"Trial \d+ failed with value None\.", record.getMessage())  # its second line


warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeat and retry are marked experimental
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says what happened
for _handler in logging.getLogger("optuna").handlers:  # Optuna's own handler, made by set_verbosity
    _handler.addFilter(KnownFailures())


@dataclass(frozen=True)
class Sweep:
    """A study over recipes: `base` (the recipe as a mapping) with the keys of `space` drawn per trial."""

    name: str  # runs/<name>/: the study's journal, its trials' runs, its report
    data: Path
    base: dict
    space: dict[str, BaseDistribution]
    trials: int  # the study's total, however many workers share it
    n_folds: int = N_FOLDS
    fold_seed: int = FOLD_SEED
    sweep_folds: int = 1  # a trial's value comes from its first sweep_folds folds
    storage: str = ""  # "" : a journal file in the sweep's folder; postgresql://..., mysql://... across machines
    pruner: str = "sha"
    min_resource: int = 4  # metrics rows (a solved head, then epochs) before the pruner may stop a trial
    reduction_factor: int = 2  # successive halving keeps the best 1/reduction_factor at each rung
    seed: int = 0  # the sampler's seed (each worker adds its own number)
    heartbeat: int = HEARTBEAT_S
    grace: int = GRACE_S
    objective: str = "fold"  # fold: mean last-epoch validation micro-F1 | chain: OOF micro-F1 of the folds' blend
    add_trials: bool = False  # a `trials` above the study's raises its total (else a different number is refused)
    holdout: bool = False  # searched on make compare's held-out split: the report grades the best once on its answers

    @property
    def dir(self) -> Path:
        return paths.run_dir(self.name)

    @property
    def journal(self) -> Path:
        return self.dir / "study.journal"

    @property
    def is_file_storage(self) -> bool:
        return not self.storage or self.storage.startswith("sqlite")

    def database(self):
        """The study's database (a server's URL) as an SQLAlchemy engine without a pool: each use opens a connection
        of its own and closes it, so no check or heartbeat holds one open."""
        import sqlalchemy

        return sqlalchemy.create_engine(self.storage, poolclass=sqlalchemy.pool.NullPool)

    def settings(self) -> dict:
        """What the study was created with: a worker with other settings is refused instead of mixing two searches."""
        space = {k: optuna.distributions.distribution_to_json(d) for k, d in self.space.items()}
        return {"base": self.base, "space": space, "data": Path(self.data).resolve().name, "n_folds": self.n_folds,
                "fold_seed": self.fold_seed, "sweep_folds": self.sweep_folds, "objective": self.objective}  # fmt: skip

    def note(self) -> str:
        """The study's settings as optuna-dashboard's study note (Markdown): what is searched, over what, on which data
        and split, from which base; numbers rounded as the report rounds them."""
        from seedlings.recipe.saved import differences

        base = [f"`{k}={shown(new)}`" for k, _, new in differences(recipe_dict(Recipe()), self.base) if new is not None]
        rows = [f"| `{key}` | {searched(d)} |" for key, d in self.space.items()]
        return "\n".join([
            f"**Sweep `{self.name}`**: {self.trials} trials, each scored by {OBJECTIVES[self.objective]}.", "",
            f"Data `{Path(self.data).resolve().name}`, {self.n_folds} folds of fold seed {self.fold_seed}, the first "
            f"{self.sweep_folds} trained per trial; pruner `{self.pruner}`"
            + ("; the best graded once on a held-out split." if self.holdout else "."), "",
            "| key | searched over |", "|---|---|", *rows, "",
            "Base recipe, where it differs from the defaults: " + (" ".join(base) or "none") + ".",
        ])  # fmt: skip


def searched(d: BaseDistribution) -> str:
    """A search range in words: 1.00e-04 to 1.00e-02 (log), 0.1 to 0.5 by 0.1, or the choices."""
    if isinstance(d, CategoricalDistribution):
        return ", ".join(f"`{shown(c)}`" for c in d.choices)
    step = f" by {shown(d.step)}" if getattr(d, "step", None) not in (None, 1) else ""
    return f"{shown(d.low)} to {shown(d.high)}{step}" + (" (log)" if d.log else "")


# ------------------------------------------------------------------------------------------------------- the space
def load_space(path: str | Path, base: dict) -> dict[str, BaseDistribution]:
    """A search-space file: recipe key (dotted, as in ARGS) -> a list of choices | {low, high, log} | {low, high,
    step}. Every key, bound and choice is checked against the base recipe before any trial trains."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: search space not found")
    raw = read_yaml(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: a search space maps recipe keys to choices or ranges")
    space = {str(key): distribution(path, str(key), spec, base) for key, spec in raw.items()}
    check_combinations(path, space, base)
    return space


def distribution(path: Path, key: str, spec: Any, base: dict) -> BaseDistribution:
    where = f"{path}: {key}"
    if any(part.strip().split(".")[0] in FREE_KEYS for part in key.split(",")):
        raise UserError(f"{where}: changes predictions or how the pipeline runs, not the trained fold a trial is "
                        "scored on; leave it out of the space")  # fmt: skip
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: an empty list of choices")
        choices = [encode_choice(parse_value(v) if isinstance(v, str) else v) for v in spec]
        if len(set(choices)) != len(choices):
            raise UserError(f"{where}: a choice is listed twice")
        dist: BaseDistribution = CategoricalDistribution(choices)
        values = [decode_choice(c) for c in choices]
    elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log", "step"}:
        low, high = (parse_value(str(spec[k])) for k in ("low", "high"))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{where}: low and high must be numbers, got {spec['low']!r} and {spec['high']!r}")
        if low > high:
            raise UserError(f"{where}: low {low} is above high {high}")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
            raise UserError(f"{where}.step: must be a number above 0, got {step!r}")
        if log and (low <= 0 or step is not None):
            raise UserError(f"{where}: log ranges need low > 0 and no step")
        if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
            dist = IntDistribution(low, high, log=log, step=step or 1)
        else:
            dist = FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
        values = [low, high]
    else:
        raise UserError(f"{where}: expected a list of choices, {{low, high, log}} or {{low, high, step}}, got {spec!r}")
    for value in values:  # each bound and choice must make a valid recipe with the base (ranges, known keys)
        try:
            recipe_with(base, {key: value})
        except UserError as e:
            raise UserError(f"{where}: {value!r} does not make a valid recipe ({e})") from None
    return dist


def check_combinations(path: Path, space: dict[str, BaseDistribution], base: dict) -> None:
    """Each value is valid alone (distribution checks that); together they may not be. A space none of whose
    combinations of bounds, midpoints and choices makes a valid recipe is refused before its study is made, instead of
    failing every trial (every combination when there are at most COMBINATIONS, a fixed sample of them otherwise)."""
    if len(space) < 2:
        return
    candidates = {key: points(dist) for key, dist in space.items()}
    total = int(np.prod([len(v) for v in candidates.values()]))
    if total <= COMBINATIONS:
        combos: Any = itertools.product(*candidates.values())
    else:
        rng = random.Random(0)
        combos = ([rng.choice(v) for v in candidates.values()] for _ in range(COMBINATIONS))
    first = None
    for combo in combos:
        try:
            recipe_with(base, dict(zip(candidates, combo)))
            return
        except UserError as e:
            first = first or e
    raise UserError(f"{path}: no combination of its values makes a valid recipe with the base "
                    f"(the first tried: {first})")  # fmt: skip


def points(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    middle = (dist.low + dist.high) / 2
    if isinstance(dist, IntDistribution):
        middle = dist.low + (round(middle) - dist.low) // dist.step * dist.step
    return list(dict.fromkeys([dist.low, middle, dist.high]))


def encode_choice(value: Any) -> Any:
    """Optuna stores choices as plain scalars: a list or mapping (a stage list, an LR {max, mult}) as its YAML text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "yaml:" + dump_yaml(value, default_flow_style=True, width=10_000).strip()


def decode_choice(value: Any) -> Any:
    return parse_value(value[5:]) if isinstance(value, str) and value.startswith("yaml:") else value


def recipe_with(base: dict, params: dict[str, Any]) -> Recipe:
    """The base recipe with a trial's values; an impossible combination exits 2 naming the key (the trial fails)."""
    values = json.loads(json.dumps(base))  # a deep copy
    for key, value in params.items():
        for part in key.split(","):  # keys joined by commas take one value together (a size for every stage)
            apply_override(values, part.strip(), decode_choice(value))
    return recipe_from_dict(values)


def fold_epochs(recipe: Recipe) -> int:
    """SGDR epochs a fold of this recipe trains (a solved head writes a metrics row but is no epoch)."""
    return sum(
        cycle_end_epochs(s.n_cycles, s.cycle_len, s.cycle_mult)[-1] for s in recipe.stages if s.kind != SOLVED_HEAD
    )


def sweep_from_args(args) -> Sweep:
    """The sweep of a command line (cli's sweep arguments): base recipe (CONFIG + ARGS), space, data (or compare's
    held-out split of it), every number checked."""
    checks = {
        "--trials": args.trials,
        "--sweep-folds": args.sweep_folds,
        "--min-resource": args.min_resource,
        "--reduction-factor": args.reduction_factor - 1,
        "--heartbeat": args.heartbeat,
        "--grace": args.grace,
    }
    for flag, value in checks.items():
        if value < 1:
            raise UserError(f"{flag}: must be at least {2 if flag == '--reduction-factor' else 1}")
    for flag, value, allowed in (("--pruner", args.pruner, PRUNERS), ("--objective", args.objective, OBJECTIVES)):
        if value not in allowed:
            raise UserError(f"{flag}: expected {' or '.join(allowed)}, got {value!r}")
    if args.grace <= args.heartbeat:
        raise UserError(f"--grace: must exceed --heartbeat ({args.heartbeat} s), got {args.grace}")
    recipe = load_recipe(args.config, args.overrides)
    data = ensure_holdout(args.data, 0.2, 0) if args.holdout else Path(args.data)
    name = args.sweep or Path(args.space).stem
    check_name(name, "--sweep")
    if args.sweep_folds > args.n_folds:
        raise UserError(f"--sweep-folds: {args.sweep_folds} is more than the split's --n-folds {args.n_folds}")
    checked = Run(name, data, recipe, args.n_folds, args.fold_seed)
    checked.check_fold(args.sweep_folds - 1)  # names and split checked
    if checked.fold_table.empty:  # folds the data cannot give stop here, once, not in every trial
        raise UserError(f"{data}: no labelled images to split into folds")
    base = recipe_dict(recipe)
    return Sweep(name, data, base, load_space(args.space, base), args.trials, args.n_folds, args.fold_seed,
                 args.sweep_folds, args.storage, args.pruner, args.min_resource, args.reduction_factor,
                 heartbeat=args.heartbeat, grace=args.grace, objective=args.objective,
                 add_trials=getattr(args, "add_trials", False), holdout=bool(args.holdout))  # fmt: skip
