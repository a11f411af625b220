"""The lossless packed copy of LA cases (``python -m uamt_fast.data pack``), and its split into parts.

A *packed* root has the same lists and folders as the release with ``mri_norm2.npz`` instead of
``mri_norm2.h5``: the LA scans are 8-bit MRI normalized per scan, so each image is an affine map of at most
256 levels and stores as uint8 codes plus the 256 float32 level values (bit-exact, ~1.2 MiB a case instead
of ~2.2 MiB). ``uamt_fast.data.cases.load_case`` reads either transparently.
"""
from __future__ import annotations

import bz2
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from uamt_fast import files
from uamt_fast.data.cases import Case, load_case, read_packed
from uamt_fast.data.layout import (
    IMAGES_DIR,
    PACKED_FORMAT,
    PACKED_NAME,
    DataError,
    check_case_id,
    make_folder,
    make_subfolder,
    read_splits,
)

# One .npz per case (an uncompressed zip of small arrays): numpy reads it with no extra dependency,
# and its bz2 payloads decompress with the GIL released, so load_cases' threads run in parallel
# (h5py serializes every HDF5 call behind one lock). bz2 is chosen for size, the point of packing:
# on LA codes it is ~20% smaller than zlib (all 100 cases: 1.205 MiB a case, 47 in 60 MiB; zlib
# ~1.5 MiB) at ~0.4 s of CPU to decode a case (zlib 0.02 s); xz is 8-15% larger unless
# run at -6, which takes ~25 s a case to write.


