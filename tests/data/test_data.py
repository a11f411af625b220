"""uamt_fast.data: lists, split, loading and its errors, synthetic scans, packing, the two-stream sampler."""
import hashlib
import json
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from uamt_fast import data
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast.data import Case, DataError, TwoStreamSampler


def write_case(root, case_id, image=None, label=None, **extra):
    """One h5 case in the release layout; ``image=None`` / ``label=None`` leave that dataset out."""
    folder = root / data.IMAGES_DIR / case_id
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / data.H5_NAME, "w") as f:
        for name, array in {"image": image, "label": label, **extra}.items():
            if array is not None:
                f.create_dataset(name, data=array)
    return folder / data.H5_NAME


def constant_case(case_id, value, shape=(12, 10, 7)):
    """A case whose every voxel is ``value``: any crop of it names the case it came from."""
    return Case(case_id, np.full(shape, value, np.float32), np.zeros(shape, np.uint8))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return data.write_synthetic_la(tmp_path_factory.mktemp("synth"), n_train=3, n_test=2, shape=(24, 20, 12), seed=5)


# ----------------------------------------------------------------------------- lists and split
def test_read_list_keeps_file_order_and_ignores_blank_lines(tmp_path):
    (tmp_path / "train.list").write_text("b\n\na \n c\n")
    assert data.read_list(tmp_path, "train") == ["b", "a", "c"]


def test_semi_supervised_split_takes_the_first_n_as_labeled():
    ids = [f"id{i}" for i in range(80)]
    labeled, unlabeled = data.semi_supervised_split(ids, 16)
    assert labeled == ids[:16] and unlabeled == ids[16:]
    assert data.semi_supervised_split(ids, 80) == (ids, [])
    for bad in (0, -1, 81):
        with pytest.raises(DataError, match=f"labeled={bad}"):
            data.semi_supervised_split(ids, bad)


# ----------------------------------------------------------------------------- bad input
def test_list_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="root not found: .*nowhere"):
        data.read_list(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="list not found: .*test.list"):
        data.read_list(tmp_path, "test")
    (tmp_path / "train.list").write_text("\n\n")
    with pytest.raises(DataError, match="train.list: the case list is empty"):
        data.read_list(tmp_path, "train")
    (tmp_path / "train.list").write_text("a\nb\na\n")
    with pytest.raises(DataError, match=r"train.list: duplicate case ids \['a'\]"):
        data.read_list(tmp_path, "train")


GOOD_IMAGE, GOOD_LABEL = np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 6), np.uint8)
BAD_CASES = {  # name: (datasets written, expected message after the file name)
    "no image": (dict(image=None, label=GOOD_LABEL), "no dataset 'image'"),
    "no label": (dict(image=GOOD_IMAGE, label=None, other=GOOD_LABEL), "no dataset 'label'"),
    "shape mismatch": (dict(image=GOOD_IMAGE, label=np.zeros((4, 5, 7), np.uint8)),
                       r"image shape \(4, 5, 6\) != label"),
    "label value 2": (dict(image=GOOD_IMAGE, label=GOOD_LABEL + 2), r"label values \[2\] outside"),
    "negative label": (dict(image=GOOD_IMAGE, label=GOOD_LABEL.astype(np.int8) - 1), r"label values \[-1\] outside"),
    "float label": (dict(image=GOOD_IMAGE, label=GOOD_IMAGE), "label dtype float32"),
    "2D arrays": (dict(image=GOOD_IMAGE[0], label=GOOD_LABEL[0]), "must both be non-empty 3D"),
    "integer image": (dict(image=GOOD_LABEL, label=GOOD_LABEL), "image dtype uint8"),
    "NaN in image": (dict(image=np.where(GOOD_LABEL == 0, np.nan, 0).astype(np.float32), label=GOOD_LABEL),
                     "120 non-finite values"),
}


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_case_contents_raise_naming_the_file(tmp_path, name):
    datasets, message = BAD_CASES[name]
    path = write_case(tmp_path, "c1", **datasets)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + ".*" + message):
        data.load_case(tmp_path, "c1")


def test_missing_or_truncated_case_files_raise_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="root not found"):
        data.load_case(tmp_path / "nowhere", "c1")
    with pytest.raises(DataError, match=re.escape(f"case folder not found: {tmp_path / data.IMAGES_DIR / 'c1'}")):
        data.load_case(tmp_path, "c1")
    (tmp_path / data.IMAGES_DIR / "c1").mkdir(parents=True)
    with pytest.raises(DataError, match=f"case file not found: .*c1/{data.H5_NAME}"):
        data.load_case(tmp_path, "c1")
    path = write_case(tmp_path, "c1", image=np.random.rand(16, 16, 16).astype(np.float32),
                      label=np.ones((16, 16, 16), np.uint8))
    assert data.load_case(tmp_path, "c1").image.shape == (16, 16, 16)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated copy
    with pytest.raises(DataError, match=re.escape(f"{path}: unreadable HDF5 file")):
        data.load_case(tmp_path, "c1")
    with pytest.raises(DataError, match=re.escape(f"{path}: unreadable HDF5 file")):  # load_cases too: nothing skipped
        data.load_cases(tmp_path, ["c1"])


