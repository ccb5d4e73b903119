"""A run's saved recipe read back (`config.yaml`, as older code wrote it too) and two recipes compared key by key:
what a resumed run checks against its recipe, and what the runs table shows as `differs`. Reads YAML only, so the
runs table lists hundreds of runs without loading the pipeline."""

from __future__ import annotations

from pathlib import Path

from seedlings.errors import UserError
from seedlings.recipe.load import read_yaml, replaced_keys


def read_config(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        saved = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except (UserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable run config ({e}); delete the run to redo it") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a run config; delete the run to start again")
    return replaced_keys(saved)  # a run recorded before a key was replaced: read as the key that replaced it


def differences(old, new, key: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every leaf where two recipes (as dicts) differ: `stages.2.size`, not `stages`."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) + [k for k in old if k not in new]
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{key}.{i}")]
    return [] if old == new else [(key, old, new)]
