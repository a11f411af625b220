"""predict: new scans -> masks (and uncertainty, probabilities) in each scan's own geometry.

Tiny V-Nets (4 filters, 16^3 windows) trained in-process with ``train.main``. Synthetic CT-like NIfTI scans on
an oblique anisotropic grid go through prepare's pancreas preset (resampled to 1 mm, windowed, cropped), and
LPS anisotropic scans through preset none (orientation only); the mask predict writes is compared with what
``train.py --eval`` scores on the prepared case. A real LA case (h5) when the data are present. Every refusal
through the real command line (``predict.main`` in-process, and once as a subprocess).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

nibabel = pytest.importorskip("nibabel")
pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[1]
from nifti_headers import with_sform  # noqa: E402 (tests/ is on sys.path under pytest)

from uamt_fast import train  # noqa: E402
from uamt_fast import data, files, predict  # noqa: E402
from uamt_fast.evaluation import geometry, inference, metrics, predictions_record
from uamt_fast.data import prepare

SHAPE = (40, 36, 20)
LPS = np.array([[-0.8, 0, 0, 30.0], [0, -0.8, 0, 25.0], [0, 0, 2.0, -18.0], [0, 0, 0, 1]])
TRAIN = ["--no-compile", "--device", "cpu", "--n-filters", "4", "--patch", "16", "16", "16", "--eval-stride-xy", "16",
         "--eval-stride-z", "16", "--save-every", "1000"]


def oblique(spacing=(1.2, 0.9, 2.5), degrees=20.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = (-20.0, -15.0, 10.0)
    return affine


def scan(seed: int, affine: np.ndarray, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1]: air 0, body 0.4, organ 0.8, noise; label): the organ a ball of 8 mm radius in world space."""
    rng = np.random.default_rng(seed)
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ (np.array(shape) / 2 + rng.uniform(-3, 3, 3) * [1, 1, 0.3]) + affine[:3, 3]
    label = (np.linalg.norm(world - centre, axis=-1) < 8.0).astype(np.uint8)
    image = np.zeros(shape, np.float32)
    image[3:-3, 3:-3, 2:-2] = 0.4
    image[label > 0] = 0.8
    return image + rng.normal(0, 0.05, shape).astype(np.float32), label


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, affine), str(path))
    return path


def load(path: Path):
    img = nibabel.load(str(path))
    return np.asarray(img.dataobj), img


def run(*args) -> int:
    return predict.main([str(a) for a in args])


def dice(mask: np.ndarray, label: np.ndarray) -> float:
    return metrics.labelmap_metrics(mask, label, 2)["dice"]


@pytest.fixture(scope="module")
def organ(tmp_path_factory, trainer_on_cpu_module) -> SimpleNamespace:
    """CT-like MSD scans (HU) on an oblique 1.2 x 0.9 x 2.5 mm grid, prepared with the pancreas preset (1 mm,
    window, body crop), and a supervised tiny V-Net trained 40 iterations on them (test Dice ~0.8)."""
    root = tmp_path_factory.mktemp("organ")
    src, affine, training = root / "msd", oblique(), []
    for k, case_id in enumerate(("image0001", "image0002", "image0005", "image0004", "image0003")):
        image, label = scan(k, affine)
        hu = np.where(image < 0.2, -1000.0, -125.0 + 400.0 * image).astype(np.float32)
        test = case_id == "image0003"
        save(src / ("imagesTs" if test else "imagesTr") / f"{case_id}.nii.gz", hu, affine)
        if test:
            save(src / "labelsTs" / f"{case_id}.nii.gz", label, affine)
        elif case_id == "image0004":
            training.append({"image": f"./imagesTr/{case_id}.nii.gz"})
        else:
            save(src / "labelsTr" / f"{case_id}.nii.gz", label, affine)
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
                                                  "training": training, "test": ["./imagesTs/image0003.nii.gz"]}))
    prepared = root / "prepared"
    prepare.prepare(src, prepared, "pancreas")
    model = root / "run"
    assert train.main(["--data", str(prepared), *TRAIN, "--iterations", "40", "--log-every", "40", "--labeled", "3",
                       "--method", "supervised", "--batch-unlabeled", "0", "--lr", "0.05", "--out", str(model)]) == 0
    return SimpleNamespace(src=src, prepared=prepared, model=model)


@pytest.fixture(scope="module")
def lps(tmp_path_factory, organ) -> SimpleNamespace:
    """Plain NIfTI scans on an LPS 0.8 x 0.8 x 2 mm grid, prepared with preset none (orientation only)."""
    root = tmp_path_factory.mktemp("lps")
    src = root / "nifti"
    for k, (folder, case_id) in enumerate((("Tr", "c1"), ("Tr", "c2"), ("Ts", "t1"))):
        image, label = scan(20 + k, LPS)
        save(src / f"images{folder}" / f"{case_id}.nii.gz", image, LPS)
        save(src / f"labels{folder}" / f"{case_id}.nii.gz", label, LPS)
    prepared = root / "prepared"
    prepare.prepare(src, prepared, "none")
    return SimpleNamespace(src=src, prepared=prepared, model=organ.model)


