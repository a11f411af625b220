"""Any number of classes: a prepared data set's class count reaches the V-Net, the losses and the evaluation
(per class and their mean, distances in voxels and mm), and unlabeled.list cases feed the unlabeled stream
without their labels ever being read. A whole training on three classes is in tests/data/test_own_data.py;
C = 2 (the LA release) is unchanged, as the rest of the suite checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train  # noqa: E402
from uamt_fast import data, reference  # noqa: E402
from uamt_fast.evaluation import metrics

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py

FAST = ["--n-filters", "4", "--labeled", "4", "--no-compile", "--device", "cpu", "--save-every", "1000"]


def write_prepared(root: Path, n_train=8, n_test=3, n_unlabeled=2, shape=(40, 36, 24), seed=0,
                   spacing=(1.0, 1.0, 2.0)) -> Path:
    """A data set in the layout ``prepare`` writes: 3 classes (two bright ellipsoids, one in each half along
    x), dataset.json with the class count, a preset patch and strides, and unlabeled.list cases whose h5
    files hold an image only."""
    rng = np.random.default_rng(seed)
    ids = {"train": [f"tr{i}" for i in range(n_train)], "test": [f"ts{i}" for i in range(n_test)],
           "unlabeled": [f"un{i}" for i in range(n_unlabeled)]}
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    level = np.array([0.0, 1.5, 3.0], np.float32)
    for role, names in ids.items():
        for name in names:
            label = np.zeros(shape, np.uint8)
            for c, x in ((1, 0.3), (2, 0.7)):
                centre = np.array([x, *rng.uniform(0.35, 0.65, 2)]) * shape
                radii = rng.uniform(0.17, 0.22, 3) * shape
                label[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = c
            folder = root / data.IMAGES_DIR / name
            folder.mkdir(parents=True)
            with h5py.File(folder / data.H5_NAME, "w") as f:
                f["image"] = (level[label] + rng.normal(0, 0.5, shape)).astype(np.float32)
                if role != "unlabeled":
                    f["label"] = label
        (root / f"{role}.list").write_text("".join(n + "\n" for n in names))
    record = {"format": data.RECORD_FORMAT, "preset": "none", "num_classes": 3,
              "labels": {"background": 0, "dim": 1, "bright": 2},
              "train": {"patch": [32, 32, 16], "eval_stride_xy": 16, "eval_stride_z": 8},
              "cases": {n: {"spacing": list(spacing)} for names in ids.values() for n in names}}
    (root / data.RECORD_NAME).write_text(json.dumps(record))
    return root


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("three_classes"))


def test_unlabeled_list_cases_join_the_unlabeled_stream_without_their_labels(three_classes, tmp_path):
    cfg = train.Config(data=[str(three_classes)], labeled=4, n_filters=4, patch=(32, 32, 16), eval_stride_xy=16,
                       eval_stride_z=8, num_classes=3, device="cpu", compile=False)
    parts = train.build(cfg)
    assert parts.student.num_classes == 3 and parts.teacher.num_classes == 3
    sampler = parts.sampler
    assert sampler.ids == [f"tr{i}" for i in range(8)] + ["un0", "un1"]
    seen = set()
    for _ in range(8):
        _, labels = sampler.next()
        for row, case_id in enumerate(sampler.last_case_ids):
            seen.add(case_id)
            if case_id.startswith("un"):
                assert (labels[row] == -1).all()  # nothing was read, nothing is made up
            else:
                assert labels[row].min() >= 0
    assert {"un0", "un1"} <= seen


def test_an_unlabeled_case_never_reads_a_label_even_when_its_file_has_one(three_classes, tmp_path):
    root = tmp_path / "data"
    write_prepared(root)
    with h5py.File(root / data.IMAGES_DIR / "un0" / data.H5_NAME, "a") as f:
        f["label"] = np.full((40, 36, 24), 9, np.uint8)  # would be refused (9 >= 3 classes) if it were read
    (case,) = data.load_cases(root, ["un0"], labeled=False)
    assert case.label is None and case.spacing == (1.0, 1.0, 2.0)
    with pytest.raises(data.DataError, match="outside 0..2"):
        data.load_case(root, "un0")
    with pytest.raises(data.DataError, match="no label and cannot be labeled"):
        data.TwoStreamSampler([case, case], [], patch_size=(16, 16, 16), batch_unlabeled=0)


def test_class_count_mismatches_are_one_line(three_classes, tmp_path, capsys):
    assert train.main(["--data", str(three_classes), *FAST, "--num-classes", "2", "--iterations", "1",
                       "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-classes 2" in err and "3 classes" in err, err
    two = tmp_path / "two"
    data.write_synthetic_la(two, n_train=5, n_test=2, shape=(32, 32, 16), seed=3)
    assert train.main(["--data", str(two), *FAST, "--labeled", "2", "--patch", "16", "16", "16",
                       "--eval-stride-xy", "16", "--eval-stride-z", "16", "--iterations", "1",
                       "--out", str(tmp_path / "r2")]) == 0
    assert train.main(["--eval", str(tmp_path / "r2"), "--data", str(three_classes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "predicts 2 classes" in err and "has 3" in err, err
    bad = tmp_path / "bad"
    write_prepared(bad)
    record = json.loads((bad / data.RECORD_NAME).read_text())
    (bad / data.RECORD_NAME).write_text(json.dumps(record | {"num_classes": 1}))
    assert train.main(["--data", str(bad), *FAST, "--iterations", "1", "--out", str(tmp_path / "r3")]) == 2
    assert "num_classes 1" in capsys.readouterr().err


def test_dice_loss_averages_the_foreground_classes_and_is_the_released_one_for_two():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (2, 6, 5, 4))
    p = logits.softmax(1)

    def one(c):
        y = (labels == c).double()
        return 1 - (2 * (p[:, c] * y).sum() + 1e-5) / ((p[:, c] ** 2).sum() + (y ** 2).sum() + 1e-5)

    assert torch.allclose(reference.dice_loss(logits, labels), (one(1) + one(2)) / 2)
    two, binary = logits[:, :2], labels.clamp(max=1)
    p2 = two.softmax(1)[:, 1]
    y = (binary == 1).double()
    released = 1 - (2 * (p2 * y).sum() + 1e-5) / ((p2 * p2).sum() + (y * y).sum() + 1e-5)
    assert torch.equal(reference.dice_loss(two, binary), released)


@pytest.mark.parametrize("spacing", [(0.625, 0.625, 0.625), (1.0, 0.8, 2.5)], ids=["isotropic", "anisotropic"])
def test_distances_in_mm_match_medpy_with_voxelspacing(spacing):
    medpy = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (30, 28, 20)], indexing="ij"), -1)
    gt = (((grid - [15, 14, 10]) / [8, 7, 5]) ** 2).sum(-1) <= 1
    pred = (((grid - [16, 13, 10]) / [7, 8, 6]) ** 2).sum(-1) <= 1
    pred ^= rng.random(pred.shape) < 0.002
    m = metrics.case_metrics(pred, gt, spacing)
    assert m["hd95"] == pytest.approx(medpy.hd95(pred, gt), rel=1e-12)
    assert m["hd95_mm"] == pytest.approx(medpy.hd95(pred, gt, voxelspacing=spacing), rel=1e-6)  # scipy EDT rounding
    assert m["asd_mm"] == pytest.approx(medpy.asd(pred, gt, voxelspacing=spacing), rel=1e-6)  # scipy EDT rounding


def test_labelmap_metrics_score_each_class_alone():
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[2:8, 2:8, 2:8], gt[12:18, 12:18, 12:18] = 1, 2
    pred = gt.copy()
    pred[12:18, 12:18, 12:15] = 1  # half of class 2 predicted as class 1
    m = metrics.labelmap_metrics(pred, gt, 3, (1.0, 1.0, 1.0))
    assert m["classes"]["1"]["dice"] == pytest.approx(2 * 216 / (216 + 324))
    assert m["classes"]["2"]["dice"] == pytest.approx(2 * 108 / (108 + 216))
    assert m["dice"] == pytest.approx((m["classes"]["1"]["dice"] + m["classes"]["2"]["dice"]) / 2)
    assert metrics.labelmap_metrics(pred, gt, 2)["dice"] == 1.0  # two classes: every nonzero voxel is foreground


def test_panels_draw_each_class_in_its_own_colour(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from uamt_fast import figures
    from uamt_fast.nets.vnet import VNet

    root = write_prepared(tmp_path / "data", n_train=1, n_test=1, n_unlabeled=0)
    case = data.load_case(root, "ts0")
    drawn, contour = [], matplotlib.axes.Axes.contour

    def spy(self, mask, *a, colors=None, linestyles=None, **k):
        drawn.append((colors, linestyles))
        return contour(self, mask, *a, colors=colors, linestyles=linestyles, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "contour", spy)
    model = VNet(num_classes=3, n_filters=2)
    with torch.no_grad():  # background everywhere: the ground truth's outlines are drawn, each class's colour
        model.out_conv.weight.zero_()
        model.out_conv.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    path = figures.case_panel({"m": model}, case, tmp_path / "panel.png", patch=(32, 32, 16), stride_xy=16,
                              stride_z=8, passes=1)
    assert path.is_file()
    assert {c for c, _ in drawn} >= {figures.CLASS_COLORS[0], figures.CLASS_COLORS[1]}  # class 1 and class 2
    assert {s for _, s in drawn} == {"solid"}  # ground truth solid (an empty prediction has no outline)


def test_pack_refuses_labels_it_cannot_store(tmp_path):
    root = write_prepared(tmp_path / "data", n_train=1, n_test=1, n_unlabeled=1)
    with pytest.raises(data.DataError, match="labels up to 2"):
        data.pack_case(data.load_case(root, "tr0"), tmp_path / "out")
    with pytest.raises(data.DataError, match="no label"):
        data.pack_case(data.load_case(root, "un0", labeled=False), tmp_path / "out")