def h5_pointing_elsewhere(path, how: str, secret) -> None:
    """An h5 case whose 'image' reads another file: a link to it, a virtual dataset over it, its raw bytes as
    external storage, or a soft link (which may lead to any of them)."""
    with h5py.File(path, "w") as f:
        f["label"] = GOOD_LABEL
        if how == "external link":
            f["image"] = h5py.ExternalLink(str(secret), "/image")
        elif how == "soft link":
            f["hidden"] = GOOD_IMAGE
            f["image"] = h5py.SoftLink("/hidden")
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=GOOD_IMAGE.shape, dtype=np.float32)
            layout[...] = h5py.VirtualSource(str(secret), "image", shape=GOOD_IMAGE.shape)
            f.create_virtual_dataset("image", layout)
        else:  # external raw storage: the dataset's bytes are the secret file's
            f.create_dataset("image", GOOD_IMAGE.shape, np.float32, external=[(str(secret), 0, GOOD_IMAGE.nbytes)])


@pytest.mark.parametrize("how, words", [("external link", "'image' is a link (ExternalLink), not a dataset of this file"),
                                        ("soft link", "'image' is a link (SoftLink), not a dataset of this file"),
                                        ("virtual", "dataset 'image' keeps its data in other files"),
                                        ("external storage", "dataset 'image' keeps its data in other files")])
def test_an_h5_case_whose_data_lie_in_another_file_is_refused_unread(tmp_path, how, words):
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["image"] = np.full(GOOD_IMAGE.shape, 7.0, np.float32)
    path = write_case(tmp_path / "root", "c1", image=GOOD_IMAGE, label=GOOD_LABEL)
    h5_pointing_elsewhere(path, how, secret)
    with pytest.raises(DataError, match=re.escape(f"{path}: {words}")):
        data.load_case(tmp_path / "root", "c1")
    with pytest.raises(DataError, match=re.escape(f"{path}: {words}")):
        data.h5_shapes(path, ("image",))  # predict's header check too


def test_an_h5_dataset_claiming_too_many_elements_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr("uamt_fast.data.cases.MAX_H5_ELEMENTS", GOOD_IMAGE.size - 1)
    path = write_case(tmp_path, "c1", image=GOOD_IMAGE, label=GOOD_LABEL)
    with pytest.raises(DataError, match=re.escape(f"{path}: dataset 'image' claims shape (4, 5, 6) = 120 elements, "
                                                  "more than 119; not read")):
        data.load_case(tmp_path, "c1")


def test_truncated_packed_case_raises_naming_the_file(synthetic_root, tmp_path):
    data.pack_dataset(synthetic_root, tmp_path, case_ids=["synth0000"])
    path = tmp_path / data.IMAGES_DIR / "synth0000" / data.PACKED_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=re.escape(f"{path}: unreadable packed case")):
        data.load_case(tmp_path, "synth0000")


def test_sampler_rejects_bad_options():
    cases = [constant_case(f"c{i}", i) for i in range(4)]
    bad = {
        "patch_size .*3 positive sizes": dict(patch_size=(8, 0, 4)),
        "patch_size .*need 3": dict(patch_size=(8, 8)),
        "larger than every volume": dict(patch_size=(8, 8, 8)),  # depth 7 everywhere
        "batch_labeled=0 must be >= 1": dict(batch_labeled=0),
        "batch_unlabeled=-1": dict(batch_unlabeled=-1),
        "3 labeled cases cannot fill batch_labeled=4": dict(batch_labeled=4),
    }
    for message, options in bad.items():
        with pytest.raises(DataError, match=message):
            TwoStreamSampler(cases[:3], cases[3:], **{"patch_size": (8, 8, 4), **options})
    with pytest.raises(DataError, match="batch_unlabeled=0 with 1 unlabeled"):
        TwoStreamSampler(cases[:3], cases[3:], patch_size=(8, 8, 4), batch_unlabeled=0)
    with pytest.raises(DataError, match="batch_unlabeled=2 with 0 unlabeled"):
        TwoStreamSampler(cases, [], patch_size=(8, 8, 4))
    with pytest.raises(DataError, match="case bad: image .* equal 3D shapes"):
        Case("bad", np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 3), np.uint8))


