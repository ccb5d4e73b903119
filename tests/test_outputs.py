"""What leaves a run: the runs table, its chain on photos it never saw, and its ONNX export with a model card."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# float32 everywhere (on a CPU with native bf16 the chain would predict in bf16, the ONNX graph in float32), and a
# calibrated blend, so that the graph's calibration is exercised
CHAIN = [*TINY, "precompute_d4=false", "precision=fp32", "calibrate=bias"]


def cli(home: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEEDLINGS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "seedlings.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="session")
def chain(demo_master, tmp_path_factory) -> Path:
    """A tiny chain submitted on the demo once per session (3 folds, 2 snapshots each): its SEEDLINGS_HOME."""
    home = tmp_path_factory.mktemp("chain-home")
    done = cli(home, "submit", "--data", str(demo_master), "--run", "tiny", "--n-folds", "3", *CHAIN)
    assert done.returncode == 0, done.stderr[-2000:]
    return home


def in_home(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("SEEDLINGS_HOME", str(home))


# ------------------------------------------------------------------------------------------------------ runs table
def test_runs_table_shows_each_run_with_what_it_has(chain, tmp_path, monkeypatch):
    from seedlings.track.table import runs_table, save_leaderboard

    home = tmp_path / "home-copy"
    shutil.copytree(chain, home)
    in_home(monkeypatch, home)
    half = home / "runs" / "half"  # a run from older code, half trained: its config lacks a key, one fold is done
    (half / "fold1").mkdir(parents=True)
    config = (home / "runs" / "tiny" / "config.yaml").read_text()
    (half / "config.yaml").write_text(re.sub(r"(?m)^seed: 0$", "seed: 7", re.sub(r"(?m)^ema: .*\n", "", config)))
    (half / "fold1" / "done.json").write_text(json.dumps({"val_f1": 0.5, "val_loss": 1.0}))
    save_leaderboard([{"date": "2026-12-06", "description": "tiny: OOF micro-F1 0.7", "status": "complete",
                       "public_score": "0.71", "private_score": "0.70"}])  # fmt: skip
    out = cli(home, "runs", "--csv", "--config", str(REPO / "tests" / "defaults.yaml"))
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(io.StringIO(out.stdout)).set_index("run")
    prov = json.loads((home / "submissions" / "tiny.json").read_text())
    assert table.loc["tiny", "oof_f1"] == pytest.approx(prov["members"]["blend"]["micro_f1"])
    assert table.loc["tiny", "oof_log_loss"] == pytest.approx(prov["members"]["blend"]["log_loss"])
    assert table.loc["tiny", "folds"] == "3/3" and table.loc["tiny", "public"] == 0.71
    assert "model=test_efficientnet" in table.loc["tiny", "differs"] and "ema" not in table.loc["half", "differs"]
    assert table.loc["half", "folds"] == "1/3" and table.loc["half", "fold_f1"] == 0.5
    assert pd.isna(table.loc["half", "oof_f1"]) and "seed=7" in table.loc["half", "differs"]
    assert list(table.index) == ["tiny", "half"]  # the best OOF first, runs without one last
    by_name = runs_table(str(REPO / "tests" / "defaults.yaml"), sort="run", ascending=True)
    assert list(by_name.run) == ["half", "tiny"]
    bad = cli(home, "runs", "--sort", "nope")
    assert bad.returncode == 2 and "--sort" in bad.stderr


def test_runs_of_a_sweep_that_does_not_exist(home):
    out = cli(home, "runs", "--sweep", "nothing")
    assert out.returncode == 2 and "nothing" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------------------- predict-images
def test_predict_images_gives_the_chains_probabilities(chain, demo_master, tmp_path):
    """On the run's own test folder: the chain's blended, calibrated test probabilities (to 1e-6) and its species;
    an empty file, a text file and a missing path are named and skipped."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    out = tmp_path / "probs.csv"
    test = demo_master / "test"
    done = cli(chain, "predict-images", "--run", "tiny", "--out", str(out), str(test), str(tmp_path / "empty.png"),
               str(tmp_path / "notes.png"), str(tmp_path / "missing.png"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 3 and all(name in done.stderr for name in ("empty.png", "notes.png", "missing.png"))
    got = pd.read_csv(out)
    got.index = [Path(f).name for f in got.file]
    blend = pd.read_csv(chain / "runs" / "tiny" / "probs" / "blend.test.csv").set_index("file")
    sub = pd.read_csv(chain / "submissions" / "tiny.csv").set_index("file")
    assert sorted(got.index) == sorted(blend.index)
    np.testing.assert_allclose(got[blend.columns].to_numpy(), blend.loc[got.index].to_numpy(), atol=1e-6, rtol=0)
    assert (got.species == sub.species.loc[got.index]).all()
    assert json.loads((chain / "submissions" / "tiny.json").read_text())["calibration"] is not None


def test_predict_images_refuses_what_it_cannot_predict(chain, demo_master, tmp_path, monkeypatch, capsys):
    from seedlings.cli import main

    in_home(monkeypatch, chain)
    (tmp_path / "empty").mkdir()
    assert main(["predict-images", "--run", "tiny", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no readable image" in err and "a folder with no files" in err
    assert main(["predict-images", "--run", "nope", str(demo_master / "test")]) == 2
    assert "'nope'" in capsys.readouterr().err
    (tmp_path / "x").write_text("a file where the folder should be")
    out = tmp_path / "x" / "probs.csv"
    assert main(["predict-images", "--run", "tiny", "--out", str(out), str(demo_master / "test")]) == 2
    assert str(tmp_path / "x") in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="session")
def exported(chain) -> Path:
    done = cli(chain, "export", "--run", "tiny")
    assert done.returncode == 0, done.stderr[-2000:]
    return chain / "runs" / "tiny" / "export"


def test_onnx_export_gives_the_chains_probabilities(chain, exported, demo_master, monkeypatch):
    """onnxruntime on the reference preprocessing of the demo's test photos: PyTorch's probabilities of the same
    chain (to 1e-4), the chain's own blended test probabilities and the submission's species."""
    import onnxruntime as ort

    from seedlings.predict.export import chain_module, prepare
    from seedlings.run import saved_run

    in_home(monkeypatch, chain)
    card = json.loads((exported / "model.json").read_text())
    assert card["classes"] == sorted(p.name for p in (demo_master / "train").iterdir())
    assert card["inside_the_graph"]["members"] == 6 and card["data_sha256"] and card["oof"]["micro_f1"] > 0
    files = sorted((demo_master / "test").iterdir())
    x = np.stack([prepare(f, card) for f in files])
    assert x.shape == (len(files), *card["input"]["shape"][1:]) and x.dtype == np.uint8
    onnx = ort.InferenceSession(str(exported / "model.onnx")).run(None, {"image": x})[0]
    module, _ = chain_module(saved_run("tiny"))
    with torch.no_grad():
        torch_probs = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx, torch_probs, atol=1e-4, rtol=0)
    blend = pd.read_csv(chain / "runs" / "tiny" / "probs" / "blend.test.csv").set_index("file")
    names = [f.name for f in files]
    np.testing.assert_allclose(onnx, blend.loc[names].to_numpy(), atol=1e-4, rtol=0)
    sub = pd.read_csv(chain / "submissions" / "tiny.csv").set_index("file")
    assert [card["classes"][i] for i in onnx.argmax(1)] == sub.species.loc[names].tolist()


def test_the_readme_classifies_a_photo_with_onnxruntime_alone(chain, exported, demo_master, tmp_path):
    """scripts/classify.py, which the README names, run in a process that imports nothing of this project, prints the
    species of the submission."""
    assert "scripts/classify.py" in (REPO / "README.md").read_text()
    code = (REPO / "scripts" / "classify.py").read_text()
    assert "import seedlings" not in code and "from seedlings" not in code
    script = tmp_path / "classify.py"  # copied away from the checkout, as a user would
    script.write_text(code)
    photos = sorted((demo_master / "test").iterdir())[:5]
    done = subprocess.run([sys.executable, "-I", str(script), str(exported), *map(str, photos)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    sub = pd.read_csv(chain / "submissions" / "tiny.csv").set_index("file")
    printed = [line.split()[:-1] for line in done.stdout.strip().splitlines()]
    assert [(Path(p[0]).name, " ".join(p[1:])) for p in printed] == [(f.name, sub.species[f.name]) for f in photos]


def test_export_refusals_leave_nothing_behind(chain, tmp_path, monkeypatch, capsys):
    from seedlings.cli import main

    in_home(monkeypatch, chain)
    where = tmp_path / "taken"
    where.write_text("a file where the folder should be")
    assert main(["export", "--run", "tiny", "--out", str(where / "export")]) == 2
    err = capsys.readouterr().err
    assert str(where) in err and len(err.strip().splitlines()) == 1
    card_dir = tmp_path / "card"
    (card_dir / "model.json").mkdir(parents=True)  # the card cannot be written: the model goes too
    assert main(["export", "--run", "tiny", "--out", str(card_dir)]) == 2
    assert "model.json" in capsys.readouterr().err
    assert sorted(p.name for p in card_dir.iterdir()) == ["model.json"]
    assert not list((card_dir / "model.json").iterdir())
    assert main(["export", "--run", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_the_graphs_calibration_and_weights_are_the_blends():
    """Chain (the exported module) against blend.Calibration and the weighted mean, on two stand-in members."""
    from seedlings.predict.blend import Calibration
    from seedlings.predict.export import Chain

    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)) for _ in range(2)]
    calibration = Calibration(1.7, np.array([0.3, -0.2, 0.0, 0.5, -0.6]))
    module = Chain(members, [0.25, 0.75], (0.5,) * 3, (0.25,) * 3, [(0, 1.0), (4, 1.0)], "arith", calibration)
    image = torch.randint(0, 256, (3, 4, 4, 3), dtype=torch.uint8)
    x = (image.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        views = [[m(x).softmax(-1), m(torch.flip(x, dims=(3,))).softmax(-1)] for m in members]
        blended = sum(w * (a + b) / 2 for w, (a, b) in zip([0.25, 0.75], views, strict=True)).numpy()
        np.testing.assert_allclose(module(image).numpy(), calibration.apply(blended), atol=1e-6)
