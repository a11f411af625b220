"""Sliding-window inference against a one-window-at-a-time transcription of the release, and evaluate()."""
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from uamt_fast.evaluation import inference
from uamt_fast.evaluation.inference import evaluate, format_table, sliding_window_predict, window_starts
from uamt_fast.evaluation.metrics import EmptyMaskWarning

PATCH = (8, 8, 6)


class PositionBias(nn.Module):
    """Adds a fixed random map over the window: the net is no longer translation-equivariant, so any
    misplaced window or padding offset changes its output."""

    def __init__(self, channels, patch):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(channels, *patch))

    def forward(self, x):
        return x + self.bias


def tiny_net(num_classes=2):
    """Conv -> BN (eval, non-trivial running stats) -> ReLU -> Dropout -> 1x1 conv -> position bias."""
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Dropout3d(0.5),
        nn.Conv3d(4, num_classes, 1),
        PositionBias(num_classes, PATCH),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def release_test_single_case(net, image, stride_xy, stride_z, patch_size, num_classes, weights=None):
    """UA-MT code/test_util.py test_single_case, transcribed: numpy padding, one window per forward. With
    ``weights`` (a numpy window map) each window's softmax is multiplied by them and ``cnt`` sums them instead
    of ones: the Gaussian blend as MONAI's sliding_window_inference and nnU-Net v2 accumulate it."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for s, p in zip(image.shape, patch_size)]
    lo = [p // 2 for p in pads]
    image = np.pad(image, [(a, p - a) for a, p in zip(lo, pads)], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                window = (slice(xs, xs + patch_size[0]), slice(ys, ys + patch_size[1]), slice(zs, zs + patch_size[2]))
                patch = torch.from_numpy(np.ascontiguousarray(image[window], dtype=np.float32))[None, None]
                with torch.no_grad():
                    y1 = torch.softmax(net(patch), dim=1)[0].numpy()
                if weights is None:
                    score_map[(slice(None), *window)] = score_map[(slice(None), *window)] + y1
                    cnt[window] = cnt[window] + 1
                else:
                    score_map[(slice(None), *window)] = score_map[(slice(None), *window)] + y1 * weights
                    cnt[window] = cnt[window] + weights
    score_map = score_map / cnt[None]
    label_map = np.argmax(score_map, axis=0)
    crop = tuple(slice(a, a + s) for a, s in zip(lo, (w, h, d)))
    return label_map[crop], score_map[(slice(None), *crop)]


@pytest.mark.parametrize(
    "shape",
    [(20, 13, 11), (5, 17, 4), (8, 8, 6), (3, 2, 1), (9, 30, 6)],
    ids=["unaligned", "smaller-in-x-and-z", "one-window", "smaller-everywhere", "long-y"],
)
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_matches_one_window_loop_exactly(shape, batch_size):
    net = tiny_net(num_classes=3)
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected_labels, expected_probs = release_test_single_case(net, image, 3, 2, PATCH, 3)
    labels, probs = sliding_window_predict(net, image, PATCH, stride_xy=3, stride_z=2, num_classes=3,
                                           batch_size=batch_size)
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert probs.dtype == torch.float32 and tuple(probs.shape) == (3, *shape)
    np.testing.assert_array_equal(labels, expected_labels)
    # Batched convs may round differently from single-window ones (ulp level); batch_size=1 is bit-exact.
    np.testing.assert_allclose(probs.numpy(), expected_probs, rtol=1e-6, atol=1e-7)
    if batch_size == 1:
        np.testing.assert_array_equal(probs.numpy(), expected_probs)
    torch.testing.assert_close(probs.sum(0), torch.ones(shape))


@pytest.mark.parametrize("shape", [(20, 13, 11), (5, 17, 4), (9, 30, 6)], ids=["unaligned", "smaller", "long-y"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_blends_match_a_one_window_loop_exactly(shape, batch_size, blend):
    """blend="gaussian": sum_w importance_map * softmax / sum_w importance_map, added in the release's window
    order: bit-equal to the one-window loop in fp32 (batch 1; batched convs may round at the ulp level);
    blend="mean" given explicitly is the release's plain average, as the default is."""
    net = tiny_net(num_classes=3)
    image = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    weights = inference.importance_map(PATCH).numpy() if blend == "gaussian" else None
    expected_labels, expected_probs = release_test_single_case(net, image, 3, 2, PATCH, 3, weights)
    labels, probs = sliding_window_predict(net, image, PATCH, 3, 2, num_classes=3, batch_size=batch_size, blend=blend)
    np.testing.assert_array_equal(labels, expected_labels)
    if batch_size == 1:
        np.testing.assert_array_equal(probs.numpy(), expected_probs)
    np.testing.assert_allclose(probs.numpy(), expected_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(0), torch.ones(shape))
    if blend == "gaussian":  # where windows overlap, the weighting changes the probabilities
        _, mean = sliding_window_predict(net, image, PATCH, 3, 2, num_classes=3, batch_size=batch_size)
        assert (probs - mean).abs().max() > 1e-3


