"""Your own data with no flags to learn first: the hold-out drawn by prepare itself, a prepared set's
own layout (``cases/<id>.h5``; the LA release's still read), --labeled from the data, errors that say when a value
was a default, absolute data roots (predict from any folder), unlisted MSD images as unlabeled cases, the sources
that need no prepare, brats2019's channel and merged classes, and a run that died before its first checkpoint.

Every check goes through the command line in-process (``python -m uamt_fast.data prepare``'s ``main``,
``train.main``, ``predict.main`` from another working folder) at tiny sizes; one test trains (2 iterations).
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("monai")

import test_prepare  # noqa: E402  (tests/data: its synthetic NIfTI folders)
from trainer_cli import one_error_line  # noqa: E402  (tests/)

from uamt_fast import data, predict, train  # noqa: E402
from uamt_fast.data import __main__ as data_cli  # noqa: E402  (python -m uamt_fast.data)

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py: one thread, the CPU ops

# The tiny run, with neither --labeled nor the data's own patch (the preset none records the paper's 112x112x80).
RUN = ["--n-filters", "2", "--patch", "16", "16", "16", "--eval-stride-xy", "16", "--eval-stride-z", "16",
       "--no-compile", "--device", "cpu", "--iterations", "2", "--log-every", "2", "--save-every", "2"]


def prepare(*args) -> tuple[int, str]:
    """``prepare`` through its command line, in-process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = data_cli.main(["prepare", *map(str, args)])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """An nnU-Net folder of 6 labeled and 2 unlabeled one-channel scans (LPS, 0.8 x 0.8 x 2 mm), no imagesTs,
    prepared with no hold-out flag."""
    base = tmp_path_factory.mktemp("own")
    src = test_prepare.write_nnunet(base / "src", n_labeled=6, n_unlabeled=2, channels=("T1",))
    code, stdout = prepare(src, base / "prepared", "--preset", "none")
    assert code == 0, stdout
    return base, src, base / "prepared", stdout


# ----------------------------------------------------------------------------- prepare
def test_the_hold_out_is_drawn_printed_and_recorded_without_a_flag(own):
    _, _, out, stdout = own
    labeled = [f"case{k:03d}" for k in range(6)]  # sorted ids, drawn as --test-count draws: seeded by --seed 0
    drawn = sorted(labeled[k] for k in np.random.default_rng(0).permutation(6)[:1])  # 20% of 6 -> 1
    assert data.read_list(out, "test") == drawn
    assert data.read_list(out, "train") == [i for i in labeled if i not in drawn]
    assert data.read_unlabeled(out) == ["case006", "case007"]
    split = json.loads((out / data.RECORD_NAME).read_text())["split"]
    assert split["seed"] == 0 and split["test"].startswith("automatic hold-out: 20% of the labeled cases")
    assert f"test cases: {drawn[0]} (1 of 6 labeled cases held out: 20%, seed 0;" in stdout


def test_hold_out_flags_still_choose(own, tmp_path):
    _, src, _, _ = own
    assert prepare(src, tmp_path / "out", "--preset", "none", "--test-count", "2", "--seed", "5")[0] == 0
    assert len(data.read_list(tmp_path / "out", "test")) == 2
    split = json.loads((tmp_path / "out" / data.RECORD_NAME).read_text())["split"]
    assert split["seed"] == 5 and split["test"].startswith("--test-count 2: 2 of 6 labeled cases")


def test_a_prepared_set_has_a_layout_of_its_own(own):
    _, _, out, _ = own
    ids = sorted(json.loads((out / data.RECORD_NAME).read_text())["cases"])
    assert sorted(p.name for p in (out / data.CASES_DIR).iterdir()) == [f"{i}.h5" for i in ids]
    assert not (out / data.IMAGES_DIR).exists()
    assert data.root_case_files(out) == [data.prepared_case_path(out, i) for i in ids]
    assert data.case_of_file(data.prepared_case_path(out, "case006")) == ("case006", out)
    case = data.load_case(out, "case006", labeled=False)
    assert case.label is None and case.spacing == pytest.approx((0.8, 0.8, 2.0))


def test_an_older_set_in_the_release_layout_is_read_then_replaced(own, tmp_path, capsys):
    """A set prepared before cases/ existed (the LA release's folders) trains as it is; prepare --overwrite
    moves it out whole; a case folder there that no prepared set owns is refused."""
    _, src, _, _ = own
    out = tmp_path / "out"
    assert prepare(src, out, "--preset", "none")[0] == 0
    before = data.load_case(out, "case006", labeled=False)
    for path in data.root_case_files(out):  # as an older prepare wrote them
        folder = data.release_case_folder(out, path.stem)
        folder.mkdir(parents=True)
        path.rename(folder / data.H5_NAME)
    (out / data.CASES_DIR).rmdir()
    np.testing.assert_array_equal(data.load_case(out, "case006", labeled=False).image, before.image)
    assert prepare(src, out, "--preset", "none", "--overwrite")[0] == 0
    assert not (out / data.IMAGES_DIR).exists() and len(data.root_case_files(out)) == 8
    (data.release_case_folder(out, "case000")).mkdir(parents=True)  # the same case at both places
    with pytest.raises(data.DataError, match="case case000 is in .* twice"):
        data.find_case(out, "case000")
    stray = tmp_path / "stray"
    data.release_case_folder(stray, "case000").mkdir(parents=True)
    assert prepare(src, stray, "--preset", "none")[0] == 2
    assert "case000 exists and is not part of a prepared set there" in capsys.readouterr().err


