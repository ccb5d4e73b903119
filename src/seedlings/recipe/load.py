"""Reading recipes: a YAML file (or a run's saved mapping) type-checked into schema.Recipe, with dotted key=value
overrides from the command line; unknown keys and wrong types exit 2 naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from seedlings.errors import UserError
from seedlings.recipe.schema import (
    LR,
    PROVENANCE_KEYS,
    SPLIT_KEYS,
    VARIANT_KEYS,
    Recipe,
    Stage,
    recipe_dict,
    validate,
)


class UniqueKeys:
    """A mapping's keys: names, each given once (the last of two would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a name, not a list or a mapping",
                                                        key_node.start_mark)  # fmt: skip
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class StrictLoader(UniqueKeys, yaml.SafeLoader):
    """YAML without aliases (a few hundred bytes of nested aliases expand to gigabytes: "billion laughs") and without
    a key given twice in one mapping."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not accepted", event.start_mark)
        return super().compose_node(parent, index)


class FastStrictLoader(UniqueKeys, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """StrictLoader's reading with libyaml's parser (ten times faster: `seedlings runs` reads hundreds of configs), for
    a text that `fast` finds no alias in and too small to nest deeply (libyaml's composer has no depth check)."""


for _cls in (StrictLoader, FastStrictLoader):
    _cls.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _cls.construct_mapping)


def fast(text: str) -> bool:
    """No anchor or alias in `text` (no & or *: StrictLoader refuses aliases with its own message) and at most 64 kB
    with under 200 flow brackets: under a few hundred levels of nesting, which libyaml's composer takes."""
    return len(text) <= 65536 and "&" not in text and "*" not in text and text.count("[") + text.count("{") < 200


class Dumper(yaml.SafeDumper):
    """YAML as StrictLoader reads it back: a string that reads as a number (1e3) is written quoted."""


# YAML 1.1 reads 1e-3 and 1e3 (no dot) as strings; users mean numbers. Read so where written plain; a quoted "1e3" or
# "2024" stays a string (a run or model named with digits)
EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (StrictLoader, FastStrictLoader, Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT, list("-+0123456789."))


def dump_yaml(obj: Any, **options) -> str:
    """safe_dump's YAML, with the strings StrictLoader would read as numbers quoted."""
    return yaml.dump(obj, Dumper=Dumper, **options)


def read_yaml(text: str, where: str) -> Any:
    """YAML text (a recipe, a space, a run's config, an override's value); bad YAML exits 2 naming `where`."""
    try:
        return yaml.load(text, Loader=FastStrictLoader if fast(text) else StrictLoader)  # noqa: S506 - SafeLoaders
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be a recipe") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) one value against its annotated type; errors name the key."""
    if tp is LR or tp == "LR":
        return _coerce_lr(key, value)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}.{i}", v, item_tp) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return _finite(key, value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    raise UserError(f"{key}: unsupported type {_type_name(tp)}")


def _coerce_lr(key: str, value: Any) -> LR:
    if isinstance(value, bool):
        raise UserError(f"{key}: expected a learning rate, got {value!r}")
    if isinstance(value, (int, float)):
        return _finite(key, value)
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return [_finite(f"{key}.{i}", v) for i, v in enumerate(value)]
    if isinstance(value, dict) and set(value) == {"max", "mult"}:
        return {"max": _coerce(f"{key}.max", value["max"], float), "mult": _coerce(f"{key}.mult", value["mult"], float)}
    raise UserError(f"{key}: expected a number, a list of numbers or {{max, mult}}, got {value!r}")


def _finite(key: str, value: float) -> float:
    """NaN compares false both ways, so it would pass every range check: every number must be finite."""
    if not math.isfinite(value):
        raise UserError(f"{key}: must be a finite number, got {value}")
    return float(value)


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, globalns={**vars(typing), "LR": LR, "Stage": Stage})
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise UserError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def parse_value(text: str, key: str = "") -> Any:
    """A command-line value is YAML: 64, 1e-3, true, [1e-4, 1e-3], {max: 0.01, mult: 10}."""
    return read_yaml(text, f"{key}: the value {text!r}" if key else f"the value {text!r}")


