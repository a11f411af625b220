"""Slice-by-slice inference for 2D models: the protocol SSL4MIS scores ACDC with.

SSL4MIS (HiLab-git/SSL4MIS ``code/val_2D.py`` ``test_single_volume``, ``code/test_2D_fully.py``), for a volume
and a 2D network trained on 256x256 slices:

1. every slice is resized to 256x256 with ``scipy.ndimage.zoom(slice, (256 / x, 256 / y), order=0)``: nearest
   neighbour, the image too;
2. one slice a forward, ``argmax(softmax(net(slice)))``;
3. the argmax resized back with ``zoom(out, (x / 256, y / 256), order=0)`` into the volume's slice;
4. each class 1..C-1 scored on the 3D volume (medpy's dc, jc, hd95, asd).

Here the slices are the last axis of the project's (X, Y, Z) volumes (``uamt_fast.data.layout``), several
slices go through one forward (``batch_size``), and the resizes are ``zoom_nearest``: scipy's order-0 zoom
written out in torch (the package does not import scipy), equal to it element for element, its edge case
included (below). The softmax is resized back with the same nearest mapping, so ``probs`` (C, X, Y, Z) is what
the uncertainty maps read and ``labels == probs.argmax(0)``.

scipy's order-0 zoom (``scipy/ndimage/_interpolation.py`` ``zoom`` and ``src/ni_interpolation.c``
``NI_ZoomShift`` with ``grid_mode=False``, ``mode="constant"``, ``cval=0``): the output size is
``round(n_in * factor)``; output index i reads input coordinate ``c = i * ((n_in - 1) / (n_out - 1))`` in
doubles (a factor of 1 when ``n_out == 1``), rounded half up (``floor(c + 0.5)``); a ``c`` past ``n_in - 1``
(one rounding step above it, at the last output index for some sizes: 256 -> 12, 14, 23, 27, ...) is outside
the input and gets ``cval`` = 0. So SSL4MIS's masks resized back to such a size have an all-background last
row or column; ``zoom_nearest`` keeps that (its probabilities there are the background's one-hot).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

SLICE_SIZE = (256, 256)  # SSL4MIS's 2D input: every slice resized to it for training and testing


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def autocast_context(device: torch.device, autocast_dtype: torch.dtype | None):
    """``torch.autocast`` to ``autocast_dtype`` on ``device``'s type; ``None``: no autocast (plain fp32)."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


def zoom_indices(size_in: int, size_out: int, device: torch.device | str | None = None) -> torch.Tensor:
    """For each of ``size_out`` output positions, the input index scipy's order-0 zoom copies (int64), -1 where
    it writes ``cval`` instead (the coordinate past the input's last index; the module docstring)."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"zoom_indices: sizes must be >= 1, got {size_in} -> {size_out}")
    # numpy.divide of the two int arrays in scipy's zoom: one correctly rounded double division, as here.
    zoom = (size_in - 1) / (size_out - 1) if size_out > 1 else 1.0
    coordinate = torch.arange(size_out, dtype=torch.float64, device=device) * zoom  # NI_ZoomShift: cc *= zoom
    index = torch.floor(coordinate + 0.5).long()  # even spline order: floor(cc + 0.5)
    return index.masked_fill_(coordinate > size_in - 1, -1)  # map_coordinate, NI_EXTEND_CONSTANT: cval


def zoom_map(shape: Sequence[int], size: Sequence[int],
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, keep)`` of scipy's order-0 zoom of an (H, W) = ``shape`` plane to (h, w) = ``size``: the
    input row and column each output one copies (``zoom_indices``, clamped to the input), and where the output
    keeps it (False where scipy writes its cval); on ``device``, for ``apply_zoom``."""
    rows, cols = (zoom_indices(int(n), int(o), device) for n, o in zip(shape, size))
    keep = (rows >= 0)[:, None] & (cols >= 0)[None, :]
    return rows.clamp(min=0), cols.clamp(min=0), keep


def apply_zoom(x: torch.Tensor, zoom: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               fill: float = 0.0) -> torch.Tensor:
    """``x`` (..., H, W) resized by a ``zoom_map``, ``fill`` where scipy writes its cval; no host-device sync."""
    rows, cols, keep = zoom
    return torch.where(keep, x.index_select(-2, rows).index_select(-1, cols), x.new_full((), fill))


