"""train.py --dims 2: SSL4MIS's 2D UA-MT protocol on a tiny synthetic ACDC set prepared with
``--preset acdc``: the preset's defaults, --labeled-patients, the poly lr and the ln C threshold, the slice
sampler and its augmentation (against numpy / scipy.ndimage, which SSL4MIS calls), the 4D teacher passes, a run
that stops, resumes bit for bit and whose checkpoint rebuilds the 2D U-Net; predict and the --eval figures with
that 2D model (slice by slice, the masks in the input's geometry).

Tiny sizes throughout (24 x 24 x 4 volumes, U-Net n_filters 2, 16 x 16 slices, 4 iterations, one thread); the
trainer's final evaluation is not run here (--stop-at at the last iteration: the slice-wise evaluation has its
own tests in tests/evaluation/).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from uamt_fast import data, train
from uamt_fast.data import acdc
from uamt_fast.data.augmentation import rot_flip_2d, rotate_nearest
from uamt_fast.data.prepare import prepare
from uamt_fast.data.sampling import SliceSampler
from uamt_fast.evaluation.slicewise import slicewise_predict
from uamt_fast.evaluation.uncertainty import mc_dropout_mean
from uamt_fast.nets.unet import UNet2D
from uamt_fast.training import checkpoints
from uamt_fast.training.build import make_config, resolve_labeled
from uamt_fast.training.step import teacher_passes

TINY_2D = ["--n-filters", "2", "--patch", "16", "16", "1", "--batch-labeled", "2", "--batch-unlabeled", "2",
           "--labeled-patients", "2", "--iterations", "4", "--no-compile", "--device", "cpu", "--threads", "1",
           "--log-every", "2", "--save-every", "2"]

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    """``prepare --preset acdc`` of a synthetic raw ACDC folder: 4 training patients (8 volumes), 1 val, 1 test."""
    tmp = tmp_path_factory.mktemp("acdc_2d")
    acdc.write_synthetic(tmp / "src", "raw", shape=(24, 24, 4))
    prepare(tmp / "src", tmp / "prepared", "acdc")
    return tmp / "prepared"


# ----------------------------------------------------------------------------- settings
def test_acdc_data_brings_ssl4mis_protocol_and_patients_label_both_frames(acdc_root):
    cfg, _ = make_config({"data": [str(acdc_root)], "labeled_patients": 3})
    assert (cfg.dims, cfg.iterations, cfg.lr_schedule, cfg.consistency_rampup, cfg.consistency_period) == \
        (2, 30000, "poly", 200.0, 150)
    assert (cfg.patch, cfg.batch_labeled, cfg.batch_unlabeled, cfg.num_classes) == ((256, 256, 1), 12, 12, 4)
    train_ids = data.read_list([str(acdc_root)], "train")
    assert cfg.labeled == 6 and train_ids[:6] == acdc.labeled_cases(train_ids, 3)  # ED and ES of 3 patients
    cfg, _ = make_config({"data": [str(acdc_root)], "labeled": 2})  # --labeled replaces the preset's 7 patients
    assert (cfg.labeled, cfg.labeled_patients) == (2, 0)
    with pytest.raises(ValueError, match="--labeled 3 and --labeled-patients 2.*disagree"):
        make_config({"data": [str(acdc_root)], "labeled": 3, "labeled_patients": 2})
    with pytest.raises(ValueError, match=r"--labeled-patients 7 \(the acdc preset's protocol\): the training "
                       "list holds 4 patients"):
        make_config({"data": [str(acdc_root)]})  # the preset's default needs SSL4MIS's full 70
    bare = train.Config(labeled_patients=3)  # a set without patients: one volume a patient
    resolve_labeled(bare)
    assert bare.labeled == 3


def test_dims_2_takes_a_slice_patch():
    assert train.Config(dims=2, origins={"patch": "the default"}).patch == (112, 112, 1)  # a 3D default: its slice
    with pytest.raises(ValueError, match="--dims 2: --patch must be X Y 1"):
        train.Config(dims=2, patch=(32, 32, 16))  # given on the command line: refused, not changed
    with pytest.raises(ValueError, match="three multiples of 16"):
        train.Config(patch=(256, 256, 1))  # a slice patch is 2D only
    with pytest.raises(ValueError, match="--dims must be"):
        train.Config(dims=4)
    with pytest.raises(ValueError, match="--downsample 2: --dims 2 resizes every slice"):
        train.Config(dims=2, patch=(32, 32, 1), downsample=2)
    with pytest.raises(ValueError, match="--blend gaussian: --dims 2 predicts whole slices"):
        train.Config(dims=2, patch=(32, 32, 1), blend="gaussian")


@pytest.mark.parametrize("iteration", [0, 1, 149, 150, 29999])
def test_poly_lr_consistency_ramp_and_threshold_on_ln_c(iteration):
    """SSL4MIS's poly lr and lambda ramp (200 periods of 150); the threshold ramps to ln 4 for 4 classes, not to
    SSL4MIS's ln 2 (the bug corrected)."""
    cfg = train.Config(dims=2, patch=(256, 256, 1), lr_schedule="poly", iterations=30000, consistency_rampup=200,
                       consistency_period=150, num_classes=4)
    lr, weight, threshold = train.schedule(cfg, iteration)
    assert lr == pytest.approx(0.01 * (1 - iteration / 30000) ** 0.9, rel=1e-12)
    assert weight == pytest.approx(0.1 * math.exp(-5 * (1 - (iteration // 150) / 200) ** 2), rel=1e-12)
    ramp = math.exp(-5 * (1 - iteration / 30000) ** 2)
    assert threshold == pytest.approx((0.75 + 0.25 * ramp) * math.log(4), rel=1e-12)
    ssl4mis = train.Config(**{**dataclasses.asdict(cfg), "threshold_bound": "ln-2"})  # the bound as published
    assert train.schedule(ssl4mis, iteration)[2] == pytest.approx((0.75 + 0.25 * ramp) * math.log(2), rel=1e-12)
    assert train.schedule(train.Config(), 2600)[0] == pytest.approx(0.001)  # --lr-schedule step: unchanged


# ----------------------------------------------------------------------------- the slices
def test_slice_augmentation_is_numpy_and_scipy_exactly():
    rng = np.random.default_rng(0)
    for shape in ((9, 14), (16, 16), (23, 10)):
        plane = rng.random(shape).astype(np.float32)
        for k in range(4):
            for axis in (0, 1):
                assert np.array_equal(rot_flip_2d(torch.from_numpy(plane), k, axis).numpy(),
                                      np.flip(np.rot90(plane, k), axis))
        for angle in (-20, -7, 0, 13, 19):  # SSL4MIS's random_rotate: order 0, reshape False, zeros outside
            assert np.array_equal(rotate_nearest(torch.from_numpy(plane), angle).numpy(),
                                  scipy.ndimage.rotate(plane, angle, order=0, reshape=False))


def make_case(case_id: str, depth: int, seed: int) -> data.Case:
    """A case whose image is its label (as float), so image and label rows must stay aligned."""
    label = np.random.default_rng(seed).integers(0, 4, (12, 10, depth)).astype(np.uint8)
    return data.Case(case_id, label.astype(np.float32), label)


def test_slice_sampler_draws_labeled_then_unlabeled_slices_aligned_and_resized():
    labeled, unlabeled = [make_case("a", 3, 0), make_case("b", 2, 1)], [make_case("c", 4, 2)]
    sampler = SliceSampler(labeled, unlabeled, patch_size=(16, 32, 1), batch_labeled=5, batch_unlabeled=3, seed=3)
    assert sampler.n_labeled == 5 and sampler.batches_per_epoch == 1
    seen = set()
    for _ in range(4):
        images, labels = sampler.next()
        assert images.shape == (8, 1, 16, 32) and labels.shape == (8, 16, 32) and labels.dtype == torch.int64
        assert torch.equal(images[:, 0], labels.float())  # the same rotation / flip / resize for both
        ids = sampler.last_case_ids
        assert sorted(ids[:5]) == ["a_slice_1", "a_slice_2", "a_slice_3", "b_slice_1", "b_slice_2"]  # an epoch
        assert all(i.startswith("c_slice_") for i in ids[5:])
        seen |= set(ids[5:])
    assert len(seen) == 4  # the unlabeled stream went round
    resumed = SliceSampler(labeled, unlabeled, patch_size=(16, 32), batch_labeled=5, batch_unlabeled=3, seed=9)
    resumed.load_state_dict(sampler.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(sampler.next(), resumed.next()))
    for shape in ((12, 10), (63, 7), (32, 250)):  # the resize is scipy's order-0 zoom (SSL4MIS's), its zero edge
        plane = torch.rand(shape) + 1  # (63 -> 16 and 250 -> 32: a last row / column at scipy's cval 0)
        assert np.array_equal(sampler.resize(plane).numpy(),
                              scipy.ndimage.zoom(plane.numpy(), (16 / shape[0], 32 / shape[1]), order=0))
    with pytest.raises(data.DataError, match="5 labeled slices .* cannot fill batch_labeled=6"):
        SliceSampler(labeled, unlabeled, patch_size=(16, 16), batch_labeled=6)


def test_teacher_passes_on_2d_batches_are_separate_forwards():
    """(T+1)*B slices in one forward with ghost batch norm == one forward per pass (the noise drawn alike)."""
    torch.manual_seed(0)
    teacher = UNet2D(num_classes=4, n_filters=2, dropout=False)
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(1)
    batched = teacher_passes(teacher, teacher, x, 5, 1, 0.1, 0.2)
    torch.manual_seed(1)
    separate = teacher_passes(teacher, teacher, x, 5, 5, 0.1, 0.2)
    assert batched.shape == (5, 3, 4, 16, 16)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)


def test_mc_dropout_mean_of_a_2d_model_runs_slice_by_slice():
    """Without dropout every pass is the same: the mean of 3 passes is the slice-wise softmax."""
    torch.manual_seed(0)
    net = UNet2D(num_classes=4, n_filters=2, dropout=False).eval()
    image = torch.rand(20, 12, 3)
    mean = mc_dropout_mean(net, image, 3, (16, 16, 1), 16, 1, 4, 2, slice_size=(16, 16))
    torch.testing.assert_close(mean, slicewise_predict(net, image, (16, 16), 4, 2)[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a run
def test_2d_run_resumes_bit_identically_and_its_checkpoint_rebuilds_the_unet(acdc_root, tmp_path, capsys):
    common = ["--data", str(acdc_root), *TINY_2D]
    assert train.main([*common, "--out", str(tmp_path / "a"), "--stop-at", "4"]) == 0
    assert "4 labeled (16 slices), 2D" in capsys.readouterr().out  # 2 patients: 4 volumes of 4 slices
    assert train.main([*common, "--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert train.main(["--resume", str(tmp_path / "b"), "--stop-at", "4"]) == 0
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("a", "b"))
    assert a["iteration"] == b["iteration"] == 4
    for name in ("student", "teacher"):
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), f"{name} differs after resume"
    model, cfg, _ = checkpoints.load_vnet(tmp_path / "a" / "checkpoint.pt")
    assert isinstance(model, UNet2D) and (model.num_classes, model.n_filters, cfg["dims"]) == (4, 2, 2)
    bad = dict(a, config=a["config"] | {"dims": 5})
    with pytest.raises(checkpoints.CheckpointError, match="bad model setting dims=5"):
        checkpoints.config_of(bad, "x.pt")


def test_any_data_set_trains_slice_wise(tiny_root, tmp_path, capsys):
    """--dims 2 on the LA release layout (no preset): its volumes' Z slices; the 3D default patch becomes a slice."""
    args = ["--data", str(tiny_root), "--dims", "2", "--labeled", "2", "--n-filters", "2", "--iterations", "2",
            "--stop-at", "2", "--no-compile", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    assert train.main(args) == 0
    assert "2 labeled (32 slices), 2D" in capsys.readouterr().out  # 2 volumes of 16 slices
    cfg = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert (cfg["dims"], tuple(cfg["patch"])) == (2, (112, 112, 1))


@pytest.mark.filterwarnings("ignore::uamt_fast.evaluation.metrics.EmptyMaskWarning")  # 4 iterations: classes missed
def test_a_2d_run_ends_with_the_slice_wise_evaluation_and_eval_repeats_it(acdc_root, tmp_path):
    """Without --stop-at the run scores its test volumes slice by slice (each Z slice resized to the patch and back,
    SSL4MIS's protocol), per class in 3D with mm; ``--eval`` of its student.pt gives the same rows."""
    import json

    from uamt_fast import files
    from uamt_fast.evaluation.inference import evaluate

    run = tmp_path / "run"
    assert train.main(["--data", str(acdc_root), *TINY_2D, "--out", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["source"]["settings"]["dims"] == 2
    assert [c["case"] for c in result["cases"]] == data.read_list(acdc_root, "test")
    assert all(sorted(c["classes"]) == ["1", "2", "3"] and "hd95_mm" in c["classes"]["1"] for c in result["cases"])
    model, _, _ = checkpoints.load_vnet(run / "student.pt")
    cases = data.load_cases(str(acdc_root), data.read_list(acdc_root, "test"))
    direct = evaluate(model, cases, num_classes=4, batch_size=4, slice_size=(16, 16))
    assert files.json_safe(direct["cases"]) == result["cases"]  # the trainer's rows are the slice-wise ones (NaN: null)
    assert train.main(["--eval", str(run / "student.pt"), "--threads", "1"]) == 0
    again = json.loads((run / "eval_student.json").read_text())
    assert again["cases"] == result["cases"]


@pytest.fixture(scope="module")
def run_2d(acdc_root, trainer_on_cpu_module, tmp_path_factory):
    """The checkpoint.pt of a 2-iteration 2D run on the synthetic ACDC set (predict's and the figures' model)."""
    run = tmp_path_factory.mktemp("run_2d")
    assert train.main(["--data", str(acdc_root), *TINY_2D, "--iterations", "2", "--stop-at", "2", "--out",
                       str(run)]) == 0
    return run / "checkpoint.pt"


def test_predict_with_a_2d_model_writes_slice_wise_masks_in_the_input_geometry(acdc_root, run_2d, tmp_path, capsys):
    """A raw ACDC frame (3D NIfTI, an axis-permuted affine, 1.5 x 1.5 x 10 mm on the file's axes, which the acdc
    preset keeps: the spacing check must not reorient them) through predict: prepare's min-max, then every Z
    slice by the slice-wise protocol --eval scores; the mask and the uncertainty have the input's shape and
    affine; predictions.json records the 2D settings. ``--blend gaussian`` (no windows to blend): one line."""
    import json

    import nibabel

    from uamt_fast import predict
    from uamt_fast.evaluation.predictions_record import RECORD_NAME

    frame = next((acdc_root.parent / "src").rglob("patient011_frame01.nii.gz"))
    out = tmp_path / "masks"
    assert predict.main([str(run_2d), str(frame), "--out", str(out), "--uncertainty", "2", "--threads", "1"]) == 0
    given = nibabel.load(str(frame))
    written = {kind: nibabel.load(str(out / f"patient011_frame01{kind}.nii.gz")) for kind in ("", "_uncertainty")}
    for image in written.values():
        assert image.shape == given.shape and np.array_equal(image.affine, given.affine)
    model, _, _ = checkpoints.load_vnet(run_2d)
    prepared = data.load_case(str(acdc_root), "patient011_frame01").image  # (the frame's own grid: test_acdc.py)
    expected = slicewise_predict(model.eval(), prepared, (16, 16), 4, 4)[0]
    assert np.array_equal(np.asarray(written[""].dataobj), expected)
    entropy = np.asarray(written["_uncertainty"].dataobj)
    assert np.isfinite(entropy).all() and entropy.min() >= 0 and 0 < entropy.max() <= math.log(4) + 1e-6
    settings = json.loads((out / RECORD_NAME).read_text())["runs"][0]["settings"]
    assert (settings["dims"], settings["slice_size"], settings["blend"], settings["eval_stride_xy"]) == \
        (2, [16, 16], None, None)
    capsys.readouterr()
    assert predict.main([str(run_2d), str(frame), "--out", str(tmp_path / "b"), "--blend", "gaussian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--blend gaussian" in err and "a 2D model (--dims 2)" in err, err
    assert not (tmp_path / "b").exists()


@pytest.mark.filterwarnings("ignore::uamt_fast.evaluation.metrics.EmptyMaskWarning")  # 2 iterations: classes missed
def test_eval_figures_of_a_2d_model_draw_its_slice_wise_panels(acdc_root, run_2d, tmp_path, capsys):
    """``--eval --figures`` of a 2D model: the panel of the picked case (its masks and uncertainty slice by slice,
    which the 3D sliding windows could not give a 2D U-Net) and the run's curves; ``figures panels --cases best``
    ranks the cases by the same slice-wise evaluation, with the model's 4 classes."""
    from uamt_fast import figures

    figs = tmp_path / "figs"
    assert train.main(["--eval", str(run_2d), "--figures", str(figs), "--figures-cases", "patient011_frame02",
                       "--figures-passes", "1", "--threads", "1"]) == 0
    assert sorted(p.name for p in figs.iterdir()) == ["curves.png", "panel-patient011_frame02.png"]
    assert "wrote " + str(figs / "panel-patient011_frame02.png") in capsys.readouterr().out
    assert figures.main(["panels", "--data", str(acdc_root), "--checkpoint", str(run_2d), "--out",
                         str(tmp_path / "best"), "--cases", "best", "--passes", "1"]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "best").glob("panel-patient011_frame0*.png"))) == 1
