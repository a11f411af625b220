"""``--preset auto`` (prepare's default): a plan made from the data set itself, by nnU-Net v2's rules.

Two steps, as nnU-Net v2's ``nnUNetv2_plan_and_preprocess`` takes them:

1. ``fingerprint``: each training case (labeled and unlabeled: never a test case, whose scores would then
   depend on it) read once: its spacing and shape in RAS, its shape after the crop to the non-zero region, a
   seeded sample of its foreground intensities (label > 0) and its label value counts
   (nnunetv2/experiment_planning/dataset_fingerprint/fingerprint_extractor.py, DatasetFingerprintExtractor).
   The intensities are those of the input channel prepare keeps (the trainer reads one channel; nnU-Net
   fingerprints each of its channels alike).
2. ``make_plan``: every decision with the value and a short ``how``: target ``spacing``, ``crop``,
   ``normalization``, ``patch``, sliding-window ``strides`` and ``batch``
   (nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py, ExperimentPlanner).

The plan is recorded as ``plan`` in the prepared ``dataset.json`` (``check_plan`` reads it back);
``preset_of_plan`` turns it into the ``Preset`` that ``prepare.transform_case`` applies, for the training
cases and, through ``recorded_preset``, for predict's scans, so a new scan gets exactly the recorded plan (CT:
the data set's recorded statistics; anything else: its own z-score). ``normalize`` applies a planned
normalisation to one volume. Reads no file itself: prepare hands each case's checked arrays to ``fingerprint``.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from uamt_fast.data.affine import ras_axes, voxel_sizes
from uamt_fast.data.layout import DataError
from uamt_fast.data.presets import PRESETS, Preset

ANISO_THRESHOLD = 3  # nnU-Net v2 ExperimentPlanner.anisotropy_threshold
DIVISOR = 16  # four stride-2 V-Net stages: every patch side a multiple of 16
VOXEL_BUDGET = 112 * 112 * 80  # the paper's patch (UA-MT train_LA_*.py): a step costs what the paper's costs
# nnU-Net samples 10e7 foreground voxels over the data set (num_foreground_voxels_for_intensitystats); 10^6 keep
# the 0.5 / 99.5 percentiles within ~1e-4 in quantile and cost 4 MB instead of 400 MB.
FOREGROUND_SAMPLES = 10**6
SAMPLE_SEED = 1234  # nnU-Net's collect_foreground_intensities: the same seed for every case
MASK_FOR_NORM_BELOW = 0.75  # nnU-Net v2 determine_use_mask_for_norm: cropping keeps < 3/4 of the median volume
MIN_STD = 1e-8  # nnU-Net v2 ZScoreNormalization / CTNormalization: (x - mean) / max(std, 1e-8)
BATCH = {"batch_labeled": 2, "batch_unlabeled": 2}  # UA-MT: batch_size 4, labeled_bs 2
KINDS = ("ct_normalization", "zscore_normalization", "none")  # the planned intensity kinds


# ----------------------------------------------------------------------------- 1. the fingerprint
def case_fingerprint(image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None,
                     ignore: int | None = None, samples: int = 0) -> dict:
    """One case: ``spacing``, ``shape``, ``shape_after_crop`` (RAS axes, as ``Orientationd`` will order
    them), ``samples`` foreground intensities (label > 0, the ignore label left out) drawn with replacement
    (nnU-Net: a case with few foreground voxels weighs as much as one with many) and ``label_counts``."""
    ras = ras_axes(affine)  # array axis k -> RAS axis ras[k]
    spacing, shape, cropped = np.empty(3), np.empty(3, int), np.empty(3, int)
    spacing[ras] = voxel_sizes(affine)
    shape[ras] = image.shape
    nonzero = image != 0  # nnU-Net crop_to_nonzero (its hole filling changes no bounding box)
    for axis in range(3):
        hits = np.flatnonzero(nonzero.any(axis=tuple(k for k in range(3) if k != axis)))
        cropped[ras[axis]] = hits[-1] - hits[0] + 1 if hits.size else 0
    found = {"spacing": spacing.tolist(), "shape": shape.tolist(), "shape_after_crop": cropped.tolist(),
             "samples": np.empty(0, np.float32), "label_counts": {}}
    if label is not None:
        values, counts = np.unique(label, return_counts=True)
        found["label_counts"] = {str(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}
        foreground = image[(label > 0) & (label != ignore)] if ignore is not None else image[label > 0]
        if foreground.size and samples:
            found["samples"] = np.random.RandomState(SAMPLE_SEED).choice(foreground, samples, replace=True)
    return found


def fingerprint(cases, read, workers: int = 1, done=None) -> dict:
    """The data set's fingerprint: ``read(case)`` -> ``(image, affine, label or None, ignore value or None)``
    for each training case (in a thread pool of ``workers``; ``done(case_id)`` after each, in order, for a
    progress line), summarised as nnU-Net's
    dataset_fingerprint.json: per case spacing and shapes, their medians, the foreground intensity statistics
    (mean, median, std, min, max, percentile_00_5, percentile_99_5 over every case's samples), the label
    counts and the median relative size after cropping."""
    cases = list(cases)
    per_case_samples = FOREGROUND_SAMPLES // max(1, sum(c.label is not None for c in cases))

    def one(case):
        image, affine, label, ignore = read(case)
        return case_fingerprint(image, affine, label, ignore, per_case_samples)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(cases)))) as pool:
        found = {}
        for case, case_found in zip(cases, pool.map(one, cases)):
            found[case.id] = case_found
            if done is not None:
                done(case.id)
    samples = np.concatenate([f.pop("samples") for f in found.values()])
    counts: dict[str, int] = {}
    for f in found.values():
        for value, n in f.pop("label_counts").items():
            counts[value] = counts.get(value, 0) + n
    shapes = np.array([f["shape"] for f in found.values()])
    cropped = np.array([f["shape_after_crop"] for f in found.values()])
    intensity = None
    if samples.size:
        lo, median, hi = np.percentile(samples, (0.5, 50.0, 99.5))
        intensity = {"samples": int(samples.size), "mean": float(samples.mean(dtype=np.float64)),
                     "median": float(median), "std": float(samples.std(dtype=np.float64)),
                     "min": float(samples.min()), "max": float(samples.max()), "percentile_00_5": float(lo),
                     "percentile_99_5": float(hi)}
    return {"cases": len(found), "spacing_median": np.median([f["spacing"] for f in found.values()], 0).tolist(),
            "shape_median": np.median(shapes, 0).tolist(), "shape_after_crop_median": np.median(cropped, 0).tolist(),
            "median_relative_size_after_cropping": float(np.median(cropped.prod(1) / shapes.prod(1))),
            "foreground_intensity": intensity, "label_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
            "per_case": found}


# ----------------------------------------------------------------------------- 2. the decisions
def target_spacing(spacings, shapes_after_crop) -> tuple[list[float], str]:
    """nnU-Net v2 ExperimentPlanner.determine_fullres_target_spacing: the median spacing per axis; when the
    coarsest axis is anisotropic in spacing (median > 3x the other axes' largest) and in voxels (its median
    size x 3 < the other axes' smallest), that axis takes the 10th percentile of its spacings, kept above the
    other axes' largest (+ 1e-5, as nnU-Net)."""
    spacings, sizes = np.asarray(spacings, float), np.asarray(shapes_after_crop, float)
    target, target_size = np.percentile(spacings, 50, 0), np.percentile(sizes, 50, 0)
    worst = int(np.argmax(target))
    others = [k for k in range(3) if k != worst]
    finest_other, smallest_other = max(target[others]), min(target_size[others])
    how = "median spacing per axis"
    if target[worst] > ANISO_THRESHOLD * finest_other and target_size[worst] * ANISO_THRESHOLD < smallest_other:
        tenth = float(np.percentile(spacings[:, worst], 10))
        if tenth < finest_other:
            tenth = max(finest_other, tenth) + 1e-5
        how += (f"; axis {worst} anisotropic (median {target[worst]:.4g} mm > {ANISO_THRESHOLD} x {finest_other:.4g}"
                f" mm, and {target_size[worst]:.4g} voxels x {ANISO_THRESHOLD} < {smallest_other:.4g}): its 10th "
                f"percentile spacing, {tenth:.4g} mm (nnU-Net v2 determine_fullres_target_spacing)")
        target[worst] = tenth
    return [float(s) for s in target], how


def normalization(channel: str, named: bool, intensity: dict | None, relative_size: float) -> tuple[dict, str]:
    """nnU-Net v2's scheme for a channel name (preprocessing/normalization/map_channel_name_to_normalization.py):
    "CT" (any case) -> CTNormalization with the data set's foreground statistics, "noNorm" -> none, anything
    else (and plain NIfTI channels, which have no name) -> ZScoreNormalization per case, over the non-zero
    voxels when cropping to them keeps < 3/4 of the median volume (``use_mask_for_norm``)."""
    scheme = channel.casefold() if named else ""
    if scheme == "ct":
        if intensity is None:
            raise DataError(f"channel {channel!r} is CT, whose normalisation needs the foreground (label > 0) "
                            f"intensities of the labeled training cases; they have no foreground voxel")
        lo, hi, mean, std = (intensity[k] for k in ("percentile_00_5", "percentile_99_5", "mean", "std"))
        return ({"kind": "ct_normalization", "clip": [lo, hi], "mean": mean, "std": std},
                (f"channel {channel!r} is CT: clip to the foreground's 0.5/99.5 percentiles [{lo:.6g}, {hi:.6g}], "
                 f"z-score with the data set's foreground mean {mean:.6g} and std {std:.6g} "
                 f"(nnU-Net v2 CTNormalization)"))
    if scheme == "nonorm":
        return {"kind": "none"}, f"channel {channel!r}: intensities kept (nnU-Net v2 NoNormalization)"
    mask = relative_size < MASK_FOR_NORM_BELOW
    over = (f"its non-zero voxels, the rest kept at 0 (cropping to them keeps a median {relative_size:.0%} < "
            f"{MASK_FOR_NORM_BELOW:.0%} of the volume: nnU-Net v2 use_mask_for_norm)" if mask else
            f"all its voxels (cropping to the non-zero voxels keeps a median {relative_size:.0%} >= "
            f"{MASK_FOR_NORM_BELOW:.0%} of the volume)")
    return ({"kind": "zscore_normalization", "use_mask_for_norm": bool(mask)},
            (f"{f'channel {channel!r}' if named else 'no channel names'}: z-score per case over {over} "
             f"(nnU-Net v2 ZScoreNormalization)"))


def patch_size(median_shape) -> tuple[list[int], str]:
    """nnU-Net v2 get_plans_for_configuration's loop with a voxel budget in place of its VRAM estimate: the
    median shape rounded down to multiples of 16 (at least 16), then, while over ``VOXEL_BUDGET``, 16 less
    along the axis whose patch / median-shape ratio is largest (ties: the last, as nnU-Net's argsort)."""
    median = [float(m) for m in median_shape]
    start = [max(DIVISOR, int(m) // DIVISOR * DIVISOR) for m in median]
    patch = list(start)
    while math.prod(patch) > VOXEL_BUDGET:
        axis = max((k for k in range(3) if patch[k] > DIVISOR), key=lambda k: (patch[k] / median[k], k))
        patch[axis] -= DIVISOR
    how = (f"the median resampled shape {'x'.join(f'{m:g}' for m in median)} rounded down to multiples of "
           f"{DIVISOR} ({'x'.join(map(str, start))})")
    how += (f", shrunk by {DIVISOR} along the axis of largest patch / median-shape ratio until within the paper's "
            f"voxel budget 112x112x80 = {VOXEL_BUDGET:,} (nnU-Net v2 get_plans_for_configuration)"
            if patch != start else f", within the paper's voxel budget 112x112x80 = {VOXEL_BUDGET:,}")
    return patch, how


def sliding_window_strides(patch) -> tuple[dict, str]:
    """nnU-Net's tile_step_size 0.5: half the window per axis, rounded down to a multiple of 16 where half is
    >= 16 (the V-Net's stride-2 stages are shift-equivariant only for shifts of whole 16-voxel cells); x and y
    share one stride (the trainer's eval_stride_xy): the smaller half."""
    def half(p: int) -> int:
        return p // 2 // DIVISOR * DIVISOR if p // 2 >= DIVISOR else p // 2

    strides = {"eval_stride_xy": min(half(patch[0]), half(patch[1])), "eval_stride_z": half(patch[2])}
    return strides, (f"half the window per axis (nnU-Net's tile_step_size 0.5), rounded down to a multiple of "
                     f"{DIVISOR} where that is >= {DIVISOR}; x and y share the smaller")


def make_plan(found: dict, channel: str, named: bool) -> dict:
    """The plan of a fingerprint (``fingerprint``) for the input channel ``channel`` (``named``: the source
    names its channels, i.e. dataset.json's ``channel_names`` / ``modality``; plain NIfTI does not)."""
    per_case = list(found["per_case"].values())
    spacing, spacing_how = target_spacing([c["spacing"] for c in per_case], [c["shape_after_crop"] for c in per_case])
    # nnU-Net v2 compute_new_shape: round(old shape * old spacing / new spacing), per case, then the median
    resampled = np.median([np.round(np.array(c["shape_after_crop"]) * np.array(c["spacing"]) / spacing)
                           for c in per_case], 0)
    norm, norm_how = normalization(channel, named, found["foreground_intensity"],
                                   found["median_relative_size_after_cropping"])
    patch, patch_how = patch_size(resampled)
    strides, strides_how = sliding_window_strides(patch)
    kept = found["median_relative_size_after_cropping"]
    return {"rules": "nnU-Net v2's experiment planning rules (uamt_fast.data.planning)", "fingerprint": found,
            "spacing": {"value": spacing, "how": spacing_how},
            "crop": {"value": "nonzero", "how": f"to the bounding box of the image's voxels != 0 (nnU-Net "
                     f"crop_to_nonzero, MONAI CropForegroundd): the median case keeps {kept:.0%} of its volume"},
            "normalization": {"value": norm, "how": norm_how},
            "patch": {"value": patch, "how": patch_how, "median_resampled_shape": resampled.tolist()},
            "strides": {"value": strides, "how": strides_how},
            "batch": {"value": dict(BATCH), "how": "the paper's 2 labeled + 2 unlabeled crops a step (UA-MT's "
                      "batch_size 4, labeled_bs 2; nnU-Net's 3d_fullres plans at least 2)"}}


def describe(plan: dict) -> list[str]:
    """The plan in a few lines, for prepare to print before the per-case work."""
    def mm(values) -> str:
        return " x ".join(f"{v:.4g}" for v in values)

    norm = plan["normalization"]["value"]
    strides = plan["strides"]["value"]
    return [(f"plan from {plan['fingerprint']['cases']} training cases by {plan['rules']}, recorded as \"plan\" "
             f"in dataset.json:"),
            f"  spacing   {mm(plan['spacing']['value'])} mm: {plan['spacing']['how']}",
            f"  crop      {plan['crop']['how']}",
            f"  intensity {norm['kind']}: {plan['normalization']['how']}",
            f"  patch     {'x'.join(map(str, plan['patch']['value']))}: {plan['patch']['how']}",
            f"  strides   {strides['eval_stride_xy']} (x, y), {strides['eval_stride_z']} (z): {plan['strides']['how']}",
            (f"  batch     {plan['batch']['value']['batch_labeled']} labeled + "
             f"{plan['batch']['value']['batch_unlabeled']} unlabeled: {plan['batch']['how']}")]


# ----------------------------------------------------------------------------- the plan applied
def preset_of_plan(plan: dict) -> Preset:
    """The ``Preset`` that applies a (checked) plan: ``prepare.transform_case`` reads nothing else."""
    strides, batch = plan["strides"]["value"], plan["batch"]["value"]
    return Preset(spacing=tuple(plan["spacing"]["value"]), intensity=dict(plan["normalization"]["value"]),
                  crop=plan["crop"]["value"], channel=None, labels=None, foreground=False,
                  patch=tuple(plan["patch"]["value"]), stride_xy=strides["eval_stride_xy"],
                  stride_z=strides["eval_stride_z"], batch_labeled=batch["batch_labeled"],
                  batch_unlabeled=batch["batch_unlabeled"])


def recorded_preset(record: dict) -> Preset:
    """The preprocessing of a (checked) prepared set's record: its plan for ``auto``, else its named preset."""
    return preset_of_plan(record["plan"]) if record.get("preset") == "auto" else PRESETS[record["preset"]]


def normalize(image: np.ndarray, intensity: dict) -> tuple[np.ndarray, dict]:
    """``image`` (float32) normalised as ``intensity`` (a plan's ``normalization`` value) says, and the
    parameters used (for the case's record). nnU-Net v2 preprocessing/normalization/default_normalization_schemes.py:
    CTNormalization: clip to [lo, hi], (x - mean) / max(std, 1e-8) with the data set's numbers;
    ZScoreNormalization: the case's own mean and std (float64 sums), over its non-zero voxels with
    ``use_mask_for_norm`` (the zero voxels stay 0; nnU-Net's mask also holds the holes inside that region)."""
    kind = intensity["kind"]
    if kind == "ct_normalization":
        lo, hi = intensity["clip"]
        scale = max(intensity["std"], MIN_STD)
        return (np.clip(image, lo, hi) - np.float32(intensity["mean"])) / np.float32(scale), {
            "clip": [lo, hi], "mean": intensity["mean"], "std": intensity["std"]}
    if kind == "zscore_normalization":
        mask = image != 0 if intensity["use_mask_for_norm"] else None
        values = image[mask] if mask is not None else image
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        normed = (values - np.float32(mean)) / np.float32(max(std, MIN_STD))
        if mask is None:
            return normed, {"over": "all voxels", "mean": mean, "std": std}
        out = np.zeros_like(image)
        out[mask] = normed
        return out, {"over": "voxels != 0", "mean": mean, "std": std}
    if kind == "none":
        return image, {}
    raise DataError(f"intensity kind {kind!r}: not one of {KINDS}")


def check_plan(plan, where: str) -> None:
    """The fields of a recorded plan that ``preset_of_plan`` reads, each of its type and range, or a one-line
    DataError naming ``where`` (the record's file) and the field."""
    def refuse(field: str, value, expected: str):
        raise DataError(f"{where}: field plan.{field} is {value!r:.80}; expected {expected}")

    def value(field: str):
        entry = plan.get(field)
        if not isinstance(entry, dict) or "value" not in entry:
            refuse(field, entry, '{"value": ..., "how": "..."}')
        return entry["value"]

    def finite(v) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    if not isinstance(plan, dict):
        raise DataError(f"{where}: field plan is {plan!r:.80}; expected the object prepare --preset auto writes")
    spacing = value("spacing")
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(finite(s) and 1e-6 <= s < 1e3 for s in spacing)):
        refuse("spacing.value", spacing, "3 voxel sizes in mm, each in (0, 1000)")
    if value("crop") != "nonzero":
        refuse("crop.value", value("crop"), '"nonzero"')
    norm = value("normalization")
    kind = norm.get("kind") if isinstance(norm, dict) else None
    if kind not in KINDS:
        refuse("normalization.value", norm, f"an object with a kind in {list(KINDS)}")
    clip = norm.get("clip")
    if kind == "ct_normalization" and not (
            isinstance(clip, list) and len(clip) == 2 and all(finite(c) for c in clip) and clip[0] <= clip[1]
            and finite(norm.get("mean")) and finite(norm.get("std")) and norm["std"] >= 0):
        refuse("normalization.value", norm,
               '{"kind": "ct_normalization", "clip": [lo <= hi], "mean": m, "std": s >= 0}')
    if kind == "zscore_normalization" and type(norm.get("use_mask_for_norm")) is not bool:
        refuse("normalization.value.use_mask_for_norm", norm.get("use_mask_for_norm"), "true or false")
    patch = value("patch")
    if not (isinstance(patch, list) and len(patch) == 3 and all(type(p) is int and p >= 1 for p in patch)):
        refuse("patch.value", patch, "3 integers >= 1")
    for field, keys, low in (("strides", ("eval_stride_xy", "eval_stride_z"), 1),
                             ("batch", ("batch_labeled", "batch_unlabeled"), 0)):
        got = value(field)
        if not (isinstance(got, dict) and all(type(got.get(k)) is int and got[k] >= low for k in keys)):
            refuse(f"{field}.value", got, f"{{{', '.join(f'{k!r}: int >= {low}' for k in keys)}}}")


__all__ = ["ANISO_THRESHOLD", "BATCH", "DIVISOR", "FOREGROUND_SAMPLES", "KINDS", "MASK_FOR_NORM_BELOW", "MIN_STD",
           "SAMPLE_SEED", "VOXEL_BUDGET", "case_fingerprint", "check_plan", "describe", "fingerprint", "make_plan",
           "normalization", "normalize", "patch_size", "preset_of_plan", "recorded_preset", "sliding_window_strides",
           "target_spacing"]
