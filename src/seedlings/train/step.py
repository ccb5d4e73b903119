"""One optimizer step on one batch, and what it runs under on the device (autocast, memory format): training, the LR
finder, `make bench` and the GPU check all take this step, so what they time is what the pipeline runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from seedlings.precision import StepScaler


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (a Precision's train or infer dtype, already checked against the device); None: float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def bf16_forwards(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Within this block, `modules` (layers that train nothing) run under bf16 autocast inside a float32 forward and
    hand float32 on to the layers that train. On a CPU with native bf16, a frozen prefix's forward runs twice as fast
    in bf16, while the bf16 backward of the layers that train runs slower than float32 (docs/recipe.md: bf16 on a
    CPU). The caller passes modules only where the CPU computes bf16 natively (Precision.frozen_bf16)."""
    if not modules:
        yield
        return
    open_casts: dict[nn.Module, torch.autocast] = {}

    def enter(module: nn.Module, args) -> None:
        open_casts[module] = torch.autocast(device.type, dtype=torch.bfloat16)
        open_casts[module].__enter__()

    def leave(module: nn.Module, args, output):
        open_casts.pop(module).__exit__(None, None, None)
        return output.float() if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for cast in open_casts.values():  # a forward that raised inside a module: its autocast is closed all the same
            cast.__exit__(None, None, None)


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
    dtype: torch.dtype | None = None,
    scaler: StepScaler | None = None,
) -> torch.Tensor:
    """One optimizer step under autocast to `dtype` (None: float32), its gradients scaled by `scaler` (fp16: a step
    whose gradients overflow is skipped and counted there); returns the batch's mean loss as a tensor on the device
    (reading it is a host sync: the caller decides when)."""
    x, y = to_device(x, device), y.to(device, non_blocking=True)
    with autocast(device, dtype):
        loss = criterion(forward(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.step(loss, optimizer)
    return loss.detach()


Select = Callable[[torch.Tensor, int, float], torch.Tensor]  # (a batch, dihedral member, scale) -> it in that view


def batch_view_probs(
    forward: Callable, x: torch.Tensor, views: list[tuple[int, float]], select: Select, stack: bool = False
) -> torch.Tensor:
    """(views, batch, classes) float32 softmax probabilities of `forward` on each view (select(x, k, scale)) of one
    batch. stack: the views of each scale in one forward (the GPU path: one large batch keeps the device busy). Off,
    one forward per view at the loader's batch size: stacking all 8 views ran 1.8x slower on this 2-core CPU (batch
    512 against 32, tf_efficientnet_lite0 at 160 px)."""
    if not stack:
        return torch.stack([forward(select(x, k, scale)).float().softmax(-1) for k, scale in views])
    logits: dict[tuple[int, float], torch.Tensor] = {}
    for scale in dict.fromkeys(s for _, s in views):  # views of one scale share a shape
        ks = [k for k, s in views if s == scale]
        parts = forward(torch.cat([select(x, k, scale) for k in ks])).float().split(len(x))
        logits.update({(k, scale): p for k, p in zip(ks, parts)})
    return torch.stack([logits[v] for v in views]).softmax(-1)
