"""What a person sees while a chain trains: through a pipe (a log, tee) plain lines with the fold, "epoch k/K", the
scores computed and an ETA; in a pseudo-terminal, tqdm's bars."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from conftest import DEFAULTS, TINY
from seedlings import progress
from seedlings.errors import UserError
from seedlings.progress import FoldProgress, Lines


def train_cmd(data, run):
    return [sys.executable, "-m", "seedlings.cli", "train", "--data", str(data), "--config", DEFAULTS, "--n-folds", "2",
            "--run", run, *TINY, "validate=cycle"]  # fmt: skip


def env(home, **extra):
    return {**os.environ, "SEEDLINGS_HOME": str(home), "SEEDLINGS_JOBS": "1", **extra}


def test_a_chain_through_a_pipe_prints_folds_epochs_and_etas_in_plain_lines(data, home):
    done = subprocess.run(train_cmd(data, "piped"), env=env(home, SEEDLINGS_PROGRESS_S="0"), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "\r" not in out and "\r" not in done.stderr  # no bar redrawn in place: a log reads line by line
    assert "fold 1/2: fold 0 of run 'piped', 6 epochs in 3 stages" in out
    assert "fold 2/2: fold 1 of run 'piped', 6 epochs in 3 stages" in out
    epochs = [line for line in out.splitlines() if re.match(r"fold \d/2 epoch \d/6 ", line)]
    assert [line.split()[3] for line in epochs] == [f"{k}/6" for k in range(1, 7)] * 2
    assert all(" | ETA fold " in line for line in epochs)
    assert "chain's folds" in epochs[0] and "chain's folds" not in epochs[-1]  # the last fold has none after it
    assert epochs[-1].endswith("ETA fold 00:00")
    assert "nan" not in out.lower()  # an epoch not scored shows no score, not NaN
    scored = [line for line in epochs if " val_f1 " in line]
    assert 0 < len(scored) < len(epochs)  # validate: cycle scores a cycle's last epoch only
    steps = [line for line in out.splitlines() if re.match(r"fold \d/2 epoch \d/6: +\d+%\|", line)]
    assert steps and all("step/s" in line or "s/step" in line for line in steps)  # tqdm's meter, as plain lines


def read_terminal(cmd, environment) -> tuple[int, str]:
    """`cmd` run with a pseudo-terminal as its standard output and error: its exit status and what it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns, as a window
    proc = subprocess.Popen(cmd, env=environment, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode(errors="replace")


def test_a_chain_in_a_terminal_draws_bars_and_keeps_the_epoch_lines(data, home):
    status, drawn = read_terminal(train_cmd(data, "tty"), env(home, SEEDLINGS_PROGRESS_S="0"))
    assert status == 0, drawn[-2000:]
    assert re.search(r"\rfold 1/2: +100%\|", drawn)  # the fold's bar over its epochs, drawn in place
    assert "6/6 [" in drawn  # it stays at its end
    lines = [line.split("\r")[-1] for line in drawn.splitlines()]
    assert sum(bool(re.match(r"fold \d/2 epoch \d/6 .* \| ETA fold", line)) for line in lines) == 12
    assert "nan" not in drawn.lower()


def test_the_eta_counts_each_stage_at_its_own_pace_and_the_folds_left(monkeypatch):
    plan = [(0, 32, True), (1, 32, False), (1, 32, False), (2, 64, False), (2, 64, False)]
    said = []
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    fold = FoldProgress("fold 1/3", plan, [], 2, "fold 0 of run 'x'")
    assert fold.remaining_s() is None  # nothing trained says how long an epoch takes
    fold.rows.append({"stage": 0, "size": 32, "seconds": 50.0})
    assert fold.remaining_s() is None  # the solved head's row is no measure of an epoch
    fold.rows.append({"stage": 1, "size": 32, "seconds": 10.0})
    assert fold.remaining_s() == pytest.approx(10 + 2 * 40)  # stage 2's epochs: 4 times the pixels
    fold.rows.append({"stage": 1, "size": 32, "seconds": 12.0})
    fold.rows.append({"stage": 2, "size": 64, "seconds": 30.0})
    assert fold.remaining_s() == pytest.approx(30)  # its own stage's pace once measured
    fold.rows.pop()
    monkeypatch.setattr(progress, "say", said.append)  # the line the next epoch prints
    fold.epoch({"epoch": 4, "stage": 2, "size": 64, "train_loss": 0.5, "val_f1": float("nan"), "seconds": 30.0})
    # 30 s left of this fold, and two more folds of 50 + 10 + 12 + 30 + 30 s
    eta = "ETA fold 00:30, chain's folds 04:54"
    assert said == [f"fold 1/3 epoch 4/5 stage 2 size 64 train_loss 0.5 seconds 30 | {eta}"]


def test_plain_lines_come_at_their_interval_and_once_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv("SEEDLINGS_PROGRESS_S", "3600")
    assert list(Lines(range(5), desc="quick")) == list(range(5))
    assert capsys.readouterr().out == ""  # a step shorter than the interval prints nothing
    monkeypatch.setenv("SEEDLINGS_PROGRESS_S", "0")
    lines = Lines(range(3), desc="cache")
    lines.set_postfix(loss="0.5")
    assert list(lines) == [0, 1, 2]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("cache:  33%|") and "| 3/3 [" in out[-1]
    assert "loss=0.5" in out[0]
    monkeypatch.setenv("SEEDLINGS_PROGRESS_S", "3600")
    lines = Lines(total=10, desc="maps")
    lines.update(4)
    lines.close()  # no line before the interval: none at the end either
    lines.interval = 0
    lines.update(4)
    lines.interval = 3600
    lines.update(2)
    lines.close()  # the last count shown once more
    out = capsys.readouterr().out.splitlines()
    assert [line.split("|")[2].split("[")[0].strip() for line in out] == ["8/10", "10/10"]
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("SEEDLINGS_PROGRESS_S", bad)
        with pytest.raises(UserError, match="SEEDLINGS_PROGRESS_S"):
            progress.interval_s()