# ----------------------------------------------------------------------------- sampler streams
def test_labeled_cases_cycle_once_per_epoch_and_unlabeled_forever():
    labeled = [constant_case(f"L{i}", i) for i in range(7)]  # 7 // 2 = 3 batches an epoch, one left out
    unlabeled = [constant_case(f"U{i}", 100 + i) for i in range(5)]
    sampler = TwoStreamSampler(labeled, unlabeled, patch_size=(8, 8, 4), batch_labeled=2, batch_unlabeled=2, seed=1)
    assert sampler.batches_per_epoch == 3
    epochs, stream = [], []
    for epoch in range(6):
        seen = []
        for _ in range(sampler.batches_per_epoch):
            images, labels = sampler.next()
            assert images.shape == (4, 1, 8, 8, 4) and labels.shape == (4, 8, 8, 4)
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            values = images.flatten(1)
            assert (values == values[:, :1]).all()  # each row is one case (no padding here)...
            names = [f"{'L' if v < 100 else 'U'}{int(v) % 100}" for v in values[:, 0]]
            assert names == sampler.last_case_ids  # ...and named in last_case_ids
            seen += sampler.last_case_ids[:2]
            stream += sampler.last_case_ids[2:]
            assert sampler.epoch == epoch
        assert len(set(seen)) == 6 and all(i.startswith("L") for i in seen)  # each labeled case at most once
        epochs.append(seen)
    assert len({tuple(e) for e in epochs}) == len(epochs)  # a fresh random order every epoch
    assert {i for e in epochs for i in e} == {c.id for c in labeled}  # the left-out case changes too
    # The unlabeled stream runs across epochs: every aligned block of 5 is a permutation of the 5 cases,
    # and blocks straddle batches (36 draws = 7 full passes + 1).
    passes = [stream[j:j + 5] for j in range(0, len(stream) - 4, 5)]
    assert len(passes) == 7 and all(sorted(p) == [f"U{i}" for i in range(5)] for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_supervised_only_batches():
    sampler = TwoStreamSampler([constant_case(f"L{i}", i) for i in range(3)], [], patch_size=(8, 8, 4),
                               batch_labeled=3, batch_unlabeled=0)
    images, labels = sampler.next()
    assert images.shape == (3, 1, 8, 8, 4) and labels.shape == (3, 8, 8, 4)
    assert sorted(sampler.last_case_ids) == ["L0", "L1", "L2"]


# ----------------------------------------------------------------------------- augmentation
def released_rot_flip_crop(volume, k, axis, start, patch):
    """The released RandomRotFlip + RandomCrop on a full numpy volume, with given draws."""
    rotated = np.flip(np.rot90(volume, k), axis=axis)
    pad = data.padding(rotated.shape, patch)
    rotated = np.pad(rotated, [(p, p) for p in pad])
    return rotated[tuple(slice(s, s + p) for s, p in zip(start, patch))], rotated


@pytest.mark.parametrize("shape, patch", [((13, 9, 7), (5, 4, 3)),  # crops inside the volume
                                          ((7, 9, 5), (8, 6, 6)),  # padding: some dims smaller than the patch
                                          ((9, 9, 12), (9, 4, 6))])  # a dim equal to the patch pads too
def test_rot_flip_crop_matches_the_released_numpy_transforms(shape, patch):
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    rng = np.random.default_rng(1)
    for k in range(4):
        for axis in range(2):
            _, padded = released_rot_flip_crop(volume, k, axis, (0, 0, 0), patch)
            for _ in range(4):
                start = [int(rng.integers(0, n - p)) for n, p in zip(padded.shape, patch)]
                expected, _ = released_rot_flip_crop(volume, k, axis, start, patch)
                got = data.rot_flip_crop(torch.from_numpy(volume), k, axis, start, patch)
                np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"k={k} axis={axis} start={start}")


def locate_crop(volume, crop, patch):
    """(k, axis) for which ``crop`` is an exact sub-block of the released transform of ``volume``
    (whose values are unique and non-zero, padding being 0) at a start the released draw allows."""
    found = []
    nonzero = np.argwhere(crop != 0)[0]
    for k in range(4):
        for axis in range(2):
            _, padded = released_rot_flip_crop(volume, k, axis, (0, 0, 0), patch)
            start = np.argwhere(padded == crop[tuple(nonzero)])[0] - nonzero
            if (start >= 0).all() and (start < np.array(padded.shape) - patch).all():
                block = padded[tuple(slice(s, s + p) for s, p in zip(start, patch))]
                if np.array_equal(block, crop):
                    found.append((k, axis))
    return found


