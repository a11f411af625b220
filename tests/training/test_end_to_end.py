"""The real command line, end to end: the README's demo, and a short run on the real LA files."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_train(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    out = subprocess.run([sys.executable, "train.py", *args, "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout, json.loads((tmp_path / "run" / "eval.json").read_text())


@pytest.mark.slow
def test_demo_learns_the_synthetic_atria(tmp_path):
    stdout, result = run_train(["--demo"], tmp_path)
    assert result["mean"]["dice"] > 0.8, result["mean"]  # chance level on these blobs is well under 0.2
    assert "Dice" in stdout and "mean" in stdout  # the evaluation table is printed


@pytest.mark.slow
@pytest.mark.real_data
def test_short_run_on_the_real_la_files(la_root, tmp_path):
    """16 labeled + 64 unlabeled real scans through the real loader, trainer and full-resolution evaluation
    of all 20 test scans (volumes pooled 4x and a 2-filter V-Net keep it to seconds of training)."""
    _, result = run_train(["--data", str(la_root), "--downsample", "4", "--n-filters", "2", "--patch", "32", "32", "16",
                           "--iterations", "4", "--log-every", "2", "--threads", "1"], tmp_path)
    test_ids = (la_root / "test.list").read_text().split()
    assert [c["case"] for c in result["cases"]] == test_ids
    assert set(result["mean"]) == {"dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm"}  # LA: 0.625 mm
    for case in result["cases"]:
        assert 0.0 <= case["dice"] <= 1.0 and 0.0 <= case["jaccard"] <= case["dice"] + 1e-12
        assert math.isnan(case["hd95"]) or case["hd95"] >= 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["labeled"] == 16
