"""nnU-Net v2's ignore label (a label named "ignore" in dataset.json: voxels that are not annotated), end to end.

prepare keeps it out of the classes and stores it as ``data.IGNORE_LABEL`` (255); the loader accepts that value
only where the record declares it; the supervised CE and Dice never see those voxels (the consistency term
does); ``train.py`` and ``train.py --eval`` score only the annotated voxels. The NIfTI volumes come from
tests/data/test_prepare.py, the tiny CPU run's flags from tests/trainer_cli.py.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("nibabel")
pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[2]
import test_prepare  # noqa: E402  (its synthetic volumes and NIfTI writer)
from uamt_fast import train  # noqa: E402
from test_data import write_case  # noqa: E402
from trainer_cli import TINY  # noqa: E402
from uamt_fast import data, reference  # noqa: E402
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast.evaluation import inference, metrics

LABELS = {"background": 0, "organ": 1, "ignore": 2}
IGNORE = data.IGNORE_LABEL


def write_nnunet_with_ignore(root: Path, labels=LABELS, n_train=4, n_test=2) -> Path:
    """An nnU-Net v2 raw folder, one channel (LPS affine), background + organ + ignore: in every label the slab of
    x below the organ ball's middle is not annotated (it hides half the ball), and case000's label is ignore
    everywhere. Test cases in imagesTs + labelsTs."""
    meta = {"channel_names": {"0": "MR"}, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz"}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for k in range(n_train + n_test):
        image, label = test_prepare.scan(k, classes=2)
        xs = np.nonzero(label)[0]
        label[: (xs.min() + xs.max()) // 2] = labels["ignore"]
        if k == 0:
            label[:] = labels["ignore"]
        images, labels_dir = ("imagesTr", "labelsTr") if k < n_train else ("imagesTs", "labelsTs")
        test_prepare.save(root / images / f"case{k:03d}_0000.nii.gz", image, test_prepare.LPS)
        test_prepare.save(root / labels_dir / f"case{k:03d}.nii.gz", label, test_prepare.LPS)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The folder above, prepared with --preset none."""
    base = tmp_path_factory.mktemp("ignore")
    src = write_nnunet_with_ignore(base / "nnunet")
    assert data_cli.main(["prepare", str(src), str(base / "prepared"), "--preset", "none"]) == 0
    return base / "prepared"


def h5_label(root: Path, case_id: str) -> np.ndarray:
    with h5py.File(data.prepared_case_path(root, case_id), "r") as f:
        return f["label"][()]


# ----------------------------------------------------------------------------- prepare
def test_prepare_keeps_ignore_out_of_the_classes_and_stores_the_reserved_value(prepared):
    import nibabel

    record = json.loads((prepared / "dataset.json").read_text())
    assert record["num_classes"] == 2 and record["labels"] == {"background": 0, "organ": 1}
    assert record["ignore_label"] == IGNORE == 255
    src = Path(record["source"]["path"])
    for case_id, case in record["cases"].items():
        assert case["label_map"] == {"0": 0, "1": 1, "2": IGNORE}
        stored = h5_label(prepared, case_id)
        source = np.asarray(nibabel.load(str(src / case["files"]["label"])).dataobj)
        assert stored.dtype == np.uint8 and set(np.unique(stored).tolist()) <= {0, 1, IGNORE}
        for source_value, value in ((0, 0), (1, 1), (2, IGNORE)):  # reoriented to RAS: the same voxel counts
            assert (stored == value).sum() == (source == source_value).sum(), (case_id, value)
    # a case whose label is ignore everywhere is still a labeled (training) case
    assert record["cases"]["case000"]["role"] == "labeled" and data.read_list(prepared, "train")[0] == "case000"
    assert (h5_label(prepared, "case000") == IGNORE).all()
    case = data.load_case(prepared, "case000")
    assert case.ignore_label == IGNORE and (case.label == IGNORE).all()


