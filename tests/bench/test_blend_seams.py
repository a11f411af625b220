"""benchmarks/blend_seams.py: which neighbour pairs straddle a window border, the seam measure on a map with known
steps, and the command end to end on a tiny untrained V-Net (the JSON it writes)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmarks import blend_seams
from uamt_fast import data
from uamt_fast.nets.vnet import VNet
from uamt_fast.training.config import Config


def test_border_pairs_follow_the_window_starts_and_the_padding():
    # windows [0, 8), [3, 11), [6, 14) over 14 voxels: borders before voxels 3, 6, 8, 11
    assert np.flatnonzero(blend_seams.border_pairs(14, 8, 3, 0)).tolist() == [2, 5, 7, 10]
    # an axis of 5 padded to the window 8 by (1, 2): one window, its borders outside the image
    assert not blend_seams.border_pairs(5, 8, 3, 1).any()


def test_seam_jumps_separate_steps_at_borders_from_steps_elsewhere():
    volume = torch.zeros(14, 8, 6)
    volume[8:] = 1.0  # one step, at the border before voxel 8 (windows of 8 at stride 3 along x)
    at_border = blend_seams.seam_jumps(volume, (8, 8, 6), (3, 3, 2))
    pairs = 13 * 8 * 6 + 14 * 7 * 6 + 14 * 8 * 5
    assert at_border["border"] == pytest.approx(8 * 6 / (4 * 8 * 6)) and at_border["elsewhere"] == 0
    volume = torch.zeros(14, 8, 6)
    volume[9:] = 1.0  # the same step one voxel later: not at a border
    away = blend_seams.seam_jumps(volume, (8, 8, 6), (3, 3, 2))
    assert away["border"] == 0 and away["elsewhere"] == pytest.approx(8 * 6 / (pairs - 4 * 8 * 6))
    assert away["ratio"] == 0


def test_the_command_writes_dice_and_seams_of_both_blends(tmp_path):
    root = data.write_synthetic_la(tmp_path / "data", n_train=1, n_test=1, shape=(36, 36, 20), seed=0)
    cfg = Config(n_filters=2, patch=(16, 16, 16), eval_stride_xy=8, eval_stride_z=4, downsample=2, labeled=1)
    torch.save({"model": VNet(n_filters=2).state_dict(), "config": dataclasses.asdict(cfg)}, tmp_path / "student.pt")
    out = tmp_path / "seams.json"
    assert blend_seams.main([str(tmp_path / "student.pt"), "--data", str(root), "--passes", "2",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["case"] for row in result["cases"]] == data.read_list(root, "test")
    for blend in ("mean", "gaussian"):
        mean = result["mean"][blend]
        assert 0 <= mean["dice"] <= 1 and mean["border"] > 0 and mean["elsewhere"] > 0 and mean["prob_ratio"] > 0
    assert result["settings"]["downsample"] == 2 and result["settings"]["passes"] == 2