@pytest.fixture(scope="module")
def la_model(tmp_path_factory, trainer_on_cpu_module) -> Path:
    """A tiny UA-MT V-Net trained 20 iterations on synthetic data in the LA release layout (no dataset.json); on a
    real LA test case it marks about a quarter of the voxels (neither mask class is empty)."""
    root = tmp_path_factory.mktemp("la_model")
    data.write_synthetic_la(root / "data", n_train=4, n_test=1, shape=(32, 24, 16), seed=3)
    assert train.main(["--data", str(root / "data"), *TRAIN, "--iterations", "20", "--lr", "0.05", "--labeled", "2",
                       "--batch-labeled", "1", "--batch-unlabeled", "1", "--mc-passes", "2", "--log-every", "20",
                       "--out", str(root / "run")]) == 0
    return root / "run"


def eval_labels(monkeypatch, model, data_root, out, *extra) -> tuple[dict, list]:
    """train.py --eval of ``model`` on ``data_root``: its eval json and the label maps it scored."""
    scored = []
    real = inference.labelmap_metrics
    monkeypatch.setattr(inference, "labelmap_metrics", lambda labels, *a: scored.append(np.array(labels)) or
                        real(labels, *a))
    assert train.main(["--eval", str(model), "--data", str(data_root), "--out", str(out), *extra]) == 0
    return json.loads((out / "eval_student.json").read_text()), scored


def boundary_band(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Voxels within ``width`` voxels (Chebyshev) of the mask's boundary."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    pool = torch.nn.functional.max_pool3d
    k = 2 * width + 1
    return (pool(m, k, 1, width) != -pool(-m, k, 1, width))[0, 0].numpy()


# ----------------------------------------------------------------------------- geometry and --eval consistency
def test_no_resampling_mask_is_evals_argmax_in_input_space(lps, tmp_path, monkeypatch):
    """Preset none (LPS -> RAS only): the written mask is --eval's argmax indexed back exactly; the Dice against
    the input-space label equals --eval's to 1e-6; the uncertainty is finite, in [0, ln 2], highest at the edge."""
    result, scored = eval_labels(monkeypatch, lps.model, lps.prepared, tmp_path)
    out = tmp_path / "masks"
    assert run(lps.model, lps.src / "imagesTs", "--data", lps.prepared, "--out", out, "--uncertainty", "4") == 0
    mask, img = load(out / "t1.nii.gz")
    _, source = load(lps.src / "imagesTs" / "t1.nii.gz")
    label, _ = load(lps.src / "labelsTs" / "t1.nii.gz")
    assert mask.dtype == np.uint8 and mask.shape == SHAPE and np.array_equal(img.affine, source.affine)
    np.testing.assert_array_equal(mask[::-1, ::-1, :], scored[0])  # RAS is LPS with x and y flipped
    assert dice(mask, label) == pytest.approx(result["cases"][0]["dice"], abs=1e-6)
    assert 0.5 < dice(mask, label)  # the model does find the organ
    uncertainty, u_img = load(out / "t1_uncertainty.nii.gz")
    assert uncertainty.dtype == np.float32 and uncertainty.shape == SHAPE and np.array_equal(u_img.affine,
                                                                                             source.affine)
    assert np.isfinite(uncertainty).all() and uncertainty.min() >= 0 and uncertainty.max() <= math.log(2)
    band = boundary_band(mask)
    assert uncertainty[band].mean() > uncertainty[~band].mean()


def test_resampled_case_comes_back_on_its_oblique_grid(organ, tmp_path, monkeypatch):
    """Pancreas preset (1 mm, window, crop): the mask and maps come back on the oblique 1.2 x 0.9 x 2.5 mm grid
    with its shape and affine, and the Dice in the input's space is close to the one --eval reports."""
    result, _ = eval_labels(monkeypatch, organ.model, organ.prepared, tmp_path)
    out = tmp_path / "masks"
    image = organ.src / "imagesTs" / "image0003.nii.gz"
    assert run(organ.model, image, "--out", out, "--uncertainty", "3", "--probabilities") == 0  # data: the run's
    mask, img = load(out / "image0003.nii.gz")
    _, source = load(image)
    label, _ = load(organ.src / "labelsTs" / "image0003.nii.gz")
    assert mask.dtype == np.uint8 and mask.shape == SHAPE and np.array_equal(img.affine, source.affine)
    evaluated = result["cases"][0]["dice"]
    assert evaluated > 0.6 and dice(mask, label) == pytest.approx(evaluated, abs=0.05)
    probs, p_img = load(out / "image0003_probabilities.nii.gz")
    assert probs.dtype == np.float32 and probs.shape == (*SHAPE, 2) and np.array_equal(p_img.affine, source.affine)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs.argmax(-1) == mask).mean() > 0.98  # trilinear probabilities vs nearest labels: edges only
    uncertainty, _ = load(out / "image0003_uncertainty.nii.gz")
    assert np.isfinite(uncertainty).all() and 0 <= uncertainty.min() and uncertainty.max() <= math.log(2)
    record = json.loads((out / "predictions.json").read_text())
    case = record["cases"][0]
    (made,) = record["runs"]
    assert case["run"] == 0 and record["format"] == predictions_record.RECORD_FORMAT
    assert made["model"] == str((organ.model / "student.pt").resolve()) and made["config"]["n_filters"] == 4
    assert made["uamt_fast"] == predict.uamt_fast.__version__ and made["finished"]
    assert made["settings"]["preprocessing"] == "prepare preset 'pancreas', channel 'CT'"
    assert case["inputs"] == [{"file": str(image.resolve()), "sha256": files.sha256(image)}]
    assert case["outputs"] == {"mask": "image0003.nii.gz", "uncertainty": "image0003_uncertainty.nii.gz",
                               "probabilities": "image0003_probabilities.nii.gz"}
    assert case["preprocessing"]["crop_box"] and case["preprocessing"]["spacing"] == pytest.approx([1, 1, 1], abs=1e-4)
    # the scan predict feeds the model is, bit for bit, the case prepare stored (one MONAI chain: transform_case)
    model = predict.load_model_and_data(predict.make_parser().parse_args([str(organ.model), str(image), "--out", "x"]),
                               torch.device("cpu"))
    found = predict.find_scans([image])[0]
    predict.check_scan(found, model)
    with h5py.File(data.prepared_case_path(organ.prepared, "image0003"), "r") as f:
        np.testing.assert_array_equal(predict.read_scan(found, model).image, f["image"][()])


