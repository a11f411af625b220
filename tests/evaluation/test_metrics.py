"""uamt_fast.evaluation.metrics against medpy.metric.binary (the field's definitions) and scipy's exact EDT."""
import math
import warnings

import h5py
import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from uamt_fast.evaluation import metrics
from uamt_fast.evaluation.metrics import EmptyMaskWarning, case_metrics, summarize

CROSS = {ndim: ndimage.generate_binary_structure(ndim, 1) for ndim in (1, 2, 3)}


def blob(shape, seed, sigma=1.5, level=0.5):
    """Smooth random blobs (several components, holes, touching the array edge)."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def medpy_metrics(pred, gt):
    return {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt),
        "asd": medpy_binary.asd(pred, gt),
    }


def scipy_surface_distances(query_mask, feature_mask):
    """medpy's private __surface_distances, spelled out with scipy (the oracle for the raw distances)."""
    qb = query_mask ^ ndimage.binary_erosion(query_mask, structure=CROSS[query_mask.ndim])
    fb = feature_mask ^ ndimage.binary_erosion(feature_mask, structure=CROSS[feature_mask.ndim])
    return ndimage.distance_transform_edt(~fb)[qb]


def assert_matches_medpy(pred, gt):
    expected = medpy_metrics(pred, gt)
    got = case_metrics(pred, gt)
    for name in metrics.METRIC_NAMES:
        assert isinstance(got[name], float)
        assert got[name] == pytest.approx(expected[name], abs=1e-6, rel=0), name
    assert metrics.dice(pred, gt) == got["dice"]
    assert metrics.jaccard(pred, gt) == got["jaccard"]
    assert metrics.hd95(pred, gt) == got["hd95"]
    assert metrics.asd(pred, gt) == got["asd"]


