"""One optimizer step on one batch, and what it runs under on the device (autocast, memory format): training, the LR
finder, `make bench` and the GPU check all take this step, so what they time is what the pipeline runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; nothing on a CPU (no faster there)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on the device; images channels_last (the fast layout on GPUs and, for Lite0, on this CPU too)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def train_step(
    forward: Callable,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    bf16: bool = True,
) -> torch.Tensor:
    """One optimizer step; returns the batch's mean loss as a tensor on the device (reading it is a host sync: the
    caller decides when)."""
    x, y = to_device(x, device), y.to(device, non_blocking=True)
    with autocast(device, bf16):
        loss = criterion(forward(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
