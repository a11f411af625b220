"""Slice-wise inference for 2D models against scipy's order-0 zoom and SSL4MIS's test_single_volume (written out
with scipy here), and evaluate()/predict_volume() dispatching to it."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.ndimage import zoom

from uamt_fast.evaluation.inference import InferenceSettings, evaluate, predict_volume, sliding_window_predict
from uamt_fast.evaluation.metrics import labelmap_metrics
from uamt_fast.evaluation.slicewise import slicewise_predict, zoom_indices, zoom_nearest
from uamt_fast.nets.unet import UNet2D


class PositionBias2D(nn.Module):
    """A per-class scale of the pixel plus a fixed random map over the slice: elementwise, so neither batching nor
    the thread count can change a bit (a 1x1 conv can: its kernels pick another summation path by batch size and
    threads), and not translation-equivariant, so a misplaced or transposed slice changes the output."""

    def __init__(self, num_classes, size):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(num_classes, 1, 1))
        self.bias = nn.Parameter(torch.randn(num_classes, *size))

    def forward(self, x):
        return x * self.scale * 3 + self.bias


def ssl4mis_test_single_volume(net, image, classes, patch_size):
    """SSL4MIS code/val_2D.py test_single_volume, transcribed (CPU, its metrics left out): ``image`` (Z, x, y),
    each slice zoomed to ``patch_size`` with scipy order 0, one slice a forward, the argmax zoomed back. Also
    returns each slice's softmax zoomed back the same way (scipy's cval 0 where its zoom writes it)."""
    prediction = np.zeros(image.shape, dtype=np.int64)
    probs = np.zeros((classes,) + image.shape, dtype=np.float32)
    for ind in range(image.shape[0]):
        slice = image[ind, :, :]
        x, y = slice.shape[0], slice.shape[1]
        slice = zoom(slice, (patch_size[0] / x, patch_size[1] / y), order=0)
        input = torch.from_numpy(slice).unsqueeze(0).unsqueeze(0).float()
        net.eval()
        with torch.no_grad():
            p = torch.softmax(net(input), dim=1)
            out = torch.argmax(p, dim=1).squeeze(0).numpy()
            prediction[ind] = zoom(out, (x / patch_size[0], y / patch_size[1]), order=0)
            for c in range(classes):
                probs[c, ind] = zoom(p[0, c].numpy(), (x / patch_size[0], y / patch_size[1]), order=0)
    return prediction, probs


@pytest.mark.parametrize("size_in", [1, 2, 12, 16, 21, 30, 32, 59, 216, 256, 257])
@pytest.mark.parametrize("size_out", [1, 3, 12, 16, 23, 30, 216, 256])
def test_zoom_nearest_equals_scipy_order0(size_in, size_out):
    """Every plane of a batch resized as scipy.ndimage.zoom(plane, (h / H, w / W), order=0) resizes it, both ways
    between odd and even sizes, including the sizes where scipy writes its cval 0 in the last row (256 -> 12, 23;
    16 -> 30; 32 -> 16)."""
    rng = np.random.default_rng(size_in * 1000 + size_out)
    planes = rng.normal(size=(2, size_in, size_out + 5)).astype(np.float32) + 2.0  # no zeros: cval is visible
    ours = zoom_nearest(torch.from_numpy(planes), (size_out, size_in)).numpy()
    for plane, got in zip(planes, ours):
        np.testing.assert_array_equal(got, zoom(plane, (size_out / size_in, size_in / (size_out + 5)), order=0))


def test_zoom_indices_cval_edge():
    """The sizes where scipy's last coordinate lands one rounding step past the input read no input (-1), and
    zoom_nearest fills them: SSL4MIS's 256 -> 216 back-resize (an ACDC in-plane size) has an all-zero last row,
    256 -> 232 none."""
    for size in (12, 216):
        assert zoom_indices(256, size)[-1] == -1 and (zoom_indices(256, size)[:-1] >= 0).all()
        assert (zoom(np.ones((256, 2)), (size / 256, 1), order=0)[-1] == 0).all()
    assert (zoom_indices(256, 232) >= 0).all()
    labels = torch.full((1, 256, 8), 3, dtype=torch.int64)
    back = zoom_nearest(labels, (12, 8))
    assert (back[0, -1] == 0).all() and (back[0, :-1] == 3).all()
    np.testing.assert_array_equal(back[0].numpy(), zoom(labels[0].numpy(), (12 / 256, 1), order=0))
    assert (zoom_nearest(labels.float(), (12, 8), fill=1.0)[0, -1] == 1).all()


@pytest.fixture(scope="module")
def position_net():
    torch.manual_seed(0)
    return PositionBias2D(4, (16, 16)).eval()


@pytest.fixture(scope="module")
def unet():
    """A tiny UNet2D (2 filters, 4 classes) with non-trivial running batch-norm statistics, in eval mode."""
    torch.manual_seed(1)
    net = UNet2D(1, 4, n_filters=2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_slicewise_equals_ssl4mis_loop_exactly(position_net):
    """Several slices a forward == SSL4MIS's one-slice loop with scipy, labels and probabilities bit for bit, on a
    (32, 30, 7) volume whose resizes hit scipy's edge both ways (32 -> 16 reads past the input's last row, 16 -> 30
    writes cval in the last column): probs there are the background's one-hot, labels 0."""
    image = torch.randn(32, 30, 7).numpy()
    assert (zoom_indices(32, 16) < 0).any() and (zoom_indices(16, 30) < 0).any()
    labels, probs = slicewise_predict(position_net, image, (16, 16), num_classes=4, batch_size=3)
    ref_labels, ref_probs = ssl4mis_test_single_volume(position_net, image.transpose(2, 0, 1), 4, (16, 16))
    assert labels.dtype == np.uint8 and labels.shape == image.shape and probs.shape == (4, *image.shape)
    np.testing.assert_array_equal(labels, ref_labels.transpose(1, 2, 0))
    assert len(np.unique(labels)) == 4  # every class predicted somewhere: the comparison sees all of them
    ref_probs = ref_probs.transpose(0, 2, 3, 1)
    ref_probs[0, :, -1] = 1.0  # the cval column: the background's one-hot (the module docstring)
    np.testing.assert_array_equal(probs.numpy(), ref_probs)
    np.testing.assert_array_equal(labels, probs.argmax(0).numpy())