def test_prepared_h5_case_keeps_its_grid_and_recorded_affine(organ, tmp_path, monkeypatch):
    """An h5 case of a prepared set is already the model's input: its mask is --eval's argmax on the h5 grid,
    placed in the world by the affine the set's dataset.json records for it."""
    _, scored = eval_labels(monkeypatch, organ.model, organ.prepared, tmp_path)
    out = tmp_path / "masks"
    assert run(organ.model, data.prepared_case_path(organ.prepared, "image0003"), "--out", out) == 0
    mask, img = load(out / "image0003.nii.gz")
    np.testing.assert_array_equal(mask, scored[0])
    recorded = json.loads((organ.prepared / data.RECORD_NAME).read_text())["cases"]["image0003"]["affine"]
    np.testing.assert_allclose(img.affine, recorded, atol=1e-4)  # (NIfTI stores the affine in float32)


def test_inverse_is_exact_for_orientation_and_crop():
    """to_input_grid: a flip-and-crop map is indexed exactly (outside the crop: the fill); a resampling map
    agrees with the exact path where it is one too, and samples a linear ramp linearly."""
    rng = np.random.default_rng(0)
    stored = torch.from_numpy(rng.random((2, 6, 5, 4)).astype(np.float32))
    affine_original = np.diag([-2.0, 1.0, 3.0, 1.0])  # input: x flipped
    affine = affine_original @ np.array([[-1, 0, 0, 9], [0, 1, 0, 2], [0, 0, 1, 1], [0, 0, 0, 1.0]])  # RAS + crop
    grid = {"affine_original": affine_original.tolist(), "shape_original": [10, 8, 6], "affine": affine.tolist(),
                "shape": [6, 5, 4]}
    back = geometry.to_input_grid(stored, grid, [1.0, 0.0])
    expected = np.tile(np.array([1.0, 0.0], np.float32)[:, None, None, None], (1, 10, 8, 6))
    expected[:, 4:10, 2:7, 1:5] = stored.numpy()[:, ::-1]
    np.testing.assert_array_equal(back.numpy(), expected)
    ramp = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).expand(1, 6, 5, 4).contiguous()
    half = {**grid, "affine": (affine @ np.diag([0.5, 1, 1, 1])).tolist()}  # model voxels half as wide in x
    sampled = geometry.to_input_grid(ramp, half, [0.0], "bilinear")[0].numpy()
    # input voxel i sits at model voxel j = 2 * (9 - i) along x, inside the ramp for i in 7..9
    np.testing.assert_allclose(sampled[7:10, 3, 2], [4.0, 2.0, 0.0], atol=1e-5)