@pytest.mark.parametrize("patch", [PATCH, (16, 16, 16), (64, 48, 32), (3, 2, 1)], ids=str)
def test_importance_map_is_monais_gaussian(patch):
    """The weights equal MONAI's compute_importance_map(mode="gaussian") at the same sigma (1/8 of the window),
    written out so that inference does not import MONAI."""
    monai_utils = pytest.importorskip("monai.inferers.utils")
    expected = monai_utils.compute_importance_map(patch, mode="gaussian", sigma_scale=inference.GAUSSIAN_SIGMA_SCALE)
    weights = inference.importance_map(patch)
    assert weights.dtype == torch.float32 and weights.shape == patch
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert weights.min() >= inference.MIN_WEIGHT  # the floor: no voxel of a window counts for nothing
    torch.testing.assert_close(weights, weights.flip(0, 1, 2))  # centred on the window


def test_window_starts_follow_the_release():
    assert window_starts(112, 112, 18) == [0]
    assert window_starts(130, 112, 18) == [0, 18]
    assert window_starts(175, 112, 18) == [0, 18, 36, 54, 63]  # last window clamped to the end
    assert window_starts(88, 80, 4) == [0, 4, 8]
    with pytest.raises(ValueError, match="shorter than the window"):
        window_starts(100, 112, 18)


def test_padding_is_centred_and_torch_input_accepted():
    net = tiny_net()
    image = torch.randn(5, 8, 3)  # x pads 3 -> (1, 2); z pads 3 -> (1, 2)
    labels, probs = sliding_window_predict(net, image, PATCH, 3, 2)
    expected_labels, _ = release_test_single_case(net, image.numpy(), 3, 2, PATCH, 2)
    np.testing.assert_array_equal(labels, expected_labels)
    assert inference.centred_padding((5, 8, 3), PATCH) == [(1, 2), (0, 0), (1, 2)]


def test_bfloat16_autocast_keeps_fp32_outputs():
    net = tiny_net()
    image = np.random.default_rng(1).standard_normal((12, 10, 9)).astype(np.float32)
    labels32, probs32 = sliding_window_predict(net, image, PATCH, 3, 2)
    labels16, probs16 = sliding_window_predict(net, image, PATCH, 3, 2, autocast_dtype=torch.bfloat16)
    assert probs16.dtype == torch.float32
    torch.testing.assert_close(probs16, probs32, atol=2e-2, rtol=0)
    assert (labels16 == labels32).mean() > 0.95


