"""What a run computes in on its device, chosen once from the recipe's `precision` (auto | bf16 | fp16 | fp32), and
the gradient scaler that fp16 training needs; and what runs the forwards through fixed weights (`engine`).

auto: bf16 on a GPU that computes it natively (compute capability 8.0 and later: A100, H100, L4, RTX 30xx on);
fp16 with a gradient scaler on older GPUs (T4, V100, P100), where bf16 is emulated and slower than float32; on a CPU
float32 training, with the forwards that need no gradient in bf16 where the CPU computes bf16 natively (AVX512-BF16
or AMX: docs/recipe.md, bf16 on a CPU). A precision the device cannot compute is refused, never silently replaced.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch

from seedlings.errors import UserError

# auto: onnxruntime only for at least this much work, counted in views of 192 px images (a view of 96 px: a quarter):
# exporting a graph takes 10 to 20 s on a 2-core CPU, about what onnxruntime saves on 500 to 600 such views
AUTO_MIN_WORK = 1000


@dataclass(frozen=True)
class Precision:
    train: torch.dtype | None  # autocast dtype of training steps (None: float32)
    infer: torch.dtype | None  # autocast dtype of the forwards without gradients: features, validation, prediction
    frozen_bf16: bool  # a CPU stage's frozen layer groups run their forward in bf16 inside a float32 step
    why: str  # what was chosen and why, in one line (make gpu-check prints it)

    @property
    def scaled(self) -> bool:
        """fp16 training: gradients scaled (torch.amp.GradScaler), a step whose gradients overflow skipped."""
        return self.train == torch.float16


@functools.cache  # asked by every fold, the bench and the GPU check; the answer cannot change
def cpu_has_bf16() -> bool:
    """This CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 forwards run about twice as fast as float32 ones
    there, and emulated elsewhere (slower than float32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cuda_has_bf16(device: torch.device) -> bool:
    """The GPU computes bf16 natively (Ampere and later); on older ones torch emulates it."""
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return True
    try:  # the current device: each fold process sees its own GPU
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch older than the keyword: the capability decides
        return False


@functools.cache
def fp16_autocast_works(device_type: str) -> bool:
    """torch autocasts to float16 on this kind of device (CUDA always; a CPU from torch 2.3 or so; a torch that
    cannot warns and computes float32, which this probe catches)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.ones(2, 2, device=device_type)
            with torch.autocast(device_type, dtype=torch.float16):
                y = torch.nn.functional.linear(x, x)
            torch.amp.GradScaler(device_type)
        return y.dtype == torch.float16
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False


def choose_precision(asked: str, device: torch.device) -> Precision:
    """The recipe's `precision` on `device`; exit 2 naming the key when the device cannot compute it."""
    if asked == "fp32":
        return Precision(None, None, False, "fp32: asked (float32 everywhere)")
    if device.type == "cuda":
        return _on_gpu(asked, device)
    if asked == "fp16":
        if not fp16_autocast_works(device.type):
            raise UserError(f"precision: fp16: torch {torch.__version__} cannot autocast to float16 on the "
                            f"{device.type}; use auto or fp32")  # fmt: skip
        return Precision(torch.float16, torch.float16, False, f"fp16 with a gradient scaler on the {device.type}: "
                         "asked (a CPU computes float16 no faster than float32)")  # fmt: skip
    native = device.type == "cpu" and cpu_has_bf16()
    if asked == "bf16" and not native:
        raise UserError(f"precision: bf16: this {device.type} does not compute bf16 natively (no AVX512-BF16 or AMX): "
                        "emulated bf16 is slower than float32; use auto or fp32")  # fmt: skip
    if native:
        return Precision(None, torch.bfloat16, True, f"{asked}: float32 training, bf16 forwards without gradients "
                         "(this CPU computes bf16 natively; its bf16 backward is slower than float32)")  # fmt: skip
    return Precision(None, None, False, "auto: float32 (this CPU does not compute bf16 natively)")


def _on_gpu(asked: str, device: torch.device) -> Precision:
    name = torch.cuda.get_device_name(device)
    cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
    native = cuda_has_bf16(device)
    if asked == "bf16" and not native:
        raise UserError(f"precision: bf16: {name} (compute capability {cc}) does not compute bf16 natively (emulated, "
                        "slower than float32); auto picks fp16 with a gradient scaler there")  # fmt: skip
    if asked in ("auto", "bf16") and native:
        return Precision(torch.bfloat16, torch.bfloat16, False,
                         f"{asked}: bf16 ({name}, compute capability {cc}, computes bf16 natively)")  # fmt: skip
    why = "asked" if asked == "fp16" else "it does not compute bf16 natively"
    return Precision(torch.float16, torch.float16, False,
                     f"{asked}: fp16 with a gradient scaler ({name}, compute capability {cc}: {why})")  # fmt: skip


class StepScaler:
    """torch.amp.GradScaler for fp16 steps, counting the steps it skipped (their gradients overflowed) on the device,
    so the count costs no host sync per step: read it once per epoch, into the epoch's row (a stage callback:
    train/callbacks.py)."""

    key = "scaler"  # its state (scale, growth) in the fold's checkpoint

    def __init__(self, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        # a skipped step leaves the schedule one step ahead of the optimizer, as meant: torch's warning says otherwise
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))

    def after_epoch(self, row: dict) -> None:
        row["skipped_steps"] = self.take_skipped()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when the unscaled gradients hold an inf or a NaN
        before = self.scaler._scale.clone()
        self.scaler.update()  # an overflow, and only an overflow, halves the scale
        self.skipped += (self.scaler._scale < before).squeeze()

    def take_skipped(self) -> int:
        """Steps skipped since the last call."""
        n = int(self.skipped.item())
        self.skipped.zero_()
        return n

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)


def scaler_for(precision: Precision, device: torch.device) -> StepScaler | None:
    return StepScaler(device) if precision.scaled else None


@functools.cache
def onnxruntime_installed() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(asked: str, device: torch.device, precision: Precision) -> str:
    """The recipe's `engine` on `device`: "onnx", "torch", or "auto" where onnxruntime may run: a CPU whose forwards
    compute float32 and has onnxruntime installed (a CPU with native bf16 keeps torch's bf16 forwards; a GPU keeps
    torch); runs_onnx then decides by the work's size. onnx where it cannot run exits 2 naming the key."""
    if asked == "torch":
        return "torch"
    cpu_float32 = device.type == "cpu" and precision.infer is None
    if asked == "auto":
        return "auto" if cpu_float32 and onnxruntime_installed() else "torch"
    if device.type != "cpu":
        raise UserError(f"engine: onnx runs on the CPU; this run's device is {device.type}: use auto or torch")
    if precision.infer is not None:
        raise UserError(f"engine: onnx computes float32, and precision asks for {precision.infer} forwards: use "
                        "precision=fp32 with it, or engine=auto")  # fmt: skip
    if not onnxruntime_installed():
        raise UserError("engine: onnx needs onnxruntime (pip install -r requirements.txt); or use engine=torch")
    return "onnx"


def runs_onnx(engine: str, views: int, size: int) -> bool:
    """`engine` (choose_engine's answer) runs `views` image views of `size` px in onnxruntime (auto: when the work pays
    for the export)."""
    return engine == "onnx" or (engine == "auto" and views * (size / 192) ** 2 >= AUTO_MIN_WORK)