def test_nnunet_channel_files_pick_the_prepared_channel(tmp_path):
    """A two-channel nnU-Net set prepared on FLAIR (channel 1), three classes: a folder of {case}_{XXXX} files
    is one case and predict reads its FLAIR file (the index from the source's dataset.json, or from the
    prepared files' suffix once that is gone); probabilities have three channels, uncertainty <= ln 3."""
    from uamt_fast.nets.vnet import VNet

    src = tmp_path / "nnunet"
    (src / "imagesTr").mkdir(parents=True)
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "FLAIR"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2}))
    for k in range(2):
        image, label = scan(30 + k, LPS)
        for c in range(2):
            save(src / "imagesTr" / f"case{k}_{c:04d}.nii.gz", image * (c + 1), LPS)
        save(src / "labelsTr" / f"case{k}.nii.gz", label * (k + 1), LPS)
    prepared = tmp_path / "prepared"
    record = prepare.prepare(src, prepared, "none", channel=["FLAIR"], test_count=1)
    net = VNet(num_classes=3, n_filters=2, dropout=True)
    config = {"n_filters": 2, "dropout": True, "num_classes": 3, "patch": [16, 16, 16], "eval_stride_xy": 16,
              "eval_stride_z": 16, "data": [str(prepared)]}
    torch.save({"model": net.state_dict(), "config": config}, tmp_path / "student.pt")
    new = tmp_path / "new"
    image, _ = scan(40, LPS, shape=(24, 20, 12))
    for c in range(2):
        save(new / f"n1_{c:04d}.nii.gz", image * (c + 1), LPS)
    out = tmp_path / "out"
    assert run(tmp_path / "student.pt", new, "--out", out, "--probabilities", "--uncertainty", "2") == 0
    case = json.loads((out / "predictions.json").read_text())["cases"][0]
    assert case["case"] == "n1" and [Path(i["file"]).name for i in case["inputs"]] == ["n1_0001.nii.gz"]
    probs, img = load(out / "n1_probabilities.nii.gz")
    assert probs.shape == (24, 20, 12, 3) and np.array_equal(img.affine, load(new / "n1_0000.nii.gz")[1].affine)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert load(out / "n1_uncertainty.nii.gz")[0].max() <= math.log(3)
    moved = {**record, "source": {**record["source"], "path": str(tmp_path / "gone")}}
    assert predict.channel_index(record) == 1 and predict.channel_index(moved) == 1


def test_batched_passes_are_figures_uncertainty_map():
    """With dropout off every pass is the same: the batched passes (chunked or not) give exactly the entropy
    figures.uncertainty_map takes of whole sliding-window passes; with dropout on, the passes differ."""
    from uamt_fast import figures
    from uamt_fast.nets.vnet import VNet

    image = np.random.default_rng(1).normal(size=(20, 18, 17)).astype(np.float32)
    for dropout in (False, True):
        net = VNet(num_classes=2, n_filters=2, dropout=dropout).eval()
        model = predict.Model(net, {}, Path("m"), (16, 16, 16), 8, 8, 1, 2, 2, None, [], None)
        probs, entropy = predict.predict_image(model, image, 20, None)  # passes in forwards of 16 + 4
        expected = figures.uncertainty_map(net, image, 20, patch=(16, 16, 16), stride_xy=8, stride_z=8)
        if not dropout:
            torch.testing.assert_close(entropy, expected.clamp(0, math.log(2)), atol=1e-5, rtol=0)
            deterministic = -(probs * torch.log(probs + 1e-6)).sum(0)
            torch.testing.assert_close(entropy, deterministic.clamp(0, math.log(2)), atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(entropy, expected, atol=1e-4)  # other dropout masks, same quantity


# ----------------------------------------------------------------------------- the LA release layout
@pytest.mark.real_data
def test_real_la_case_mask_is_evals_argmax(la_model, la_root, tmp_path, monkeypatch):
    case_id = data.read_list(la_root, "test")[0]
    _, scored = eval_labels(monkeypatch, la_model, la_root, tmp_path, "--cases", case_id)
    h5 = la_root / data.IMAGES_DIR / case_id / data.H5_NAME
    out = tmp_path / "masks"
    assert run(la_model, h5, "--out", out) == 0
    mask, img = load(out / f"{case_id}.nii.gz")
    assert 0.01 < mask.mean() < 0.99  # a mask with both classes: the comparison is not of two empty masks
    np.testing.assert_array_equal(mask, scored[0])
    with h5py.File(h5, "r") as f:
        assert mask.shape == f["image"].shape
    assert np.allclose(img.affine, np.diag([*data.LA_SPACING, 1.0]))


def test_la_layout_inputs_data_root_and_nifti(la_model, tmp_path, capsys):
    """A data root predicts every case folder; a NIfTI scan with an LA model is used as it is (no record), and
    its mask keeps the input's affine and header; a progress line a case; the next run's cases are
    merged into the folder's predictions.json, which then describes every output there."""
    root = la_model.parent / "data"
    out = tmp_path / "masks"
    assert run(la_model, root, "--out", out, "--threads", "1") == 0
    ids = sorted(p.name for p in (root / data.IMAGES_DIR).iterdir())
    n = len(ids)  # [k/n] id seconds (ETA of the rest), the last line without one
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split()[:2] for line in shown] == [[f"[{k}/{n}]", i] for k, i in enumerate(ids, 1)], shown
    assert all(line.endswith(")") == (k < n) and " s" in line for k, line in enumerate(shown, 1)), shown
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{i}.nii.gz" for i in ids)
    case = data.load_case(root, ids[0])
    affine = np.diag([0.625, -0.625, 0.625, 1.0])
    save(tmp_path / "in" / "scan.nii.gz", case.image, affine)
    assert run(la_model, tmp_path / "in" / "scan.nii.gz", "--out", out) == 0
    mask, img = load(out / "scan.nii.gz")
    np.testing.assert_array_equal(mask, np.asarray(load(out / f"{ids[0]}.nii.gz")[0]))
    assert np.array_equal(img.affine, affine) and img.header["descrip"].tobytes().startswith(b"uamt_fast.predict")
    record = json.loads((out / "predictions.json").read_text())
    assert sorted(p.name for p in out.glob("predictions*.json")) == ["predictions.json"]
    assert sorted(c["case"] for c in record["cases"]) == sorted([*ids, "scan"]) and len(record["runs"]) == 2
    assert {c["run"] for c in record["cases"] if c["case"] == "scan"} == {1}
    assert all(r["settings"]["preprocessing"] == "none (the LA release layout)" for r in record["runs"])


