"""make kaggle's notebook executed (nbclient) on the demo competition laid out as Kaggle mounts it, in a fresh virtual
environment that starts with only what Kaggle's image is assumed to have and installs the rest from the bundle with no
index: its submission is make demo's with torch's forwards (ARGS=engine=torch: the bundle carries no onnxruntime), byte
for byte. Slow: the chain runs twice, then a shorter one twice (about eight minutes)."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
from packaging import tags

from seedlings.bundle import kaggle as B
from seedlings.data.demo import make_demo

REPO = Path(__file__).resolve().parents[1]
DEMO_ARGS = ["--n-folds", "5", "--fold-seed", "0"]
DEMO_OVERRIDES = ["mixup_alpha=0", "cutmix_alpha=0", "precision=fp32"]


def wheel_from_environment(name: str, dest: Path) -> Path:
    """The installed distribution `name` packed back into a wheel (tests download nothing: these are the files pip
    installed here from the same pinned wheels)."""
    dist = metadata.distribution(name)
    info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
    supported = {str(t) for t in tags.sys_tags()}  # py2.py3-none-any is written as two Tag lines: the one for here
    tag = next(t for line in dist.read_text("WHEEL").splitlines() if (t := line.removeprefix("Tag: ")) in supported)
    wheel = dest / f"{info.removesuffix('.dist-info')}-{tag}.whl"
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files:
            path = dist.locate_file(f)
            if f.parts[0] == ".." or "__pycache__" in f.parts or f.name in skip or not path.is_file():
                continue
            data = path.read_bytes()
            z.writestr(f.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        z.writestr(f"{info}/RECORD", "\n".join([*rows, f"{info}/RECORD,,"]) + "\n")
    return wheel


def kaggle_image(venv: Path) -> Path:
    """A virtual environment holding only the image's packages (torch, torchvision, numpy, pandas, scikit-learn,
    opencv, ipykernel and what they require), linked from this one; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    for name in B.closure(B.IMAGE, strict=False):
        for f in metadata.distribution(name).files:
            top = f.parts[0]
            if top != ".." and not top.endswith(".pth") and not (site / top).exists():
                (site / top).symlink_to(metadata.distribution(name).locate_file(top))
    return venv / "bin" / "python"


def run_notebook(bundle: Path, root: Path, python: Path, jupyter: Path) -> str:
    """The bundle's notebook executed in the kernel `python`, with `root` as /kaggle; what its cells printed."""
    kernels = jupyter / "kernels" / "kaggle-image"
    kernels.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python",
            "display_name": "Kaggle's image", "env": {"KAGGLE_ROOT": str(root)}}  # fmt: skip
    (kernels / "kernel.json").write_text(json.dumps(spec))
    from nbclient import NotebookClient

    nb = nbformat.read(bundle / "notebook" / "seedlings.ipynb", as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="kaggle-image", resources={"metadata": {"path": str(root)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_the_kaggle_notebook_reproduces_make_demo_offline(home, tmp_path, monkeypatch):
    """Twice: make demo's recipe as it is (its weights a wheel's), then, shortened, as a hub recipe (`pretrained=hub`)
    whose weights come from their own dataset (the same weights, saved as make kaggle-push saves a hub model's): its
    submission is that of the same chain run here on that file."""
    for k in ("SEEDLINGS_JOBS", "SEEDLINGS_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    made = subprocess.run(["make", "-s", "-n", "demo"], cwd=REPO, capture_output=True, text=True).stdout
    assert all(a in made for a in ["--per-class 10 --seed 0", "--config configs/cpu.yaml", *DEMO_OVERRIDES])
    assert " ".join(DEMO_ARGS) in made  # what follows is make demo's chain, as the Makefile runs it
    data = make_demo(home / "data" / "demo", per_class=10, seed=0)
    env = {**os.environ, "SEEDLINGS_HOME": str(home)}

    def chain(run: str, overrides: list[str]) -> None:
        """make demo's chain, as the Makefile runs it, as `run` with `overrides`."""
        cmd = [sys.executable, "-m", "seedlings.cli", "submit", "--data", str(data), "--run", run,
               "--config", str(REPO / "configs" / "cpu.yaml"), *DEMO_ARGS, *overrides]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)

    chain("demo", [*DEMO_OVERRIDES, "engine=torch"])  # the bundle has no onnxruntime: the notebook runs torch
    expected = (home / "submissions" / "demo.csv").read_bytes()

    monkeypatch.setattr(B, "download_wheels", lambda dists, dest: [wheel_from_environment(n, dest) for n in dists])
    python = kaggle_image(tmp_path / "image")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    bundle = B.build_bundle(str(REPO / "configs" / "cpu.yaml"), DEMO_OVERRIDES, "demo", 5, 0, tmp_path / "kaggle")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 64 * 2**20, f"the bundle is {size / 2**20:.1f} MiB"
    root = tmp_path / "kaggle-root"  # as Kaggle mounts a notebook's inputs
    shutil.copytree(data, root / "input" / "plant-seedlings-classification")
    shutil.copytree(bundle / "dataset", root / "input" / "seedlings-demo-wheels")
    (root / "working").mkdir()
    said = run_notebook(bundle, root, python, tmp_path / "jupyter")
    assert "installed 0 of" not in said and "seedlings" in said.split("wheels:", 1)[1].split("\n", 1)[0]
    torch_info = list((tmp_path / "image").glob("lib/python*/site-packages/torch-*.dist-info"))
    assert len(torch_info) == 1 and torch_info[0].is_symlink()  # the image's own torch, never replaced
    assert (root / "working" / "submission.csv").read_bytes() == expected
    assert (root / "working" / "runs" / "demo" / "report" / "report.md").is_file()

    from safetensors.torch import save_file

    from seedlings.train.model import bundled_state_dict

    short = [*DEMO_OVERRIDES, "stages.1.cycle_len=3"]  # the weights' path is what this half checks: a shorter chain
    hub = B.build_bundle(str(REPO / "configs" / "cpu.yaml"), [*short, "pretrained=hub"], "hub", 5, 0,
                         tmp_path / "kaggle-hub")  # fmt: skip
    weights = json.loads((hub / "dataset" / B.BUNDLE_FILE).read_text())["weights"]
    root = tmp_path / "kaggle-root-hub"
    shutil.copytree(data, root / "input" / "plant-seedlings-classification")
    shutil.copytree(hub / "dataset", root / "input" / "seedlings-hub-wheels")
    saved = root / "input" / "timm-weights" / weights["file"]  # the weight dataset, as make kaggle-push fills it
    saved.parent.mkdir()
    save_file({k: v.contiguous() for k, v in bundled_state_dict(weights["model"]).items()}, str(saved))
    (root / "working").mkdir()
    run_notebook(hub, root, python, tmp_path / "jupyter")
    assert f"pretrained: {saved}" in (root / "working" / "runs" / "hub" / "config.yaml").read_text()
    chain("hub", [*short, f"pretrained={saved}", "engine=torch"])  # the same chain here, on the same weights file
    assert (root / "working" / "submission.csv").read_bytes() == (home / "submissions" / "hub.csv").read_bytes()