@pytest.mark.parametrize("shape, patch, padded", [((14, 11, 9), (6, 6, 5), False),
                                                 ((6, 11, 5), (8, 8, 5), True)])  # 6 < 8 in-plane: always padding
def test_sampler_crops_are_sub_blocks_of_a_rotated_flipped_volume_with_labels_aligned(shape, patch, padded):
    n = int(np.prod(shape))
    cases = []
    for i in range(3):  # unique values per voxel (offset per case); label = a fixed function of the value
        image = (np.arange(n, dtype=np.float32) + 1 + i * n).reshape(shape)
        cases.append(Case(f"c{i}", image, (image % 3 == 0).astype(np.uint8)))
    sampler = TwoStreamSampler(cases[:2], cases[2:], patch_size=patch, batch_labeled=2, batch_unlabeled=2, seed=3)
    transforms = set()
    for _ in range(10):
        images, labels = sampler.next()
        for row, case_id in enumerate(sampler.last_case_ids):
            crop, label = images[row, 0].numpy(), labels[row].numpy()
            np.testing.assert_array_equal(label, (crop % 3 == 0) & (crop > 0))  # aligned; padding is background
            found = locate_crop(cases[int(case_id[1:])].image, crop, patch)
            assert found, f"row {row} ({case_id}) is not a crop of any rotated/flipped {case_id}"
            transforms.add(frozenset(found))
            assert (crop == 0).any() == padded  # the zero-padding path is taken exactly when needed
    # rot90 by k then a flip is always one of 4 reflections, each reached by 2 of the 8 (k, axis) draws
    assert len(transforms) == 4 and all(len(t) == 2 for t in transforms)


# ----------------------------------------------------------------------------- determinism and resume
def batches(sampler, n):
    return [(*sampler.next(), list(sampler.last_case_ids), sampler.epoch) for _ in range(n)]