SHAPES = [(37,), (17, 23), (40, 9), (64, 64), (12, 15, 9), (30, 8, 20), (5, 40, 6), (24, 24, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medpy_on_random_blobs(shape, seed):
    pred, gt = blob(shape, 2 * seed), blob(shape, 2 * seed + 1)
    if not pred.any() or not gt.any():
        pytest.fail(f"test data: empty blob for shape {shape}, seed {seed}; pick another level")
    assert_matches_medpy(pred, gt)


@pytest.mark.parametrize("shape", [(17, 23), (12, 15, 9), (30, 8, 20)], ids=lambda s: "x".join(map(str, s)))
def test_overlapping_masks_touching_every_edge(shape):
    gt = blob(shape, 7, level=0.45)
    pred = ndimage.binary_dilation(gt, iterations=2)  # reaches the array edges
    for axis in range(len(shape)):  # the border_value=0 erosion case: foreground on every face of the array
        assert np.take(pred, 0, axis=axis).any() and np.take(pred, -1, axis=axis).any()
    assert_matches_medpy(pred, gt)
    assert_matches_medpy(gt, pred)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_surface_border_is_scipy_erosion_border(ndim):
    shape = {1: (50,), 2: (31, 17), 3: (13, 9, 11)}[ndim]
    mask = blob(shape, 3, sigma=1.0)
    expected = mask ^ ndimage.binary_erosion(mask, structure=CROSS[ndim])
    np.testing.assert_array_equal(metrics.surface_border(mask), expected)


def ball(shape, center, radius):
    grid = np.indices(shape)
    return sum((grid[i] - c) ** 2 for i, c in enumerate(center)) <= radius * radius


@pytest.mark.parametrize("local_search", [True, False], ids=["shell-search", "separable-only"])
@pytest.mark.parametrize("shape", [(120, 100), (64, 56, 48)], ids=lambda s: "x".join(map(str, s)))
def test_surface_distances_bit_exact_with_scipy_edt(shape, local_search, monkeypatch):
    """A ball 2 voxels from the ground truth (settled by the shell search) plus a far cube (left to
    the separable EDT): both exact paths in one call, bit for bit equal to scipy's EDT."""
    centre, radius = [int(0.6 * s) for s in shape], min(shape) // 4
    gt = ball(shape, centre, radius - 2)
    pred = ball(shape, centre, radius)
    pred[(slice(1, 11),) * len(shape)] = True
    used = {"shell": 0, "separable": 0}
    for name, key in (("_shell_search_sq", "shell"), ("_separable_sq", "separable")):
        original = getattr(metrics, name)

        def spy(*args, _original=original, _key=key):
            used[_key] += 1
            return _original(*args)

        monkeypatch.setattr(metrics, name, spy)
    for a, b in ((pred, gt), (gt, pred)):
        got = metrics.surface_distances(metrics.border_points(a), metrics.border_points(b), local_search)
        np.testing.assert_array_equal(got, scipy_surface_distances(a, b))
    assert used["separable"] > 0 and (used["shell"] > 0) == local_search, used


def test_golden_two_single_voxels():
    pred, gt = np.zeros((6, 7), bool), np.zeros((6, 7), bool)
    pred[0, 0], gt[3, 4] = True, True  # 3-4-5 triangle
    assert case_metrics(pred, gt) == {"dice": 0.0, "jaccard": 0.0, "hd95": 5.0, "asd": 5.0}


def test_asd_is_directed_prediction_to_ground_truth():
    gt = np.zeros((20, 20), bool)
    gt[5:10, 5:10] = True
    pred = gt.copy()
    pred[17, 17] = True  # an outlier voxel: far from gt, but gt's border is all on pred's border
    assert metrics.asd(gt, pred) == 0.0
    assert metrics.asd(pred, gt) == pytest.approx(medpy_binary.asd(pred, gt), abs=1e-12) and metrics.asd(pred, gt) > 0


def test_mm_distances_on_an_anisotropic_grid_are_exact_zero_and_medpy_exact():
    """A prediction equal to the ground truth is 0 mm away, exactly (the matmul form of torch.cdist gave
    hd95_mm 1.35e-06 where hd95 is 0); other masks keep medpy's mm distances."""
    spacing = (0.8, 0.8, 2.5)
    gt = np.zeros((40, 36, 20), bool)
    gt[8:30, 6:28, 4:15] = True  # ~2.4e3 border voxels: above torch.cdist's 25-point switch to the matmul form
    same = case_metrics(gt, gt, spacing)
    assert (same["hd95"], same["asd"], same["hd95_mm"], same["asd_mm"]) == (0.0, 0.0, 0.0, 0.0)
    pred = gt.copy()
    pred[10:12, 10:30, 3:5] = True  # most border voxels shared (hd95 0), a few 1 slice (2.5 mm) off
    for a, b in ((pred, gt), (gt, pred), (blob((30, 28, 14), 5, 2), blob((30, 28, 14), 6, 2))):
        got = case_metrics(a, b, spacing)
        assert got["hd95_mm"] == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=spacing), rel=1e-12, abs=0)
        assert got["asd_mm"] == pytest.approx(medpy_binary.asd(a, b, voxelspacing=spacing), rel=1e-12, abs=0)
    assert case_metrics(pred, gt, spacing)["hd95_mm"] == 0.0 < case_metrics(pred, gt, spacing)["asd_mm"]


def test_torch_and_numpy_inputs_agree():
    gt = blob((16, 12, 10), 4)
    pred = ndimage.binary_dilation(gt)
    expected = case_metrics(pred, gt)
    assert case_metrics(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.uint8))) == expected
    assert case_metrics(torch.from_numpy(pred).float(), gt.astype(np.int64) * 3) == expected  # nonzero = foreground


REAL_PERTURBATIONS = {
    "eroded": lambda gt: ndimage.binary_erosion(gt, CROSS[3], iterations=2),
    "dilated": lambda gt: ndimage.binary_dilation(gt, CROSS[3], iterations=3),
    "shifted": lambda gt: np.roll(gt, (4, -3, 2), axis=(0, 1, 2)),
    "with_far_blob": lambda gt: gt | _corner_cube(gt.shape),
}


