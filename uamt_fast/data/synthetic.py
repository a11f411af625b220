"""Synthetic LA-like scans in the release layout (``python -m uamt_fast.data synth``), for the demo and tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from uamt_fast import files
from uamt_fast.data.layout import H5_NAME, IMAGES_DIR, DataError, make_folder, make_subfolder


def write_synthetic_la(root, n_train: int = 8, n_test: int = 2, shape=(128, 128, 96), seed: int = 0) -> Path:
    """Write LA-like synthetic scans in the release layout and return ``root``.

    Each scan: an 8-bit MRI-like volume with a smooth lumpy ellipsoid (the "atrium", label 1,
    bright), a dimmer unlabeled blob (a neighbouring structure), a smooth bias field and noise,
    then normalized per scan as the release does: ``(raw - mean) / std`` in float32. Case i depends
    only on (seed, i), not on the counts. Ids: ``synth0000``..., train first, then test. Refused: a shape
    that is not 3 sizes >= 1, ``n_train`` or ``n_test`` < 1, ``seed`` < 0, ``root`` a file.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1 or n_train < 1 or n_test < 1 or seed < 0:
        raise DataError(f"write_synthetic_la: need a 3D shape of positive sizes, n_train, n_test >= 1 and seed >= 0; "
                        f"got shape={shape}, n_train={n_train}, n_test={n_test}, seed={seed}")
    root = make_folder(root, "output folder")
    ids = [f"synth{i:04d}" for i in range(n_train + n_test)]
    for i, case_id in enumerate(ids):
        image, label = _synthetic_scan(np.random.default_rng([seed, i]), shape)
        folder = make_subfolder(root, IMAGES_DIR, case_id)
        files.atomic_write_h5(folder / H5_NAME, lambda f: (f.create_dataset("image", data=image, compression="gzip"),
                                                           f.create_dataset("label", data=label, compression="gzip")))
    files.atomic_write_text(root / "train.list", "".join(i + "\n" for i in ids[:n_train]))
    files.atomic_write_text(root / "test.list", "".join(i + "\n" for i in ids[n_train:]))
    return root


def _synthetic_scan(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    n = np.array(shape, np.float64)
    axes = np.ogrid[tuple(slice(0, s) for s in shape)]

    def lumpy_ellipsoid(center, radii, lumpiness):
        u = [(a - c) / r for a, c, r in zip(axes, center, radii)]  # ellipsoid coordinates, |u| = 1 on the surface
        wobble = sum(lumpiness * rng.uniform(0.5, 1) * np.sin(rng.uniform(1, 3) * u[j] + rng.uniform(0, 2 * np.pi))
                     for j in range(3))  # smooth, low-frequency boundary displacement
        return u[0] ** 2 + u[1] ** 2 + u[2] ** 2 < (1 + wobble) ** 2

    atrium = lumpy_ellipsoid(n * rng.uniform(0.4, 0.6, 3), n * rng.uniform(0.15, 0.25, 3), 0.08)
    other = lumpy_ellipsoid(n * rng.uniform(0.2, 0.8, 3), n * rng.uniform(0.08, 0.15, 3), 0.05) & ~atrium
    bias = sum(rng.uniform(-15, 15) * (a / max(s - 1, 1) - 0.5) for a, s in zip(axes, shape))
    raw = 50 + 100 * atrium + 45 * other + bias + rng.normal(0, 15, shape)
    raw = np.clip(np.rint(raw), 0, 255)  # an 8-bit scan...
    image = ((raw - raw.mean()) / max(raw.std(), 1e-6)).astype(np.float32)  # ...normalized as released
    return image, atrium.astype(np.uint8)


__all__ = ["write_synthetic_la"]
