"""Every file the pipeline writes goes through one atomic write: a temporary name, fsync, then a rename.

A reader never sees half a file: a kill or a full disk mid-write leaves the old file (or none) and a `*.tmp<pid>` that
the next write of the same path removes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd


def tmp_path(path: Path) -> Path:
    """The temporary name of `path` for this process; the suffix stays last, so np.save and friends keep it."""
    return path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is fsynced and renamed to `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the file's content to tmp; the result appears at `path` whole or not at all."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1))


def write_csv(path: str | Path, df: pd.DataFrame, **to_csv) -> Path:
    """A DataFrame as CSV without its index, Unix line ends (byte-identical on every platform)."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n", **to_csv))


def save_torch(path: str | Path, obj) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
