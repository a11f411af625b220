"""--blend mean|gaussian through the command lines: train.py's end-of-run evaluation and --eval, and predict, use
the run's own setting unless a flag overrides it, and say in their records which one they used; a checkpoint from
before --blend reads as mean; predict's uncertainty map is blended as its mask.

Which blend ran is seen by counting ``inference.importance_map`` calls (built once per Gaussian-blended sliding
window prediction, never for the plain average), not only by what a record claims. The unit tests of the blend
itself (MONAI's weights, the one-window loop) are in test_inference.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("nibabel")  # predict writes NIfTI files

from trainer_cli import TINY  # noqa: E402 (tests/ is on sys.path under pytest)

from uamt_fast import data, predict, train  # noqa: E402
from uamt_fast.evaluation import inference, uncertainty  # noqa: E402
from uamt_fast.training import checkpoints  # noqa: E402

SHAPE = (24, 24, 20)
# Windows overlap on every axis (16^3 windows at strides 8 and 4), so the blends give different probabilities.
WINDOWS = ["--eval-stride-xy", "8", "--eval-stride-z", "4"]


def counting_importance_map(mp: pytest.MonkeyPatch) -> list:
    """Patch ``inference.importance_map`` to record each call; returns the list the calls go into."""
    calls, real = [], inference.importance_map
    mp.setattr(inference, "importance_map", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory, trainer_on_cpu_module) -> SimpleNamespace:
    """A tiny UA-MT run (2 iterations) trained with --blend gaussian on a synthetic LA-layout set of 1 test case;
    ``calls``: the Gaussian-blended predictions its end-of-run evaluation made."""
    root = tmp_path_factory.mktemp("blend")
    data.write_synthetic_la(root / "data", n_train=3, n_test=1, shape=SHAPE, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        calls = counting_importance_map(mp)
        assert train.main(["--data", str(root / "data"), *TINY, *WINDOWS, "--blend", "gaussian", "--mc-passes", "2",
                           "--batch-labeled", "1", "--batch-unlabeled", "1", "--threads", "1",
                           "--out", str(root / "run")]) == 0
    return SimpleNamespace(run=root / "run", data=root / "data", calls=len(calls))


@pytest.fixture
def gaussian_calls(monkeypatch) -> list:
    return counting_importance_map(monkeypatch)


def settings(path: Path) -> dict:
    return json.loads(path.read_text())["source"]["settings"]


def test_a_run_saves_its_blend_and_evaluates_with_it(gaussian_run):
    assert json.loads((gaussian_run.run / "config.json").read_text())["config"]["blend"] == "gaussian"
    assert settings(gaussian_run.run / "eval.json")["blend"] == "gaussian"
    assert gaussian_run.calls == 1  # the one test case, blended with Gaussian weights


def test_eval_takes_the_runs_blend_unless_the_flag_is_given(gaussian_run, tmp_path, gaussian_calls):
    given = ["--eval", str(gaussian_run.run), "--data", str(gaussian_run.data), "--threads", "1"]
    assert train.main([*given, "--out", str(tmp_path / "own")]) == 0
    assert settings(tmp_path / "own" / "eval_student.json")["blend"] == "gaussian" and len(gaussian_calls) == 1
    assert train.main([*given, "--out", str(tmp_path / "mean"), "--blend", "mean"]) == 0
    assert settings(tmp_path / "mean" / "eval_student.json")["blend"] == "mean" and len(gaussian_calls) == 1


def test_predict_follows_the_runs_blend_and_records_it(gaussian_run, tmp_path, gaussian_calls):
    """Default: the run's gaussian, for the mask and the uncertainty alike (2 blended predictions), and the mask is
    the argmax of the Gaussian-blended prediction; --blend mean overrides it."""
    case_id = data.read_list(gaussian_run.data, "test")[0]
    case, out = gaussian_run.data / data.IMAGES_DIR / case_id, tmp_path / "own"  # (the test case's folder)
    assert predict.main([str(gaussian_run.run), str(case), "--out", str(out), "--uncertainty", "2",
                         "--threads", "1"]) == 0
    assert len(gaussian_calls) == 2
    assert json.loads((out / "predictions.json").read_text())["runs"][-1]["settings"]["blend"] == "gaussian"
    import nibabel

    mask = np.asarray(nibabel.load(str(out / f"{case_id}.nii.gz")).dataobj)
    net, cfg, _ = checkpoints.load_vnet(gaussian_run.run)
    image = data.load_case(gaussian_run.data, case_id).image
    args = (net.eval(), image, tuple(cfg["patch"]), cfg["eval_stride_xy"], cfg["eval_stride_z"], 2)
    gaussian = inference.sliding_window_predict(*args, blend="gaussian")
    np.testing.assert_array_equal(mask, gaussian[0])
    assert (gaussian[1] - inference.sliding_window_predict(*args)[1]).abs().max() > 1e-4  # the blends differ here

    assert predict.main([str(gaussian_run.run), str(case), "--out", str(tmp_path / "mean"), "--blend", "mean",
                         "--threads", "1"]) == 0
    assert len(gaussian_calls) == 3  # (importance_map above: one call) and none for predict --blend mean
    assert json.loads((tmp_path / "mean" / "predictions.json").read_text())["runs"][-1]["settings"]["blend"] == "mean"


def test_a_checkpoint_from_before_blend_reads_as_mean(gaussian_run, tmp_path, gaussian_calls, capsys):
    case = gaussian_run.data / data.IMAGES_DIR / data.read_list(gaussian_run.data, "test")[0]
    state = torch.load(gaussian_run.run / "student.pt", weights_only=True)
    del state["config"]["blend"]
    torch.save(state, tmp_path / "old.pt")
    assert train.main(["--eval", str(tmp_path / "old.pt"), "--data", str(gaussian_run.data), "--threads", "1"]) == 0
    assert settings(tmp_path / "eval_old.json")["blend"] == "mean"
    assert predict.main([str(tmp_path / "old.pt"), str(case), "--out", str(tmp_path / "masks"), "--threads", "1"]) == 0
    assert json.loads((tmp_path / "masks" / "predictions.json").read_text())["runs"][-1]["settings"]["blend"] == "mean"
    assert gaussian_calls == []
    state["config"]["blend"] = "max"  # a config no trainer wrote: one line, exit 2, nothing predicted
    torch.save(state, tmp_path / "odd.pt")
    capsys.readouterr()
    assert predict.main([str(tmp_path / "odd.pt"), str(case), "--out", str(tmp_path / "odd")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blend 'max'" in err and "mean, gaussian" in err, err
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_mc_dropout_mean_is_blended_as_the_prediction(blend):
    """Without dropout every pass is the same forward, so the MC mean of the windows, blended, is the prediction's
    blended softmax: the uncertainty map predict writes is blended as its mask is."""
    net = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 3, 1)).eval()
    image = np.random.default_rng(2).standard_normal((14, 11, 9)).astype(np.float32)
    args = ((8, 8, 6), 3, 2, 3, 2)  # patch, strides, classes, windows per forward
    mean = uncertainty.mc_dropout_mean(net, image, 3, *args, blend=blend)
    torch.testing.assert_close(mean, inference.sliding_window_predict(net, image, *args, blend=blend)[1],
                               rtol=1e-5, atol=1e-6)
    other = "mean" if blend == "gaussian" else "gaussian"
    assert (mean - inference.sliding_window_predict(net, image, *args, blend=other)[1]).abs().max() > 1e-4
