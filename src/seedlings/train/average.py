"""An exponential moving average of the weights a stage trains (recipe key `ema`, timm's --model-ema): updated after
every optimizer step; validation and each cycle's snapshot read the average, and a stage ends on it. Its state goes
into the fold's checkpoint, so a resumed fold averages on exactly as an uninterrupted one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """The average of the parameters in `optimizer`'s groups (what the stage trains; the frozen ones are their own
    average). Buffers (batch-norm statistics) stay as trained. The decay warms up as (1 + t) / (10 + t) over the
    first steps t, so the first steps' weights do not dominate a short stage. A stage callback (callbacks.py):
    updated after every step, read by validation and snapshots, copied into the model when the stage ends."""

    key = "average"  # its state's name in the fold's checkpoint

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, decay: float):
        trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.names = [n for n, p in model.named_parameters() if id(p) in trained]
        self.params = [p for _, p in model.named_parameters() if id(p) in trained]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def after_step(self) -> None:
        self.update()

    def after_stage(self) -> None:
        self.copy_to_model()  # the stage ends on its average: the next stage starts from it

    def weights_read(self):
        return self.swapped()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within this block the model holds the averaged weights; the trained ones come back after it."""
        trained = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_([p.data for p in self.params], self.shadow)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "shadow": [t.detach().cpu().clone() for t in self.shadow],
                "steps": self.steps, "decay": self.decay}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError("the checkpoint's weight average covers other parameters than this stage trains")
        for mine, saved in zip(self.shadow, state["shadow"], strict=True):
            mine.copy_(saved)
        self.steps = state["steps"]
