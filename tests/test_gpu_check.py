"""The GPU check's script, run here at toy sizes on CPU so that it cannot rot before a GPU is lent."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    assert 0 <= result["fold"]["val_f1"] <= 1 and result["fold"]["fold_seconds"] > 0
    assert "bare img/s" in done.stdout and "one shortened fold end to end" in done.stdout
