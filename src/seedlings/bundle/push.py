"""`make kaggle-push` and `make kaggle-output`: the bundle `make kaggle` built, sent through the kaggle package's API
(the client and timeouts of `make upload`), and the finished notebook's outputs brought back into runs/<run>/ and
submissions/, so that `make upload` and `make leaderboard` work on them as on a local run."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from seedlings import paths
from seedlings.bundle.kaggle import BUNDLE_FILE, PLACEHOLDER_OWNER, notebook_slug
from seedlings.data.kaggle import KaggleClient, RealKaggle, kaggle_username
from seedlings.errors import UserError

READY_WAIT_S = 600  # how long a push waits for Kaggle to process a new dataset version before pushing the notebook


def read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found; make kaggle builds the bundle first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not JSON; make kaggle builds it again") from None


def with_owner(meta: dict, owner: str) -> dict:
    """Metadata whose ids name `owner`, the account that pushes (make kaggle may not have known it)."""
    out = dict(meta)
    out["id"] = f"{owner}/{meta['id'].split('/', 1)[1]}"
    if "dataset_sources" in out:
        out["dataset_sources"] = [f"{owner}/{d.split('/', 1)[1]}" for d in meta["dataset_sources"]]
    return out


def owned(path: Path, meta: dict, owner: str) -> dict:
    """`meta` (read from `path`) with `owner`'s ids, written back to `path`: what the push sends names the account."""
    out = with_owner(meta, owner)
    path.write_text(json.dumps(out, indent=1))
    return out


def hub_weights(model: str, out: Path) -> Path:
    """A hub model's ImageNet weights, fetched by timm and saved as safetensors at `out` (a second push reuses them)."""
    if out.is_file():
        return out
    import timm
    from safetensors.torch import save_file

    hub_log = logging.getLogger("huggingface_hub")
    level, hub_log.level = hub_log.level, logging.CRITICAL  # its retries' lines: the failure is said once, below
    try:
        state = timm.create_model(model, pretrained=True).state_dict()
    except (RuntimeError, OSError) as e:
        raise UserError(f"pretrained: hub: the weights of {model} could not be fetched for Kaggle "
                        f"({type(e).__name__}); push once online, or bundle a recipe with pretrained: bundled "
                        "(tf_efficientnet_lite0/1/2)") from None  # fmt: skip
    finally:
        hub_log.setLevel(level)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out.with_suffix(".partial")))
    return out.with_suffix(".partial").replace(out)


def wait_ready(client: KaggleClient, dataset: str, wait_s: float) -> None:
    """Until Kaggle has processed the dataset's new version (a notebook pushed before would not see it)."""
    deadline = time.monotonic() + wait_s
    while (status := client.dataset_status(dataset)) != "ready":
        if status in ("error", "failed") or time.monotonic() > deadline:
            raise UserError(f"dataset {dataset}: Kaggle says {status!r} after the upload; see kaggle.com/datasets/"
                            f"{dataset}, then make kaggle-push again")  # fmt: skip
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def push_weights(folder: Path, weights: dict, client: KaggleClient, owner: str, wait_s: float) -> None:
    """The hub model's weight dataset, sent only when Kaggle has none of that name: its weights never change."""
    meta_path = folder / "dataset-metadata.json"
    meta = owned(meta_path, read_metadata(meta_path), owner)
    status = client.dataset_status(meta["id"])
    if status is None:
        hub_weights(weights["model"], folder / weights["file"])
        client.dataset_push(folder, True, f"ImageNet weights of {weights['model']} from timm's hub")
        print(f"created dataset {meta['id']} (the weights of {weights['model']}); waiting for Kaggle to process it")
    elif status in ("error", "failed"):  # never versioned: a push again would meet the same broken dataset
        raise UserError(f"dataset {meta['id']}: Kaggle says {status!r} (an earlier upload of the weights failed); "
                        f"delete it at kaggle.com/datasets/{meta['id']}, then make kaggle-push again")  # fmt: skip
    else:
        print(f"dataset {meta['id']}: on Kaggle already, the weights of {weights['model']} are not sent again")
    wait_ready(client, meta["id"], wait_s)


