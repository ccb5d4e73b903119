"""Where the forwards through fixed weights run: the precomputed features and maps of the frozen layers, and prediction
through the whole network (TTA views at another size or scale). On a 2-core CPU, onnxruntime ran them 3.3x to 3.6x
as fast as torch's float32 (make bench: tf_efficientnet_lite2's frozen groups at 192 px; torch's exporter folds timm's
TF-style padding into the convolutions), with the same probabilities within rounding. The recipe's `engine` chooses
(precision.choose_engine); training steps, and the forwards of weights still training (validation), stay in torch.

A module is exported once for each input shape (the exported graph fixes height and width) and for each state of its
weights: loading another member's weights into the model exports it again."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from seedlings.precision import runs_onnx

OPSET = 18  # of every graph exported, `seedlings export`'s file too


def weights_state(module: nn.Module) -> tuple:
    """Changes whenever a weight or buffer of `module` does: each tensor's storage and version counter (load_state_dict
    copies into the tensors in place, which bumps their version)."""
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


class OnnxForward:
    """`module` (in eval mode, on the CPU) run by onnxruntime: called like the module on a batch, float32 out."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.sessions: dict[tuple, tuple[tuple, object]] = {}  # input shape -> (weights' state, session)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape, state = tuple(x.shape[1:]), weights_state(self.module)
        known = self.sessions.get(shape)
        if known is None or known[0] != state:
            known = self.sessions[shape] = (state, self.session(x))
        array = x.detach().float().contiguous().numpy()  # NCHW: the layout the graph was exported with
        return torch.from_numpy(known[1].run(None, {"x": array})[0])

    def session(self, x: torch.Tensor):
        import onnxruntime as ort

        self.module.eval()  # a wrapper made for the export is in training mode; what it wraps already is not
        example = x[:1].detach().float().expand(2, *x.shape[1:]).contiguous()  # batch 2: a batch of 1 would be fixed
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            program = torch.onnx.export(self.module, (example,), dynamo=True, input_names=["x"], opset_version=OPSET,
                                        dynamic_shapes=({0: batch},), external_data=False,
                                        verbose=False)  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        return ort.InferenceSession(
            program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )


def fixed_forward(engine: str, module: nn.Module, views: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as `engine` runs `views` image views of `size` px: in onnxruntime, or the module itself."""
    return OnnxForward(module) if runs_onnx(engine, views, size) else module
