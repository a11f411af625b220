"""The benchmarks' --data: repeated for a data set in parts, it gives the same case lists, the same cases and
the same h5 folder for the released trainer as one root holding everything; one --data works as before."""
import shutil

import numpy as np
import pytest

from uamt_fast import train
from benchmarks import profile_step, reference_trainer, train_step
from uamt_fast import data


@pytest.fixture(scope="module")
def parts(tiny_root, tmp_path_factory):
    """``tiny_root`` split in two: part1 holds the first 3 training cases as h5 (copied), part2 the rest
    packed; both carry the full lists (as ``python -m uamt_fast.data pack --max-part-mib`` writes them)."""
    base = tmp_path_factory.mktemp("parts")
    part1, part2 = base / "part1", base / "part2"
    ids = data.read_list(tiny_root, "train") + data.read_list(tiny_root, "test")
    for part in (part1, part2):
        (part / data.IMAGES_DIR).mkdir(parents=True)
        for split in ("train", "test"):
            shutil.copy(tiny_root / f"{split}.list", part / f"{split}.list")
    for case_id in ids[:3]:
        shutil.copytree(tiny_root / data.IMAGES_DIR / case_id, part1 / data.IMAGES_DIR / case_id)
    for case_id in ids[3:]:
        data.pack_case(data.load_case(tiny_root, case_id), part2)
    return [str(part1), str(part2)]


def test_repeated_data_flag_is_a_list_and_one_stays_one(tiny_root, parts):
    for parse in (train_step.parse_args, profile_step.parse_args):
        assert parse(["--cpu", "--data", parts[0], "--data", parts[1]]).data == parts
        assert parse(["--cpu", "--data", str(tiny_root)]).data == [str(tiny_root)]
        assert parse(["--cpu"]).data == []


def test_parts_give_the_same_cases_and_reference_h5_as_one_root(tiny_root, parts, tmp_path):
    def cases(roots):
        return {split: train.load_split(train.Config(data=roots, device="cpu"), split) for split in ("train", "test")}

    whole, split = cases([str(tiny_root)]), cases(train_step.parse_args(["--data", parts[0], "--data", parts[1]]).data)
    for name in ("train", "test"):
        assert [c.id for c in split[name]] == [c.id for c in whole[name]]
        for a, b in zip(split[name], whole[name]):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.label, b.label)

    # One root holding every case as h5: the release folder itself, as before.
    assert reference_trainer.release_h5_folder(str(tiny_root), whole["train"], tmp_path / "one") == \
        tiny_root / data.IMAGES_DIR
    # Parts: one folder, each case linked from the part holding its h5 or written from its packed copy.
    h5_dir = reference_trainer.release_h5_folder(parts, split["train"], tmp_path / "parts")
    assert h5_dir == tmp_path / "parts" / "h5"
    assert (h5_dir / split["train"][0].id / data.H5_NAME).is_symlink()
    assert not (h5_dir / split["train"][-1].id / data.H5_NAME).is_symlink()
    released = reference_trainer.LAHeart(h5_dir, [c.id for c in whole["train"]])
    for k, case in enumerate(whole["train"]):
        np.testing.assert_array_equal(released[k]["image"], case.image)
        np.testing.assert_array_equal(released[k]["label"], case.label)
