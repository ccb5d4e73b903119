"""SGDR: cosine annealing with warm restarts, per optimizer step, as pure functions and torch's scheduler."""

from __future__ import annotations

import math

import torch


def cycle_lengths(n_cycles: int, cycle_len: int, cycle_mult: int) -> list[int]:
    """Epochs of each cycle: cycle_len, cycle_len * mult, cycle_len * mult^2, ..."""
    return [cycle_len * cycle_mult**i for i in range(n_cycles)]


def sgdr_lr(step: int, peak: float, steps_per_epoch: int, cycle_len: int, cycle_mult: int, warmup: int = 0) -> float:
    """The learning rate at optimizer step `step` (0-based) of a stage; 0 at the end of each cycle.

    warmup: steps of linear rise from peak/warmup to peak at the start of the stage; the first cycle's cosine then
    spans the rest of that cycle (later cycles restart at the peak without warm-up).
    """
    t, period = step, cycle_len * steps_per_epoch
    while t >= period:
        t -= period
        period *= cycle_mult
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < cycle_len * steps_per_epoch and warmup:  # the first cycle, after its warm-up
        t, period = t - warmup, period - warmup
    return peak * (1 + math.cos(math.pi * t / period)) / 2


def cycle_end_epochs(n_cycles: int, cycle_len: int, cycle_mult: int) -> list[int]:
    """1-based epoch numbers (within the stage) after which a cycle ends and a snapshot is taken."""
    ends, total = [], 0
    for length in cycle_lengths(n_cycles, cycle_len, cycle_mult):
        total += length
        ends.append(total)
    return ends


def make_scheduler(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, cycle_len: int, cycle_mult: int, warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """SGDR stepped once per optimizer step; each param group follows sgdr_lr from its own peak (its initial lr)."""

    def factor(step: int) -> float:
        return sgdr_lr(step, 1.0, steps_per_epoch, cycle_len, cycle_mult, warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