def zoom_nearest(x: torch.Tensor, size: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """``x`` (..., H, W) resized to (..., h, w) = ``size`` as ``scipy.ndimage.zoom(x2d, (h / H, w / W), order=0)``
    resizes each (H, W) plane (the module docstring), ``fill`` where scipy writes its cval 0; same dtype and
    device as ``x``. A size equal to the input's returns the values unchanged (scipy's zoom factor 1)."""
    if x.dim() < 2:
        raise ValueError(f"zoom_nearest: expected a tensor (..., H, W), got shape {tuple(x.shape)}")
    return apply_zoom(x, zoom_map(x.shape[-2:], size, x.device), fill)


@torch.no_grad()  # not inference_mode: callers may still update the returned probs in place
def slicewise_predict(model: nn.Module, image: np.ndarray | torch.Tensor, slice_size: Sequence[int] = SLICE_SIZE,
                      num_classes: int = 4, batch_size: int = 16,
                      autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Segment one volume slice by slice with a 2D model, as SSL4MIS tests (the module docstring).

    The model is used as it is (call ``model.eval()`` first; ``evaluate`` does) and called as ``model(x)`` with
    ``x`` of shape ``(n, 1, *slice_size)``, float32, on the model's device, ``n <= batch_size``; it must return
    logits ``(n, num_classes, *slice_size)``.

    Args:
        image: (X, Y, Z) float volume, numpy or torch (any device); the slices are ``image[:, :, z]``.
        slice_size: (h, w) every slice is resized to (nearest, ``zoom_nearest``), the model's training size.
        num_classes: channels the model outputs.
        batch_size: slices per forward.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under ``torch.autocast``; the softmax stays
            fp32. ``None``: plain fp32.

    Returns:
        ``labels``: np.uint8 (X, Y, Z), each slice's argmax resized back (nearest).
        ``probs``: torch.float32 (num_classes, X, Y, Z) on the model's device, each slice's softmax resized back
        with the same nearest mapping (where scipy's zoom writes 0, the background's one-hot).
    """
    if image.ndim != 3:
        raise ValueError(f"slicewise_predict: expected an image (X, Y, Z), got shape {tuple(image.shape)}")
    slice_size = tuple(int(s) for s in slice_size)
    if len(slice_size) != 2 or min(slice_size) < 1:
        raise ValueError(f"slicewise_predict: slice_size must be 2 positive ints, got {slice_size}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"slicewise_predict: batch_size must be a positive integer, got {batch_size!r}")
    if num_classes < 1:
        raise ValueError(f"slicewise_predict: num_classes must be >= 1, got {num_classes}")
    device = model_device(model)
    slices = torch.as_tensor(image, dtype=torch.float32).to(device).permute(2, 0, 1)  # (Z, X, Y)
    depth, size = slices.shape[0], tuple(slices.shape[1:])
    probs = torch.empty((num_classes, *size, depth), dtype=torch.float32, device=device)
    for first in range(0, depth, int(batch_size)):
        x = zoom_nearest(slices[first : first + batch_size], slice_size)[:, None]  # (n, 1, h, w)
        with autocast_context(device, autocast_dtype):
            logits = model(x)
        expected = (x.shape[0], num_classes, *slice_size)
        if tuple(logits.shape) != expected:
            raise ValueError(f"slicewise_predict: model returned logits of shape {tuple(logits.shape)}, expected "
                             f"{expected} (num_classes={num_classes})")
        p = torch.softmax(logits.float(), dim=1)
        # Back to the slice's size: the foreground classes 0 where scipy writes cval, the background 1, so the
        # argmax there is the background, as scipy's zoom of SSL4MIS's argmax gives.
        back = torch.cat([zoom_nearest(p[:, :1], size, fill=1.0), zoom_nearest(p[:, 1:], size)], dim=1)
        probs[..., first : first + x.shape[0]] = back.permute(1, 2, 3, 0)  # (C, X, Y, n)
    labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
    return labels, probs


__all__ = ["SLICE_SIZE", "apply_zoom", "autocast_context", "model_device", "slicewise_predict", "zoom_indices",
           "zoom_map", "zoom_nearest"]