def apply_override(values: dict, key: str, value: Any) -> None:
    """Set a dotted key (`stages.1.size`) in a nested dict/list, creating nothing that the recipe lacks."""
    parts = key.split(".")
    if not all(parts):
        raise UserError(f"{key or '(empty)'}: not a recipe key (an override is key=value, dotted: stages.1.size=160)")
    node: Any = values
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"{path}: no such list index (the recipe has {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if part == "stages" or part in {f.name for f in dataclasses.fields(Recipe)}:
                    node[part] = {}
                else:
                    raise UserError(f"{path}: unknown key")
            node = node[part]
        else:
            raise UserError(f"{path}: is not a mapping or a list")
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        parent = ".".join(parts[:-1])
        raise UserError(f"{key}: {parent} is a value ({node!r}), not a mapping with keys")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"{key}: no such list index (the recipe has {len(node)})")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (None: the defaults), apply `key=value` overrides, type-check and validate."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: recipe not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{p}: not a text file") from None
        values = read_yaml(text, str(p))
        if values is None:
            raise UserError(f"{p}: an empty recipe (it would silently train the defaults); give its keys")
        if not isinstance(values, dict):
            raise UserError(f"{p}: a recipe is a mapping of keys to values")
        values = replaced_keys(drop_run_record(values, p), str(p))
    for key, value in parse_overrides(overrides):
        apply_override(values, key, value)
    return recipe_from_dict(values)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key=value` words as (dotted key, value) in order, each value read as YAML, a replaced key read as the key that
    replaced it (said on stderr)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{item}: an override is key=value")
        key, text = item.split("=", 1)
        key, value = key.strip(), parse_value(text, key.strip())
        if key in REPLACED:
            ((key, value),) = replaced_keys({key: value}, item).items()
        out.append((key, value))
    return out


def variant_overrides(overrides: list[str]) -> dict:
    """The prediction and blend keys among `key=value` overrides (tta=d4+scales), read as a recipe reads them: the
    variant every run of a blend is predicted with."""
    keys = {item.split("=", 1)[0].strip() for item in overrides if "=" in item} & set(VARIANT_KEYS)
    recipe = load_recipe(None, [item for item in overrides if item.split("=", 1)[0].strip() in keys])
    return {k: getattr(recipe, k) for k in sorted(keys)}


def bf16_as_precision(value: Any, where: str) -> tuple[str, str]:
    if not isinstance(value, bool):
        raise UserError(f"{where}: bf16: expected true or false (precision replaces it), got {value!r}")
    return "precision", "auto" if value else "fp32"


REPLACED = {"bf16": bf16_as_precision}  # a key a recipe no longer has -> (the key that replaced it, its value)


def replaced_keys(values: dict, where: str | None = None) -> dict:
    """`values` with every replaced key read as the key that replaced it (bf16: true is precision: auto, false is
    precision: fp32): said on stderr with `where` (a user's recipe or override), silently without (a run's record)."""
    if not isinstance(values, dict) or not REPLACED.keys() & values.keys():
        return values
    out = {}
    for key, value in values.items():
        if key not in REPLACED:
            out[key] = value
            continue
        new, new_value = REPLACED[key](value, where or "a run's config")
        if new in values and values[new] != new_value:
            raise UserError(f"{where or 'a run config'}: {key} and {new} both given and they differ; {new} replaced "
                            f"{key}: keep {new} only")  # fmt: skip
        out[new] = new_value
        if where:
            print(f"{where}: {key}: {yaml.safe_dump(value).split()[0]} is read as {new}: {new_value} "
                  f"({new} replaced {key})", file=sys.stderr)  # fmt: skip
    return out


def drop_run_record(values: dict, path: Path) -> dict:
    """A run's runs/<run>/config.yaml (it names its git commit) as a recipe: its split and provenance are not recipe
    keys, so they are left out and said (N_FOLDS, FOLD_SEED and DATA give them). A recipe file with `n_folds` and no
    commit is refused as an unknown key, like any other."""
    if "git_commit" not in values:
        return values
    record = {k: values[k] for k in (*SPLIT_KEYS, *PROVENANCE_KEYS) if k in values}
    print(f"{path}: a run's record; its recipe is used, not its {', '.join(f'{k} {v}' for k, v in record.items())}"
          " (N_FOLDS, FOLD_SEED and DATA set those)", file=sys.stderr)  # fmt: skip
    return {k: v for k, v in values.items() if k not in record}


def with_changes(recipe: Recipe, changes: dict[str, Any]) -> Recipe:
    """The recipe with dotted keys set to (YAML) values, in order, validated like any recipe."""
    values = recipe_dict(recipe)
    for key, value in changes.items():
        apply_override(values, str(key), value)
    return recipe_from_dict(values)


def recipe_from_dict(values: dict) -> Recipe:
    """Type-check and validate a recipe given as a mapping (a parsed YAML file, a run's saved config)."""
    try:
        recipe = _build(Recipe, replaced_keys(values))
    except RecursionError:
        raise UserError("a recipe nested too deeply (lists or mappings inside each other thousands of times)") from None
    validate(recipe)
    return recipe