def push(bundle: Path | None = None, client: KaggleClient | None = None, wait_s: float = READY_WAIT_S) -> str:
    """Send a hub model's weight dataset if Kaggle lacks it, create the wheel dataset or a new version of it, wait
    until Kaggle has processed them, push the notebook (it runs at once on Kaggle's GPU); returns the notebook's id."""
    bundle = bundle or paths.REPO / "kaggle"
    dataset_meta = read_metadata(bundle / "dataset" / "dataset-metadata.json")
    kernel_meta = read_metadata(bundle / "notebook" / "kernel-metadata.json")
    if not (bundle / "dataset" / BUNDLE_FILE).is_file():
        raise UserError(f"{bundle / 'dataset' / BUNDLE_FILE}: not found; make kaggle builds the bundle again")
    client = client or RealKaggle()
    owner = client.username() or dataset_meta["id"].split("/")[0]
    if owner == PLACEHOLDER_OWNER:
        raise UserError("the Kaggle account's name is unknown: set KAGGLE_USERNAME (or use a kaggle.json)")
    dataset = owned(bundle / "dataset" / "dataset-metadata.json", dataset_meta, owner)["id"]
    kernel = owned(bundle / "notebook" / "kernel-metadata.json", kernel_meta, owner)["id"]
    record = json.loads((bundle / "dataset" / BUNDLE_FILE).read_text())
    if record.get("weights"):
        push_weights(bundle / "weights", record["weights"], client, owner, wait_s)
    new = client.dataset_status(dataset) is None
    client.dataset_push(bundle / "dataset", new, f"seedlings {record.get('git_commit', '')[:10]}")
    print(f"{'created' if new else 'new version of'} dataset {dataset}; waiting for Kaggle to process it")
    wait_ready(client, dataset, wait_s)
    url = client.kernel_push(bundle / "notebook")
    print(f"pushed notebook {kernel}: it runs on Kaggle now ({url or 'kaggle.com/code/' + kernel}); "
          f"make kaggle-output RUN=... fetches what it wrote once it is complete")  # fmt: skip
    return kernel


def fetch_output(run: str, client: KaggleClient | None = None) -> Path:
    """The finished notebook of `run` (make kaggle RUN=...)'s runs/<run>/ and submission, into this checkout's runs/
    and submissions/."""
    target = paths.run_dir(run)
    if target.exists():
        raise UserError(f"{target}: already here; move it away (or fetch as another RUN) before make kaggle-output")
    client = client or RealKaggle()
    kernel = f"{client.username() or kaggle_username()}/{notebook_slug(run)}"
    status = client.kernel_status(kernel)
    if status != "complete":
        raise UserError(f"notebook {kernel} is {status}, not complete: see kaggle.com/code/{kernel}, fetch it when "
                        "it has finished")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        got = Path(tmp)
        client.kernel_output(kernel, got)
        found = got / "runs" / run
        if not found.is_dir():
            runs = sorted(p.name for p in (got / "runs").iterdir()) if (got / "runs").is_dir() else []
            raise UserError(f"notebook {kernel} wrote no runs/{run} (it wrote: {', '.join(runs) or 'no runs'})")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(found), str(target))
        subs = paths.submissions_dir()
        subs.mkdir(parents=True, exist_ok=True)
        for suffix in (".csv", ".json"):
            written = got / "submissions" / f"{run}{suffix}"
            if written.is_file():
                shutil.copy2(written, subs / written.name)
    csv = paths.submission_path(run)
    print(f"{target}: fetched from {kernel}" + (f"; {csv} (make upload RUN={run} sends it)" if csv.exists() else ""))
    return target