def test_an_msd_image_left_out_of_training_is_an_unlabeled_case(tmp_path):
    src = test_prepare.write_msd(tmp_path / "msd")  # image0004 is declared {"image": ...} without a label
    test_prepare.save(src / "imagesTr" / "image0009.nii.gz", test_prepare.scan(9)[0], test_prepare.oblique())
    code, stdout = prepare(src, tmp_path / "out", "--preset", "none")
    assert code == 0
    assert data.read_unlabeled(tmp_path / "out") == ["image0004", "image0009"]
    assert "1 image(s) that dataset.json's 'training' list leaves out added as unlabeled cases (image0009)" in stdout


def test_sources_that_need_no_prepare_say_so(own, tiny_root, tmp_path, capsys):
    _, _, prepared, _ = own
    for src, words in ((tiny_root, ["LA release's h5 layout", f"needs no prepare: train.py --data {tiny_root}"]),
                       (tiny_root / data.IMAGES_DIR, [f"need no prepare: train.py --data {tiny_root} reads"]),
                       (prepared, ["a set that prepare wrote already", f"train.py --data {prepared}"])):
        assert prepare(src, tmp_path / "out")[0] == 2
        one_error_line(capsys, *words, prefix="error: ")
    assert not (tmp_path / "out").exists()


def test_brats_preset_wants_flair_and_says_what_it_merges(tmp_path, capsys):
    src = test_prepare.write_nnunet(tmp_path / "src", n_labeled=3, n_unlabeled=0, channels=("MRI",))
    assert prepare(src, tmp_path / "out", "--preset", "brats2019", "--test-count", "1")[0] == 2
    one_error_line(capsys, "preset channel 'FLAIR': not a channel", "0=MRI", "name it with --channel", prefix="error: ")
    code, stdout = prepare(src, tmp_path / "out", "--preset", "brats2019", "--test-count", "1", "--channel", "MRI")
    assert code == 0
    assert "every label > 0 becomes class 1, 'whole tumour': left (1), right (2) merged" in stdout


# ----------------------------------------------------------------------------- train.py and predict
def test_labeled_defaults_to_the_prepared_set_and_runs_record_absolute_roots(own, tmp_path, monkeypatch):
    """--labeled from the data (all 5 of train.list: the unlabeled cases are unlabeled.list's), --data given
    relative and recorded absolute; predict run from another folder finds the data and its preprocessing."""
    base, src, prepared, _ = own
    monkeypatch.chdir(base)
    run = tmp_path / "run"
    assert train.main(["--data", "prepared", *RUN, "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["labeled"] == 5 and saved["config"]["data"] == [str(prepared)]
    assert "prepared" in saved["environment"]["argv"]  # the command line as given
    test_id, train_id = data.read_list(prepared, "test")[0], data.read_list(prepared, "train")[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # (predict's command line in-process: a subprocess costs ~9 s of imports)
    assert predict.main([str(run), str(src / "imagesTr" / f"{test_id}_0000.nii.gz"),
                         str(data.prepared_case_path(prepared, train_id)), "--out", "masks", "--device", "cpu"]) == 0
    assert {p.name for p in (elsewhere / "masks").glob("*.nii.gz")} == {f"{test_id}.nii.gz", f"{train_id}.nii.gz"}
    record = json.loads((elsewhere / "masks" / "predictions.json").read_text())
    assert record["runs"][-1]["settings"]["preprocessing"] == "prepare preset 'none', channel 'T1'"


def test_errors_about_a_default_say_it_was_the_default(tiny_root, own, tmp_path, capsys):
    tiny = ["--n-filters", "2", "--no-compile", "--device", "cpu", "--out", str(tmp_path / "run")]
    patch = ["--patch", "16", "16", "16", "--eval-stride-xy", "16", "--eval-stride-z", "16"]
    assert train.main(["--data", str(tiny_root), *tiny, *patch]) == 2  # 5 training cases
    one_error_line(capsys, "--labeled 16 (the default for the LA release): need 1 <= labeled <= 5")
    assert train.main(["--data", str(tiny_root), *tiny, "--labeled", "2"]) == 2  # 32x24x16 volumes
    one_error_line(capsys, "--patch 112 112 80 (the default) is larger than every volume")
    assert train.main(["--data", str(tiny_root), *tiny, *patch, "--labeled", "1"]) == 2
    one_error_line(capsys, "1 labeled cases cannot fill --batch-labeled 2 (the default)")
    assert train.main(["--data", str(tiny_root), *tiny, "--labeled", "2", "--patch", "16", "16", "16"]) == 2
    one_error_line(capsys, "--eval-stride-xy 18 (the default) / --eval-stride-z 4 (the default): a stride larger "
                   "than the window (--patch 16 16 16)")
    src = test_prepare.write_nnunet(tmp_path / "src", n_labeled=3, n_unlabeled=0, channels=("T1",))
    assert prepare(src, tmp_path / "all_labeled", "--preset", "none")[0] == 0
    assert train.main(["--data", str(tmp_path / "all_labeled"), *tiny, *patch]) == 2
    one_error_line(capsys, "--labeled 2 (the default for a prepared set: all of its train.list) leaves no "
                   "unlabeled case for --method uamt", "--method supervised")
    assert not (tmp_path / "run").exists()


def test_a_run_that_saved_no_checkpoint_is_not_sent_to_resume(tiny_root, tmp_path, capsys):
    """What a run killed before its first checkpoint leaves: its config and log, no checkpoint.pt."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert train.main(["--data", str(tiny_root), "--labeled", "2", "--out", str(run)]) == 2
    err = one_error_line(capsys, "already holds a run", "saved no checkpoint.pt", "--overwrite")
    assert "--resume" not in err
    assert train.main(["--resume", str(run)]) == 2
    one_error_line(capsys, f"--resume {run}: no checkpoint.pt in that folder", f"--out {run} --overwrite")
    assert sorted(p.name for p in run.iterdir() if p.name != "run.lock") == ["config.json", "metrics.jsonl"]