def test_bad_arguments_are_named():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"expected an image \(X, Y, Z\)"):
        sliding_window_predict(net, np.zeros((1, 8, 8, 6), np.float32), PATCH)
    with pytest.raises(ValueError, match="stride_z must be a positive integer"):
        sliding_window_predict(net, np.zeros((8, 8, 6), np.float32), PATCH, 3, 0)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 2, 8, 8, 6\), expected \(1, 3, 8, 8, 6\)"):
        sliding_window_predict(net, np.zeros((8, 8, 6), np.float32), PATCH, num_classes=3)
    with pytest.raises(ValueError, match="stride 12 along axis 0 is larger than the window 4: voxels 4.."):
        sliding_window_predict(net, np.zeros((30, 8, 6), np.float32), (4, 4, 2), 12, 1)  # windows at 0, 12, 24, 26
    with pytest.raises(ValueError, match="downsample must be a positive integer, got 0"):
        sliding_window_predict(net, np.zeros((8, 8, 6), np.float32), PATCH, downsample=0)
    with pytest.raises(ValueError, match=r"blend must be one of \('mean', 'gaussian'\), got 'max'"):
        sliding_window_predict(net, np.zeros((8, 8, 6), np.float32), PATCH, blend="max")


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_downsampled_prediction_is_the_pooled_one_upsampled_to_full_resolution(blend):
    """downsample k: windows over the k-times average-pooled image (blended there), the averaged softmax upsampled
    trilinearly, the remainder voxels (an axis not a multiple of k) their neighbour's value; the labels its argmax."""
    net = tiny_net()
    image = np.random.default_rng(3).standard_normal((21, 18, 13)).astype(np.float32)
    labels, probs = sliding_window_predict(net, image, PATCH, 3, 2, downsample=2, blend=blend)
    assert probs.shape == (2, 21, 18, 13) and labels.shape == image.shape and labels.dtype == np.uint8
    pooled = nn.functional.avg_pool3d(torch.from_numpy(image)[None, None], 2)[0, 0]
    _, small = sliding_window_predict(net, pooled.numpy(), PATCH, 3, 2, blend=blend)
    up = nn.functional.interpolate(small[None], scale_factor=2, mode="trilinear")[0]
    torch.testing.assert_close(probs[:, :20, :, :12], up, rtol=0, atol=0)
    torch.testing.assert_close(probs[:, 20], probs[:, 19], rtol=0, atol=0)
    torch.testing.assert_close(probs[..., 12], probs[..., 11], rtol=0, atol=0)
    np.testing.assert_array_equal(labels, probs.argmax(0).numpy())
    torch.testing.assert_close(probs.sum(0), torch.ones(21, 18, 13), rtol=0, atol=1e-5)