# ----------------------------------------------------------------------------- refusals: one line, exit 2
def _nan_weight(tmp, model):
    state = torch.load(model / "student.pt", weights_only=True)
    state["model"]["block_five.conv.3.weight"][0, 0, 0, 0, 0] = float("nan")
    torch.save(state, tmp / "bad.pt")
    return [tmp / "bad.pt", _la_nifti(tmp)]


LA_AFFINE = np.diag([0.625, 0.625, 0.625, 1.0])


def _la_nifti(tmp, shape=(20, 20, 12), affine=LA_AFFINE, name="ok.nii.gz"):
    return save(tmp / "in" / name, np.random.default_rng(0).normal(size=shape).astype(np.float32), affine)


def _odd_sform(sform):
    return lambda t, m: [m, _la_nifti(t), with_sform(_la_nifti(t, name="odd.nii.gz"), sform)]


def _record(text=None, **fields):
    """--data of a prepared set whose dataset.json is ``text``, or a record of two classes with ``fields``."""
    def build(t, m):
        (t / "prepared").mkdir()
        record = {"format": data.RECORD_FORMAT, "num_classes": 2, "preset": "none", **fields}
        (t / "prepared" / data.RECORD_NAME).write_text(text or json.dumps(record))
        return [m, _la_nifti(t), "--data", t / "prepared"]
    return build


def _h5_case_singular_affine(t, m):
    root = data.write_synthetic_la(t / "root", n_train=1, n_test=1, shape=(20, 20, 12), seed=0)
    case = {"affine": np.diag([0.625, 0.625, 0.0, 1.0]).tolist(), "shape": [20, 20, 12]}
    (root / data.RECORD_NAME).write_text(json.dumps({"format": data.RECORD_FORMAT, "num_classes": 2,
                                                     "cases": {"synth0000": case}}))
    return [m, root / data.IMAGES_DIR / "synth0001", root / data.IMAGES_DIR / "synth0000"]


