"""`make mlflow-ui`: MLflow's UI on the embedded store (runs/mlflow.db), on 127.0.0.1 only, one worker and no job
runners (those serve GenAI evaluations), its address the project's experiment in the model-training view."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from seedlings import paths
from seedlings.errors import UserError
from seedlings.storage import loopback_port
from seedlings.track.mlflow import ARTIFACTS, EXPERIMENT, STORE, TRAINING_VIEW


def check_store(store: Path) -> str:
    """The embedded store is an SQLite database with MLflow's tables, or exit 2 before any address is printed; the
    UI's page of the project's experiment (its runs, in the model-training view), or its home before any run."""
    fix = "move it away, and the next run with tracking: mlflow makes a new one"
    try:
        with contextlib.closing(sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
            query = "select experiment_id from experiments where name = ?"
            found = db.execute(query, (EXPERIMENT,)).fetchone() if "experiments" in tables else None
    except sqlite3.Error as e:
        raise UserError(f"{store}: not an SQLite database ({e}); {fix}") from None
    if not {"experiments", "runs", "metrics"} <= tables:
        raise UserError(f"{store}: an SQLite database without MLflow's tables; {fix}")
    return f"#/experiments/{found[0]}{TRAINING_VIEW}" if found else ""


def serve_ui(port: int) -> int:
    """`make mlflow-ui`: MLflow's UI on the embedded store (runs/mlflow.db), on 127.0.0.1 only."""
    port = loopback_port(port)
    store = paths.run_dir("") / STORE
    if not store.exists():
        raise UserError(f"{store}: no MLflow store here yet (a run with tracking: mlflow makes it)")
    print(f"MLflow UI on {store}: http://127.0.0.1:{port}/{check_store(store)} (Ctrl-C to stop)", flush=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    artifacts = paths.run_dir("") / ARTIFACTS
    cmd = [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store}", "--default-artifact-root",
           artifacts.resolve().as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    try:  # a UI for one person, light on memory: 3 processes instead of 17
        return subprocess.call(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    except KeyboardInterrupt:
        return 0
