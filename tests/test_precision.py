"""The recipe's precision: what each value computes in on each device (GPUs simulated: this machine has none), the
refusals, the fp16 gradient scaler (skipped steps counted, its state in the checkpoint, a resume exact), and the old
`bf16` key read as the key that replaced it."""

import functools
import hashlib
import json

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import tiny_run
from seedlings import precision as P
from seedlings.cli import main
from seedlings.errors import UserError
from seedlings.recipe.load import load_recipe
from seedlings.train import fit
from seedlings.train.checkpoint import load_checkpoint
from seedlings.train.fit import train_fold

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_trains_in_float32_and_predicts_in_bf16_where_native(monkeypatch, native):
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: native)
    p = P.choose_precision("auto", CPU)
    assert p.train is None and not p.scaled
    assert p.infer == (torch.bfloat16 if native else None) and p.frozen_bf16 == native
    fp32 = P.choose_precision("fp32", CPU)
    assert (fp32.train, fp32.infer, fp32.frozen_bf16) == (None, None, False)
    if native:
        assert P.choose_precision("bf16", CPU).infer == torch.bfloat16
    else:
        with pytest.raises(UserError, match="precision: bf16: .*does not compute bf16 natively"):
            P.choose_precision("bf16", CPU)


def test_fp16_on_a_cpu_is_scaled_where_torch_can_and_refused_where_it_cannot(monkeypatch):
    p = P.choose_precision("fp16", CPU)  # torch 2.14 autocasts to float16 on CPU tensors
    assert p.train == p.infer == torch.float16 and p.scaled
    monkeypatch.setattr(P, "fp16_autocast_works", lambda device_type: False)
    with pytest.raises(UserError, match="precision: fp16: torch .* cannot autocast to float16 on the cpu"):
        P.choose_precision("fp16", CPU)


def gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    """A CUDA device as torch would describe it (this machine has no GPU)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))
    return torch.device("cuda")


@pytest.mark.parametrize(
    "name, capability, auto",
    [("Tesla T4", (7, 5), torch.float16), ("Tesla P100-PCIE-16GB", (6, 0), torch.float16),
     ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16), ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16)],
)  # fmt: skip
def test_auto_on_a_gpu_is_bf16_where_native_and_fp16_with_a_scaler_elsewhere(monkeypatch, name, capability, auto):
    device = gpu(monkeypatch, name, capability)
    p = P.choose_precision("auto", device)
    assert p.train == p.infer == auto and p.scaled == (auto == torch.float16) and not p.frozen_bf16
    assert name in p.why and ".".join(map(str, capability)) in p.why
    assert P.choose_precision("fp16", device).scaled
    if auto == torch.bfloat16:
        assert P.choose_precision("bf16", device).train == torch.bfloat16
    else:
        with pytest.raises(UserError, match=f"precision: bf16: {name} .*auto picks fp16"):
            P.choose_precision("bf16", device)


def test_the_scaler_skips_and_counts_a_step_whose_gradients_overflow():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = P.StepScaler(CPU)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.full((2, 4), 6.0e4)).float().sum()  # float16 overflows: inf gradients
    scaler.step(loss, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # skipped
    assert scaler.take_skipped() == 1 and scaler.take_skipped() == 0
    assert scaler.state_dict()["scale"] == 65536.0 / 2
    optimizer.zero_grad()  # as train_step does before every step
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 4)).float().mean()  # its gradients, scaled by 2^15, fit in float16
    scaler.step(loss, optimizer)
    assert not torch.equal(before[0], model.weight) and scaler.take_skipped() == 0
    again = P.StepScaler(CPU)
    again.load_state_dict(scaler.state_dict())
    assert again.state_dict() == scaler.state_dict()


def test_an_fp16_fold_killed_mid_epoch_resumes_to_the_same_metrics(demo_master, home, monkeypatch):
    """A scale that starts too high (2^20) makes the first steps overflow: they are skipped and counted, and the
    scale is halved each time. The resumed fold must restore the scale from its checkpoint, or it skips other steps."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**20))
    whole = train_fold(tiny_run(demo_master, "fp16", "precision=fp16"), 0)
    m1 = pd.read_csv(home / "runs" / "fp16" / "fold0" / "metrics.csv")
    assert m1.skipped_steps.sum() > 0  # the first steps overflowed and were skipped

    calls, step = [], fit.train_step
    metrics = home / "runs" / "fp16-cut" / "fold0" / "metrics.csv"

    def killed_mid_epoch(*args, **kwargs):
        if metrics.exists() and len(pd.read_csv(metrics)) >= 2:
            calls.append(1)
        if len(calls) == 2:  # the second step of the third epoch
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(fit, "train_step", killed_mid_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_fold(tiny_run(demo_master, "fp16-cut", "precision=fp16"), 0)
    monkeypatch.setattr(fit, "train_step", step)
    ckpt = load_checkpoint(home / "runs" / "fp16-cut" / "fold0" / "checkpoint.pt")
    assert (ckpt["stage"], ckpt["epoch"]) == (1, 1) and ckpt["scaler"]["scale"] < 2.0**20
    resumed = train_fold(tiny_run(demo_master, "fp16-cut", "precision=fp16"), 0)
    m2 = pd.read_csv(home / "runs" / "fp16-cut" / "fold0" / "metrics.csv")
    columns = ["epoch", "stage", "train_loss", "val_loss", "val_f1", "lr", "skipped_steps"]
    pd.testing.assert_frame_equal(m1[columns], m2[columns])
    assert resumed["val_loss"] == whole["val_loss"]


def test_the_bf16_key_is_read_as_precision_with_a_note(capsys, tmp_path):
    assert load_recipe(None, ["bf16=false"]).precision == "fp32"
    assert "bf16=false: bf16: false is read as precision: fp32 (precision replaced bf16)" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("bf16: true\n")
    assert load_recipe(old).precision == "auto"
    assert f"{old}: bf16: true is read as precision: auto" in capsys.readouterr().err
    old.write_text("bf16: true\nprecision: fp16\n")
    with pytest.raises(UserError, match="bf16 and precision both given"):
        load_recipe(old)
    old.write_text("precision: fp16\n")
    assert load_recipe(old, ["bf16=false"]).precision == "fp32"  # an override wins, as any override does


def test_a_run_recorded_with_bf16_keeps_its_training_key(demo_master, home):
    """A run trained before `precision` existed recorded `bf16`: its checkpoints name the run's training key, which
    must not change, or every such fold would be refused on resume. The keys below are the ones 59fd65c (bf16: true,
    bf16: false) gave the tiny recipe."""
    assert tiny_run(demo_master, "old").training_key() == "a3e751a725"
    assert tiny_run(demo_master, "old", "precision=fp32").training_key() == "8cc0474ddb"
    assert tiny_run(demo_master, "old", "precision=fp16").training_key() not in ("a3e751a725", "8cc0474ddb")
    run = tiny_run(demo_master, "old", "precision=fp32")
    run.fold_table  # noqa: B018 (made on first use; the record names it)
    run.record()
    old = run.config_path.read_text().replace("precision: fp32", "bf16: false")
    assert "bf16: false" in old
    run.config_path.write_text(old)
    record = json.loads(run.data_record_path.read_text())
    record["config_sha256"] = hashlib.sha256(run.config_path.read_bytes()).hexdigest()
    run.data_record_path.write_text(json.dumps(record))
    tiny_run(demo_master, "old", "precision=fp32").check()  # the old record opens with the key that replaced bf16
    with pytest.raises(UserError, match="precision: 'fp32' \\(given 'auto'\\)"):
        tiny_run(demo_master, "old").check()


def test_an_unknown_precision_or_one_the_device_cannot_compute_exits_2(demo, capsys, monkeypatch):
    assert main(["train", "--data", str(demo), "--fold", "0", "precision=fp8"]) == 2
    assert capsys.readouterr().err == "error: precision: expected auto or bf16 or fp16 or fp32, got 'fp8'\n"
    monkeypatch.setattr(P, "fp16_autocast_works", lambda device_type: False)
    assert main(["train", "--data", str(demo), "--fold", "0", "--n-folds", "3", "precision=fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: precision: fp16:")
