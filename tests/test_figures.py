"""uamt_fast.figures: the case panels and training curves are written, of the right size, and not blank."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from uamt_fast import data, figures
from uamt_fast.nets.vnet import VNet

plt = pytest.importorskip("matplotlib.pyplot")


def read_png(path):
    image = plt.imread(path)  # (H, W, 4) floats in 0..1
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def assert_not_blank(image):
    rgb = image[..., :3]
    assert rgb.std() > 0.05, "the PNG is (nearly) one colour"
    assert (np.abs(rgb - rgb[0, 0]).sum(-1) > 0.1).mean() > 0.05, "less than 5% of the pixels differ from the corner"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = data.write_synthetic_la(tmp_path_factory.mktemp("synth"), n_train=1, n_test=1, shape=(40, 36, 20), seed=2)
    return data.load_case(root, "synth0001")


def test_case_panel_png_has_one_cell_per_slice_and_column(case, tmp_path):
    torch.manual_seed(0)
    models = {"a": VNet(n_filters=2), "b": VNet(n_filters=2)}
    path = figures.case_panel(models, case, tmp_path / "panel.png", patch=(32, 32, 16), stride_xy=16, stride_z=8,
                              passes=2, n_slices=2)
    image = read_png(path)
    cell = figures.PANEL_INCHES * figures.DPI
    header = figures.HEADER_INCHES * figures.DPI  # the case id and the legend
    assert image.shape[:2] == (round(2 * cell + header), round(4 * cell))  # 2 slices x (image, a, b, uncertainty)
    assert_not_blank(image)


def test_case_panel_shows_the_whole_case_id_and_a_legend(tmp_path, monkeypatch):
    long_id = "06SR5RBREL16DQ6M8LWS_long_id"  # the old title cut ids at 12 characters
    case = data.Case(long_id, np.random.default_rng(0).random((40, 36, 20), dtype=np.float32),
                     (np.indices((40, 36, 20))[2] % 7 > 3).astype(np.uint8))
    seen = {}

    def keep(plt, fig, path, top=1.0):
        seen["title"] = fig._suptitle.get_text()
        seen["legend"] = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        seen["colors"] = [h.get_color() for legend in fig.legends for h in legend.legend_handles]
        plt.close(fig)
        return path

    monkeypatch.setattr(figures, "save_figure", keep)
    figures.case_panel({"a": VNet(n_filters=2)}, case, tmp_path / "p.png", patch=(32, 32, 16), stride_xy=16,
                       stride_z=8, passes=1, n_slices=1)
    assert seen == {"title": f"case {long_id}", "legend": ["ground truth", "prediction"], "colors": ["red", "blue"]}


def test_downsampled_uncertainty_map_is_full_resolution(case):
    entropy = figures.uncertainty_map(VNet(n_filters=2, dropout=True), case.image, 2, patch=(16, 16, 16), stride_xy=8,
                                      stride_z=8, downsample=2)
    assert entropy.shape == case.image.shape and (entropy >= 0).all()


def test_a_2d_models_panel_and_uncertainty_go_slice_by_slice(case, tmp_path):
    """``slice_size`` set: the panel of a 2D U-Net is drawn (its masks slice by slice), and the uncertainty map is
    the entropy of the slice-wise softmax (without dropout every pass is the same)."""
    from uamt_fast.evaluation.slicewise import slicewise_predict
    from uamt_fast.evaluation.uncertainty import predictive_entropy
    from uamt_fast.nets.unet import UNet2D

    torch.manual_seed(0)
    net = UNet2D(num_classes=2, n_filters=2, dropout=False).eval()
    entropy = figures.uncertainty_map(net, case.image, 2, patch=(16, 16, 1), slice_size=(16, 16))
    torch.testing.assert_close(entropy, predictive_entropy(slicewise_predict(net, case.image, (16, 16), 2, 4)[1]))
    assert figures.slice_size_of({"dims": 2, "patch": [16, 32, 1]}) == (16, 32)
    assert figures.slice_size_of({"patch": [16, 32, 16]}) is None  # (a config from before --dims: the V-Net)
    path = figures.case_panel({"2D": net}, case, tmp_path / "panel.png", patch=(16, 16, 1), passes=1, n_slices=2,
                              slice_size=(16, 16))
    assert read_png(path).shape[:2] == (round((2 * figures.PANEL_INCHES + figures.HEADER_INCHES) * figures.DPI),
                                        round(3 * figures.PANEL_INCHES * figures.DPI))


def test_axial_slices_lie_in_the_labeled_extent():
    label = np.zeros((4, 4, 50), np.uint8)
    label[1, 1, 10:31] = 1
    assert figures.axial_slices(label, 3) == [14, 20, 26]
    assert figures.axial_slices(np.zeros((2, 2, 11), np.uint8), 2) == [2, 8]


def test_training_curves_from_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"iteration": i, "lr": 0.01, "loss_ce": 1 / i, "loss_dice": 0.5 / i, "loss_supervised": 0.75 / i,
              "loss_consistency": 1e-3 * i, "consistency_weight": 0.1 * i / 40, "threshold": 0.5 + i / 200,
              "mask_fraction": i / 40, "uncertainty_mean": 0.3, "it_per_s": 5 + i % 3} for i in range(1, 41)]
    lines.append({"iteration": 40, "train_seconds": 8.0, "it_per_s": 5.0})  # the final speed line
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert len(figures.read_metrics(run)) == 40
    path = figures.training_curves({"seed 1": run, "seed 2": run / "metrics.jsonl"}, tmp_path / "curves.png")
    image = read_png(path)
    assert image.shape[:2] == (round(2 * 2.8 * figures.DPI), round(3 * 3.6 * figures.DPI))
    assert_not_blank(image)
    with (run / "metrics.jsonl").open("a") as f:  # --val-every's lines: a third row with their curve
        f.write("".join(json.dumps({"iteration": i, "val_dice": i / 50, "val_dice_RV": i / 60}) + "\n"
                        for i in (20, 40)))
    image = read_png(figures.training_curves({"run": run}, tmp_path / "curves-val.png"))
    assert image.shape[:2] == (round(3 * 2.8 * figures.DPI), round(3 * 3.6 * figures.DPI))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        figures.read_metrics(tmp_path)


def test_command_line_panels_from_a_checkpoint(tmp_path, capsys):
    root = data.write_synthetic_la(tmp_path / "la", n_train=1, n_test=1, shape=(40, 36, 20), seed=2)
    cfg = {"n_filters": 2, "dropout": True, "patch": (32, 32, 16), "downsample": 1, "eval_stride_xy": 16,
           "eval_stride_z": 8, "eval_batch": 4}
    torch.save({"model": VNet(n_filters=2).state_dict(), "config": cfg}, tmp_path / "student.pt")
    assert figures.main(["panels", "--data", str(root), "--checkpoint", f"mine={tmp_path / 'student.pt'}",
                         "--out", str(tmp_path / "figs"), "--passes", "1"]) == 0
    assert (tmp_path / "figs" / "panel-synth0001.png").is_file()
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    assert figures.main(["panels", "--data", str(root), "--checkpoint", str(tmp_path / "bad.pt"),
                         "--out", str(tmp_path / "figs")]) == 2
    assert "not a train.py checkpoint" in capsys.readouterr().err


def test_train_eval_writes_the_panels_and_the_curves_of_its_run(tmp_path, monkeypatch):
    import dataclasses

    from uamt_fast import train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    root = data.write_synthetic_la(tmp_path / "la", n_train=2, n_test=2, shape=(40, 36, 20), seed=4)
    cfg = train.Config(data=[str(root)], n_filters=2, patch=(32, 32, 16), eval_stride_xy=16, eval_stride_z=8)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": VNet(n_filters=2).state_dict(), "config": dataclasses.asdict(cfg)}, run / "student.pt")
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "lr": 0.01, "loss_ce": 0.7, "it_per_s": 2}) + "\n")
    assert train.main(["--eval", str(run / "student.pt"), "--figures", str(tmp_path / "figs"), "--first", "1",
                       "--figures-passes", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["curves.png", "panel-synth0002.png"]
    assert (run / "eval_student.json").is_file()  # --eval writes a new file beside the checkpoint


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """A student.pt of a tiny config, with a 4-case test set: (train module, data root, run folder)."""
    import dataclasses

    from uamt_fast import train

    base = tmp_path_factory.mktemp("eval_run")
    root = data.write_synthetic_la(base / "la", n_train=2, n_test=4, shape=(40, 36, 20), seed=4)
    cfg = train.Config(data=[str(root)], n_filters=2, patch=(32, 32, 16), eval_stride_xy=16, eval_stride_z=8)
    run = base / "run"
    run.mkdir()
    torch.manual_seed(1)
    torch.save({"model": VNet(n_filters=2).state_dict(), "config": dataclasses.asdict(cfg)}, run / "student.pt")
    return train, root, run


def test_a_saved_config_with_the_old_count_of_panels_still_loads(eval_run):
    train, root, _ = eval_run
    assert train.Config(data=[str(root)], figures_cases=2).figures_cases == []  # configs saved before ids and picks


def test_eval_of_named_cases_or_the_first_n_evaluates_only_those(eval_run, tmp_path, monkeypatch):
    train, root, run = eval_run
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ids = data.read_list(root, "test")
    for flags, expected in ((["--cases", ids[2], ids[0]], [ids[2], ids[0]]), (["--first", "2"], ids[:2]),
                            (["--cases", ids[3], ids[1], ids[0], "--first", "2"], [ids[3], ids[1]])):
        out = tmp_path / "_".join(flags)
        assert train.main(["--eval", str(run), "--out", str(out), *flags]) == 0
        result = json.loads((out / "eval_student.json").read_text())
        assert [row["case"] for row in result["cases"]] == expected == result["source"]["case_ids"]


def test_eval_panels_picked_by_dice(eval_run, tmp_path, monkeypatch, capsys):
    train, root, run = eval_run
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    figs = tmp_path / "figs"
    assert train.main(["--eval", str(run), "--out", str(tmp_path / "e"), "--figures", str(figs), "--figures-passes",
                       "1", "--figures-cases", "best", "worst", "best"]) == 0
    rows = sorted(json.loads((tmp_path / "e" / "eval_student.json").read_text())["cases"],
                  key=lambda r: (r["dice"], r["case"]))
    assert sorted(p.name for p in figs.iterdir()) == sorted({f"panel-{rows[-1]['case']}.png",
                                                             f"panel-{rows[0]['case']}.png"})


@pytest.mark.parametrize("flags, words", [(["--cases", "nope"], ["--cases nope", "not in test.list"]),
                                          (["--figures-cases", "2"], ["--figures-cases 2", "--first N"]),
                                          (["--first", "2", "--figures-cases", "synth0004"], ["--figures-cases"])])
def test_eval_refuses_unknown_cases_before_any_work(eval_run, tmp_path, capsys, flags, words):
    train, _, run = eval_run
    assert train.main(["--eval", str(run), "--out", str(tmp_path / "e"), "--figures", str(tmp_path / "f"),
                       *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "e").exists() and not any((tmp_path / "f").iterdir())


def test_command_line_panels_by_id_and_by_dice(panel_inputs, tmp_path):
    root, _ = panel_inputs
    ids = data.read_list(root, "test")
    assert figures.main(panels_argv(panel_inputs, tmp_path / "a", "--cases", ids[1], "--passes", "1")) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == [f"panel-{ids[1]}.png"]
    assert figures.main(panels_argv(panel_inputs, tmp_path / "b", "--cases", "median", "--first", "1",
                                    "--passes", "1")) == 0
    assert [p.name for p in (tmp_path / "b").iterdir()] == [f"panel-{ids[0]}.png"]


# ----------------------------------------------------------------------------- command-line errors
@pytest.fixture(scope="module")
def panel_inputs(tmp_path_factory):
    """A tiny data set and a student.pt whose settings fit it."""
    base = tmp_path_factory.mktemp("panel_inputs")
    root = data.write_synthetic_la(base / "la", n_train=1, n_test=2, shape=(40, 36, 20), seed=2)
    cfg = {"n_filters": 2, "dropout": True, "patch": (32, 32, 16), "downsample": 1, "eval_stride_xy": 16,
           "eval_stride_z": 8, "eval_batch": 4}
    torch.save({"model": VNet(n_filters=2).state_dict(), "config": cfg}, base / "student.pt")
    return root, base / "student.pt"


def panels_argv(panel_inputs, out, *flags):
    root, checkpoint = panel_inputs
    return ["panels", "--data", str(root), "--checkpoint", f"mine={checkpoint}", "--out", str(out), *flags]


def one_line_error(capsys, *named):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(n in err for n in named), err
    return err


@pytest.mark.parametrize("flags, named", [(["--cases", "-1"], "--cases"),  # ids[:-1] dropped a case
                                          (["--passes", "0"], "--passes"),  # ZeroDivisionError
                                          (["--passes", "1025"], "--passes"), (["--cases", "x"], "--cases")])
def test_panels_refuse_out_of_range_counts(panel_inputs, tmp_path, capsys, flags, named):
    assert figures.main(panels_argv(panel_inputs, tmp_path / "figs", *flags)) == 2
    one_line_error(capsys, named)
    assert not (tmp_path / "figs").exists()


def test_panels_out_must_be_a_folder_and_curves_out_a_file(panel_inputs, tmp_path, capsys):
    (tmp_path / "file.png").write_text("x")
    for out, message in ((tmp_path / "file.png", "is a file; give a folder"),
                         (tmp_path / "file.png" / "figs", "is a file, not a folder")):
        assert figures.main(panels_argv(panel_inputs, out, "--passes", "1")) == 2
        one_line_error(capsys, f"--out {out}", message)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "lr": 0.01, "loss_ce": 0.7}) + "\n")
    for out, message in ((tmp_path, "is a folder; give the path of the PNG"),
                         (tmp_path / "file.png" / "curves.png", "is a file, not a folder")):
        assert figures.main(["curves", str(run), "--out", str(out)]) == 2
        one_line_error(capsys, f"--out {out}", message)
    assert figures.main(["curves", str(run), "--out", str(tmp_path / "new" / "curves.png")]) == 0
    assert (tmp_path / "new" / "curves.png").is_file()


def test_panels_refuse_test_ids_that_are_paths_and_create_no_folder_from_them(panel_inputs, tmp_path, capsys):
    root = tmp_path / "la"
    shutil.copytree(panel_inputs[0], root)
    (root / data.IMAGES_DIR / "sub").mkdir()  # before: read, and its panel written to figs/panel-sub/synth0002.png
    (root / data.IMAGES_DIR / "synth0002").rename(root / data.IMAGES_DIR / "sub" / "synth0002")
    (root / "test.list").write_text("sub/synth0002\n")
    argv = ["panels", "--data", str(root), "--checkpoint", f"mine={panel_inputs[1]}", "--out", str(tmp_path / "figs"),
            "--passes", "1"]
    assert figures.main(argv) == 2
    one_line_error(capsys, f"{root / 'test.list'}: case id 'sub/synth0002' is not a plain name")
    assert not (tmp_path / "figs").exists()
    with pytest.raises(ValueError, match="write_panels: case id '../x' is not a plain name"):
        figures.write_panels({}, [data.Case("../x", np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8))],
                             tmp_path / "figs", {})


def test_two_checkpoints_of_one_name_are_refused(panel_inputs, tmp_path, capsys):
    """Both --checkpoint runs/a/student.pt and runs/a/teacher.pt are named 'a': one column was silently dropped."""
    checkpoint = panel_inputs[1]
    argv = ["panels", "--data", str(panel_inputs[0]), "--checkpoint", str(checkpoint), "--checkpoint", str(checkpoint),
            "--out", str(tmp_path / "figs"), "--passes", "1"]
    assert figures.main(argv) == 2
    one_line_error(capsys, f"the name '{checkpoint.parent.name}' is taken")


def test_panel_api_refuses_zero_passes_or_slices(case, tmp_path):
    for options, message in ((dict(passes=0), "passes=0"), (dict(n_slices=0), "n_slices=0")):
        with pytest.raises(ValueError, match=message):
            figures.case_panel({"a": VNet(n_filters=2)}, case, tmp_path / "p.png", patch=(32, 32, 16), **options)
    with pytest.raises(ValueError, match="passes=0"):
        figures.uncertainty_map(VNet(n_filters=2), case.image, 0, patch=(32, 32, 16), stride_xy=16, stride_z=8)


def test_panels_help_states_the_ranges(capsys):
    with pytest.raises(SystemExit):
        figures.main(["panels", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "N >= 0" in text and "T in [1, 1024]" in text and "not a file" in text and "best / median / worst" in text


def test_figures_from_the_shell_print_one_line_not_a_traceback(panel_inputs, tmp_path):
    argv = panels_argv(panel_inputs, tmp_path, "--passes", "0")
    result = subprocess.run([sys.executable, "-m", "uamt_fast.figures", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: argument --passes: expected an integer in [1, 1024], " \
        "got '0'\n", result.stderr


def test_a_predicted_nifti_gets_its_panel_and_mismatched_files_one_line(tmp_path, capsys):
    nibabel = pytest.importorskip("nibabel")
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (24, 20, 12)], indexing="ij"), -1)
    label = ((((grid - [12, 10, 6]) / [6, 5, 3]) ** 2).sum(-1) <= 1).astype(np.uint8)
    files = {}
    for name, array in (("image", label * 2.0 + 0.1), ("mask", label), ("unc", label * 0.3), ("gt", label)):
        files[name] = tmp_path / f"{name}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(np.asarray(array, np.float32 if name in ("image", "unc") else np.uint8),
                                         affine), str(files[name]))
    out = tmp_path / "panel.png"
    assert figures.main(["predicted", str(files["image"]), str(files["mask"]), "--uncertainty", str(files["unc"]),
                         "--label", str(files["gt"]), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    nibabel.save(nibabel.Nifti1Image(label[:, :, :6], affine), str(tmp_path / "short.nii.gz"))
    assert figures.main(["predicted", str(files["image"]), str(tmp_path / "short.nii.gz"), "--out",
                         str(tmp_path / "p2.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "short.nii.gz" in err and "differ" in err, err


@pytest.fixture(scope="module")
def predicted_files(tmp_path_factory):
    """A scan, a 3-class ground truth (class 2 inside class 1) and a prediction one voxel off, as NIfTI files."""
    nibabel = pytest.importorskip("nibabel")
    folder = tmp_path_factory.mktemp("predicted")
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (24, 20, 12)], indexing="ij"), -1)
    radius = np.sqrt((((grid - [12, 10, 6]) / [8, 7, 5]) ** 2).sum(-1))
    label = np.where(radius <= 0.5, 2, radius <= 1).astype(np.uint8)
    paths = {}
    for name, array in (("image", label * 2.0 + 0.1), ("label3", label), ("mask3", np.roll(label, 1, 0)),
                        ("label2", label > 0), ("mask2", np.roll(label > 0, 1, 0))):
        paths[name] = folder / f"{name}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(np.asarray(array, np.float32 if name == "image" else np.uint8),
                                         np.diag([-0.8, -0.8, 2.0, 1.0])), str(paths[name]))
    return paths


LEGENDS = {  # (classes, --label given) -> the legend's (text, colour, line style) entries
    (2, False): [("prediction", "blue", "-")],
    (2, True): [("ground truth", "red", "-"), ("prediction", "blue", "-")],
    (3, False): [("prediction", "gray", "--"), ("class 1", "tab:red", "-"), ("class 2", "tab:blue", "-")],
    (3, True): [("ground truth", "gray", "-"), ("prediction", "gray", "--"), ("class 1", "tab:red", "-"),
                ("class 2", "tab:blue", "-")],
}


@pytest.mark.parametrize("classes, with_label", sorted(LEGENDS))
def test_predicted_panel_legend_names_each_class_and_map_as_drawn(predicted_files, classes, with_label, tmp_path,
                                                                  monkeypatch):
    """figures predicted: the legend of train.py --figures (an entry a map and, beyond two classes, a class),
    and the outlines it describes, at LINE_WIDTH: solid ground truth, dashed prediction beyond two classes."""
    seen = {}

    def keep(plt, fig, path, top=1.0):
        (legend,) = fig.legends
        seen["legend"] = [(t.get_text(), h.get_color(), h.get_linestyle())
                          for t, h in zip(legend.get_texts(), legend.legend_handles)]
        seen["widths"] = {h.get_linewidth() for h in legend.legend_handles}
        seen["outlines"] = {(tuple(c.get_edgecolor()[0].round(3)), c.get_linestyle()[0][1] is None,
                             float(c.get_linewidth()[0])) for ax in fig.axes[1::2] for c in ax.collections}
        plt.close(fig)
        return path

    monkeypatch.setattr(figures, "save_figure", keep)
    argv = ["predicted", str(predicted_files["image"]), str(predicted_files[f"mask{classes}"]),
            "--out", str(tmp_path / "p.png")]
    assert figures.main(argv + (["--label", str(predicted_files[f"label{classes}"])] if with_label else [])) == 0
    assert seen["legend"] == LEGENDS[classes, with_label]
    assert min(seen["widths"]) >= figures.LINE_WIDTH >= 1.5
    # one outline a class and a map, every one LINE_WIDTH wide, dashed for the prediction only beyond two classes
    kinds = ("ground truth", "prediction") if with_label else ("prediction",)
    styles = [figures.outline_style(k, c, classes) for k in kinds for c in range(1, classes)]
    expected = {(tuple(np.round(plt.matplotlib.colors.to_rgba(color), 3)), style == "solid", figures.LINE_WIDTH)
                for color, style in styles}
    assert seen["outlines"] == expected
