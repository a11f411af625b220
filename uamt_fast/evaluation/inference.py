"""Sliding-window inference and evaluation: the protocol of the UA-MT release (``code/test_util.py``).

For a volume (X, Y, Z) and a model trained on 112x112x80 crops:

1. Zero-pad every axis shorter than the window, centred: ``lo = pad // 2``, ``hi = pad - lo``.
2. Window starts per axis (size W after padding, window p, stride s)::

       starts = [min(s * i, W - p) for i in range(ceil((W - p) / s) + 1)]

   stride 18 in-plane, 4 along the last axis; windows visited x-major, then y, then z.
3. ``probs = sum_windows softmax(model(window)) / count`` (count = windows covering the voxel),
   ``labels = argmax_c probs``; crop the padding back off.

``blend="gaussian"`` replaces step 3's plain average by an importance-weighted one, as MONAI's
``sliding_window_inference(mode="gaussian")`` and nnU-Net v2's ``predict_sliding_window_return_logits`` do:
``probs = sum_windows w * softmax(model(window)) / sum_windows w`` with ``w`` (``importance_map``) a Gaussian
over the window, sigma 1/8 of its size per axis, so a voxel near a window's border counts little and the
seams of the plain average (a jump wherever a window starts or ends) fade. ``"mean"`` stays the default: the
protocol the paper's numbers were measured with.

``predict_volume(model, image, InferenceSettings(...))`` is the one entry point: ``evaluate`` (train.py --eval),
``python -m uamt_fast.predict`` and ``uamt_fast.figures`` call it, so they see the same masks. It runs
``sliding_window_predict`` for a 3D model, and for a 2D model (``slice_size`` set) SSL4MIS's slice-by-slice
protocol (``uamt_fast.evaluation.slicewise``: each Z slice resized to ``slice_size`` and back, nearest, as
``scipy.ndimage.zoom(order=0)`` does). For a model trained on
k-times pooled volumes (``downsample`` k) the windows slide over the pooled image and the averaged softmax is
upsampled back to the full resolution before the argmax.

Here several windows go through one forward (``batch_size``), and the sums are kept in fp32 on the
model's device, added window by window in the release's order: in fp32 the result equals a
one-window-at-a-time loop exactly (tests/evaluation/test_inference.py checks it).

``evaluate`` runs this over a split and scores each case with ``uamt_fast.evaluation.metrics.labelmap_metrics``
(Dice/Jaccard as fractions, 95HD/ASD in voxels), returning the ``eval.json`` layout::

    {"cases": [{"case": id, "dice": f, "jaccard": f, "hd95": f, "asd": f}, ...],
     "mean": {"dice": f, "jaccard": f, "hd95": f, "asd": f}, "nan_cases": n}
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from uamt_fast.evaluation.metrics import labelmap_metrics, summarize
from uamt_fast.evaluation.slicewise import autocast_context, model_device, slicewise_predict

PATCH_SIZE = (112, 112, 80)  # the paper's training crop and test window
BLENDS = ("mean", "gaussian")  # how overlapping windows are combined: the release's plain average | Gaussian weights
GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = 1/8 of the window per axis: MONAI's default sigma_scale, nnU-Net v2's 1/8
MIN_WEIGHT = 1e-3  # the floor of the Gaussian weights (MONAI compute_importance_map's clamp)


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start indices of the windows along one axis: ``min(stride * i, size - patch)`` for
    ``i in range(ceil((size - patch) / stride) + 1)``; requires ``size >= patch``."""
    if size < patch:
        raise ValueError(f"window_starts: axis of size {size} is shorter than the window {patch} (pad it first)")
    return [min(stride * i, size - patch) for i in range(math.ceil((size - patch) / stride) + 1)]


def centred_padding(shape: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """(lo, hi) zero padding per axis that brings every axis up to the window, centred as in the release
    (step 1 above: ``lo = pad // 2``, ``hi = pad - lo``, ``pad = max(window - size, 0)``)."""
    pads = [max(p - s, 0) for s, p in zip(shape, patch_size)]
    return [(pad // 2, pad - pad // 2) for pad in pads]


def importance_map(patch_size: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The Gaussian weights (px, py, pz), float32, of ``blend="gaussian"``: per axis ``exp(-x^2 / (2 sigma^2))`` on
    ``x = -(p-1)/2 .. (p-1)/2`` (centred on the window), ``sigma = sigma_scale * p``, their outer product, raised
    to at least ``MIN_WEIGHT`` (so a voxel seen only by window corners is still divided by a nonzero sum).

    The same computation as MONAI's ``monai.inferers.utils.compute_importance_map(patch_size, mode="gaussian",
    sigma_scale=sigma_scale)`` (tests/evaluation/test_inference.py compares them), written out so that inference
    does not need MONAI. nnU-Net v2's ``compute_gaussian`` (``inference/sliding_window_prediction.py``) takes the
    same sigma, 1/8 of the window, but filters a delta at ``p // 2`` with scipy's ``gaussian_filter`` and weights
    the network's logits; here, as in the release's average, the softmax is weighted.
    """
    weights = None
    for axis, p in enumerate(int(p) for p in patch_size):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        g = torch.exp(x**2 / (-2 * (p * sigma_scale) ** 2))  # (MONAI's expression: the same fp32 rounding)
        weights = g if axis == 0 else weights.unsqueeze(-1) * g
    if weights is None:
        raise ValueError(f"importance_map: patch_size {tuple(patch_size)} has no axes")
    return weights.clamp_(min=max(weights.min().item(), MIN_WEIGHT))


@torch.no_grad()  # not inference_mode: callers may still update the returned probs in place
def sliding_window_predict(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    patch_size: Sequence[int] = PATCH_SIZE,
    stride_xy: int = 18,
    stride_z: int = 4,
    num_classes: int = 2,
    batch_size: int = 4,
    autocast_dtype: torch.dtype | None = None,
    downsample: int = 1,
    blend: str = "mean",
) -> tuple[np.ndarray, torch.Tensor]:
    """Segment one volume with overlapping windows, averaging their softmax (the release's protocol; with
    ``blend="gaussian"`` a Gaussian-weighted average).

    The model is used as it is (call ``model.eval()`` first for deterministic inference; ``evaluate``
    does) and called as ``model(x)`` with ``x`` of shape ``(n, 1, *patch_size)``, float32, on the
    model's device, ``n <= batch_size``; it must return logits ``(n, num_classes, *patch_size)``.

    Args:
        image: (X, Y, Z) float volume, numpy or torch (any device).
        patch_size: window (px, py, pz).
        stride_xy: window stride along X and Y.
        stride_z: window stride along Z.
        num_classes: channels the model outputs.
        batch_size: windows per forward.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under ``torch.autocast``; the
            softmax and the sums stay fp32. ``None``: plain fp32.
        downsample: k for a model trained on k-times average-pooled volumes: the windows slide over the
            pooled image (each voxel the mean of a k^3 block, a remainder smaller than k dropped); the
            averaged softmax is upsampled trilinearly back (each pooled voxel at the centre of its block,
            ``align_corners=False``) and the remainder voxels take their nearest neighbour's value.
        blend: ``"mean"``: each window's softmax counts alike (the release's protocol, the paper's numbers);
            ``"gaussian"``: weighted by ``importance_map(patch_size)`` and divided by the sum of the weights per
            voxel (MONAI's and nnU-Net's blending: a window's border counts little, so the seams fade). Either
            way the sums are fp32 and added window by window in the release's order.

    Returns:
        ``labels``: np.uint8 (X, Y, Z), the argmax class per voxel.
        ``probs``: torch.float32 (num_classes, X, Y, Z) on the model's device, the averaged (blended) softmax,
        at the full resolution of ``image``.
    """
    if image.ndim != 3:
        raise ValueError(f"sliding_window_predict: expected an image (X, Y, Z), got shape {tuple(image.shape)}")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"sliding_window_predict: patch_size must be 3 positive ints, got {patch_size}")
    for name, value in (("stride_xy", stride_xy), ("stride_z", stride_z), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"sliding_window_predict: {name} must be a positive integer, got {value!r}")
    if num_classes < 1:
        raise ValueError(f"sliding_window_predict: num_classes must be >= 1, got {num_classes}")
    if isinstance(downsample, bool) or int(downsample) != downsample or downsample < 1:
        raise ValueError(f"sliding_window_predict: downsample must be a positive integer, got {downsample!r}")
    if blend not in BLENDS:
        raise ValueError(f"sliding_window_predict: blend must be one of {BLENDS}, got {blend!r}")
    args = (patch_size, stride_xy, stride_z, num_classes, batch_size, autocast_dtype, blend)
    if downsample == 1:
        score = _averaged_softmax(model, image, *args)
    else:
        small = torch.nn.functional.avg_pool3d(torch.as_tensor(np.asarray(image))[None, None], downsample)[0, 0]
        score = torch.nn.functional.interpolate(_averaged_softmax(model, small.numpy(), *args)[None],
                                                scale_factor=downsample, mode="trilinear")
        remainder = [full - up for full, up in zip(image.shape, score.shape[2:])]
        score = torch.nn.functional.pad(score, [p for r in reversed(remainder) for p in (0, r)], mode="replicate")[0]
    labels = score.argmax(0).to(torch.uint8).cpu().numpy()
    return labels, score


def _averaged_softmax(model: nn.Module, image, patch_size: tuple[int, ...], stride_xy: int, stride_z: int,
                      num_classes: int, batch_size: int, autocast_dtype: torch.dtype | None,
                      blend: str) -> torch.Tensor:
    """``sliding_window_predict``'s probs at the resolution of ``image`` (arguments checked there)."""
    device = model_device(model)
    volume = torch.as_tensor(image, dtype=torch.float32).to(device)
    size = tuple(volume.shape)
    padding = centred_padding(size, patch_size)
    # F.pad lists axes last-first.
    volume = nn.functional.pad(volume, [p for lo_hi in reversed(padding) for p in lo_hi])
    strides = (stride_xy, stride_xy, stride_z)
    starts = [window_starts(s, p, st) for s, p, st in zip(volume.shape, patch_size, strides)]
    windows = list(itertools.product(*starts))  # x-major, then y, then z: the release's loop order

    score = torch.zeros((num_classes, *volume.shape), dtype=torch.float32, device=device)
    # Windows covering each voxel, as an outer product of per-axis counts (exact small integers in
    # fp32, the same values the release accumulates one window at a time).
    counts = []
    for axis, (axis_starts, p) in enumerate(zip(starts, patch_size)):
        c = torch.zeros(volume.shape[axis], dtype=torch.float32, device=device)
        for s in axis_starts:
            c[s : s + p] += 1
        if not c.all():  # a stride larger than the window leaves gaps: their scores would be 0 / 0
            raise ValueError(f"sliding_window_predict: stride {strides[axis]} along axis {axis} is larger than the "
                             f"window {p}: voxels {int((c == 0).nonzero()[0])}.. of the padded image are in no window")
        counts.append(c)
    count = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    if blend == "gaussian":
        # The weights' sum is kept voxel by voxel, window by window (the floor at MIN_WEIGHT makes the map
        # not quite separable, so no outer product of per-axis sums), as a one-window loop would add it.
        weights = importance_map(patch_size, device=device)
        count = torch.zeros(volume.shape, dtype=torch.float32, device=device)

    px, py, pz = patch_size
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        x = torch.stack([volume[xs : xs + px, ys : ys + py, zs : zs + pz] for xs, ys, zs in batch])[:, None]
        with autocast_context(device, autocast_dtype):
            logits = model(x)
        expected = (len(batch), num_classes, *patch_size)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"sliding_window_predict: model returned logits of shape {tuple(logits.shape)}, expected {expected} "
                f"(num_classes={num_classes})"
            )
        probs = torch.softmax(logits.float(), dim=1)
        for k, (xs, ys, zs) in enumerate(batch):  # in window order, so the fp32 sums match the release
            if blend == "mean":
                score[:, xs : xs + px, ys : ys + py, zs : zs + pz] += probs[k]
            else:
                score[:, xs : xs + px, ys : ys + py, zs : zs + pz] += probs[k] * weights
                count[xs : xs + px, ys : ys + py, zs : zs + pz] += weights

    score /= count
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(padding, size))
    return score[(slice(None), *crop)]


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How ``predict_volume`` segments a volume: a 3D model's sliding windows, or a 2D model's slices.

    ``slice_size`` None: ``sliding_window_predict`` with the window fields. ``slice_size`` (h, w): a 2D model,
    ``uamt_fast.evaluation.slicewise.slicewise_predict`` (every Z slice resized to it; a --dims 2 run's
    ``patch[:2]``), which has no windows to stride, pool or blend: ``downsample`` must stay 1 and ``blend``
    ``"mean"`` (``predict_volume`` refuses others rather than ignore them).
    """

    patch_size: tuple = PATCH_SIZE  # window (px, py, pz)
    stride_xy: int = 18  # window stride along X and Y
    stride_z: int = 4  # window stride along Z
    num_classes: int = 2  # channels the model outputs
    batch_size: int = 4  # windows (slices) per forward
    autocast_dtype: torch.dtype | None = None  # forward under torch.autocast; softmax and sums stay fp32
    downsample: int = 1  # a 3D model trained on k-times pooled volumes
    blend: str = "mean"  # how overlapping windows are combined (BLENDS)
    slice_size: tuple | None = None  # a 2D model: (h, w) every slice is resized to


def predict_volume(model: nn.Module, image: np.ndarray | torch.Tensor,
                   settings: InferenceSettings) -> tuple[np.ndarray, torch.Tensor]:
    """``(labels, probs)`` of ``image`` (X, Y, Z): ``labels`` np.uint8 (X, Y, Z), ``probs`` float32 (C, X, Y, Z) on
    the model's device; by sliding windows (a 3D model) or slice by slice (``settings.slice_size``, a 2D model).
    The one dispatch point of ``evaluate``, predict and the figures, so they see the same masks."""
    s = settings
    if s.slice_size is None:
        return sliding_window_predict(model, image, s.patch_size, s.stride_xy, s.stride_z, s.num_classes,
                                      s.batch_size, s.autocast_dtype, s.downsample, s.blend)
    if s.downsample != 1 or s.blend != "mean":
        raise ValueError(f"predict_volume: a 2D model (slice_size {tuple(s.slice_size)}) is applied to whole "
                         f"slices: downsample must be 1 and blend 'mean', got {s.downsample!r}, {s.blend!r}")
    return slicewise_predict(model, image, s.slice_size, s.num_classes, s.batch_size, s.autocast_dtype)


def _iter_cases(data: Any, split: str) -> tuple[int, Iterable[Any]]:
    """(number of cases, iterable of objects with .id/.image/.label); a folder is read lazily, one case at a time."""
    if isinstance(data, (str, os.PathLike)):
        from uamt_fast.data import load_case, read_list  # lazy: the data module is optional for in-memory use

        ids = read_list(data, split)
        return len(ids), (load_case(data, case_id) for case_id in ids)
    if not isinstance(data, Sequence):
        raise TypeError(
            f"evaluate: data must be a data-set folder or a sequence of cases with .id/.image/.label, "
            f"got {type(data).__name__}"
        )
    for i, case in enumerate(data):
        missing = [a for a in ("id", "image", "label") if not hasattr(case, a)]
        if missing:
            raise TypeError(f"evaluate: data[{i}] ({type(case).__name__}) lacks attribute(s) {missing}")
    return len(data), iter(data)


def evaluate(
    model: nn.Module,
    data: str | os.PathLike | Sequence[Any],
    split: str = "test",
    patch_size: Sequence[int] = PATCH_SIZE,
    stride_xy: int = 18,
    stride_z: int = 4,
    num_classes: int = 2,
    batch_size: int = 4,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[dict], Any] | None = None,
    downsample: int = 1,
    blend: str = "mean",
    slice_size: Sequence[int] | None = None,
) -> dict:
    """Sliding-window (or, for a 2D model, slice-by-slice) predictions of every case of a split, scored like the
    paper's table.

    Args:
        model: segmentation network; put in eval mode for the run (dropout off, running batch-norm
            statistics) and restored to each module's previous mode afterwards.
        data: a data-set root (the release layout; cases from ``uamt_fast.data.read_list(root, split)``,
            each loaded by ``uamt_fast.data.load_case``) or a sequence of objects with ``.id``,
            ``.image`` (X, Y, Z) and ``.label`` (X, Y, Z).
        split: list name when ``data`` is a folder (``"test"`` reads test.list); unused otherwise.
        patch_size, stride_xy, stride_z, num_classes, batch_size, autocast_dtype, downsample, blend: as in
            ``sliding_window_predict`` (``downsample``: the labels are scored at full resolution).
        slice_size: None: the sliding windows above. (h, w): a 2D model, each Z slice resized to it and back
            (``uamt_fast.evaluation.slicewise.slicewise_predict``, SSL4MIS's ACDC protocol: 256x256); the classes
            are still scored on the whole 3D volume. ``predict_volume`` dispatches.
        progress: called with each case's row once it is scored (e.g. ``progress=print``).

    Returns:
        ``{"cases": [{"case", "dice", "jaccard", "hd95", "asd"[, "hd95_mm", "asd_mm"]}, ...], "mean": {...},
        "nan_cases": n}``; with 2 classes the foreground is every nonzero predicted class, with more each
        class is scored alone (``"classes"`` per case, ``"mean_per_class"``) and the top level is their mean
        (``uamt_fast.evaluation.metrics.labelmap_metrics``). Dice/Jaccard are fractions, 95HD/ASD voxels (and mm
        where the case has a ``spacing``); an empty prediction gives NaN distances (see
        ``uamt_fast.evaluation.metrics``). A case with an ``ignore_label`` (nnU-Net's ignore label) is scored on
        its annotated voxels only.
    """
    settings = InferenceSettings(tuple(patch_size), stride_xy, stride_z, num_classes, batch_size, autocast_dtype,
                                 downsample, blend, None if slice_size is None else tuple(slice_size))
    n_cases, cases = _iter_cases(data, split)
    if n_cases == 0:
        raise ValueError(f"evaluate: no cases to evaluate (split {split!r})")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    rows = []
    try:
        for case in cases:
            if tuple(case.image.shape) != tuple(case.label.shape):
                raise ValueError(
                    f"evaluate: case {case.id!r}: image shape {tuple(case.image.shape)} does not match "
                    f"label shape {tuple(case.label.shape)}"
                )
            labels, _ = predict_volume(model, case.image, settings)
            # (the spacing, in mm, and the ignore label, where the case carries them: uamt_fast.data's cases do)
            row = {"case": str(case.id), **labelmap_metrics(labels, case.label, num_classes,
                                                           getattr(case, "spacing", None),
                                                           getattr(case, "ignore_label", None))}
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        for m, training in modes:
            m.train(training)
    return summarize(rows)


def format_table(result: dict) -> str:
    """The ``evaluate`` result as a text table like the paper's: Dice %, Jaccard %, 95HD and ASD (voxels); with
    more than 2 classes a line a class, named by ``result["class_names"]`` ({"1": "RV", ...}) where present."""
    missing = [k for k in ("cases", "mean", "nan_cases") if k not in result]
    if missing:
        raise ValueError(f"format_table: result lacks {missing}; expected the output of evaluate()/summarize()")
    width = max([len("case")] + [len(str(row.get("case", ""))) for row in result["cases"]] + [len("mean (000)")]
                + [len(f"class {c} {name}") for c, name in result.get("class_names", {}).items()])
    header = f"{'case':<{width}}  {'Dice(%)':>8}  {'Jaccard(%)':>10}  {'95HD(vox)':>9}  {'ASD(vox)':>8}"

    def line(name: str, m: dict) -> str:
        return (
            f"{name:<{width}}  {100 * m['dice']:>8.2f}  {100 * m['jaccard']:>10.2f}  "
            f"{m['hd95']:>9.2f}  {m['asd']:>8.2f}"
        )

    lines = [header, "-" * len(header)]
    lines += [line(str(row.get("case", i)), row) for i, row in enumerate(result["cases"])]
    lines += ["-" * len(header), line(f"mean ({len(result['cases'])})", result["mean"])]
    names = result.get("class_names", {})  # (the data set's label names, where it has them)
    for c, m in result.get("mean_per_class", {}).items():  # more than 2 classes: each class's mean too
        lines.append(line(f"class {c}" + (f" {names[c]}" if c in names else ""), m))
    if "hd95_mm" in result["mean"]:
        lines.append(f"{'mean, mm':<{width}}  {'':>8}  {'':>10}  {result['mean']['hd95_mm']:>9.2f}  "
                     f"{result['mean']['asd_mm']:>8.2f}")
    if result["nan_cases"]:
        lines.append(
            f"{result['nan_cases']} case(s) with an empty prediction or label: NaN distances, left out of "
            f"the distance means"
        )
    return "\n".join(lines)


__all__ = ["BLENDS", "GAUSSIAN_SIGMA_SCALE", "InferenceSettings", "MIN_WEIGHT", "PATCH_SIZE", "centred_padding",
           "evaluate", "format_table", "importance_map", "predict_volume", "sliding_window_predict", "window_starts"]
