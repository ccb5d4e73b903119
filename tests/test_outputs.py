"""What leaves a run: the runs table, its chain on photos it never saw, and its ONNX export with a model card."""

import contextlib
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


def cli(home: Path, *args: str, timeout: int = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEEDLINGS_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "seedlings.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


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
    assert [row["run"] for row in by_name] == ["half", "tiny"]
    bad = cli(home, "runs", "--sort", "nope")
    assert bad.returncode == 2 and "--sort" in bad.stderr


def test_runs_table_shows_a_damaged_file_as_damaged_and_every_other_run(chain, tmp_path, monkeypatch):
    from seedlings.track.table import runs_table, show

    home = tmp_path / "home-copy"
    shutil.copytree(chain, home)
    in_home(monkeypatch, home)
    config = (home / "runs" / "tiny" / "config.yaml").read_text()
    done = {"garbage": "xx{", "empty": "", "list": "[]", "map": "{}", "word": json.dumps({"val_f1": "high"})}
    for case, text in done.items():
        (home / "runs" / f"done-{case}" / "fold0").mkdir(parents=True)
        (home / "runs" / f"done-{case}" / "config.yaml").write_text(config)
        (home / "runs" / f"done-{case}" / "fold0" / "done.json").write_text(text)
    (home / "runs" / "split-word").mkdir()
    (home / "runs" / "split-word" / "config.yaml").write_text(re.sub(r"(?m)^n_folds: .*$", "n_folds: abc", config))
    (home / "runs" / "config-bad").mkdir()
    (home / "runs" / "config-bad" / "config.yaml").write_text("model: [unclosed\n")
    for run, record in {"prov-list": [], "prov-words": {"members": {"blend": {"micro_f1": "x"}}, "seconds": {"a": "b"},
                                                         "submission": ["x"]}}.items():  # fmt: skip
        (home / "runs" / run).mkdir()
        (home / "runs" / run / "config.yaml").write_text(config)
        (home / "submissions" / f"{run}.json").write_text(json.dumps(record))
    (home / "submissions" / "leaderboard.csv").write_bytes(bytes(range(256)) * 4)
    out = cli(home, "runs", "--config", str(REPO / "tests" / "defaults.yaml"))
    assert out.returncode == 0, out.stderr
    assert "leaderboard.csv: damaged" in out.stderr
    table = pd.DataFrame(runs_table(str(REPO / "tests" / "defaults.yaml"))).set_index("run")
    assert table.index[0] == "tiny" and table.loc["tiny", "oof_f1"] > 0  # the sound run, first by its score
    assert {"tiny", "split-word", "config-bad", "prov-list", "prov-words", *(f"done-{c}" for c in done)} <= set(
        table.index
    )
    for case in done:
        assert table.loc[f"done-{case}", "folds"] == "1/3 (1 done.json damaged)"
        assert pd.isna(table.loc[f"done-{case}", "fold_f1"])
    assert table.loc["split-word", "folds"] == "0/?" and "config.yaml damaged" in table.loc["config-bad", "differs"]
    assert table.loc["prov-list", "submission"] == "prov-list.json damaged"
    assert pd.isna(table.loc["prov-words", "oof_f1"]) and pd.isna(table.loc["prov-words", "seconds"])
    for column in ("oof_f1", "seconds", "folds", "submission", "public", "differs"):
        assert len(runs_table(str(REPO / "tests" / "defaults.yaml"), sort=column)) == len(table)  # no mixed types
    assert "prov-list.json damaged" in show(runs_table(str(REPO / "tests" / "defaults.yaml")))


def test_runs_table_fits_the_terminal_with_dotted_keys(home):
    from conftest import tiny_recipe
    from seedlings.recipe.load import dump_yaml
    from seedlings.recipe.schema import recipe_dict
    from seedlings.track.table import runs_table, show

    for i in range(50):  # runs whose stages differ from the reference's, one of them in number
        recipe = recipe_dict(tiny_recipe(f"stages.1.size={40 + i}", f"seed={i}"))
        if i == 0:
            recipe["stages"] = recipe["stages"][:1]  # one stage where the reference has two
        (home / "runs" / f"run-{i:02d}").mkdir(parents=True)
        (home / "runs" / f"run-{i:02d}" / "config.yaml").write_text(dump_yaml(recipe, sort_keys=False))
    rows = runs_table(str(REPO / "configs" / "cpu.yaml"), sort="run", ascending=True)
    table = pd.DataFrame(rows)
    differs = table.set_index("run").differs
    assert "stages.1.size=41" in differs["run-01"].split() and "{'" not in " ".join(differs)
    assert "stages.1=-" in differs["run-00"].split() and "stages.2.size=40" in differs["run-01"].split()
    assert (table.model == "test_efficientnet").all() and table.date.str.match(r"\d{4}-\d\d-\d\d \d\d:\d\d$").all()
    for width in (80, 120, 200):
        lines = show(rows, width=width).splitlines()
        assert len(lines) == 51 and max(map(len, lines)) <= width, (width, max(map(len, lines)))
    assert all(w in show(rows, wide=True) for w in differs["run-49"].split())  # --wide: all of it


def test_runs_of_a_sweep_show_each_trials_state_and_value_from_its_report(home):
    from seedlings.track.table import runs_table

    for n in range(3):
        (home / "runs" / "s" / f"trial-{n:04d}").mkdir(parents=True)
        (home / "runs" / "s" / f"trial-{n:04d}" / "config.yaml").write_text("seed: 0\n")
    (home / "runs" / "s" / "trials.csv").write_text("number,state,value\n0,COMPLETE,0.9\n1,PRUNED,\n1,COMPLETE,x\n")
    rows = runs_table(None, sweep="s", sort="run", ascending=True)
    assert [(r["run"], r["state"], r["value"]) for r in rows] == [
        ("s/trial-0000", "COMPLETE", 0.9),
        ("s/trial-0001", "COMPLETE", None),
        ("s/trial-0002", "", None),
    ]


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


def test_predict_images_never_reads_nor_builds_the_training_cache(chain, demo_master, tmp_path):
    """16 photos predicted with the training images' cache gone: the same probabilities, and no cache made again."""
    home = tmp_path / "no-cache"
    shutil.copytree(chain, home, ignore=shutil.ignore_patterns("cache"))
    assert not (home / "data" / "cache").exists()
    photos = sorted((demo_master / "test").iterdir())[:16]
    out = tmp_path / "probs.csv"
    done = cli(home, "predict-images", "--run", "tiny", "--out", str(out), *map(str, photos))
    assert done.returncode == 0, done.stderr
    train_caches = list((home / "data" / "cache").rglob("*train*")) if (home / "data" / "cache").exists() else []
    assert train_caches == []
    got = pd.read_csv(out).set_index("file")
    got.index = [Path(f).name for f in got.index]
    blend = pd.read_csv(chain / "runs" / "tiny" / "probs" / "blend.test.csv").set_index("file")
    assert len(got) == 16
    np.testing.assert_allclose(got[blend.columns].to_numpy(), blend.loc[got.index].to_numpy(), atol=1e-6, rtol=0)


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


def test_predict_images_takes_a_path_as_given_and_never_writes_over_a_photo(chain, demo_master, tmp_path, monkeypatch,
                                                                            capsys):  # fmt: skip
    from seedlings.cli import main

    in_home(monkeypatch, chain)
    photo = tmp_path / "plant[1].png"  # an existing file, though its name reads as a pattern
    shutil.copy(sorted((demo_master / "test").iterdir())[0], photo)
    before = photo.read_bytes()
    assert main(["predict-images", "--run", "tiny", "--out", str(photo), str(photo)]) == 2
    assert (
        capsys.readouterr().err.startswith(f"error: --out {photo}: is one of the photos")
        and photo.read_bytes() == before
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "probs.csv"
    assert main(["predict-images", "--run", "tiny", "--out", str(out), str(photo), "plant[1].png"]) == 0
    assert list(pd.read_csv(out).file) == [str(photo)]  # one row: the same file by two paths


# ----------------------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="session")
def exported(chain) -> Path:
    """The tiny chain exported with tracking on: an MLflow store of its own in the chain's home (no server)."""
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{chain / 'export-mlflow.db'}"}
    done = cli(chain, "export", "--run", "tiny", env=store, cwd=chain)  # MLflow's artifacts under its cwd
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
    agree = card["agreement"]  # measured by the export itself: every test photo of the demo, float32 throughout
    assert agree["test_photos"] == agree["of"] == agree["same_species"] == len(files)
    assert 0 <= agree["median_difference"] <= agree["largest_difference"] < 1e-4
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


def test_the_export_is_attached_to_its_runs_mlflow_run(chain, exported):
    """With tracking on, model.onnx and model.json are artifacts of the run's MLflow run (its export/ folder), the
    same bytes, and the export's measured agreement is among the run's metrics."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{chain / 'export-mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("seedlings").experiment_id])
    assert found.info.run_name == "tiny"
    listed = {Path(f.path).name: f.file_size for f in client.list_artifacts(found.info.run_id, "export")}
    assert listed == {name: (exported / name).stat().st_size for name in ("model.onnx", "model.json")}
    agree = json.loads((exported / "model.json").read_text())["agreement"]
    assert found.data.metrics["export_same_species"] == agree["same_species"] > 0
    assert found.data.metrics["export_largest_difference"] == pytest.approx(agree["largest_difference"])


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


@contextlib.contextmanager
def provenance_as(chain: Path, change):
    """The tiny chain's submission provenance changed by `change(record)` (None: removed) for a block, then restored."""
    path = chain / "submissions" / "tiny.json"
    original = path.read_text()
    try:
        record = change(json.loads(original))
        if record is None:
            path.unlink()
        else:
            path.write_text(json.dumps(record))
        yield
    finally:
        path.write_text(original)


def test_predict_images_and_export_blend_only_the_folds_the_submission_blended(chain, demo_master, monkeypatch):
    from seedlings.predict.export import chain_module
    from seedlings.predict.images import predict_images
    from seedlings.run import saved_run

    in_home(monkeypatch, chain)
    photos = [str(p) for p in sorted((demo_master / "test").iterdir())[:6]]
    every = predict_images("tiny", photos)
    assert len(chain_module(saved_run("tiny"))[0].members) == 6  # 3 folds x 2 snapshots
    with provenance_as(chain, lambda r: {**r, "missing_folds": [1]}):  # fold 1 trained after the blend
        assert len(chain_module(saved_run("tiny"))[0].members) == 4
        two_folds = predict_images("tiny", photos).iloc[:, 2:].to_numpy()
        assert np.abs(two_folds - every.iloc[:, 2:].to_numpy()).max() > 1e-7  # the tiny models differ only a little


DAMAGED = {
    "no member": lambda r: {**r, "members": {}},
    "weights that are words": lambda r: {**r, "members": {k: {**v, "weight": "x"} for k, v in r["members"].items()}},
    "a calibration without its temperature": lambda r: {**r, "calibration": {"used": True, "bias": {}}},
    "runs that are not this run": lambda r: {**r, "runs": []},
    "missing folds that are not folds": lambda r: {**r, "missing_folds": "1"},
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_provenance_is_refused_not_predicted_from(chain, demo_master, monkeypatch, capsys, case):
    from seedlings.cli import main

    in_home(monkeypatch, chain)
    photo = str(sorted((demo_master / "test").iterdir())[0])
    with provenance_as(chain, DAMAGED[case]):
        for command in (["predict-images", "--run", "tiny", photo], ["export", "--run", "tiny"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert "tiny.json: damaged provenance of the run's submission" in err and len(err.strip().splitlines()) == 1


def test_a_run_never_submitted_is_told_how_to_submit(chain, demo_master, monkeypatch, capsys):
    from seedlings.cli import main

    in_home(monkeypatch, chain)
    with provenance_as(chain, lambda r: None):
        assert main(["predict-images", "--run", "tiny", str(demo_master / "test")]) == 2
        assert "make submit RUN=tiny writes it" in capsys.readouterr().err


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
