"""Tracking on MLflow, off unless asked (recipe key `tracking: mlflow`, or MLFLOW_TRACKING_URI in the environment):
one MLflow run per project run, a nested run per fold (and per sweep trial under its sweep's run). The resolved
recipe goes in as parameters, the data and code as tags, every epoch's scores at their step (training and validation
in chart sections of their own), the fold's and the chain's figures, and the report, plots and submission as artifacts
(the export too, with its measured agreement).

Without MLFLOW_TRACKING_URI the store is SQLite in runs/mlflow.db (no server; `make mlflow-ui` serves it: ui.py). The
MLflow run ids of a project run are kept in runs/<run>/mlflow.json, so a resumed fold logs on into its own MLflow run.

A tracking server that is down or refuses never costs a training: the first failure prints one warning line and the
tracker goes quiet for the rest of the process."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from seedlings import paths
from seedlings.recipe.schema import recipe_dict
from seedlings.run import Run, git_commit
from seedlings.storage import file_sha256, write_json

ENV = "MLFLOW_TRACKING_URI"
STORE = "mlflow.db"  # under runs/: the embedded store
ARTIFACTS = "mlflow-artifacts"  # under runs/: the embedded store's artifacts
EXPERIMENT = "seedlings"
KIND = {"mlflow.experimentKind": "custom_model_development"}  # a model-training experiment, not a GenAI one
# MLflow 3's UI shows an experiment as its GenAI overview (traces, latency, a "Detect Issues" popup) unless the page's
# address asks for the model-training view (runs, their charts): `make mlflow-ui` prints such an address
TRAINING_VIEW = "?workflowType=machine_learning"
CONSTANT_KEYS = ("epoch", "stage", "size")  # of an epoch's row: its step, and what the recipe says; never charts
SOLVED = {"train_loss": "training/solved_head_loss"}  # the solved head's row: a fit on features, not a step's loss
# an epoch's scores as MLflow's run page shows them: a chart section per prefix, before the ungrouped speed and finals
CHARTS = {"train_loss": "training/loss", "lr": "training/lr", "val_f1": "validation/micro_f1",
          "val_macro_f1": "validation/macro_f1", "val_loss": "validation/loss"}  # fmt: skip
# one short try per call: a server that is down must not hold a training for MLflow's default minutes of retries
QUIET_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PARAM = 6000  # characters MLflow keeps of a parameter's value


def tracking_uri() -> str:
    return os.environ.get(ENV) or f"sqlite:///{paths.run_dir('') / STORE}"


def wanted(tracking: str) -> bool:
    return tracking == "mlflow" or bool(os.environ.get(ENV))


def flat(tree, prefix: str = "") -> dict[str, str]:
    """A recipe as dotted parameters: stages.1.lr.max -> '0.00214'."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(t, dict) for t in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: str(tree)[:MAX_PARAM]}


