"""Every file the pipeline writes goes through one atomic write: a temporary name, fsync, then a rename.

A reader never sees half a file: a kill or a full disk mid-write leaves the old file (or none) and a `*.tmp<pid>` that
the next write of the same path removes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from seedlings.errors import Busy, UserError

if TYPE_CHECKING:  # numpy and pandas load where a file of theirs is written or read: the runs table needs neither
    import numpy as np
    import pandas as pd

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def tmp_path(path: Path) -> Path:
    """The temporary name of `path` for this process; the suffix stays last, so np.save and friends keep it."""
    return path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")


def remove_stale_tmp(path: Path) -> None:
    """Temporary files of `path` left by processes that no longer run (killed mid-write)."""
    for old in path.parent.glob(f"{path.stem}.tmp*{path.suffix}"):
        pid = old.name[len(path.stem) + 4 : len(old.name) - len(path.suffix)]
        if pid.isdigit() and not process_alive(int(pid)):
            old.unlink(missing_ok=True)


def loopback_port(port: int = 0) -> int:
    """`port` if it is free on 127.0.0.1 now, or (0) one that is: where a local UI (optuna-dashboard, MLflow's) is
    served. A port out of range or taken exits 2 naming it, before any address is printed."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port: must be in [0, 65535] (0: a free one), got {port}")
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"--port {port}: 127.0.0.1:{port} cannot be served ({e.strerror}); give another, or 0 for "
                            "a free one") from None  # fmt: skip
        return s.getsockname()[1]


def process_alive(pid: int, running: bytes = b"") -> bool:
    """Whether process `pid` lives on this machine; with `running`, only if its command line holds those bytes (a pid
    reused by another program counts as dead). Without /proc (macOS) the pid alone tells."""
    if running:
        try:
            return running in Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            if Path("/proc/self").exists():
                return False  # /proc is there and the process is not
        except OSError:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def free_bytes(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(path: Path, needed: int) -> None:
    """Exit 2 before writing `needed` bytes to `path` where the disk cannot hold them (with 1% and 64 MiB spare)."""
    free = free_bytes(path.parent)
    if free < needed * 1.01 + (64 << 20):
        raise UserError(f"{path}: needs {size_text(needed)} (and 64 MB spare), {size_text(free)} free on its disk; "
                        "free space first")  # fmt: skip


def size_text(n: float) -> str:
    """Bytes as a person reads them: 3.2 GB, 41 MB, 512 kB, 80 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 10 * scale else 0}f} {unit}"
    return f"{n:.0f} bytes"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is fsynced and renamed to `path`, on failure removed. A full
    disk exits 2 naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as RuntimeError: judge by the space left, not the exception's type
        if isinstance(e, OSError | RuntimeError) and (
            getattr(e, "errno", None) in DISK_FULL or free_bytes(path.parent) < (16 << 20)
        ):
            free = free_bytes(path.parent)
            raise UserError(
                f"{path}: disk full ({written:,} bytes written, {free:,} free); free space and run again"
            ) from None
        if isinstance(e, OSError) and e.filename == str(tmp):  # the reader wants the file asked for, not our tmp name
            raise OSError(e.errno, e.strerror, str(path)) from None
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


def finite_number(value: object) -> float | None:
    """A finite number read from a file the pipeline wrote, or None (missing, or damaged: a word, a list, true, NaN)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_json(path: str | Path, what: str, fix: str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON file the pipeline wrote, with `keys`; a damaged one (cut short, emptied, edited) exits 2 naming it, what
    it was and `fix`, the command or step that repairs it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: damaged {what} (not readable JSON); {fix}") from None
    except OSError as e:  # missing (a run never submitted), a folder, unreadable
        raise UserError(f"{path}: no readable {what} ({e.strerror or e}); {fix}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if not isinstance(obj, dict) or missing:
        raise UserError(f"{path}: damaged {what} (no {', '.join(missing) or 'mapping'}); {fix}")
    return obj


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_csv(path: str | Path, df: pd.DataFrame, **to_csv) -> Path:
    """A DataFrame as CSV without its index, Unix line ends (byte-identical on every platform)."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n", **to_csv))


@dataclass
class Probs:
    """Class probabilities of some images: `values[i]` belongs to `files[i]`, columns in `classes` order. One file
    format (save_probs, load_probs) for every member's and blend's predictions and a distilled fold's teachers."""

    values: np.ndarray  # (n_images, n_classes) float32
    files: list[str]
    classes: list[str]


def save_probs(path: Path, probs: Probs) -> None:
    """One format: a CSV `file,<class>...`; 9 significant digits give back every float32 exactly."""
    import numpy as np
    import pandas as pd

    df = pd.DataFrame(probs.values.astype(np.float32), columns=probs.classes)
    df.insert(0, "file", probs.files)
    write_csv(path, df, float_format="%.9g")


def load_probs(path: Path) -> Probs:
    import numpy as np
    import pandas as pd

    if not path.exists():
        raise UserError(f"{path}: no probabilities (make predict)")
    try:
        df = pd.read_csv(path, float_precision="round_trip")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: unreadable probabilities ({type(e).__name__}); delete it to redo it") from None
    if df.columns[0] != "file" or len(df.columns) < 3:
        raise UserError(f"{path}: expected columns file,<class>,..., got {','.join(map(str, df.columns))}")
    try:
        values = df.iloc[:, 1:].to_numpy(np.float32)
    except ValueError:  # a cell that is not a number
        raise UserError(
            f"{path}: unreadable probabilities (a value that is not a number); delete it to redo it"
        ) from None
    return Probs(values, df.file.tolist(), df.columns[1:].tolist())


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """A matplotlib figure as a PNG (the format from the suffix, which the temporary name keeps)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))


def save_torch(path: str | Path, obj) -> Path:
    import torch  # here, not at the top: reading the pipeline's files (seedlings runs) needs no torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def cpu_copy(obj):
    """Tensors (in dicts, lists) copied to the host: what a background save writes can no longer change."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class BackgroundSaver:
    """torch.save off the training thread, one file at a time: the next epoch trains while the last checkpoint is
    written. Callers pass host copies (cpu_copy); `wait()` before anything reads the files, and at the end."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending = None

    def save(self, path: Path, obj) -> None:
        self.wait()  # at most one write in flight: memory stays bounded, files land in order
        self.pending = self.pool.submit(save_torch, path, obj)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed write raises here, in the training thread

    def close(self) -> None:
        """Let the write in flight finish and end the thread (an idle thread per trained fold would pile up)."""
        self.pool.shutdown(wait=True)


def load_torch(path: str | Path, what: str, device="cpu"):
    """A file torch.save wrote (weights only: nothing executes); a truncated, foreign or unsafe one exits 2 naming
    it and what it was (`weights`, `features`, `checkpoint`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} missing")
    try:
        import torch

        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the user has to know which file, not torch's traceback
        raise UserError(f"{path}: not readable {what} ({type(e).__name__}); delete it and run again") from None


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """One writer at a time: an advisory lock on `lock` held for the block; a second process gets Busy saying who
    holds it, host and process (another fold, another run: other lock files, so `make -j` keeps working)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"{lock.parent}: {what} is in use by {holder}; wait for it to end or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} process {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
