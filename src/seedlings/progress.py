"""What a person sees while the chain runs: bars on a terminal, plain lines in a log.

On a terminal (standard error is one) `bar` is tqdm's bar. Anywhere else (a log file, `tee`, nohup, a notebook running
the command) it is `Lines`: tqdm's meter, the same content, written as one plain line every SEEDLINGS_PROGRESS_S
seconds (30 unless set). `say` prints a line above the bars. `FoldProgress` is a fold's: a header, then one line per
epoch ("fold 1/2 epoch 4/21 ...", validation scores only where they were computed) ending with the ETA of the fold and
of the chain's folds left, and on a terminal a bar over the fold's epochs that stays on screen.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

from seedlings.errors import UserError

INTERVAL_S = 30.0  # a plain line this often while one step runs, when the output is not a terminal
TERMINAL_REDRAW_S = 0.5  # a bar's costly postfix (a host read of the loss) at most this often on a terminal


def interval_s() -> float:
    """Seconds between two plain lines: SEEDLINGS_PROGRESS_S, else INTERVAL_S."""
    text = os.environ.get("SEEDLINGS_PROGRESS_S", "").strip()
    if not text:
        return INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise UserError(f"SEEDLINGS_PROGRESS_S={text!r}: not a number of seconds >= 0")
    return value


def on_terminal() -> bool:
    return sys.stderr.isatty()


def say(line: str) -> None:
    """A line on standard output, flushed (a log shows it at once), above any bar on screen."""
    if on_terminal():
        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


class Lines:
    """tqdm's meter as plain lines: one when interval_s() has passed since the last (none for a step shorter than
    that), and one with the last count at the end of a step that printed any."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None or not hasattr(iterable, "__len__") else len(iterable)
        self.n, self.postfix, self.shown = 0, "", None  # shown: the count the last line showed (None: no line yet)
        self.start = self.last = time.perf_counter()
        self.interval = interval_s()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.interval

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.due():
            self.write()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self) -> None:
        self.last, self.shown = time.perf_counter(), self.n
        say(tqdm.format_meter(self.n, self.total, self.last - self.start, prefix=self.desc, ascii=True,
                              unit=self.unit, postfix=self.postfix or None))  # fmt: skip

    def close(self) -> None:
        if self.shown is not None and self.shown != self.n:  # the step's last count, where it printed any line
            self.write()


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
        disable: bool = False):  # fmt: skip
    """Progress over `iterable` (or `total` updates): tqdm's bar on a terminal (gone once done), plain lines
    elsewhere; `disable`: neither (a step too short to show)."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return Lines(iterable, total, desc, unit)


def due(progress) -> bool:
    """Whether `progress` (a bar's) draws at its next update: a postfix that costs a host read is computed only then."""
    if isinstance(progress, Lines):
        return progress.due()
    if getattr(progress, "disable", True):
        return False
    return time.time() - progress.last_print_t >= TERMINAL_REDRAW_S


def clock(seconds: float | None) -> str:
    return "?" if seconds is None else tqdm.format_interval(round(seconds))


class FoldProgress:
    """A fold's progress: `plan` is its epochs' (stage, size, solved head) in order; `done` the metrics rows of the
    epochs already trained (a resumed fold); `label` "fold 1/2"; `folds_after` how many of the chain's folds are left
    to train after this one (the chain's ETA assumes they take as long as this one)."""

    def __init__(self, label: str, plan: list[tuple[int, int, bool]], done: list[dict], folds_after: int, what: str):
        self.label, self.plan, self.folds_after = label, plan, folds_after
        self.rows = list(done)
        resumed = f", resuming after epoch {len(done)}" if done else ""
        say(f"{label}: {what}, {len(plan)} epochs in {len({s for s, _, _ in plan})} stages{resumed}")
        self.bar = None
        if on_terminal():
            self.bar = tqdm(total=len(plan), initial=len(done), desc=label, unit="epoch", leave=True,
                            dynamic_ncols=True)  # fmt: skip

    def epoch_desc(self) -> str:
        """The description of the next epoch's bar: "fold 1/2 epoch 4/21"."""
        return f"{self.label} epoch {len(self.rows) + 1}/{len(self.plan)}"

    def remaining_s(self) -> float | None:
        """Seconds the fold's epochs left should take: each as long as the epochs of its stage done so far, or as the
        last trained epoch scaled by its pixels; None while no trained epoch says how long one takes."""
        trained = [r for r, (_, _, head) in zip(self.rows, self.plan) if not head]
        left = self.plan[len(self.rows) :]
        if not left:
            return 0.0
        if not trained:
            return None
        total = 0.0
        for stage, size, _ in left:
            same = [r["seconds"] for r in trained if r["stage"] == stage]
            total += sum(same) / len(same) if same else trained[-1]["seconds"] * (size / trained[-1]["size"]) ** 2
        return total

    def epoch(self, row: dict) -> None:
        """One epoch's line: its counters, its scores (those computed: a NaN is a score not computed), the ETAs."""
        self.rows.append(row)
        left = self.remaining_s()
        fold_s = None if left is None else sum(r["seconds"] for r in self.rows) + left
        chain = None if left is None else left + self.folds_after * fold_s
        shown = {k: v for k, v in row.items() if k != "epoch" and not (isinstance(v, float) and math.isnan(v))}
        values = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        eta = f"ETA fold {clock(left)}" + (f", chain's folds {clock(chain)}" if self.folds_after else "")
        say(f"{self.label} epoch {len(self.rows)}/{len(self.plan)} {values} | {eta}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
