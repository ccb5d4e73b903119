"""Tracking on MLflow against a real `mlflow server` on 127.0.0.1 (SQLite backend), started and removed here; what a
tiny run logged is read back over the server's REST API. Tracking off writes nothing of MLflow's."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import Interrupted, stop_after, tiny_run
from seedlings.train.fit import train_fold

pytest.importorskip("mlflow")
STAGES = (
    "stages=[{size: 32, freeze: true, precompute: true, fit: logistic},"
    " {size: 32, freeze: false, lr: 0.003, n_cycles: 1, cycle_len: 2}]"
)


@pytest.fixture(autouse=True)
def tracker_quiet_reset(monkeypatch):
    """A failure silences tracking for the rest of a process: each test starts with it on."""
    from seedlings.track.mlflow import Tracker

    monkeypatch.setattr(Tracker, "failed", False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts in `folder`."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not start in 120 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)

    def api(self, path: str, body: dict | None = None, method: str = "POST") -> dict:
        if method == "GET":
            query = "&".join(f"{k}={v}" for k, v in (body or {}).items())
            req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{path}?{query}")
        else:
            req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{path}", data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "mlflow-server")
    s.folder.mkdir()
    s.start()
    yield s
    s.stop()
    shutil.rmtree(s.folder, ignore_errors=True)


def runs_of(server: Server) -> dict[str, dict]:
    experiment = server.api("experiments/get-by-name", {"experiment_name": "seedlings"}, "GET")["experiment"]
    found = server.api("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
    return {r["info"]["run_name"]: r for r in found.get("runs", [])}


def test_a_run_logs_its_folds_epochs_and_files(server, demo_master, home, monkeypatch):
    """Parameters, tags, each epoch's metrics at its step, the fold's files, nested under the run; a fold stopped
    and resumed logs on into its own MLflow run, each step once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    run = tiny_run(demo_master, "tracked", STAGES, "validate=epoch")
    with pytest.raises(Interrupted):
        train_fold(run, 0, on_epoch=stop_after(1))  # stopped after the first SGDR epoch, checkpointed
    assert runs_of(server)["tracked fold 0"]["info"]["status"] == "KILLED"
    train_fold(run, 0)  # resumed: logs on into the same MLflow run
    runs = runs_of(server)
    assert set(runs) == {"tracked", "tracked fold 0"}
    parent, fold = runs["tracked"], runs["tracked fold 0"]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["model"] == "test_efficientnet" and params["stages.1.cycle_len"] == "2" and params["n_folds"] == "3"
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["data"] == str(demo_master) and len(tags["data_sha256"]) == 64 and tags["git_commit"]
    fold_tags = {t["key"]: t["value"] for t in fold["data"]["tags"]}
    assert fold_tags["mlflow.parentRunId"] == parent["info"]["run_id"] and fold["info"]["status"] == "FINISHED"
    assert int(fold_tags["threads"]) >= 1  # a constant of the fold: a tag, not a chart
    charts = {m["key"] for m in fold["data"]["metrics"]}
    assert {"validation/micro_f1", "validation/loss", "training/loss", "training/lr", "final_val_f1"} <= charts
    assert not charts & {"epoch", "stage", "size", "final_threads"}  # the step is the epoch; the recipe says the rest
    experiment = server.api("experiments/get-by-name", {"experiment_name": "seedlings"}, "GET")["experiment"]
    kind = {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # MLflow's UI opens it on runs and charts, not the GenAI overview
    history = server.api("metrics/get-history", {"run_id": fold["info"]["run_id"], "metric_key": "validation/micro_f1"},
                         "GET")  # fmt: skip
    steps = sorted(m["step"] for m in history["metrics"])
    assert steps == [1, 2, 3]  # the solved head's row and two SGDR epochs

    def steps_of(key: str) -> list[int]:
        found = server.api("metrics/get-history", {"run_id": fold["info"]["run_id"], "metric_key": key}, "GET")
        return sorted(m["step"] for m in found.get("metrics", []))

    assert steps_of("training/loss") == steps_of("training/lr") == [2, 3]  # the SGDR epochs' steps
    assert steps_of("training/solved_head_loss") == [1]  # the head fitted on features: a point of its own
    metrics_csv = (home / "runs" / "tracked" / "fold0" / "metrics.csv").read_text().splitlines()
    assert len(metrics_csv) == 1 + len(steps)
    listed = server.api("artifacts/list", {"run_id": fold["info"]["run_id"]}, "GET")
    assert {"metrics.csv", "loss.png", "done.json"} <= {f["path"] for f in listed["files"]}
    ids = json.loads((home / "runs" / "tracked" / "mlflow.json").read_text())
    assert ids["run"] == parent["info"]["run_id"] and ids["folds"]["0"] == fold["info"]["run_id"]
    train_fold(run, 1)
    assert set(runs_of(server)) == {"tracked", "tracked fold 0", "tracked fold 1"}


@pytest.mark.slow  # 22 s: make test stays within its 10 minutes
def test_a_server_that_goes_down_never_costs_a_training(server, demo_master, home, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    run = tiny_run(demo_master, "cut", STAGES)
    train_fold(run, 0)
    server.stop()  # the server is gone before fold 1 starts
    final = train_fold(run, 1)
    assert final["val_f1"] >= 0 and (home / "runs" / "cut" / "fold1" / "done.json").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and server.url.split("//")[1] in warnings[0] and "goes on" in warnings[0]


def test_tracking_off_writes_nothing_of_mlflow(demo_master, home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_fold(tiny_run(demo_master, "quiet", STAGES), 0)
    found = [p for p in home.rglob("*") if "mlflow" in p.name.lower()]
    assert not found


def test_embedded_store_when_asked_by_the_recipe(demo_master, home, monkeypatch):
    """tracking: mlflow without a server: a SQLite store in runs/mlflow.db, artifacts beside it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    train_fold(tiny_run(demo_master, "local", STAGES, "tracking=mlflow"), 0)
    store = home / "runs" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("seedlings")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert names == {"local", "local fold 0"}
    assert (home / "runs" / "mlflow-artifacts").is_dir()


@pytest.mark.slow  # 20 to 40 s on a 2-core CPU: with the slow tests, which CI runs too
def test_a_sweep_is_a_parent_run_with_a_nested_run_per_trial(demo, home, tmp_path, monkeypatch):
    """Each trial's run is nested in the sweep's, with how it ended: its state, its value or the epoch it was pruned
    at; a pruned trial's fold run is marked killed."""
    from mlflow.tracking import MlflowClient

    from test_sweep import run_workers, space_file, sweep_cmd

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (demo / "answers.csv").unlink()
    space = space_file(tmp_path, "stages.1.cycle_len: [1, 3]\ndrop_rate: [0.1, 0.3]\n")
    run_workers(1, sweep_cmd(demo, space, 4, "tracking=mlflow"), home, [tmp_path])
    client = MlflowClient(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("seedlings").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    sweep = by_name["s"]
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["trials"] == 4  # finished by the report
    assert 0 <= sweep.data.metrics["best_value"] <= 1
    trials = [r for name, r in by_name.items() if name.startswith("s/trial-") and " fold " not in name]
    assert len(trials) == 4
    assert all(t.data.tags["mlflow.parentRunId"] == sweep.info.run_id for t in trials)
    states = {t.data.tags["trial_state"] for t in trials}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    for t in trials:
        if t.data.tags["trial_state"] == "COMPLETE":
            assert 0 <= t.data.metrics["trial_value"] <= 1 and t.info.status == "FINISHED"
        else:
            assert int(t.data.tags["pruned_epoch"]) >= 1 and t.info.status == "KILLED"
            fold = by_name[f"{t.info.run_name} fold 0"]
            assert fold.info.status == "KILLED"
    from seedlings.track.table import runs_table

    monkeypatch.setenv("SEEDLINGS_HOME", str(home))
    table = pd.DataFrame(runs_table(None, sweep="s", sort="run", ascending=True))
    assert len(table) == 4 and {s.lower() for s in states} == set(table.state)
    complete = table[table.state == "complete"]
    # a trial's value: its one fold's last validation micro-F1, stored to 4 digits
    assert ((complete.value - complete.fold_f1).abs() <= 5e-5).all()


def test_mlflow_ui_without_a_store_names_it(home, capsys):
    from seedlings.cli import main

    assert main(["mlflow-ui", "--port", str(free_port())]) == 2
    assert str(home / "runs" / "mlflow.db") in capsys.readouterr().err


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b""], ids=["random bytes", "empty"])
def test_mlflow_ui_on_a_store_that_is_not_one_refuses_before_any_address(home, capsys, content):
    import sqlite3

    from seedlings.cli import main

    store = home / "runs" / "mlflow.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(content)
    assert main(["mlflow-ui", "--port", str(free_port())]) == 2
    out, err = capsys.readouterr()
    assert "http://" not in out and err.startswith(f"error: {store}: ") and len(err.strip().splitlines()) == 1
    store.unlink()
    with sqlite3.connect(store) as db:
        db.execute("create table notes (text)")  # an SQLite database, not MLflow's
    assert main(["mlflow-ui", "--port", str(free_port())]) == 2
    assert "without MLflow's tables" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_ui_serves_the_embedded_store_on_loopback(demo_master, home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "SEEDLINGS_HOME": str(home)}
    cmd = [sys.executable, "-m", "seedlings.cli", "mlflow-ui", "--port", str(free_port())]
    train_fold(tiny_run(demo_master, "shown", STAGES, "tracking=mlflow"), 0)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        address = proc.stdout.readline().split("http://", 1)[1].split("/", 1)[0]
        assert address.startswith("127.0.0.1:")
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://{address}/api/2.0/mlflow/experiments/get-by-name"
                                            "?experiment_name=seedlings", timeout=2) as r:  # fmt: skip
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None and body["experiment"]["name"] == "seedlings"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def page_text(url: str) -> str:
    """What headless Chromium shows of `url` once its scripts ran: the page's words, one per line."""
    import html
    import re

    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    flags = ["--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1400,1200", "--dump-dom"]
    done = subprocess.run([browser, *flags, url], capture_output=True, text=True, timeout=120)
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", done.stdout, flags=re.S)
    return "\n".join(w.strip() for w in html.unescape(re.sub(r"<[^>]+>", "\n", body)).split("\n") if w.strip())


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium-headless-shell") or shutil.which("chromium")), reason="no Chromium")
def test_make_mlflow_ui_opens_on_the_runs_and_their_charts(demo_master, home, monkeypatch):
    """The address make mlflow-ui prints opens the experiment's runs (MLflow 3's model-training view, not its GenAI
    overview); a fold's page charts training and validation first; the UI is 3 processes, not 17."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_fold(tiny_run(demo_master, "shown", STAGES, "tracking=mlflow"), 0)
    cmd = [sys.executable, "-m", "seedlings.cli", "mlflow-ui", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, env={**os.environ, "SEEDLINGS_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        url = "http://" + proc.stdout.readline().split("http://", 1)[1].split()[0]
        assert url.endswith("?workflowType=machine_learning")
        base = url.split("/#/", 1)[0]
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        runs = page_text(url)
        assert "shown" in runs.splitlines() and "Model registry" in runs  # the run (its folds nested under it)
        assert "Token Usage" not in runs and "Detect Issues" not in runs  # the GenAI overview's
        query = {"experiment_ids": [url.split("/")[-1].split("?")[0]], "filter": "tags.fold = '0'"}
        ask = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(ask, timeout=30) as r:
            run_id = json.loads(r.read())["runs"][0]["info"]["run_id"]
        charts = page_text(url.replace("?", f"/runs/{run_id}/model-metrics?")).splitlines()
        ungrouped = len(charts) - 1 - charts[::-1].index("Model metrics")  # the section of speed and finals
        assert "training" in charts and "validation" in charts, charts
        assert charts.index("training") < ungrouped and charts.index("validation") < ungrouped, charts
        sessions = [line.split() for line in subprocess.run(["ps", "-eo", "sid="], capture_output=True,
                                                            text=True).stdout.splitlines()]  # fmt: skip
        assert sum(1 for f in sessions if f and int(f[0]) == proc.pid) <= 3
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_a_try_study_logs_each_levers_verdict(home, tmp_path, monkeypatch):
    """make try with tracking on: the study is an MLflow run under the "try" parent, each lever's keys a parameter
    and its differences with their intervals metrics named by the lever, try.md an artifact."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from seedlings.track.mlflow import track_try

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = tmp_path / "try.md"
    report.write_text("# make try\n")
    table = pd.DataFrame([{"lever": "16 views (d4+scales)", "delta_f1": -0.0023, "delta_f1_low": -0.009,
                           "delta_f1_high": 0.0045, "delta_log_loss": 0.0012, "mcnemar_p": 0.75}])  # fmt: skip
    track_try("try/comp/levers", "mlflow", {"16 views (d4+scales)": {"tta": "d4+scales"}}, table, [report])
    client = MlflowClient(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("seedlings").experiment_id])}
    study = runs["try/comp/levers"]
    assert study.data.tags["mlflow.parentRunId"] == runs["try"].info.run_id and study.info.status == "FINISHED"
    assert study.data.params["lever.16 views _d4_scales_.tta"] == "d4+scales"
    assert study.data.metrics["16 views _d4_scales_.delta_f1_low"] == pytest.approx(-0.009)
    assert study.data.metrics["16 views _d4_scales_.delta_log_loss"] == pytest.approx(0.0012)
    assert [a.path for a in client.list_artifacts(study.info.run_id)] == ["try.md"]