def _corner_cube(shape):
    cube = np.zeros(shape, dtype=bool)
    cube[:12, :12, :12] = True
    return cube


def _real_labels(la_root, count):
    ids = [line.strip() for line in (la_root / "test.list").read_text().splitlines() if line.strip()][:count]
    labels = []
    for case_id in ids:
        with h5py.File(la_root / "2018LA_Seg_Training Set" / case_id / "mri_norm2.h5", "r") as f:
            labels.append(f["label"][:].astype(bool))
    return labels


@pytest.mark.real_data
def test_matches_medpy_on_real_la_labels(la_root):
    labels = _real_labels(la_root, 2)
    # Two perturbations per real label keeps the medpy oracle (~1 s per volume) inside the time budget.
    for gt, names in zip(labels, (("eroded", "with_far_blob"), ("dilated", "shifted"))):
        for name in names:
            pred = REAL_PERTURBATIONS[name](gt)
            expected = medpy_metrics(pred, gt)
            got = case_metrics(pred, gt)
            for k in metrics.METRIC_NAMES:
                assert got[k] == pytest.approx(expected[k], abs=1e-6, rel=0), (name, k)


@pytest.mark.parametrize(
    "pred_empty, gt_empty, which",
    [(True, False, "the prediction is empty"), (False, True, "the ground truth is empty"),
     (True, True, "the prediction and ground truth are empty")],
)
def test_empty_masks_give_zero_overlap_and_nan_distances_with_warning(pred_empty, gt_empty, which):
    full = blob((10, 12, 8), 5)
    pred = np.zeros_like(full) if pred_empty else full
    gt = np.zeros_like(full) if gt_empty else full
    for fn in (metrics.hd95, metrics.asd):
        with pytest.warns(EmptyMaskWarning, match=which):
            assert math.isnan(fn(pred, gt))
    with pytest.warns(EmptyMaskWarning, match=which):
        result = case_metrics(pred, gt)
    assert result["dice"] == 0.0 and result["jaccard"] == 0.0
    assert math.isnan(result["hd95"]) and math.isnan(result["asd"])
    assert metrics.dice(pred, gt) == 0.0 and metrics.jaccard(pred, gt) == 0.0


def test_nonempty_masks_do_not_warn():
    gt = blob((10, 12, 8), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        case_metrics(ndimage.binary_dilation(gt), gt)


@pytest.mark.parametrize("fn", [metrics.dice, metrics.jaccard, metrics.hd95, metrics.asd, case_metrics])
def test_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        fn(np.ones((4, 5, 6)), np.ones((4, 5, 7)))


def test_non_array_input_is_rejected():
    with pytest.raises(TypeError, match="prediction must be a numpy array or a torch tensor"):
        metrics.dice([[1, 0]], np.ones((1, 2)))


def test_summarize_ignores_nan_per_metric_and_counts_nan_cases():
    cases = [
        {"case": "a", "dice": 0.9, "jaccard": 0.8, "hd95": 2.0, "asd": 1.0},
        {"case": "b", "dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan},
        {"case": "c", "dice": 0.7, "jaccard": 0.5, "hd95": 4.0, "asd": 3.0},
    ]
    result = summarize(cases)
    assert result["cases"] == cases
    assert result["nan_cases"] == 1
    assert result["mean"] == pytest.approx({"dice": 1.6 / 3, "jaccard": 1.3 / 3, "hd95": 3.0, "asd": 2.0})


def test_summarize_all_nan_metric_is_nan_and_bad_input_raises():
    result = summarize([{"dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan}])
    assert math.isnan(result["mean"]["hd95"]) and result["mean"]["dice"] == 0.0 and result["nan_cases"] == 1
    with pytest.raises(ValueError, match="no cases"):
        summarize([])
    with pytest.raises(ValueError, match=r"case 'x' lacks \['asd'\]"):
        summarize([{"case": "x", "dice": 1.0, "jaccard": 1.0, "hd95": 0.0}])
