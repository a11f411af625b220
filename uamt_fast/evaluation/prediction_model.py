"""The model ``python -m uamt_fast.predict`` runs: its network, how a scan reaches it, and the data it learnt from.

``load_model_and_data(args, device)`` reads MODEL (a train.py run folder or checkpoint, through
``uamt_fast.training.checkpoints`` only: weights-only, non-finite weights refused), checks the inference
settings its config saved, and reads the record (``dataset.json``) of the prepared set it was trained on
(``--data``, or the data roots of its config; none for the LA release, whose scans are used as they are).
A 3D model (the V-Net) predicts by sliding windows (``patch``, the strides, ``downsample``, ``blend``); a
2D model (``--dims 2``, SSL4MIS's U-Net) slice by slice, every Z slice resized to ``slice_size`` (its
``patch[:2]``) and back, as ``train.py --eval`` scores it (``uamt_fast.evaluation.slicewise``): it has no
windows, so no strides, pooling or blending (``--blend gaussian`` is refused for it). ``Model.settings``
is the ``InferenceSettings`` of ``inference.predict_volume``, the one dispatch point --eval, predict and the
figures share. Errors are one-line ``PredictError`` / ``CheckpointError`` / ``DataError`` (ValueErrors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uamt_fast import data
from uamt_fast.data import DataError, formats, prepare
from uamt_fast.evaluation import inference
from uamt_fast.training import checkpoints


class PredictError(ValueError):
    """A prediction that cannot run; the message is one line and names the file or flag."""


@dataclass
class Model:
    """The network and everything that decides how a scan reaches it."""

    net: torch.nn.Module
    config: dict
    path: Path
    patch: tuple[int, int, int]
    stride_xy: int
    stride_z: int
    downsample: int
    batch: int
    num_classes: int
    record: dict | None  # the prepared set's dataset.json; None: the LA release (no preprocessing)
    roots: list[str]  # where the record was read ([] when none could be)
    channel: int | None  # index of the input channel the model was prepared with, when known
    blend: str = "mean"  # how overlapping windows are combined (inference.BLENDS)
    slice_size: tuple[int, int] | None = None  # a 2D model: every Z slice resized to it (its patch[:2])

    def settings(self, autocast: torch.dtype | None = None) -> inference.InferenceSettings:
        """How ``inference.predict_volume`` segments a scan with this model (the forward under ``autocast``)."""
        return inference.InferenceSettings(self.patch, self.stride_xy, self.stride_z, self.num_classes, self.batch,
                                           autocast, self.downsample, self.blend, self.slice_size)


def load_model_and_data(args, device: torch.device) -> Model:
    """MODEL (``checkpoints.load_vnet``, in eval mode: the V-Net, or the 2D U-Net of a --dims 2 run) with its
    inference settings, checked, and the record of the data it was prepared on (``--data``, or the roots saved
    in its config; none for the LA release). ``args``: predict's ``model``, ``data``, ``batch``, ``channel``,
    ``blend``."""
    net, cfg, path = checkpoints.load_vnet(args.model, device, "MODEL")
    net.eval()
    two_d = cfg.get("dims", 3) == 2
    patch = cfg.get("patch", inference.PATCH_SIZE)
    settings = {k: cfg.get(k, default) for k, default in (("eval_stride_xy", 18), ("eval_stride_z", 4),
                                                         ("downsample", 1), ("eval_batch", 4))}
    # (a 2D run's patch is X Y 1, train.py's --dims 2 rule; its strides are not used: whole slices, no windows)
    sizes_ok = isinstance(patch, (list, tuple)) and len(patch) == 3 and all(type(p) is int for p in patch) and (
        min(patch[:2]) >= 16 and patch[2] == 1 if two_d else min(patch) >= 16)
    if not sizes_ok or not all(type(v) is int and v >= 1 for v in settings.values()) \
            or (not two_d and (settings["eval_stride_xy"] > min(patch[:2]) or settings["eval_stride_z"] > patch[2])) \
            or (two_d and settings["downsample"] != 1):
        raise checkpoints.CheckpointError(f"MODEL {path}: bad {'slice' if two_d else 'sliding-window'} settings in "
                                          f"its config (patch {patch!r:.40}, {settings!r:.120})")
    if two_d and args.blend not in (None, "mean"):
        raise PredictError(f"--blend {args.blend}: MODEL {path} is a 2D model (--dims 2), which predicts whole "
                           "slices: no overlapping windows to blend; drop --blend")
    blend = "mean" if two_d else args.blend or cfg.get("blend", "mean")  # the model's own, as --eval's
    if blend not in inference.BLENDS:
        raise checkpoints.CheckpointError(f"MODEL {path}: blend {blend!r} in its config is not one of "
                                          f"{', '.join(inference.BLENDS)}")
    saved = cfg.get("data") or []
    roots = list(args.data or ([saved] if isinstance(saved, str) else saved))
    record, found = None, []
    if args.data or (roots and all(Path(r).is_dir() for r in roots)):  # --data given: it must be there
        record, found = data.read_record(roots), roots
    if record is not None:
        if record["num_classes"] != net.num_classes:
            raise PredictError(f"MODEL {path}: the model predicts {net.num_classes} classes, its data "
                               f"({', '.join(found)}) has {record['num_classes']}")
        if record.get("preset") not in prepare.PRESETS:
            raise DataError(f"{Path(found[0]) / data.RECORD_NAME}: preset {record.get('preset')!r} is not one of "
                            f"{sorted(prepare.PRESETS)}")
    return Model(net, cfg, path, tuple(patch), settings["eval_stride_xy"], settings["eval_stride_z"],
                 settings["downsample"], args.batch or settings["eval_batch"], net.num_classes or 2, record, found,
                 args.channel if args.channel is not None else channel_index(record), blend,
                 tuple(patch[:2]) if two_d else None)


def channel_index(record: dict | None) -> int | None:
    """The index of the record's input channel: from the source's dataset.json when it is still there, from a
    channel that is an index ("0", "1": plain NIfTI folders), or from the suffix of the nnU-Net files read;
    None when none tells (a multi-channel scan then needs --channel)."""
    from uamt_fast.files import read_json

    if record is None:
        return None
    name = str(record.get("channel", ""))
    source = (record.get("source") or {}).get("path")
    meta_file = Path(source) / "dataset.json" if source else None
    try:  # (the source's description is a hint here: a moved, changed or unreadable one is no error)
        meta = read_json(meta_file, "the data set description") if meta_file and meta_file.is_file() else {}
    except ValueError:
        meta = {}
    names = meta.get("channel_names", meta.get("modality"))
    if isinstance(names, dict):
        hits = [k for k, v in names.items() if str(v).lower() == name.lower() and str(k).isdecimal()]
        if len(hits) == 1:
            return int(hits[0])
    if name.isdecimal():
        return int(name)
    if (record.get("source") or {}).get("layout") != "nnunet":  # only nnU-Net names every file by its channel
        return None
    for case in (record.get("cases") or {}).values():
        files = (case.get("files") or {}).get("image") or []
        match = formats.CHANNEL_SUFFIX.match(formats.strip_ending(Path(files[0]).name)) if files else None
        if match:
            return int(match["channel"])
    return None


__all__ = ["Model", "PredictError", "channel_index", "load_model_and_data"]
