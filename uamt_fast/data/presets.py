"""What ``prepare`` does for each benchmark (``--preset``), and the training settings it hands train.py.

``PRESETS``: ``auto`` (prepare's default: planned from the data set by nnU-Net v2's rules,
``uamt_fast.data.planning``; its entry here is a placeholder that the plan replaces), ``la`` (the UA-MT
release, exported to NIfTI: the h5 release needs no prepare), ``pancreas`` (NIH Pancreas-CT, MC-Net's split),
``brats2019`` (whole tumour on FLAIR, SSL4MIS's preprocessing), ``acdc`` (cardiac cine MRI, SSL4MIS's 2D
protocol: ``uamt_fast.data.acdc`` reads its two forms and its split) and ``none`` (orientation and the input
checks only). Each preset cites, beside it, the code it follows.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """What prepare does for one benchmark, and the training settings it hands train.py."""

    spacing: tuple[float, float, float] | None  # target mm (RAS axes); None keeps the source grid
    intensity: dict  # {"kind": "none"} | {"kind": "ct_window", "window": [lo, hi]} | {"kind": "zscore", ...}
    crop: str | None  # crop to the bounding box of the image's "positive" voxels (the body / the brain after the
    # intensity step) or its "nonzero" ones (nnU-Net crop_to_nonzero, on the raw intensities); None: no crop
    channel: str | None  # the input channel by name (case-insensitive); None: the only one
    labels: dict | None  # target labels name -> value; None: the source's own (dataset.json or the files)
    foreground: bool  # every source label > 0 becomes 1 (BraTS whole tumour)
    patch: tuple[int, int, int]
    stride_xy: int
    stride_z: int
    batch_labeled: int = 2  # crops a training step: the paper's 2 labeled + 2 unlabeled (UA-MT labeled_bs 2 of 4)
    batch_unlabeled: int = 2
    split: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (train, test) case numbers, in order
    drop: tuple[int, ...] = ()  # case numbers never used
    orientation: str | None = "RAS"  # the stored axes (MONAI Orientationd axcodes); None: the file's own axes
    protocol: dict = field(default_factory=dict)  # the benchmark's training settings beyond patch, strides and
    # batch (train.py Config fields, each checked by record.TRAIN_FIELDS), recorded with them in dataset.json's "train"


# MC-Net's NIH Pancreas-CT split (ycwu1997/MC-Net MC-Net/data/Pancreas/train.list @39a5086, in its order: the
# first 12 = 20% are the labeled ones; data/Pancreas/test.list @3253f74), as the numbers of image0001..image0082.
PANCREAS_TRAIN = (57, 18, 62, 31, 20, 17, 32, 79, 61, 64, 70, 19, 48, 76, 41, 52, 49, 71, 72, 34, 10, 15, 77, 80, 27,
                  47, 22, 14, 68, 58, 7, 11, 24, 42, 82, 35, 12, 55, 75, 78, 16, 13, 53, 23, 56, 33, 38, 30, 81, 29,
                  36, 44, 2, 45, 26, 65, 66, 43, 28, 63, 69, 3)
PANCREAS_TEST = (50, 59, 37, 60, 40, 74, 4, 46, 8, 54, 5, 73, 1, 39, 6, 67, 25, 51, 21, 9)

PRESETS = {
    # Planned from the data (uamt_fast.data.planning, nnU-Net v2's rules): prepare replaces this placeholder by
    # planning.preset_of_plan(the plan) before any case is transformed; the source's own classes, as "none".
    "auto": Preset(spacing=None, intensity={"kind": "planned"}, crop="nonzero", channel=None, labels=None,
                   foreground=False, patch=(112, 112, 80), stride_xy=18, stride_z=4),
    # LA (2018 Atrial Segmentation Challenge, the UA-MT release's mri_norm2.h5): already 0.625 mm and
    # normalized per scan, so no resampling, no intensity change, no crop. Patch 112x112x80 and strides 18/4:
    # UA-MT code/test_LA.py and code/train_LA_meanteacher_certainty_unlabel.py (yulequan/UA-MT @80d0a34);
    # the same in DTC code/test_LA.py (HiLab-git/DTC @0b7cfed) and MC-Net mcnet/test_3d.py (ycwu1997/MC-Net @9a9730d).
    "la": Preset(spacing=None, intensity={"kind": "none"}, crop=None, channel=None,
                 labels={"background": 0, "left atrium": 1}, foreground=False, patch=(112, 112, 80), stride_xy=18,
                 stride_z=4),
    # NIH Pancreas-CT: MC-Net data/Pancreas/Pre-processing.ipynb (@3253f74) resamples to 1 mm (BSpline; here
    # bilinear), windows HU to [75 - 400/2, 75 + 400/2] = [-125, 275] scaled to [0, 1]; it then crops around the
    # *label* (+25 voxels in x, y) and z-scores the crop. A label crop is impossible for unlabeled and test
    # cases, so this preset crops to the body (window > 0, i.e. HU > -125) and keeps [0, 1]. Patch 96^3,
    # strides 16/16: MC-Net mcnet/test_3d.py (@9a9730d). Split: MC-Net's 62/20 lists above, less the two
    # scans that TCIA's Pancreas-CT page marks as duplicates, #25 and #70 (the 80-scan version most of the
    # literature uses; taken from that page as remembered, not from a stored copy). MC-Net's own lists still
    # hold both (image0025 in test, image0070 in train), so the split here is 61/19.
    "pancreas": Preset(spacing=(1.0, 1.0, 1.0), intensity={"kind": "ct_window", "window": [-125.0, 275.0]},
                       crop="positive", channel=None, labels={"background": 0, "pancreas": 1}, foreground=False,
                       patch=(96, 96, 96), stride_xy=16, stride_z=16, split=(PANCREAS_TRAIN, PANCREAS_TEST),
                       drop=(25, 70)),
    # BraTS 2019, whole tumour on FLAIR: SSL4MIS code/dataloaders/brats_proprecessing.py (HiLab-git/SSL4MIS
    # @6f98472) crops to the brain (nonzero voxels), clips at the 99.9th percentile, z-scores with the mean and
    # std of the voxels > 0 (applied to every voxel) and sets label > 0 to 1; no resampling (BraTS is 1 mm).
    # Patch 96^3 (train_uncertainty_aware_mean_teacher_3D.py @0fc63df), strides 64/64 (code/test_3D.py
    # @132771f and the validation in that training script).
    "brats2019": Preset(spacing=None, intensity={"kind": "zscore", "over": "positive", "clip_percentile": 99.9},
                        crop="positive", channel="FLAIR", labels={"background": 0, "whole tumour": 1}, foreground=True,
                        patch=(96, 96, 96), stride_xy=64, stride_z=64),
    # ACDC (cardiac cine MRI, 4 classes; ACDC's label values 1 = RV, 2 = myocardium, 3 = LV), SSL4MIS's 2D
    # protocol (HiLab-git/SSL4MIS @06df604): per-volume min-max to [0, 1] as code/dataloaders/
    # acdc_data_processing.py does, no resampling or crop, and the file's own axes (the short-axis slices on
    # the last one, as ACDC stores them; SSL4MIS keeps SimpleITK's (Z, Y, X) of the same array). Slices at
    # 256 x 256, batch 24 with 12 labeled: train_uncertainty_aware_mean_teacher_2D.py (--patch_size, --batch_size,
    # --labeled_bs); patch (256, 256, 1) is one slice, so a stride equals it. Split: uamt_fast.data.acdc_split.
    # The protocol, same script: --max_iterations 30000, lr_ = base_lr * (1 - iter_num / max_iterations) ** 0.9,
    # --consistency_rampup 200 over iter_num // 150 (T = 8, noise clamp(N(0, 0.1^2), +-0.2), ema 0.99, SGD 0.01,
    # momentum 0.9, weight decay 1e-4 are train.py's defaults already); 7 labeled patients, the benchmark's
    # main row (its --labeled_num default, 136, counts slices: the same 7 patients).
    "acdc": Preset(spacing=None, intensity={"kind": "minmax"}, crop=None, channel=None,
                   labels={"background": 0, "RV": 1, "Myo": 2, "LV": 3}, foreground=False, patch=(256, 256, 1),
                   stride_xy=256, stride_z=1, batch_labeled=12, batch_unlabeled=12, orientation=None,
                   protocol={"dims": 2, "iterations": 30000, "lr_schedule": "poly", "consistency_rampup": 200.0,
                             "consistency_period": 150, "labeled_patients": 7}),
    # Only canonical orientation and the input checks; classes from the source's labels; patch and strides are
    # train.py's defaults (Config.patch, eval_stride_xy, eval_stride_z).
    "none": Preset(spacing=None, intensity={"kind": "none"}, crop=None, channel=None, labels=None, foreground=False,
                   patch=(112, 112, 80), stride_xy=18, stride_z=4),
}


__all__ = ["PANCREAS_TEST", "PANCREAS_TRAIN", "PRESETS", "Preset"]
