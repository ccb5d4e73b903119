"""make kaggle's notebook executed (nbclient) on the demo competition laid out as Kaggle mounts it, in a fresh virtual
environment that starts with only what Kaggle's image is assumed to have and installs the rest from the bundle with no
index: its submission is make demo's, byte for byte. Slow: the chain runs twice (about five minutes)."""

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


@pytest.mark.slow
def test_the_kaggle_notebook_reproduces_make_demo_offline(home, tmp_path, monkeypatch):
    for k in ("SEEDLINGS_JOBS", "SEEDLINGS_THREADS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    made = subprocess.run(["make", "-s", "-n", "demo"], cwd=REPO, capture_output=True, text=True).stdout
    assert all(a in made for a in ["--per-class 10 --seed 0", "--config configs/cpu.yaml", *DEMO_OVERRIDES])
    assert " ".join(DEMO_ARGS) in made  # what follows is make demo's chain, as the Makefile runs it
    data = make_demo(home / "data" / "demo", per_class=10, seed=0)
    env = {**os.environ, "SEEDLINGS_HOME": str(home)}
    chain = [sys.executable, "-m", "seedlings.cli", "submit", "--data", str(data), "--run", "demo",
             "--config", str(REPO / "configs" / "cpu.yaml"), *DEMO_ARGS, *DEMO_OVERRIDES]  # fmt: skip
    subprocess.run(chain, env=env, check=True, capture_output=True)

    monkeypatch.setattr(B, "download_wheels", lambda dists, dest: [wheel_from_environment(n, dest) for n in dists])
    bundle = B.build_bundle(str(REPO / "configs" / "cpu.yaml"), DEMO_OVERRIDES, "demo", 5, 0, tmp_path / "kaggle")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 64 * 2**20, f"the bundle is {size / 2**20:.1f} MiB"
    root = tmp_path / "kaggle-root"  # as Kaggle mounts a notebook's inputs
    shutil.copytree(data, root / "input" / "plant-seedlings-classification")
    shutil.copytree(bundle / "dataset", root / "input" / "seedlings-demo-wheels")
    (root / "working").mkdir()

    python = kaggle_image(tmp_path / "image")
    kernels = tmp_path / "jupyter" / "kernels" / "kaggle-image"
    kernels.mkdir(parents=True)
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python",
            "display_name": "Kaggle's image", "env": {"KAGGLE_ROOT": str(root)}}  # fmt: skip
    (kernels / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    from nbclient import NotebookClient

    nb = nbformat.read(bundle / "notebook" / "seedlings.ipynb", as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="kaggle-image", resources={"metadata": {"path": str(root)}}).execute()
    said = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "installed 0 of" not in said and "seedlings" in said.split("wheels:", 1)[1].split("\n", 1)[0]
    torch_info = list((tmp_path / "image").glob("lib/python*/site-packages/torch-*.dist-info"))
    assert len(torch_info) == 1 and torch_info[0].is_symlink()  # the image's own torch, never replaced
    got = (root / "working" / "submission.csv").read_bytes()
    assert got == (home / "submissions" / "demo.csv").read_bytes()
    assert (root / "working" / "runs" / "demo" / "report" / "report.md").is_file()
