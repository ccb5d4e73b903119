"""The GPU check's script, run here at toy sizes on CPU so that it cannot rot before a GPU is lent."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 20 to 40 s on a 2-core CPU: with the slow tests, which CI runs too
def test_gpu_check_dry_run(home, tmp_path):
    env = {**os.environ, "SEEDLINGS_HOME": str(home), "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    (row,) = result["rows"]
    assert row["model"] == "test_efficientnet" and row["size"] == 32
    for key in ("bare_img_s", "loader_img_s", "epoch_img_s", "predict_views_s", "predict_d4_views_s"):
        assert row[key] > 0, key
    assert row["ratio"] == row["epoch_img_s"] / row["bare_img_s"]
    # the fold end to end: configs/gpu.yaml shortened to a solved head and one epoch, trained and recorded
    metrics = pd.read_csv(home / "runs" / "gpu-check" / "fold0" / "metrics.csv")
    assert metrics.stage.tolist() == [0, 1] and metrics.head_c.notna().iloc[0]
    assert result["fold"]["val_f1"] == pytest.approx(metrics.val_f1.iloc[-1])
    assert result["fold"]["fold_seconds"] >= metrics.seconds.sum()
    assert "bare img/s" in done.stdout and "one shortened fold end to end" in done.stdout
    assert result["precision"].startswith("auto: ") and f"precision {result['precision']}" in done.stdout  # and why


def test_gpu_check_times_the_pipelines_own_step(monkeypatch):
    """The check's bare and epoch figures come from step.train_step, the step training runs: with that step replaced
    by one of a known 20 ms, the bare rate is the batch over 20 ms and the epoch calls it once per batch."""
    import time

    import torch

    import seedlings.lab.gpu_check as G

    calls = []

    def known_step(forward, optimizer, criterion, x, y, device, dtype=None, scaler=None):
        calls.append(len(x))
        time.sleep(0.02)

    monkeypatch.setattr(G, "train_step", known_step)
    row = G.measure("test_efficientnet", 8, 32, 48, torch.device("cpu"), steps=4)
    assert row["bare_img_s"] == pytest.approx(8 / 0.02, rel=0.2)
    assert len(calls) == 1 + 4 + 2 * (48 // 8)  # warm-up + timed bare steps + the two epochs (warm-up, timed)
    assert row["epoch_img_s"] <= 8 / 0.02 * 1.05 and row["ratio"] == pytest.approx(row["epoch_img_s"] / 400, rel=0.2)