BAD = {
    "non-finite weight": (_nan_weight, "'model' tensor block_five.conv.3.weight holds NaN or Inf values"),
    "2D image": (lambda t, m: [m, _la_nifti(t), _la_nifti(t, (20, 20), name="flat.nii.gz")],
                 "flat.nii.gz: a 2D image of shape (20, 20); the model reads 3D volumes"),
    "4D channels": (lambda t, m: [m, _la_nifti(t), _la_nifti(t, (20, 20, 12, 3), name="multi.nii.gz")],
                    ("multi.nii.gz: 3 channels (shape (20, 20, 12, 3)) and the model reads one (one channel); give "
                     "--channel INDEX")),
    "channel files": (lambda t, m: [m, _la_nifti(t, name="c_0000.nii.gz"), _la_nifti(t, name="c_0001.nii.gz")],
                      "case c has 2 channel files and the model reads one"),
    "channel out of range": (lambda t, m: [m, _la_nifti(t, (20, 20, 12, 2), name="two.nii.gz"), "--channel", "5"],
                             ("two.nii.gz: 2 channels (shape (20, 20, 12, 2)) and the model reads one (one "
                              "channel); channel 5 is not among them")),
    "spacing": (lambda t, m: [m, _la_nifti(t, affine=np.diag([2.5, 2.5, 2.5, 1.0]))],
                "spacing (2.5, 2.5, 2.5) mm is more than 2x off the model's data"),
    "same case twice": (lambda t, m: [m, _la_nifti(t), save(t / "b" / "ok.nii", np.ones((4, 4, 4), np.float32),
                                                           np.eye(4))], "two inputs are case ok"),
    "missing input": (lambda t, m: [m, t / "nowhere.nii.gz"], "INPUT"),
    "no model": (lambda t, m: [t / "none.pt", _la_nifti(t)], "none.pt: no such file"),
    "cuda": (lambda t, m: [m, _la_nifti(t), "--device", "cuda"] if not torch.cuda.is_available() else pytest.skip(),
             "--device cuda: no CUDA device is available"),
    "bad --uncertainty": (lambda t, m: [m, _la_nifti(t), "--uncertainty", "0"],
                          "argument --uncertainty: expected an integer in [1, 1024], got '0'"),
    "bad --device": (lambda t, m: [m, _la_nifti(t), "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    "bad --threads": (lambda t, m: [m, _la_nifti(t), "--threads", "-1"], "argument --threads: expected an integer"),
    "zero voxel size": (_odd_sform(np.diag([0.625, 0.0, 0.625, 1.0])),
                        ("odd.nii.gz: the NIfTI affine (sform / qform / pixdim) gives array axis 1 a voxel size of "
                         "0 mm")),
    "two axes on one world axis": (_odd_sform([[0.625, 0.625, 0, 0], [0, 0, 0.625, 0], [0, 0, 0, 0]]),
                                   ("odd.nii.gz: the NIfTI affine (sform / qform / pixdim) points array axes 0 and 1 "
                                    "along one world direction")),
    "NaN in the affine": (_odd_sform(np.diag([0.625, np.nan, 0.625, 1.0])),
                          "odd.nii.gz: the NIfTI affine (sform / qform / pixdim) holds NaN or Inf"),
    "record nested 100,000 deep": (_record("[" * 100_000 + "]" * 100_000),
                                   "prepared/dataset.json: the prepared data set's record is nested too deeply"),
    "record train a string": (_record(train="patch"), ("prepared/dataset.json: field train is 'patch'; expected an "
                                                       "object")),
    "record cases a list": (_record(cases=[1]), "prepared/dataset.json: field cases is [1]; expected an object"),
    "record cases a number": (_record(cases=5), "prepared/dataset.json: field cases is 5; expected an object"),
    "record affine 3x3": (_record(cases={"c1": {"affine": np.eye(3).tolist()}}),
                          "prepared/dataset.json: field cases.c1.affine is a matrix of shape (3, 3); expected 4x4"),
    "record affine 1x1": (_record(cases={"c1": {"affine": [[1.0]]}}),
                          "prepared/dataset.json: field cases.c1.affine is a matrix of shape (1, 1); expected 4x4"),
    "record affine NaN": (_record(cases={"c1": {"affine": np.diag([1.0, np.nan, 1.0, 1.0]).tolist()}}),
                          "prepared/dataset.json: field cases.c1.affine holds NaN or Inf"),
    "record spacing ragged": (_record(cases={"c1": {"spacing": [0.6, [0.6], 0.6]}}),
                              ("prepared/dataset.json: field cases.c1.spacing is [0.6, [0.6], 0.6]; expected 3 voxel "
                               "sizes in mm")),
    "record affine singular, h5 case": (_h5_case_singular_affine, ("root/dataset.json: field cases.synth0000.affine "
                                                                   "gives array axis 2 a voxel size of 0 mm")),
}


@pytest.mark.parametrize("name", list(BAD))
def test_refusals_are_one_line_before_any_work(la_model, tmp_path, capsys, name):
    build, message = BAD[name]
    args = build(tmp_path, la_model)
    out = tmp_path / "out"
    assert run(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("predict: error: ") and message in err, err
    assert not out.exists()  # nothing predicted, not even the good scan listed first


def test_missing_out_flag(la_model, tmp_path, capsys):
    assert run(la_model, _la_nifti(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the following arguments are required: --out" in err


def test_missing_extra_names_the_install(la_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel -> ImportError
    assert run(la_model, tmp_path / "x.nii.gz", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs nibabel: pip install 'uamt_fast[data]'" in err


def test_existing_output_needs_overwrite(la_model, tmp_path, capsys):
    scan_file, out = _la_nifti(tmp_path), tmp_path / "out"
    assert run(la_model, scan_file, "--out", out) == 0
    before = (out / "ok.nii.gz").read_bytes()
    (out / "ok.nii.gz").write_bytes(b"the user's own file")
    assert run(la_model, scan_file, "--out", out, "--uncertainty", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ok.nii.gz already exists (1 output file(s) there); pass --overwrite" in err
    assert (out / "ok.nii.gz").read_bytes() == b"the user's own file" and not (out / "ok_uncertainty.nii.gz").exists()
    assert run(la_model, scan_file, "--out", out, "--overwrite") == 0
    assert (out / "ok.nii.gz").read_bytes() == before and not list(out.glob("*.tmp"))
    record = json.loads((out / "predictions.json").read_text())  # the case's entry replaced, its old run gone
    assert sorted(p.name for p in out.glob("predictions*.json")) == ["predictions.json"]
    assert [c["case"] for c in record["cases"]] == ["ok"] and len(record["runs"]) == 1


def test_subprocess_refusal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "uamt_fast.predict", str(tmp_path / "none.pt"),
                           str(_la_nifti(tmp_path)), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("predict: error: MODEL ") \
        and "none.pt: no such file" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- writes: links, inputs, one writer
def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: files.sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


def test_links_planted_at_the_old_temporary_names_are_never_written_through(la_model, tmp_path):
    scan_file, out = _la_nifti(tmp_path), tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file")
    out.mkdir()
    for name in ("ok.nii.gz.tmp", "predictions.json.tmp", "ok_uncertainty.nii.gz.tmp"):
        (out / name).symlink_to(victim)
    assert run(la_model, scan_file, "--out", out, "--uncertainty", "2") == 0
    assert victim.read_bytes() == b"the user's own file"
    assert (out / "ok.nii.gz").is_file() and not (out / "ok.nii.gz").is_symlink()
    (out / "ok.nii.gz").unlink()
    (out / "ok.nii.gz").symlink_to(victim)  # a link at the output's own name: replaced by the file, not followed
    assert run(la_model, scan_file, "--out", out, "--overwrite") == 0
    assert victim.read_bytes() == b"the user's own file" and not (out / "ok.nii.gz").is_symlink()
    (out / files.LOCK_NAME).unlink()
    (out / files.LOCK_NAME).symlink_to(victim)  # the lock file is opened O_NOFOLLOW
    assert run(la_model, scan_file, "--out", out, "--overwrite") == 2
    assert victim.read_bytes() == b"the user's own file"


def test_an_input_is_never_replaced_even_with_overwrite(la_model, tmp_path, capsys):
    scans = tmp_path / "scans"
    for name in ("case01.nii.gz", "case02.nii.gz"):
        _la_nifti(tmp_path, name=name)
    (tmp_path / "in").rename(scans)
    before = _hashes(scans)
    for extra in ([], ["--overwrite"]):
        assert run(la_model, scans, "--out", scans, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "would be written over the input" in err and "pass --overwrite" not in err
    hard = tmp_path / "elsewhere"  # a hard link of an input at an output's name: the same inode
    hard.mkdir()
    os.link(scans / "case01.nii.gz", hard / "case01.nii.gz")
    assert run(la_model, scans / "case01.nii.gz", "--out", hard, "--overwrite") == 2
    assert "input" in capsys.readouterr().err
    assert _hashes(scans) == before and sorted(p.name for p in scans.iterdir()) == ["case01.nii.gz", "case02.nii.gz"]


def test_one_predict_a_folder_and_the_record_describes_every_output(la_model, tmp_path, capsys):
    out = tmp_path / "out"
    a, b = _la_nifti(tmp_path, name="a.nii.gz"), _la_nifti(tmp_path, name="b.nii.gz")
    out.mkdir()
    with files.FolderLock(out, "--out", "predict"):  # another predict writing there now
        assert run(la_model, a, "--out", out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err
    assert list(out.iterdir()) == [out / files.LOCK_NAME]
    assert run(la_model, a, "--out", out) == 0
    assert run(la_model, b, "--out", out) == 0
    record = json.loads((out / "predictions.json").read_text())
    assert [(c["case"], c["run"]) for c in record["cases"]] == [("a", 0), ("b", 1)] and len(record["runs"]) == 2
    described = {name for c in record["cases"] for name in c["outputs"].values()}
    assert described == {p.name for p in out.glob("*.nii.gz")}
    (out / "predictions.json").write_text("[1, 2")  # not a record: refused without --overwrite, nothing written
    c = _la_nifti(tmp_path, name="c.nii.gz")
    assert run(la_model, c, "--out", out) == 2
    assert "predictions.json there is not a predictions record" in capsys.readouterr().err
    assert not (out / "c.nii.gz").exists()
    assert run(la_model, c, "--out", out, "--overwrite") == 0


def _huge_header(path: Path) -> Path:
    """A 200-byte .nii.gz whose header claims 2^33 voxels (8 GiB of uint8)."""
    img = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.uint8), LA_AFFINE)
    img.header.set_data_shape((2048, 2048, 2048))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.header.binaryblock + b"\0" * 4 + bytes(64)))
    return path


def test_every_input_is_checked_before_anything_is_written(la_model, tmp_path, capsys):
    good = _la_nifti(tmp_path, name="a.nii.gz")
    image = np.random.default_rng(1).normal(size=(20, 20, 12)).astype(np.float32)
    image[3, 4, 5] = np.nan
    bad = save(tmp_path / "in" / "b.nii.gz", image, LA_AFFINE)
    out = tmp_path / "out"
    assert run(la_model, good, bad, "--out", out) == 2
    assert "b.nii.gz: the image is not all finite" in capsys.readouterr().err
    assert not out.exists()  # a.nii.gz was not predicted first
    huge = _huge_header(tmp_path / "huge" / "h.nii.gz")
    assert run(la_model, good, huge, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "claims shape (2048, 2048, 2048)" in err and "--max-voxels" in err
    assert not out.exists()
    assert run(la_model, good, "--out", out, "--max-voxels", "100") == 2
    assert "more than --max-voxels 100" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ACDC's raw layout
def _acdc_raw(tmp: Path) -> Path:
    """Synthetic raw ACDC: patient099 in training/ (ES frame 4), patient101 in testing/ (ES frame 6), with an
    extra cine frame (patient099_frame02) that is neither ED nor ES, and the 4D stub that must never be read."""
    from uamt_fast.data import acdc

    root = acdc.write_synthetic(tmp / "acdc", "raw", patients=(99, 101), shape=(24, 24, 4))
    patient = root / "training" / "patient099"
    (patient / "patient099_frame02.nii.gz").write_bytes((patient / "patient099_frame01.nii.gz").read_bytes())
    return root


def test_acdc_patient_folder_gives_the_ed_and_es_frames_of_its_info_cfg(tmp_path):
    patient = _acdc_raw(tmp_path) / "training" / "patient099"
    scans = predict.find_scans([patient])
    assert [(s.id, s.kind, [f.name for f in s.files]) for s in scans] == [
        ("patient099_frame01", "nifti", ["patient099_frame01.nii.gz"]),
        ("patient099_frame04", "nifti", ["patient099_frame04.nii.gz"])]  # not frame02, no _gt, no _4d


def test_a_folder_of_acdc_patient_folders_gives_every_patients_frames_sorted(tmp_path):
    root = _acdc_raw(tmp_path)
    both = ["patient099_frame01", "patient099_frame04", "patient101_frame01", "patient101_frame06"]
    assert [s.id for s in predict.find_scans([root])] == both  # the download's root: training/ and testing/
    assert [s.id for s in predict.find_scans([root / "testing"])] == both[2:]
    assert [f.parent.name for s in predict.find_scans([root]) for f in s.files] == \
        ["patient099"] * 2 + ["patient101"] * 2


def test_a_flat_folder_of_acdc_files_leaves_out_labels_and_cine_and_says_so(tmp_path, capsys):
    patient = _acdc_raw(tmp_path) / "training" / "patient099"
    (patient / "Info.cfg").unlink()  # frames copied out without it: the generic folder reading
    assert [s.id for s in predict.find_scans([patient])] == ["patient099_frame01", "patient099_frame02",
                                                             "patient099_frame04"]  # every frame, no _gt, no _4d
    assert f"INPUT {patient}: left out 3 ACDC label (_gt) and 4D cine (_4d) file(s)" in capsys.readouterr().out


def test_an_acdc_frame_that_info_cfg_names_but_the_folder_lacks_is_one_line(tmp_path):
    patient = _acdc_raw(tmp_path) / "training" / "patient099"
    (patient / "patient099_frame04.nii.gz").unlink()
    with pytest.raises(data.DataError,
                       match=r"patient099_frame04\.nii\.gz: missing \(the ES frame, Info.cfg's ES: 4\)"):
        predict.find_scans([patient.parent])


@pytest.fixture(scope="module")
def acdc_2d(tmp_path_factory, trainer_on_cpu_module) -> SimpleNamespace:
    """A 2-iteration 2D U-Net run on a synthetic raw ACDC folder prepared with ``--preset acdc``, and that folder."""
    from uamt_fast.data import acdc

    tmp = tmp_path_factory.mktemp("acdc_2d")
    src = acdc.write_synthetic(tmp / "src", "raw", patients=(99, 38, 50, 11), shape=(24, 24, 4))
    prepare.prepare(src, tmp / "prepared", "acdc")
    assert train.main(["--data", str(tmp / "prepared"), "--n-filters", "2", "--patch", "16", "16", "1",
                       "--batch-labeled", "2", "--batch-unlabeled", "2", "--labeled-patients", "1", "--iterations", "2",
                       "--stop-at", "2", "--no-compile", "--device", "cpu", "--threads", "1", "--log-every", "2",
                       "--save-every", "2", "--out", str(tmp / "run")]) == 0
    return SimpleNamespace(src=src, model=tmp / "run" / "checkpoint.pt")


def test_predict_on_an_acdc_root_writes_each_ed_and_es_frame_in_its_geometry(acdc_2d, tmp_path):
    out = tmp_path / "masks"
    assert run(acdc_2d.model, acdc_2d.src, "--out", out, "--threads", "1") == 0  # (the 4D stubs unread)
    frames = sorted(acdc_2d.src.glob("training/*/patient???_frame??.nii.gz"))
    assert len(frames) == 8 and sorted(p.name for p in out.glob("*.nii.gz")) == [f.name for f in frames]
    for frame in frames:
        mask, written = load(out / frame.name)
        given = nibabel.load(str(frame))
        assert mask.shape == given.shape and np.array_equal(written.affine, given.affine)
    record = json.loads((out / "predictions.json").read_text())
    assert [c["inputs"][0]["file"] for c in record["cases"]] == [str(f.resolve()) for f in frames]


@pytest.mark.parametrize("name, why", [("patient011_frame01_gt.nii.gz", "a label (ACDC's _gt file), not a frame"),
                                       ("patient011_4d.nii.gz", "ACDC's 4D cine, not a frame")])
def test_an_acdc_label_or_cine_named_as_input_is_refused_in_one_line(acdc_2d, tmp_path, capsys, name, why):
    patient = acdc_2d.src / "training" / "patient011"
    out = tmp_path / "out"
    assert run(acdc_2d.model, patient / "patient011_frame01.nii.gz", patient / name, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"INPUT {patient / name}: {why}" in err, err
    assert not out.exists()