def test_slicewise_unet_equals_one_slice_loop_and_ssl4mis(unet):
    """The real 2D U-Net: batch_size 4 against batch_size 1 (same labels, probabilities equal up to the conv's
    batched summation order) and against SSL4MIS's scipy loop (same labels)."""
    image = torch.randn(31, 20, 6).numpy()
    labels, probs = slicewise_predict(unet, image, (32, 32), num_classes=4, batch_size=4)
    one_labels, one_probs = slicewise_predict(unet, image, (32, 32), num_classes=4, batch_size=1)
    np.testing.assert_array_equal(labels, one_labels)
    torch.testing.assert_close(probs, one_probs, atol=1e-6, rtol=0)
    ref_labels, _ = ssl4mis_test_single_volume(unet, image.transpose(2, 0, 1), 4, (32, 32))
    np.testing.assert_array_equal(labels, ref_labels.transpose(1, 2, 0))
    assert len(np.unique(labels)) > 1


@pytest.mark.filterwarnings("ignore::uamt_fast.evaluation.metrics.EmptyMaskWarning")  # an untrained net
def test_evaluate_slice_size_scores_each_class_in_3d(unet):
    """evaluate(slice_size=...) on a 2D model: per-class rows (RV, Myo, LV) of the slice-wise labels scored on the
    3D volume, in mm with the case's spacing, and the model's mode restored."""
    rng = np.random.default_rng(0)
    label = np.zeros((31, 20, 6), dtype=np.uint8)
    label[8:24, 4:16, 1:5] = 1
    label[12:20, 6:14, 1:5] = 2
    label[14:18, 8:12, 2:4] = 3
    image = (label + rng.normal(scale=0.3, size=label.shape)).astype(np.float32)
    case = SimpleNamespace(id="patient001_frame01", image=image, label=label, spacing=(1.5, 1.5, 10.0))
    unet.train()
    result = evaluate(unet, [case], num_classes=4, batch_size=4, slice_size=(32, 32))
    assert unet.training and all(m.training for m in unet.modules())
    unet.eval()
    labels, _ = slicewise_predict(unet, image, (32, 32), num_classes=4, batch_size=4)
    expected = labelmap_metrics(labels, label, 4, case.spacing)
    row = result["cases"][0]
    assert row["case"] == case.id and sorted(row["classes"]) == ["1", "2", "3"]
    assert "hd95_mm" in row["classes"]["1"]
    for c in ("1", "2", "3"):
        for k, v in expected["classes"][c].items():
            np.testing.assert_equal(row["classes"][c][k], v)


class Oracle2D(nn.Module):
    """Logits that put the class ``round(x)`` first: a model that segments an image holding its label perfectly."""

    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x[:, 0].round().long(), 4).permute(0, 3, 1, 2).float()


def test_evaluate_slice_size_perfect_model_scores_one():
    """A perfect slice-wise model scores Dice 1 and distance 0 in every class: the slices go back where they came
    from (no transposed or shifted slice), at a size (28 x 20) whose nearest round trip through 32 x 32 is exact."""
    label = np.zeros((28, 20, 6), dtype=np.uint8)
    label[8:24, 4:16, 1:5], label[12:20, 6:14, 1:5], label[14:18, 8:12, 2:4] = 1, 2, 3
    label[27, 19, 0] = 3  # the last row and column, which scipy's edge case blanks at other sizes (31: 32 -> 31)
    case = SimpleNamespace(id="c", image=label.astype(np.float32), label=label, spacing=(1.5, 1.5, 10.0))
    result = evaluate(Oracle2D(), [case], num_classes=4, batch_size=4, slice_size=(32, 32))
    for c in ("1", "2", "3"):
        assert result["cases"][0]["classes"][c]["dice"] == 1.0 and result["cases"][0]["classes"][c]["hd95_mm"] == 0.0


def test_predict_volume_dispatch(unet):
    """predict_volume: no slice_size -> the sliding windows' result; a slice_size -> the slice-wise one; a 2D
    model with a downsample or a Gaussian blend is refused, not silently run without them."""
    image = torch.randn(20, 18, 5).numpy()
    net3d = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval()
    settings = InferenceSettings(patch_size=(16, 16, 4), stride_xy=6, stride_z=2, num_classes=2, batch_size=3)
    labels, probs = predict_volume(net3d, image, settings)
    ref_labels, ref_probs = sliding_window_predict(net3d, image, (16, 16, 4), 6, 2, 2, 3)
    np.testing.assert_array_equal(labels, ref_labels)
    assert torch.equal(probs, ref_probs)
    settings_2d = InferenceSettings(num_classes=4, batch_size=2, slice_size=(32, 32))
    labels, probs = predict_volume(unet, image, settings_2d)
    ref_labels, ref_probs = slicewise_predict(unet, image, (32, 32), 4, 2)
    np.testing.assert_array_equal(labels, ref_labels)
    assert torch.equal(probs, ref_probs)
    for bad in ({"downsample": 2}, {"blend": "gaussian"}):
        with pytest.raises(ValueError, match="2D model"):
            predict_volume(unet, image, InferenceSettings(num_classes=4, slice_size=(32, 32), **bad))