def quantize(image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Express an 8-bit scan normalized as ``(raw - mean) / std`` by its 8-bit codes.

    Finds ``offset``, ``scale`` and codes ``q`` in 0..255 with ``image ~= offset + scale * q`` (the
    affine fit must hold to 4 float32 ulps of max|image|, else DataError: never silently lossy) and
    returns ``(q uint8, levels float32 (256,), offset, scale, max_affine_error)`` where
    ``levels[q] == image`` bit for bit (each used level holds the exact float32 value of the scan).
    """
    values, inverse = np.unique(image, return_inverse=True)
    if values.size > 256:
        raise DataError(f"{name}: {values.size} distinct image values; an 8-bit scan has at most 256")
    v = values.astype(np.float64)
    offset, scale = v[0], 1.0
    if v.size > 1:
        codes = np.rint((v - v[0]) / np.diff(v).min())  # smallest gap ~ one level: first guess
        scale, offset = np.polyfit(codes, v, 1)  # least squares refit over all levels
    codes = np.rint((v - offset) / scale)
    error = float(np.abs((offset + scale * codes).astype(np.float32) - v).max())
    tolerance = 4 * np.finfo(np.float32).eps * max(float(np.abs(v).max()), 1e-30)
    if codes.min() < 0 or codes.max() > 255 or error > tolerance or np.unique(codes).size != v.size:
        raise DataError(f"{name}: image is not an affine map of <= 256 levels (max error {error:.3g}, "
                        f"tolerance {tolerance:.3g}); refusing to pack it lossily")
    levels = (offset + scale * np.arange(256)).astype(np.float32)
    levels[codes.astype(np.int64)] = values
    q = codes.astype(np.uint8)[inverse.reshape(image.shape)]
    return q, levels, float(offset), float(scale), error


def pack_case(case: Case, out_root) -> tuple[Path, float]:
    """Write ``case`` packed under ``out_root``; verify the file reads back bit-exact. Returns (path, affine error).
    ``case.id`` must be a plain name (``check_case_id``): the file goes to ``out_root/<IMAGES_DIR>/<id>/``."""
    check_case_id(case.id, "pack_case")
    if case.label is None or case.label.max() > 1:  # the packed label is one bit a voxel
        raise DataError(f"case {case.id}: pack stores the LA release's binary labels; this case has "
                        + ("no label" if case.label is None else f"labels up to {int(case.label.max())}")
                        + " (train from the prepared h5 folder itself)")
    q, levels, offset, scale, error = quantize(case.image, f"case {case.id}")
    path = make_subfolder(out_root, IMAGES_DIR, case.id) / PACKED_NAME
    fields = dict(format=np.array(PACKED_FORMAT), shape=np.array(case.image.shape, np.int64), levels=levels,
                  offset=np.float64(offset), scale=np.float64(scale),
                  image_codes_bz2=np.frombuffer(bz2.compress(q.tobytes(), 9), np.uint8),
                  label_bits_bz2=np.frombuffer(bz2.compress(np.packbits(case.label).tobytes(), 9), np.uint8))
    files.atomic_write(path, lambda f: np.savez(f, **fields))
    image, label = read_packed(path)
    if not (np.array_equal(image.view(np.uint32), case.image.view(np.uint32)) and np.array_equal(label, case.label)):
        raise DataError(f"{path}: packed copy does not read back bit-exact")  # a bug, never expected
    return path, error


def pack_dataset(root, out, case_ids=None, n_train=None, n_test=None, n_unlabeled=0) -> list[tuple[str, int, float]]:
    """Pack the given ids, or the first ``n_train + n_unlabeled`` of train.list and ``n_test`` of test.list.

    The packed train.list / test.list keep the source lists' order (so the first N stay the labeled
    ones). Returns ``(id, bytes, max affine error)`` per case, train ids first. Refused: ids that are not
    plain names or in neither list, counts below 0 or beyond the lists, nothing to pack, ``out`` the
    source root itself (its lists would be replaced) or a file.
    """
    splits = read_splits(root)
    train_ids, test_ids = splits["train"], splits["test"]
    if case_ids is not None:
        case_ids = {check_case_id(i, "case_ids") for i in case_ids}
        unknown = sorted(case_ids - set(train_ids) - set(test_ids))
        if unknown:
            raise DataError(f"{root}: case ids {unknown} are in neither train.list nor test.list")
        train_ids, test_ids = [i for i in train_ids if i in case_ids], [i for i in test_ids if i in case_ids]
    else:
        wanted = {"--train": n_train or 0, "--unlabeled": n_unlabeled, "--test": n_test or 0}
        if any(n < 0 for n in wanted.values()) or wanted["--train"] + wanted["--unlabeled"] > len(train_ids) \
                or wanted["--test"] > len(test_ids):
            raise DataError(f"{root}: asked for {wanted}; the lists hold {len(train_ids)} train, "
                            f"{len(test_ids)} test ids")
        train_ids, test_ids = train_ids[: wanted["--train"] + wanted["--unlabeled"]], test_ids[: wanted["--test"]]
    if not train_ids + test_ids:
        raise DataError(f"{root}: nothing to pack (no case ids picked)")
    if Path(out).resolve() == Path(root).resolve():
        raise DataError(f"output folder {out} is the source root; its train.list and test.list would be replaced")
    out = make_folder(out, "output folder")

    def pack_one(case_id):
        path, error = pack_case(load_case(root, case_id), out)
        return case_id, path.stat().st_size, error

    with ThreadPoolExecutor(max_workers=2) as pool:  # bz2 releases the GIL
        report = list(pool.map(pack_one, train_ids + test_ids))
    for split, ids in (("train", train_ids), ("test", test_ids)):
        files.atomic_write_text(out / f"{split}.list", "".join(i + "\n" for i in ids))
    return report


def split_into_parts(out, report, max_part_bytes: int) -> list[tuple[Path, list[str], int]]:
    """Move the packed cases of ``out`` into ``out/part1``, ``out/part2``, ... of <= ``max_part_bytes``
    each (greedy, in list order: train ids, then test ids) and return ``(folder, ids, bytes)`` per part.

    Every part carries the full train.list and test.list, so ``--data part1 --data part2 ...`` in any
    order gives the same lists and the same labeled cases; a part alone names the cases it lacks.
    """
    out = Path(out)
    too_big = [(i, n) for i, n, _ in report if n > max_part_bytes]
    if too_big:
        raise DataError(f"cases larger than the part size {max_part_bytes / 2**20:.2f} MiB: {too_big}")
    groups = [[]]
    for case_id, size, _ in report:
        if sum(n for _, n in groups[-1]) + size > max_part_bytes:
            groups.append([])
        groups[-1].append((case_id, size))
    lists = {split: (out / f"{split}.list").read_text() for split in ("train", "test")}
    parts = []
    for k, group in enumerate(groups, 1):
        part = make_subfolder(out, f"part{k}")
        images = make_subfolder(part, IMAGES_DIR)
        for case_id, _ in group:
            os.replace(out / IMAGES_DIR / case_id, images / case_id)
        for split, text in lists.items():
            files.atomic_write_text(part / f"{split}.list", text)
        parts.append((part, [i for i, _ in group], sum(n for _, n in group)))
    for split in lists:
        files.remove(out, f"{split}.list")
    (out / IMAGES_DIR).rmdir()  # empty now: every case moved into a part
    return parts


__all__ = ["pack_case", "pack_dataset", "quantize", "split_into_parts"]