def test_an_msd_labels_map_may_name_ignore_too(tmp_path):
    src = test_prepare.write_msd(tmp_path / "msd", unlabeled=())
    meta = json.loads((src / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "pancreas", "2": "ignore"}
    (src / "dataset.json").write_text(json.dumps(meta))
    assert data_cli.main(["prepare", str(src), str(tmp_path / "out"), "--preset", "none"]) == 0
    record = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert record["num_classes"] == 2 and record["ignore_label"] == IGNORE
    assert record["labels"] == {"background": 0, "pancreas": 1}


@pytest.mark.parametrize("labels", [{"background": 0, "ignore": 1, "organ": 2},
                                    {"background": 0, "organ": 1, "ignore": 2, "vessel": 3}],
                         ids=["ignore-1-of-2", "ignore-2-of-3"])
def test_an_ignore_label_that_is_not_the_highest_value_is_refused_in_one_line(tmp_path, capsys, labels):
    src = tmp_path / "nnunet"
    src.mkdir()
    meta = {"channel_names": {"0": "MR"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    (src / "dataset.json").write_text(json.dumps(meta))
    image, label = test_prepare.scan(0, classes=2)
    test_prepare.save(src / "imagesTr" / "case000_0000.nii.gz", image, test_prepare.LPS)
    test_prepare.save(src / "labelsTr" / "case000.nii.gz", label, test_prepare.LPS)
    out = tmp_path / "out"
    assert data_cli.main(["prepare", str(src), str(out), "--preset", "none", "--test-count", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(src / "dataset.json") in err and "'labels'" in err and '"ignore"' in err and "highest" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- the loader and the crops
def test_the_loader_accepts_the_reserved_value_only_where_the_record_declares_it(tmp_path):
    root = tmp_path / "data"
    label = np.zeros((8, 8, 6), np.uint8)
    label[2:6, 2:6, 1:5] = 1
    label[:4] = IGNORE
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    write_case(root, "ok", image=image, label=label)
    write_case(root, "bad", image=image, label=np.where(label == 1, 7, label).astype(np.uint8))
    record = {"format": data.RECORD_FORMAT, "num_classes": 2, "ignore_label": IGNORE}
    (root / data.RECORD_NAME).write_text(json.dumps(record))
    case = data.load_case(root, "ok")
    assert case.ignore_label == IGNORE and np.array_equal(case.label, label)
    with pytest.raises(data.DataError, match=r"label values \[7\] outside \{0, 1\} \(or 255"):
        data.load_case(root, "bad")
    (root / data.RECORD_NAME).write_text(json.dumps(record | {"ignore_label": 7}))
    with pytest.raises(data.DataError, match="ignore_label 7"):
        data.load_case(root, "ok")
    (root / data.RECORD_NAME).write_text(json.dumps({k: v for k, v in record.items() if k != "ignore_label"}))
    with pytest.raises(data.DataError, match=r"label values \[255\] outside \{0, 1\}"):
        data.load_case(root, "ok")

    sampler = data.TwoStreamSampler([case, case], [], patch_size=(6, 6, 4), batch_unlabeled=0)
    seen = torch.cat([sampler.next()[1].flatten() for _ in range(8)]).unique().tolist()
    assert seen == [0, 1, IGNORE]  # rotations, flips and crops carry the reserved value through


def test_downsampling_keeps_the_ignored_blocks_and_votes_with_the_annotated_voxels():
    label = np.zeros((4, 4, 2), np.uint8)
    label[:2] = IGNORE  # blocks (0, 0) and (0, 1): ignore everywhere
    label[2:, :2] = 1  # block (1, 0): organ

    def pooled(block_values):  # block (1, 1) holds these 8 values
        label[2:, 2:] = np.array(block_values, np.uint8).reshape(2, 2, 2)
        small = data.downsample(data.Case("c", np.zeros(label.shape, np.float32), label, ignore_label=IGNORE), 2)
        assert small.label.dtype == np.uint8 and small.label.shape == (2, 2, 1)
        assert small.label[:, :, 0].tolist()[0] == [IGNORE, IGNORE] and small.label[1, 0, 0] == 1
        return int(small.label[1, 1, 0])

    I = IGNORE  # noqa: E741
    assert pooled([I, I, I, I, I, 1, 1, 1]) == IGNORE  # more than half not annotated
    assert pooled([I, I, I, I, 1, 1, 1, 0]) == 1  # half: the annotated voxels vote (3 organ, 1 background)
    assert pooled([I, I, 1, 1, 1, 1, 0, 0]) == 1
    assert pooled([I, I, 0, 0, 0, 1, 1, 0]) == 0


# ----------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("classes", [2, 3])
def test_the_supervised_loss_is_that_of_the_annotated_voxels_alone(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(2, classes, 6, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ignored = torch.rand(2, 6, 5, 4, generator=g) < 0.4
    labels = torch.randint(0, classes, (2, 6, 5, 4), generator=g).masked_fill(ignored, IGNORE)
    loss = reference.supervised_loss(logits, labels, ignore_index=IGNORE)
    loss.backward()
    assert (logits.grad.movedim(1, -1)[ignored] == 0).all()  # no gradient reaches an ignored voxel
    wild = torch.where(ignored.unsqueeze(1), 1e3 * torch.randn(logits.shape, dtype=torch.float64, generator=g),
                       logits.detach())
    for ce_or_dice in (reference.cross_entropy, reference.dice_loss):
        assert torch.equal(ce_or_dice(wild, labels, IGNORE), ce_or_dice(logits.detach(), labels, IGNORE))
    annotated = ~ignored
    alone = logits.detach().movedim(1, -1)[annotated].T[None], labels[annotated][None]  # (1, C, N), (1, N)
    assert torch.allclose(loss.detach(), reference.supervised_loss(*alone), rtol=1e-12, atol=0)
    every = torch.full_like(labels, IGNORE)  # a crop with no annotated voxel: 0, not NaN
    assert reference.supervised_loss(logits.detach(), every, IGNORE).item() == 0.0
    plain = labels.masked_fill(ignored, 0)  # no ignored voxel: the same loss as without ignore_index
    assert torch.allclose(reference.supervised_loss(logits.detach(), plain, IGNORE),
                          reference.supervised_loss(logits.detach(), plain), rtol=1e-12, atol=0)


def test_the_trainer_losses_ignore_those_voxels_but_the_consistency_sees_them():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 6, 5, 4, generator=g)  # 2 labeled rows, then 2 unlabeled
    target = torch.randn(4, 2, 6, 5, 4, generator=g)
    ignored = torch.zeros(4, 6, 5, 4, dtype=torch.bool)
    ignored[:2, :3] = True
    labels = torch.randint(0, 2, (4, 6, 5, 4), generator=g).masked_fill(ignored, IGNORE)
    labels[2:] = -1

    def terms(student_logits):
        _, t, _ = train.student_losses(lambda _: student_logits, None, labels, target, None, torch.tensor(0.1),
                                       torch.tensor(0.5), n_labeled=2, method="mt", consistency_on="all",
                                       fused_loss=False, ignore_index=IGNORE)
        return t

    wild = torch.where(ignored.unsqueeze(1), 30 * torch.randn(logits.shape, generator=g), logits)
    before, after = terms(logits), terms(wild)
    assert torch.equal(before[:2], after[:2])  # CE and Dice: unchanged
    assert not torch.equal(before[2], after[2])  # the consistency term: the student still sees those voxels
    assert torch.allclose(before[:2], torch.stack([reference.cross_entropy(logits[:2], labels[:2], IGNORE),
                                                   reference.dice_loss(logits[:2], labels[:2], IGNORE)]))


# ----------------------------------------------------------------------------- metrics
def test_metrics_leave_the_ignored_voxels_out_of_the_confusion_counts():
    rng = np.random.default_rng(0)
    gt = (rng.random((12, 10, 8)) < 0.3).astype(np.uint8)
    pred = (rng.random(gt.shape) < 0.3).astype(np.uint8)
    gt[:5] = IGNORE
    pred[:5] = 1  # whatever is predicted there does not count
    m = metrics.labelmap_metrics(pred, gt, 2, ignore_label=IGNORE)
    a = gt != IGNORE
    tp, fp, fn = ((pred == 1) & (gt == 1)).sum(), ((pred == 1) & (gt == 0)).sum(), ((pred == 0) & (gt == 1)).sum()
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["jaccard"] == pytest.approx(tp / (tp + fp + fn))
    with warnings.catch_warnings():  # class 1 is empty once the ignored voxels are out: NaN distances, warned
        warnings.simplefilter("ignore", metrics.EmptyMaskWarning)
        three = metrics.labelmap_metrics(np.where(a, pred * 2, 1), np.where(a, gt * 2, IGNORE), 3,
                                         ignore_label=IGNORE)
    assert sorted(three["classes"]) == ["1", "2"] and three["classes"]["2"]["dice"] == pytest.approx(m["dice"])
    assert three["classes"]["1"]["dice"] == 0.0  # class 1 only predicted where nothing is annotated: not scored


# ----------------------------------------------------------------------------- prepare -> train -> --eval
def test_a_tiny_run_and_its_eval_score_only_the_annotated_voxels(prepared, tmp_path, trainer_on_cpu):
    run = tmp_path / "run"
    assert train.main(["--data", str(prepared), *TINY, "--n-filters", "2", "--iterations", "30", "--save-every", "30",
                       "--log-every", "10", "--out", str(run)]) == 0  # ~3 s; Dice ~0.6 on the annotated voxels
    assert train.main(["--eval", str(run)]) == 0
    at_end = json.loads((run / "eval.json").read_text())
    again = json.loads((run / "eval_student.json").read_text())
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_ce"]) and np.isfinite(r["loss_dice"]) for r in log if "loss_ce" in r)

    model, cfg, _ = train.load_model(run / "student.pt", torch.device("cpu"))
    model.eval()
    test_ids = data.read_list(prepared, "test")
    assert [r["case"] for r in again["cases"]] == test_ids
    for row, end_row in zip(again["cases"], at_end["cases"]):
        case = data.load_case(prepared, row["case"])
        annotated = case.label != IGNORE
        assert (~annotated).any() and (case.label == 1).any()  # the ignore slab hides half the organ
        pred, _ = inference.sliding_window_predict(model, case.image, cfg["patch"], cfg["eval_stride_xy"],
                                                   cfg["eval_stride_z"], 2, cfg["eval_batch"])
        p, gt = (pred == 1) & annotated, (case.label == 1) & annotated
        tp, fp, fn = (p & gt).sum(), (p & ~gt).sum(), (~p & gt).sum()
        dice = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
        assert row["dice"] == pytest.approx(dice) and end_row["dice"] == pytest.approx(dice)
        assert dice > 0.3 and metrics.dice(pred, case.label) < dice - 0.1  # counting the ignored voxels would differ
        assert row["jaccard"] == pytest.approx(tp / (tp + fp + fn) if tp + fp + fn else 0.0)
        with warnings.catch_warnings():  # (an empty prediction: NaN distances, warned)
            warnings.simplefilter("ignore", metrics.EmptyMaskWarning)
            expected = metrics.case_metrics(p, gt, case.spacing)
        for k in ("hd95", "asd", "hd95_mm", "asd_mm"):
            assert (row[k] is None and np.isnan(expected[k])) or row[k] == pytest.approx(expected[k]), k
        assert "classes" not in row  # the ignore label is never a class