def assert_same_batches(a, b):
    for (x1, y1, ids1, e1), (x2, y2, ids2, e2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and ids1 == ids2 and e1 == e2


def test_same_seed_same_batches_and_resume_continues_exactly(tmp_path):
    rng = np.random.default_rng(0)
    cases = [Case(f"c{i}", rng.random((12, 10, 8), np.float32), (rng.random((12, 10, 8)) > 0.5).astype(np.uint8))
             for i in range(8)]

    def make(seed=7):
        return TwoStreamSampler(cases[:5], cases[5:], patch_size=(6, 6, 4), seed=seed)

    a, b = make(), make()
    assert_same_batches(batches(a, 5), batches(b, 5))
    first = batches(make(seed=8), 1)[0]
    assert not torch.equal(first[0], batches(make(), 1)[0][0])  # another seed, other crops

    uninterrupted = make()
    expected = batches(uninterrupted, 13)  # crosses epochs (2 batches each) and unlabeled passes
    interrupted = make()
    batches(interrupted, 6)
    torch.save(interrupted.state_dict(), tmp_path / "sampler.pt")
    resumed = make(seed=123)  # the loaded state replaces the seed
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert_same_batches(batches(resumed, 7), expected[6:])
    with pytest.raises(DataError, match="does not fit this sampler"):
        TwoStreamSampler(cases[:4], cases[4:], patch_size=(6, 6, 4)).load_state_dict(interrupted.state_dict())


# ----------------------------------------------------------------------------- synthetic data
def test_synthetic_data_round_trips_through_the_loader(synthetic_root, tmp_path):
    train, test = data.read_list(synthetic_root, "train"), data.read_list(synthetic_root, "test")
    assert train == ["synth0000", "synth0001", "synth0002"] and test == ["synth0003", "synth0004"]
    for case in data.load_cases(synthetic_root, train + test):
        assert case.image.shape == (24, 20, 12) and case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert abs(case.image.mean()) < 1e-4 and abs(case.image.std() - 1) < 1e-3  # normalized per scan
        assert 0.005 < case.label.mean() < 0.2 and set(np.unique(case.label)) == {0, 1}
        assert case.image[case.label == 1].mean() > case.image[case.label == 0].mean() + 1  # a bright atrium
        assert np.unique(case.image).size <= 256  # 8-bit scans, so they pack
    again = data.write_synthetic_la(tmp_path / "again", n_train=2, n_test=1, shape=(24, 20, 12), seed=5)
    for case_id in ("synth0000", "synth0001"):  # case i depends on (seed, i) only
        a, b = data.load_case(synthetic_root, case_id), data.load_case(again, case_id)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    other = data.write_synthetic_la(tmp_path / "other", n_train=1, n_test=1, shape=(24, 20, 12), seed=6)
    assert not np.array_equal(data.load_case(other, "synth0000").image,
                              data.load_case(synthetic_root, "synth0000").image)


def test_synth_command_line(tmp_path):
    assert data_cli.main(["synth", str(tmp_path), "--train", "2", "--test", "1", "--shape", "9", "8", "7", "--seed", "2"]) \
        == 0
    assert data.load_case(tmp_path, data.read_list(tmp_path, "test")[0]).image.shape == (9, 8, 7)


# ----------------------------------------------------------------------------- packing
def test_pack_round_trip_is_bit_exact_on_synthetic_data(synthetic_root, tmp_path, capsys):
    argv = ["pack", str(synthetic_root), str(tmp_path), "--train", "1", "--unlabeled", "1", "--test", "1"]
    assert data_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 cases" in out and "Lossless: every case was read back and its image and label are bit-identical" in out
    assert "part" not in out and "affine" not in out  # part sizes only when parts were asked for
    assert data.read_list(tmp_path, "train") == ["synth0000", "synth0001"]
    assert data.read_list(tmp_path, "test") == ["synth0003"]
    assert not list(tmp_path.rglob("*.h5"))
    for case_id in ("synth0000", "synth0001", "synth0003"):
        packed, source = data.load_case(tmp_path, case_id), data.load_case(synthetic_root, case_id)
        assert np.array_equal(packed.image.view(np.uint32), source.image.view(np.uint32))
        assert np.array_equal(packed.label, source.label)
    picked = data.pack_dataset(synthetic_root, tmp_path / "picked", case_ids=["synth0004", "synth0002"])
    assert [case_id for case_id, _, _ in picked] == ["synth0002", "synth0004"]  # each in its own list, list order
    assert data.read_list(tmp_path / "picked", "train") == ["synth0002"]


def test_quantize_finds_the_affine_map_and_refuses_lossy_packing(synthetic_root, tmp_path):
    raw = np.random.default_rng(0).integers(3, 200, (10, 10, 10)).astype(np.float64)
    image = ((raw - raw.mean()) / raw.std()).astype(np.float32)
    q, levels, offset, scale, error = data.quantize(image, "test image")
    assert offset == pytest.approx(-raw.mean() / raw.std() + 3 * scale, rel=1e-6)  # code 0 <-> raw value 3
    assert np.array_equal(levels[q].view(np.uint32), image.view(np.uint32))
    assert scale == pytest.approx(1 / raw.std(), rel=1e-6)
    assert error <= 4 * np.finfo(np.float32).eps * np.abs(image).max()
    bent = image.copy()
    bent[image == image.max()] += np.float32(0.4 * scale)  # one level moved by 0.4 of a step: 197 levels, not affine
    with pytest.raises(DataError, match="case bent: image is not an affine map"):
        data.pack_case(Case("bent", bent, np.zeros(image.shape, np.uint8)), tmp_path)
    # seeded: unseeded np.random.rand repeats a float32 value in ~1.5% of draws, and then counts 999
    distinct = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    assert len(np.unique(distinct)) == 1000
    with pytest.raises(DataError, match="case float: 1000 distinct image values"):
        data.pack_case(Case("float", distinct, np.zeros((10, 10, 10), np.uint8)),
                       tmp_path)
    with pytest.raises(DataError, match="neither train.list nor test.list"):
        data.pack_dataset(synthetic_root, tmp_path, case_ids=["synth0000", "nope"])
    with pytest.raises(DataError, match="asked for"):
        data.pack_dataset(synthetic_root, tmp_path, n_train=3, n_unlabeled=1)


# ----------------------------------------------------------------------------- real LA data
@pytest.mark.real_data
def test_real_cases_load_and_crop_at_the_paper_patch(la_root):
    train, test = data.read_list(la_root, "train"), data.read_list(la_root, "test")
    assert len(train) == 80 and len(test) == 20 and not set(train) & set(test)
    cases = data.load_cases(la_root, train[:2] + test[:1])
    for case in cases:
        assert case.image.shape[2] == 88 and min(case.image.shape[:2]) > 112
        # normalized before the release cropped around the heart: background < 0 < the bright atrium
        assert -1.5 < case.image.min() < 0 < case.image[case.label == 1].mean() < case.image.max() < 20
        assert 0.02 < case.label.mean() < 0.2 and np.unique(case.image).size <= 256  # an 8-bit scan
    sampler = TwoStreamSampler(cases[:2], cases[2:], patch_size=(112, 112, 80), seed=0)
    images, labels = sampler.next()
    assert images.shape == (4, 1, 112, 112, 80) and labels.shape == (4, 112, 112, 80)


@pytest.mark.real_data
def test_real_cases_pack_bit_exact(la_root, tmp_path):
    ids = data.read_list(la_root, "train")[:1] + data.read_list(la_root, "test")[:1]
    report = data.pack_dataset(la_root, tmp_path, case_ids=ids)
    for case_id, size, error in report:
        packed, source = data.load_case(tmp_path, case_id), data.load_case(la_root, case_id)
        assert np.array_equal(packed.image.view(np.uint32), source.image.view(np.uint32))
        assert np.array_equal(packed.label, source.label)
        assert size < 0.7 * (la_root / data.IMAGES_DIR / case_id / data.H5_NAME).stat().st_size
        assert error <= 4 * np.finfo(np.float32).eps * np.abs(source.image).max()


# ----------------------------------------------------------------------------- several roots
def test_parts_give_the_same_lists_and_crops_as_one_root(synthetic_root, tmp_path, capsys):
    # Packed synthetic cases are ~17 kB: a 0.03 MiB limit makes one part a case or two.
    assert data_cli.main(["pack", str(synthetic_root), str(tmp_path), "--train", "3", "--test", "2",
                      "--max-part-mib", "0.03"]) == 0
    out = capsys.readouterr().out
    parts = sorted(tmp_path.glob("part*"))
    assert len(parts) >= 2 and "--data " + str(parts[0]) in out and f"{parts[0]}: " in out and "Lossless" in out
    assert not (tmp_path / data.IMAGES_DIR).exists() and not (tmp_path / "train.list").exists()
    assert sum(len(list((p / data.IMAGES_DIR).iterdir())) for p in parts) == 5  # each case in exactly one part
    for roots in (parts, parts[::-1]):  # every part holds the full lists: the order of --data does not matter
        for split in ("train", "test"):
            assert data.read_list(roots, split) == data.read_list(synthetic_root, split)

    def crops(roots):
        cases = data.load_cases(roots, data.read_list(roots, "train"))
        sampler = TwoStreamSampler(cases[:1], cases[1:], patch_size=(16, 16, 8), batch_labeled=1, seed=3)
        return batches(sampler, 3)

    assert_same_batches(crops(parts), crops([synthetic_root]))


def test_several_roots_share_their_lists_and_each_case_is_found_in_one(synthetic_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    data.pack_dataset(synthetic_root, a, case_ids=["synth0000", "synth0003"])
    data.pack_dataset(synthetic_root, b, case_ids=["synth0001", "synth0002", "synth0004"])
    for root in (a, b):  # parts of one data set: each carries the full lists
        for split in ("train", "test"):
            shutil.copy(synthetic_root / f"{split}.list", root / f"{split}.list")
    assert data.read_list([a, b], "train") == data.read_list([b, a], "train") == ["synth0000", "synth0001", "synth0002"]
    assert data.read_list([b, a], "test") == ["synth0003", "synth0004"]
    assert data.find_case([a, b], "synth0002") == b
    assert [c.id for c in data.load_cases([a, str(b)], ["synth0001", "synth0000"])] == ["synth0001", "synth0000"]
    images_only = [tmp_path / name for name in ("images_only", "images_only2")]  # no lists, no such case
    for root in images_only:
        (root / data.IMAGES_DIR).mkdir(parents=True)
    assert data.read_list([a, images_only[0]], "train") == data.read_list(a, "train")  # a root without lists: fine
    with pytest.raises(DataError, match=r"case synth0001: no file cases/synth0001.h5 and no folder .*synth0001 in "
                                        r"any of"):
        data.find_case([a, images_only[0]], "synth0001")
    data.pack_dataset(synthetic_root, tmp_path / "c", case_ids=["synth0000"])
    with pytest.raises(DataError, match=r"case synth0000 is in several roots: \[.*/a', .*/c'\]"):
        data.load_cases([a, b, tmp_path / "c"], ["synth0000"])
    with pytest.raises(DataError, match=r"case list not found: train.list in none of"):
        data.read_list(images_only, "train")
    with pytest.raises(DataError, match="root not found: .*nowhere"):
        data.read_list([a, tmp_path / "nowhere"], "train")
    with pytest.raises(DataError, match="LA data root given twice"):
        data.read_list([a, a], "train")
    with pytest.raises(DataError, match="no LA data root given"):
        data.read_list([], "train")


def test_roots_whose_lists_differ_are_refused_naming_both_and_the_first_difference(tmp_path):
    """Merging differing lists made the labeled set (the first --labeled train ids) depend on the --data order."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root, train_ids in ((a, "x\ny\nz\n"), (b, "x\nz\ny\n")):
        root.mkdir()
        (root / "train.list").write_text(train_ids)
        (root / "test.list").write_text("t\n")
    for roots, first in (([a, b], "'y' in the first, 'z' in the second"), ([b, a], "'z' in the first, 'y'")):
        with pytest.raises(DataError, match=re.escape(f"train.list differs between {roots[0]} and {roots[1]}: id 2 is "
                                                      f"{first}")):
            data.read_list(roots, "train")
        with pytest.raises(DataError, match="train.list differs"):  # test ids are read with the train list checked
            data.read_list(roots, "test")
    (b / "train.list").write_text("x\ny\n")  # a prefix: the longer list's next id is the difference
    with pytest.raises(DataError, match=re.escape("id 3 is 'z' in the first, missing (the list ends) in the second")):
        data.read_splits([a, b])
    (b / "train.list").write_text("x\ny\nz\n")
    assert data.read_splits([b, a]) == {"train": ["x", "y", "z"], "test": ["t"]}


BAD_IDS = ["../../x", "/abs/path", "a/b", ".", "..", "a\\b", "a\x00b", "a\tb", "a\x1bb", "a\u200bb"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_list_ids_that_are_paths_or_hold_control_characters_are_refused_naming_the_list(tmp_path, bad):
    (tmp_path / "train.list").write_text(f"ok\n{bad}\n", encoding="utf-8")
    expected = re.escape(f"{tmp_path / 'train.list'}: case id {bad!r} is not a plain name")
    with pytest.raises(DataError, match=expected):
        data.read_list(tmp_path, "train")
    (tmp_path / "test.list").write_text("t\n")
    for call in (lambda: data.read_list(tmp_path, "test"), lambda: data.read_splits(tmp_path)):
        with pytest.raises(DataError, match=expected):  # the other list of the root is checked too
            call()


@pytest.mark.parametrize("bad", BAD_IDS + ["", 7])
def test_case_ids_given_to_the_api_must_be_plain_names(synthetic_root, tmp_path, bad):
    with pytest.raises(DataError, match=re.escape(f"case id {bad!r} is not a plain name")):
        data.load_case(synthetic_root, bad)
    with pytest.raises(DataError, match=re.escape(f"case_ids: case id {bad!r} is not a plain name")):
        data.pack_dataset(synthetic_root, tmp_path / "out", case_ids=[bad])
    with pytest.raises(DataError, match=re.escape(f"pack_case: case id {bad!r} is not a plain name")):
        data.pack_case(Case(bad, np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert data.check_case_id("0RZDK210BSMWAA6467LU") == "0RZDK210BSMWAA6467LU"


def test_pack_refuses_a_list_id_that_leaves_the_root_and_writes_nothing_outside_its_output(tmp_path, capsys):
    """Before: train.list naming ../../evil read tmp/evil/mri_norm2.h5 and wrote tmp/evil/mri_norm2.npz."""
    source, out = tmp_path / "source", tmp_path / "out"
    write_case(source, "good", image=GOOD_IMAGE, label=GOOD_LABEL)
    outside = tmp_path / "evil"
    outside.mkdir()
    write_case(tmp_path / "x", "y", image=GOOD_IMAGE, label=GOOD_LABEL).rename(outside / data.H5_NAME)
    (source / "train.list").write_text("good\n../../evil\n")
    (source / "test.list").write_text("good2\n")
    assert data_cli.main(["pack", str(source), str(out), "--train", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {source / 'train.list'}: case id '../../evil' is not a plain name (expected a folder name " \
        f"in '{data.IMAGES_DIR}': not empty, '.' or '..', no '/', '\\' or non-printing characters)\n"
    assert sorted(p.name for p in outside.iterdir()) == [data.H5_NAME] and not out.exists()
    assert data_cli.main(["pack", str(source), str(out), "--cases", "../evil"]) == 2
    assert capsys.readouterr().err.startswith("error: --cases: case id '../evil' is not a plain name")


def test_a_case_in_both_lists_is_refused_whichever_list_is_read(tmp_path, synthetic_root):
    (tmp_path / "train.list").write_text("a\nb\nc\n")
    (tmp_path / "test.list").write_text("d\nb\n")
    expected = re.escape(f"case ids ['b'] are in both {tmp_path / 'train.list'} and {tmp_path / 'test.list'}")
    for call in (lambda: data.read_list(tmp_path, "train"), lambda: data.read_list(tmp_path, "test"),
                 lambda: data.read_splits(tmp_path), lambda: data.split_fingerprint(tmp_path)):
        with pytest.raises(DataError, match=expected):
            call()
    (tmp_path / "test.list").write_text("")  # an empty other list: nothing overlaps (only a read list must have ids)
    assert data.read_list(tmp_path, "train") == ["a", "b", "c"]
    (tmp_path / "test.list").unlink()
    assert data.read_list(tmp_path, "train") == ["a", "b", "c"]


def test_split_fingerprint_names_both_lists_and_hashes_ids_and_order(synthetic_root, tmp_path):
    fingerprint = data.split_fingerprint(synthetic_root)
    train, test = data.read_list(synthetic_root, "train"), data.read_list(synthetic_root, "test")
    assert data.read_splits(synthetic_root) == {"train": train, "test": test}
    assert fingerprint == {"train": train, "test": test,
                           "sha256": hashlib.sha256(json.dumps([train, test]).encode()).hexdigest()}
    for split in ("train", "test"):
        (tmp_path / f"{split}.list").write_text((synthetic_root / f"{split}.list").read_text())
    assert data.split_fingerprint(tmp_path) == fingerprint  # the ids decide, not the folder
    (tmp_path / "train.list").write_text("".join(i + "\n" for i in train[::-1]))  # same ids, other labeled ones
    assert data.split_fingerprint(tmp_path)["sha256"] != fingerprint["sha256"]
    with pytest.raises(DataError, match="list not found: .*test.list"):
        (tmp_path / "test.list").unlink()
        data.read_splits(tmp_path)


def test_a_list_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    (tmp_path / "train.list").write_bytes(b"a\n\xff\xfeb\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.list'}: not UTF-8 text (byte 2")):
        data.read_list(tmp_path, "train")


def test_pack_refuses_a_part_smaller_than_a_case(synthetic_root, tmp_path, capsys):
    assert data_cli.main(["pack", str(synthetic_root), str(tmp_path), "--train", "1", "--max-part-mib", "0.001"]) == 2
    assert "larger than the part size" in capsys.readouterr().err


def test_an_empty_folder_among_several_roots_is_refused(tmp_path):
    """A typo'd or empty --data part must not be skipped without a word."""
    root = data.write_synthetic_la(tmp_path / "la", n_train=2, n_test=1, shape=(16, 16, 8), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a data root"):
        data.read_list([root, tmp_path / "empty"], "train")


# ----------------------------------------------------------------------------- command-line flags
BAD_FLAGS = {  # argv after the command and its folders: the flag the one-line error must name
    "pack": [(["--train", "1", "--max-part-mib", mib], "--max-part-mib") for mib in ("nan", "inf", "-inf", "0", "-1")]
    + [(["--train", "-1"], "--train"), (["--train", "1", "--unlabeled", "-1"], "--unlabeled"),
       (["--train", "1", "--test", "-2"], "--test"), (["--train", "x"], "--train"),
       (["--train", "0"], "nothing to pack")],
    "synth": [(["--train", "0"], "--train"), (["--test", "-1"], "--test"), (["--seed", "-1"], "--seed"),
              (["--shape", "8", "0", "8"], "--shape")],
}


@pytest.mark.parametrize("command, flags, named", [(c, f, n) for c, cases in BAD_FLAGS.items() for f, n in cases])
def test_bad_pack_and_synth_flags_are_one_line_and_exit_2(synthetic_root, tmp_path, capsys, command, flags, named):
    folders = [str(synthetic_root), str(tmp_path / "out")] if command == "pack" else [str(tmp_path / "out")]
    assert data_cli.main([command, *folders, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "out").exists()


def test_pack_max_part_mib_nan_from_the_shell_is_one_line_not_a_traceback(synthetic_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "uamt_fast.data", "pack", str(synthetic_root), str(tmp_path / "out"),
                             "--train", "1", "--max-part-mib", "nan"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "error: argument --max-part-mib: expected a finite number " \
        "> 0, got 'nan'\n", result.stderr


def test_help_states_the_ranges_of_the_numeric_flags(capsys):
    for command, ranges in {"pack": ["N >= 0", "K >= 0", "M >= 0", "N + K + M >= 1", "a finite number > 0"],
                            "synth": ["training cases, >= 1", "test cases, >= 1", "each >= 1", "seed >= 0"]}.items():
        with pytest.raises(SystemExit) as exit:
            data_cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
        assert exit.value.code == 0 and all(r in text for r in ranges), (command, text)


def test_pack_and_synth_refuse_an_output_that_is_a_file_or_the_source_root(synthetic_root, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        for argv in (["pack", str(synthetic_root), str(out), "--train", "1"],
                     ["synth", str(out), "--shape", "4", "4", "4"]):
            assert data_cli.main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: output folder {out}: ") and "is a file; expected a folder" in err \
                and err.count("\n") == 1, err
    lists = {split: (synthetic_root / f"{split}.list").read_text() for split in ("train", "test")}
    assert data_cli.main(["pack", str(synthetic_root), str(synthetic_root), "--train", "1"]) == 2
    assert "is the source root" in capsys.readouterr().err
    assert {split: (synthetic_root / f"{split}.list").read_text() for split in lists} == lists