class ThresholdNet(nn.Module):
    """Logits (-x, x): predicts foreground exactly where the image is positive. Records its mode."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.dropout = nn.Dropout3d(0.5)
        self.modes_seen = set()

    def forward(self, x):
        self.modes_seen.add((self.training, self.dropout.training))
        return torch.cat([-x, x], dim=1) * self.scale


def synthetic_case(case_id, shape, empty=False, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    if not empty:
        label[2:-2, 3:-3, 1:-1] = 1
    image = np.where(label == 1, 1.0, -1.0) + 0.1 * rng.standard_normal(shape)
    if empty:
        image = -np.abs(image) - 0.5  # the model predicts nothing, but the label is not empty
        label[4:7, 4:7, 2:4] = 1
    return SimpleNamespace(id=case_id, image=image.astype(np.float32), label=label)


def test_evaluate_returns_eval_json_shape_and_restores_modes():
    net = ThresholdNet()
    net.train()
    net.dropout.eval()  # mixed modes must come back exactly as they were
    cases = [synthetic_case("perfect_a", (12, 10, 9)), synthetic_case("perfect_b", (6, 14, 7), seed=1),
             synthetic_case("empty_pred", (10, 10, 8), empty=True)]
    seen_rows = []
    with pytest.warns(EmptyMaskWarning, match="the prediction is empty"):
        result = evaluate(net, cases, patch_size=PATCH, stride_xy=3, stride_z=2, batch_size=4,
                          progress=seen_rows.append)
    assert net.training and not net.dropout.training
    assert net.modes_seen == {(False, False)}  # every forward ran in eval mode

    assert set(result) == {"cases", "mean", "nan_cases"}
    assert [row["case"] for row in result["cases"]] == ["perfect_a", "perfect_b", "empty_pred"]
    assert seen_rows == result["cases"]
    for row in result["cases"]:
        assert set(row) == {"case", "dice", "jaccard", "hd95", "asd"}
        assert all(isinstance(row[k], float) for k in ("dice", "jaccard", "hd95", "asd"))
    a, b, empty = result["cases"]
    assert a["dice"] == a["jaccard"] == 1.0 and a["hd95"] == a["asd"] == 0.0
    assert b["dice"] == 1.0
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95"]) and math.isnan(empty["asd"])
    assert result["nan_cases"] == 1
    assert result["mean"]["dice"] == pytest.approx(2 / 3)
    assert result["mean"]["hd95"] == 0.0  # the NaN case is left out of the distance means


def test_evaluate_restores_modes_when_a_case_fails():
    net = ThresholdNet().train()
    bad = SimpleNamespace(id="bad", image=np.zeros((8, 8, 6), np.float32), label=np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match=r"case 'bad': image shape \(8, 8, 6\) does not match label shape \(8, 8, 5\)"):
        evaluate(net, [bad], patch_size=PATCH)
    assert net.training and net.dropout.training


def test_evaluate_reads_a_folder_through_uamt_fast_data(monkeypatch, tmp_path):
    calls = []
    cases = {"c1": synthetic_case("c1", (9, 9, 7)), "c2": synthetic_case("c2", (10, 8, 6), seed=3)}
    fake = types.ModuleType("uamt_fast.data")
    fake.read_list = lambda root, split: calls.append(("read_list", root, split)) or ["c1", "c2"]
    fake.load_case = lambda root, case_id: calls.append(("load_case", root, case_id)) or cases[case_id]
    monkeypatch.setitem(sys.modules, "uamt_fast.data", fake)
    result = evaluate(ThresholdNet(), tmp_path, split="train", patch_size=PATCH, stride_xy=4, stride_z=3)
    assert calls == [("read_list", tmp_path, "train"), ("load_case", tmp_path, "c1"), ("load_case", tmp_path, "c2")]
    assert [row["case"] for row in result["cases"]] == ["c1", "c2"]
    assert result["mean"]["dice"] == 1.0


def test_evaluate_rejects_bad_data():
    with pytest.raises(TypeError, match=r"data\[0\] \(dict\) lacks attribute\(s\) \['id', 'image', 'label'\]"):
        evaluate(ThresholdNet(), [{"id": "x"}], patch_size=PATCH)
    with pytest.raises(TypeError, match="data-set folder or a sequence"):
        evaluate(ThresholdNet(), 42, patch_size=PATCH)
    with pytest.raises(ValueError, match="no cases"):
        evaluate(ThresholdNet(), [], patch_size=PATCH)


def test_format_table_lists_cases_in_percent_and_the_mean():
    result = {
        "cases": [
            {"case": "UPT6DX9IQY9JAZ7HJKA7", "dice": 0.9123, "jaccard": 0.8391, "hd95": 5.5, "asd": 1.75},
            {"case": "empty", "dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan},
        ],
        "mean": {"dice": 0.45615, "jaccard": 0.41955, "hd95": 5.5, "asd": 1.75},
        "nan_cases": 1,
    }
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["case", "Dice(%)", "Jaccard(%)", "95HD(vox)", "ASD(vox)"]
    assert lines[2].split() == ["UPT6DX9IQY9JAZ7HJKA7", "91.23", "83.91", "5.50", "1.75"]
    assert lines[3].split() == ["empty", "0.00", "0.00", "nan", "nan"]
    assert lines[5].split() == ["mean", "(2)", "45.62", "41.95", "5.50", "1.75"]
    assert "1 case(s)" in lines[6]
    per_class = {"1": result["mean"], "2": result["mean"]}
    lines = format_table(result | {"mean_per_class": per_class, "class_names": {"1": "right ventricle"}}).splitlines()
    assert lines[6].split() == ["class", "1", "right", "ventricle", "45.62", "41.95", "5.50", "1.75"]
    assert lines[7].split() == ["class", "2", "45.62", "41.95", "5.50", "1.75"]  # (a class without a name)
    assert len({len(line) for line in lines[:8] if not line.startswith("-")}) == 1  # the columns line up
    with pytest.raises(ValueError, match="result lacks"):
        format_table({"cases": []})