class Tracker:
    """The MLflow run of one project run (`name`, runs/<name>/) and of its folds. Every method does nothing when
    tracking is off or has failed once in this process."""

    failed = False  # shared by every tracker of the process: one warning, then quiet

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled = name, enabled and not Tracker.failed
        self.ids_path = paths.run_dir(name) / paths.MLFLOW_IDS
        self.client = None

    # ----------------------------------------------------------------------------------------------- plumbing
    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled or Tracker.failed:
            return None
        try:
            if self.client is None:
                for key, value in QUIET_HTTP.items():
                    os.environ.setdefault(key, value)
                from mlflow.tracking import MlflowClient

                uri = tracking_uri()
                if uri.startswith("sqlite:///"):
                    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                self.client = MlflowClient(uri)
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a training
            Tracker.failed = True
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"warning: MLflow at {safe(tracking_uri())} failed ({what}: {type(e).__name__}: {first}); "
                  "training goes on without tracking", file=sys.stderr)  # fmt: skip
            return None

    def _ids(self) -> dict:
        return json.loads(self.ids_path.read_text()) if self.ids_path.exists() else {}

    def _save_ids(self, ids: dict) -> None:
        write_json(self.ids_path, ids)

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found:
            for key, value in KIND.items():
                if found.tags.get(key) != value:  # an experiment made by older code
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        embedded = not os.environ.get(ENV)  # artifacts beside the SQLite store, not in ./mlruns of the cwd
        where = (paths.run_dir("") / ARTIFACTS).resolve().as_uri() if embedded else None
        return self.client.create_experiment(EXPERIMENT, artifact_location=where, tags=KIND)

    # ---------------------------------------------------------------------------------------------- the runs
    def run_id(self, params: dict | None = None, tags: dict | None = None, parent: str | None = None) -> str | None:
        """The project run's MLflow run: made the first time (with the recipe as parameters), found again after."""
        return self._call("start the run", self._run_id, params or {}, tags or {}, parent)

    def _run_id(self, params: dict, tags: dict, parent: str | None) -> str:
        ids = self._ids()
        if ids.get("uri") == tracking_uri() and ids.get("run"):
            return ids["run"]
        run_tags = {"mlflow.runName": self.name, **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(self._experiment(), tags=run_tags)
        self._log_params(run.info.run_id, params)
        self._save_ids({"uri": tracking_uri(), "run": run.info.run_id, "folds": {}})
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def fold_run(self, fold: int, parent: str | None) -> str | None:
        """The fold's nested MLflow run: the same one when the fold resumes."""
        return self._call("start the fold's run", self._fold_run, fold, parent)

    def _fold_run(self, fold: int, parent: str | None) -> str | None:
        if parent is None:
            return None
        ids = self._ids()
        known = ids.get("folds", {}).get(str(fold))
        if known:
            self.client.update_run(known, status="RUNNING")
            return known
        tags = {"mlflow.runName": f"{self.name} fold {fold}", "mlflow.parentRunId": parent, "fold": str(fold)}
        run = self.client.create_run(self._experiment(), tags=tags)
        ids.setdefault("folds", {})[str(fold)] = run.info.run_id
        self._save_ids(ids)
        return run.info.run_id

    def metrics(self, run_id: str | None, values: dict, step: int | None = None) -> None:
        """Numbers (NaN and non-numbers left out) at one step."""
        if run_id is None:
            return
        self._call("log metrics", self._metrics, run_id, values, step)

    def _metrics(self, run_id: str, values: dict, step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in values.items()
                 if isinstance(v, int | float) and not isinstance(v, bool) and v == v]  # fmt: skip
        if items:
            self.client.log_batch(run_id, metrics=items)

    def tags(self, run_id: str | None, values: dict) -> None:
        if run_id is not None:
            self._call("set tags", lambda: [self.client.set_tag(run_id, k, str(v)) for k, v in values.items()])

    def artifacts(self, run_id: str | None, files: list[Path], folder: str | None = None) -> None:
        if run_id is None:
            return
        existing = [f for f in files if Path(f).is_file()]
        self._call("log artifacts", lambda: [self.client.log_artifact(run_id, str(f), folder) for f in existing])

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self._call("end the run", lambda: self.client.set_terminated(run_id, status))


# ------------------------------------------------------------------------------------- what the pipeline logs
def run_params(run: Run) -> dict:
    return {**recipe_dict(run.recipe), "n_folds": run.n_folds, "fold_seed": run.fold_seed}


def run_tags(run: Run) -> dict:
    """Where the run's data and code come from: the data folder and the sha256 of its record (data.json: every
    image's sha256), the commit, the host and the thread count (CPU results depend on it)."""
    import torch

    record = run.data_record_path
    return {
        "data": str(run.data),
        "data_sha256": file_sha256(record) if record.exists() else "",
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "threads": str(torch.get_num_threads()),
    }


def project_run(run: Run) -> tuple[Tracker, str | None]:
    """The run's tracker and MLflow run (None when tracking is off or failed); a sweep's trial (runs/<sweep>/...) is
    nested in its sweep's MLflow run."""
    tracker = Tracker(run.name, wanted(run.recipe.tracking))
    if not tracker.enabled:
        return tracker, None
    parent = None
    if "/" in run.name:
        sweep = run.name.split("/", 1)[0]
        parent = Tracker(sweep, True).run_id(tags={"sweep": sweep})
    return tracker, tracker.run_id(run_params(run), run_tags(run), parent)


@dataclass
class FoldTracking:
    """A fold's nested MLflow run: each epoch's metrics row at its step, then the fold's figures and files."""

    tracker: Tracker
    run_id: str | None
    scores_every_epoch = False  # a fold's callback (train/callbacks.py): it charts the scores computed, no more

    def after_epoch(self, row: dict) -> None:
        self.chart(row, CHARTS)

    def after_solved_head(self, row: dict) -> None:
        self.chart(row, {**CHARTS, **SOLVED, "lr": None})  # a fit on features: its loss apart, no learning rate

    def chart(self, row: dict, names: dict) -> None:
        """The row's scores at its step, each under its chart's name (a name of None: not charted)."""
        values = {names.get(k, k): v for k, v in row.items() if k not in CONSTANT_KEYS and names.get(k, k)}
        self.tracker.metrics(self.run_id, values, step=int(row["epoch"]))

    def after_fold(self, final: dict, fold_dir: Path) -> None:
        self.tracker.metrics(self.run_id, {f"final_{k}": v for k, v in final.items() if k != "threads"})
        self.tracker.tags(self.run_id, {"threads": final["threads"]} if "threads" in final else {})
        self.tracker.artifacts(self.run_id, [fold_dir / f for f in paths.FOLD_RECORDS])
        self.tracker.finish(self.run_id)

    def stopped(self) -> None:
        self.tracker.finish(self.run_id, "KILLED")


def track_fold(run: Run, fold: int) -> FoldTracking:
    tracker, parent = project_run(run)
    return FoldTracking(tracker, tracker.fold_run(fold, parent) if parent else None)


def track_chain(run: Run, scores: dict, seconds: dict, files: list[Path]) -> None:
    """The chain's figures (the blend's out-of-fold micro-F1, macro-F1, log loss; seconds per step) and its files:
    the submission, its provenance, the report and its plots."""
    tracker, run_id = project_run(run)
    if run_id is None:
        return
    tracker.metrics(run_id, {**{f"oof_{k}": v for k, v in scores.items()}, "seconds": sum(seconds.values()),
                             **{f"seconds_{k}": v for k, v in seconds.items()}})  # fmt: skip
    tracker.artifacts(run_id, files)
    tracker.finish(run_id)


def track_export(run: Run, files: list[Path], agreement: dict) -> None:
    """`seedlings export`'s files (model.onnx, model.json) under the run's MLflow run, in its `export/` folder, with
    what the export's check on the test photos measured (export_same_species, export_largest_difference, ...)."""
    tracker, run_id = project_run(run)
    tracker.metrics(run_id, {f"export_{k}": v for k, v in agreement.items()})
    tracker.artifacts(run_id, files, paths.EXPORT)


def track_trial(run: Run, state: str, value: float | None = None, pruned_epoch: int | None = None) -> None:
    """How a sweep's trial ended, on its MLflow run (nested in the sweep's)."""
    tracker, run_id = project_run(run)
    tracker.tags(run_id, {"trial_state": state, **({"pruned_epoch": pruned_epoch} if pruned_epoch else {})})
    if value is not None:
        tracker.metrics(run_id, {"trial_value": value})
    tracker.finish(run_id, "KILLED" if state == "PRUNED" else "FAILED" if state == "FAIL" else "FINISHED")


def track_sweep(name: str, tracking: str, best: float | None, trials: int, files: list[Path]) -> None:
    """The sweep's own MLflow run (its trials' runs are nested in it), once its report is written: how many trials,
    the best value, the report and best.yaml; then finished. A sweep whose trials were not tracked has none."""
    tracker = Tracker(name, wanted(tracking))
    if not tracker.enabled or not tracker.ids_path.exists():
        return
    run_id = tracker.run_id(tags={"sweep": name})
    tracker.metrics(run_id, {"trials": trials, **({"best_value": best} if best is not None else {})})
    tracker.artifacts(run_id, files)
    tracker.finish(run_id)


def track_try(name: str, tracking: str, levers: dict, table, files: list[Path]) -> None:
    """A `make try` study as an MLflow run (runs/<name>/, nested under the runs it compared, which share its "try"
    parent): each lever's keys as a parameter, and its micro-F1 and log loss differences with their intervals as
    metrics named by the lever; try.md and try.csv as artifacts."""
    tracker = Tracker(name, wanted(tracking))
    if not tracker.enabled:
        return
    parent = Tracker(name.split("/", 1)[0], True).run_id(tags={"sweep": name.split("/", 1)[0]})
    run_id = tracker.run_id({f"lever.{metric_name(k)}": v for k, v in levers.items()}, {"try": name}, parent)
    values = {f"{metric_name(row.lever)}.{col}": getattr(row, col) for row in table.itertuples()
              for col in ("delta_f1", "delta_f1_low", "delta_f1_high", "delta_log_loss", "mcnemar_p")}  # fmt: skip
    tracker.metrics(run_id, values)
    tracker.artifacts(run_id, files)
    tracker.finish(run_id)


def metric_name(label: str) -> str:
    """A lever's label as MLflow takes a name (letters, digits, _ - . / and spaces)."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in label)[:200]


def safe(uri: str) -> str:
    """The tracking URI without a password."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri
