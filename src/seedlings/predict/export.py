"""`seedlings export`: a finished run's chain as one ONNX graph (torch's exporter) and a model card beside it.

The graph takes photos already prepared as the run's cache prepares them (plant mask, then two resizes: the model
card names each step and `prepare` below is the reference) as uint8 RGB (N, size, size, 3), and gives the chain's
probabilities (N, classes): normalisation, the TTA views, every fold member weighted as the submission blended it,
and the calibration, inside the graph."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from seedlings import paths
from seedlings.data.augment import view
from seedlings.data.cache import BACKGROUND, GREEN_HIGH, GREEN_LOW, MIN_PLANT, _load, mask_side
from seedlings.errors import UserError
from seedlings.metrics import MEANS, PROB_FLOOR
from seedlings.predict.images import blended_folds, chain_record, member_weights, recorded_calibration
from seedlings.predict.members import run_members
from seedlings.predict.tta import tta_views
from seedlings.run import Run, git_commit
from seedlings.storage import atomic_path, file_sha256, load_probs, write_json
from seedlings.track.mlflow import track_export
from seedlings.train.engine import OPSET
from seedlings.train.model import create_model, model_mean_std

CHECKED = 256  # test photos (evenly spaced) the export is checked on against the chain's own probabilities


class Chain(nn.Module):
    """uint8 RGB (N, S, S, 3) -> the chain's probabilities: each member's softmax averaged over the TTA views,
    weighted as the blend weighted it, then calibrated as the chain calibrated it."""

    def __init__(self, members: list[nn.Module], shares: list[float], mean, std, views, tta_mean: str, calibration):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("shares", torch.tensor(shares, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.views, self.tta_mean, self.mean_std = list(views), tta_mean, (tuple(mean), tuple(std))
        temperature, bias = (1.0, None) if calibration is None else (calibration.temperature, calibration.bias)
        self.calibrated = calibration is not None
        self.temperature = float(temperature)
        self.register_buffer("bias", torch.tensor(np.zeros(1) if bias is None else bias, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        probs = 0
        scales = sorted({scale for _, scale in self.views})
        for share, member in zip(self.shares, self.members, strict=True):
            views = []
            for scale in scales:  # the views of one scale through the member as one batch
                ks = [k for k, s in self.views if s == scale]
                logits = member(torch.cat([view(x, k, scale) for k in ks]))
                views.append(logits.softmax(-1).reshape(len(ks), -1, logits.shape[-1]))
            probs = probs + share * MEANS[self.tta_mean](torch.cat(views))
        if not self.calibrated:
            return probs
        z = self.temperature * torch.log(probs.clamp_min(PROB_FLOOR)) + self.bias
        return z.softmax(-1)


def chain_module(run: Run) -> tuple[Chain, dict]:
    """The run's chain as one module (float32, eval mode) and the record of the submission it reproduces."""
    record = chain_record(run)
    if record["runs"] != [run.name]:
        raise UserError(f"run {run.name!r} blends other runs ({', '.join(record['runs'][1:])}): export each run alone")
    folds = blended_folds(run, record)
    members = [m for m in run_members(run) if m.fold in folds]
    if not members:
        raise UserError(f"run {run.name!r}: no trained fold (make train RUN={run.name})")
    shares = member_weights(record, members)
    kept = [m for m in members if shares[m] > 0]
    classes = run.comp.classes
    models = []
    bare = dataclasses.replace(run.recipe, pretrained="none")  # the weights come from the members, not ImageNet
    for m in kept:
        model = create_model(bare, len(classes))
        model.load_state_dict(m.state_dict())
        models.append(model.eval())
    mean, std = model_mean_std(models[0])
    chain = Chain(models, [shares[m] for m in kept], mean, std, tta_views(run.recipe.tta), run.recipe.tta_mean,
                  recorded_calibration(record, classes))  # fmt: skip
    return chain.eval(), record


def model_card(run: Run, record: dict, chain: Chain, onnx_file: str) -> dict:
    """What a user of the ONNX file needs and what it was made from (README: classify a photo with onnxruntime)."""
    recipe = run.recipe
    return {
        "model": onnx_file,
        "run": run.name,
        "classes": run.comp.classes,
        "input": {
            "name": "image",
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "shape": ["N", recipe.eval_size, recipe.eval_size, 3],
        },  # fmt: skip
        "output": {"name": "probabilities", "shape": ["N", len(run.comp.classes)]},
        "preprocessing": {  # data/cache.py (_load) and data/loaders.py (eval_transform); `prepare` below
            "decode": "RGB uint8: alpha dropped, greyscale expanded, 16 bit scaled to 8",
            "plant_mask": recipe.plant_mask,
            "background": BACKGROUND[recipe.plant_mask],  # null: no mask; else the gravel's share of its brightness
            "mask_side": mask_side(recipe.cache_size),  # the mask is found on the photo shrunk to this longest side
            "green_hsv": [list(GREEN_LOW), list(GREEN_HIGH)],  # OpenCV HSV, hue 0-180
            "mask_kernel": "ellipse of odd side max(3, round(min(h, w) / 60) | 1): close, then dilate",
            "min_plant": MIN_PLANT,  # a mask keeping less of the photo than this: the photo as it is
            "cache_size": recipe.cache_size,  # first resize: INTER_AREA when shrinking, INTER_CUBIC when enlarging
            "size": recipe.eval_size,  # second resize: INTER_AREA
        },
        "inside_the_graph": {
            "normalisation": {"mean": list(chain.mean_std[0]), "std": list(chain.mean_std[1])},
            "tta": recipe.tta,
            "tta_mean": recipe.tta_mean,
            "members": len(chain.members),
            "calibrated": chain.calibrated,
        },  # fmt: skip
        "precision": f"float32; the chain itself predicted with the recipe's precision ({recipe.precision}): in bf16 "
        "or fp16 where it chose one (auto: bf16 on GPUs and CPUs that compute it natively, fp16 on older GPUs), and "
        "a photo whose top two classes nearly tie may then change its species: `agreement` gives what was measured",
        "recipe": record.get("recipe", {}),
        "oof": record["members"].get("blend", {}),
        "data_sha256": file_sha256(run.data_record_path),  # data.json: every image's sha
        "git_commit": git_commit(),
        "trained_at_commit": record.get("git_commit", ""),
    }


def prepare(path: str | Path, card: dict) -> np.ndarray:
    """The reference preprocessing of one photo for the exported graph, as its model card says: (S, S, 3) uint8."""
    step = card["preprocessing"]
    img, err = _load(Path(path), step["cache_size"], step["plant_mask"])
    if err:
        raise UserError(err)
    return cv2.resize(img, (step["size"], step["size"]), interpolation=cv2.INTER_AREA)


def agreement(run: Run, onnx_path: Path, card: dict) -> dict:
    """The exported graph in onnxruntime against the chain's blended test probabilities, on up to CHECKED of the
    run's test photos prepared as the card says: how many, how many get the submission's species, and the largest
    and median differences of a probability."""
    import onnxruntime as ort

    blend = load_probs(paths.probs_file(paths.probs_dir(run.name, run.variant), paths.BLEND, "test"))
    rows = np.unique(np.linspace(0, len(blend.files) - 1, min(len(blend.files), CHECKED)).round().astype(int))
    x = np.stack([prepare(run.comp.test_path(blend.files[i]), card) for i in rows])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"image": x[i : i + 16]})[0] for i in range(0, len(x), 16)])
    want = blend.values[rows][:, [blend.classes.index(c) for c in card["classes"]]]
    diff, same = np.abs(got - want), int((got.argmax(1) == want.argmax(1)).sum())
    return {"test_photos": len(rows), "of": len(blend.files), "same_species": same,
            "largest_difference": float(diff.max()), "median_difference": float(np.median(diff))}  # fmt: skip


def export(run: Run, out: Path | None = None) -> Path:
    """runs/<run>/export/ (or `out`): model.onnx and model.json, both written or neither (an older pair stays)."""
    out = Path(out) if out else run.dir / paths.EXPORT
    chain, record = chain_module(run)
    onnx_path, card_path = out / paths.MODEL, out / paths.MODEL_CARD
    card = model_card(run, record, chain, onnx_path.name)
    size = run.recipe.eval_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    written = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(onnx_path) as tmp, torch.no_grad():
            program = torch.onnx.export(chain, (example,), dynamo=True, input_names=["image"], opset_version=OPSET,
                                        output_names=["probabilities"], dynamic_shapes={"image": {0: batch}},
                                        external_data=False, verbose=False)  # fmt: skip
            program.save(str(tmp))
        written = True
        try:
            card["agreement"] = agreement(run, onnx_path, card)
        except UserError as e:  # the test photos or the chain's probabilities gone since: the export stands alone
            card["agreement"] = {"not_measured": str(e)}
        write_json(card_path, card)
    except (OSError, UserError) as e:
        if written:  # a model without its card is not left behind
            onnx_path.unlink(missing_ok=True)
        if isinstance(e, UserError):
            raise
        raise UserError(f"{e.filename or out}: cannot write the export ({e.strerror or e})") from None
    agree = card["agreement"]
    track_export(run, [onnx_path, card_path], agree)
    checked = agree.get("not_measured") or (f"the submission's species on {agree['same_species']} of "
                                            f"{agree['test_photos']} test photos, probabilities within "
                                            f"{agree['largest_difference']:.1e}")  # fmt: skip
    print(f"{onnx_path}: {len(chain.members)} members, TTA {run.recipe.tta} inside; model card {card_path}; {checked}")
    return onnx_path
