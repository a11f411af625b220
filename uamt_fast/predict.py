"""``python -m uamt_fast.predict MODEL INPUT... --out DIR``: masks of new scans, in each scan's own geometry.

MODEL is a train.py run folder (its ``student.pt``) or a checkpoint (``student.pt``, ``teacher.pt``,
``checkpoint.pt``), read through ``uamt_fast.training.checkpoints`` only (weights-only, non-finite weights refused),
with its settings and its data's record (``uamt_fast.evaluation.prediction_model``): a 3D model (the V-Net) or a
2D one (``train.py --dims 2``, SSL4MIS's U-Net).
INPUT is any mix of NIfTI files, folders of them (an MSD / nnU-Net ``imagesTs``, or a raw folder holding one;
nnU-Net channel files ``{case}_{XXXX}`` make one case), ACDC's raw layout (``find_scans``: a patient folder, a
folder of them, the download's root), SSL4MIS's preprocessed ACDC volumes (``patientXXX_frameYY.h5``, a folder
of them or the release's root: read as ``prepare --preset acdc`` stores them, the outputs in the file's (Z, Y, X)
order, voxel for voxel with its label), and the training layout's h5 cases (an ``mri_norm2.h5`` or
``cases/<id>.h5``, a case folder, or a data root: every case of it, in either layout).

For each scan, in the prepare -> train -> predict order of nnU-Net:

1. **The model's preprocessing.** The prepared set the model was trained on (the ``data`` roots saved in its
   config, or ``--data``) has a ``dataset.json`` (``uamt_fast.data.prepare``): a NIfTI scan goes through
   ``prepare.transform_case`` with that record's ``preset`` and ``channel``, the very code that prepared the
   training cases (``auto``: the recorded plan, ``planning.recorded_preset``: its spacing, crop and normalisation,
   CT with the data set's recorded statistics, anything else z-scored per scan). The LA release has no
   record: scans are used as they are (already normalized per scan, 0.625 mm). An h5 case is already in the
   training layout and is used as it is.
2. **The paper's sliding-window inference** with the checkpoint's patch, strides, downsample and class count,
   through ``inference.sliding_window_predict``: the function ``train.py --eval`` scores, so the mask written
   for a test case is the argmax ``--eval`` scores (on a CPU, and on CUDA with ``--no-amp``; by default CUDA
   runs the forward under bf16 autocast, and ``--eval`` runs it in fp32). Windows are blended (mask and
   uncertainty alike) as the model's config says, as ``--eval`` did; ``--blend`` overrides. A 2D model
   predicts slice by slice instead (``inference.predict_volume``: each Z slice of the preprocessed scan resized
   to its ``patch[:2]`` and back, nearest, SSL4MIS's ACDC protocol, as ``--eval`` scores it; its MC-dropout
   passes too), so a 3D NIfTI in gives a 3D mask out.
3. **The inverse** (``uamt_fast.evaluation.geometry.to_input_grid``): each voxel of the input's grid is mapped
   through the input's affine to the world and back through the prepared grid's affine (the case record's
   ``affine_original`` and ``affine``: orientation, resampling and crop in one 4x4 map). Where that map is a
   signed axis permutation with an integer shift (orientation and crop only, no resampling) the prediction is
   indexed back exactly; otherwise it is resampled, nearest for labels, trilinear for float maps. Voxels
   outside the prepared grid (cropped away) are background: label 0, probability 1 for class 0, uncertainty 0.

Writes into ``--out``: ``{case}.nii.gz`` (uint8 labels, the input's affine and header; an h5 case: the grid
of its h5 and the affine its data set records, else the LA release's 0.625 mm), with ``--uncertainty T``
``{case}_uncertainty.nii.gz`` (float32, the predictive entropy ``-sum_c mu_c ln(mu_c + 1e-6)`` of the mean
``mu`` of T MC-dropout passes, clamped to [0, ln C]; the passes of a window go through the network stacked
in one batch, as the trainer stacks its teacher passes, up to max(--batch, min(T, 16)) patches a forward:
``uamt_fast.evaluation.uncertainty``), with ``--probabilities`` ``{case}_probabilities.nii.gz`` (float32,
(X, Y, Z, C)), and ``predictions.json`` (``uamt_fast.evaluation.predictions_record``), one record of every
output in the folder (``runs``: the model file, its config, the settings, the uamt_fast version and the times
of each predict; ``cases``: each case's input files and their sha256, its outputs, preprocessing record and
the run that wrote them). A later predict into the same folder merges its cases into it (a case predicted
again replaces its entry); it is rewritten atomically after every case.

Every input is checked before anything is written (headers, dimensions, channels, spacing against the
model's data, a voxel count within ``--max-voxels`` read from the header, every voxel finite, the records
of h5 cases' data sets); an output that is one of the inputs is refused whatever the flags; an existing
output is never replaced without ``--overwrite``; one predict writes into a folder at a time (the folder's
``run.lock``, ``uamt_fast.files.FolderLock``); every file is written through ``uamt_fast.files`` (a new
temporary file, then a rename: no link is followed). Every error is one line on stderr and exit status 2.
nibabel (and MONAI for a prepared set's NIfTI scans) come with ``pip install 'uamt_fast[data]'``.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import uamt_fast
from uamt_fast import cli, data, files, progress
from uamt_fast.data import DataError, acdc, formats, planning, prepare
from uamt_fast.data.affine import ras_axes, voxel_sizes
from uamt_fast.evaluation import inference, uncertainty
from uamt_fast.evaluation.geometry import to_input_grid
from uamt_fast.evaluation.prediction_model import Model, PredictError, channel_index, load_model_and_data
from uamt_fast.evaluation.predictions_record import RECORD_FORMAT, RECORD_NAME, read_record, write_record

SPACING_FACTOR = 2.0  # without resampling, an input spacing more than 2x off the training data's is refused
MAX_VOXELS = 1 << 30  # a header claiming more is refused before its data is read (4 GiB as float32)


# ----------------------------------------------------------------------------- the command line
class _Parser(cli.OneLineParser):
    error_type = PredictError


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m uamt_fast.predict", description=__doc__.split("\n")[0].split(": ", 1)[1],
                epilog="example: python -m uamt_fast.predict runs/uamt imagesTs --out masks --uncertainty 8")
    p.add_argument("model", metavar="MODEL", help="a train.py run folder (its student.pt) or a checkpoint file")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="NIfTI files, folders of them (imagesTs), ACDC patient folders (their ED and ES frames) or a "
                   "folder of them, h5 cases (mri_norm2.h5, a case folder, a data root), SSL4MIS's ACDC h5 volumes")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--data", action="append", metavar="DIR",
                   help="the model's prepared data set (its dataset.json gives the preprocessing); default: the data "
                   "roots saved in the checkpoint's config")
    p.add_argument("--uncertainty", type=cli.number(int, "[1, 1024]"), metavar="T",
                   help="also write {case}_uncertainty.nii.gz: predictive entropy of T MC-dropout passes, T in [1, 1024]")
    p.add_argument("--probabilities", action="store_true",
                   help="also write {case}_probabilities.nii.gz: the class probabilities (X, Y, Z, C)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument("--threads", type=cli.number(int, "[1, 1024]"), metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=cli.number(int, "[1, 1024]"), metavar="N",
                   help="sliding windows per forward (default: the checkpoint's eval_batch)")
    p.add_argument("--channel", type=cli.number(int, ">= 0"), metavar="INDEX",
                   help="the input channel of multi-channel scans (default: the one the model was prepared with)")
    p.add_argument("--no-amp", action="store_true", help="fp32 forward on CUDA too (as train.py --eval), not bf16")
    p.add_argument("--blend", choices=inference.BLENDS,
                   help="overlapping windows: mean (plain average, the paper's) | gaussian (Gaussian weights, "
                   "sigma 1/8 of the window: fainter seams); default: the model's own, as --eval scored (a 2D model: "
                   "whole slices, nothing to blend)")
    p.add_argument("--max-voxels", type=cli.number(int, ">= 1"), default=MAX_VOXELS, metavar="N",
                   help="refuse a scan whose header claims more than N voxels, before reading it (default: 2^30)")
    p.add_argument("--overwrite", action="store_true", help="replace output files already in --out (never an input)")
    return p


def main(argv=None) -> int:
    """Run the command: 0, or 2 after one line on stderr."""
    try:
        args = make_parser().parse_args(argv)
        return run(args)
    except torch.cuda.OutOfMemoryError:
        print("predict: error: out of GPU memory; give a smaller --batch (windows per forward) or fewer --uncertainty "
              "passes", file=sys.stderr)
        return 2
    except (ValueError, ImportError, OSError) as e:  # DataError, CheckpointError, RunFolderError are ValueErrors
        message = files.describe(e) if isinstance(e, OSError) else str(e)
        print(f"predict: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- the inputs
@dataclass
class Scan:
    """One case to predict: the file read (and the channel of a 4D file), every file of the case, its kind."""

    id: str
    kind: str  # "nifti" | "h5" (the training layout's) | "ssl4mis-h5" (SSL4MIS's ACDC volume: (Z, Y, X))
    files: tuple[Path, ...]  # all files of the case (nnU-Net: one per channel)
    image: Path | None = None  # the file read (set by check_scan)
    channel: int | None = None  # index into the last axis of a 4D NIfTI file
    root: Path | None = None  # h5: the data root holding it, when it sits in the release layout
    outputs: dict = field(default_factory=dict)  # "mask" | "uncertainty" | "probabilities" -> Path


def find_scans(inputs) -> list[Scan]:
    """Every case named by the INPUT arguments, in the order given (a folder's cases sorted).

    ACDC's raw layout: a patient folder (one holding ``Info.cfg``) gives the ED and the ES frame its Info.cfg
    names (``acdc.phase_frames``, as ``prepare --preset acdc`` reads them; the other frame files, if any, are not
    taken), each case named after its file (``patient001_frame12``); a folder of patient folders (``training/``,
    ``testing/``, the download's root: ``formats.acdc_patient_folders``) gives every patient's, sorted. Labels
    (``_gt``) and the 4D cine (``_4d``) are never scans: named as an INPUT, they are refused."""
    scans: list[Scan] = []
    loose: dict[Path, list[Path]] = {}  # NIfTI files given one by one, by folder (channel files make one case)
    for text in inputs:
        path = Path(text)
        if path.is_file() and path.name.endswith(formats.NIFTI_ENDINGS):
            if what := acdc.not_a_frame(path):
                raise PredictError(f"INPUT {path}: {what}, not a frame; give a patientXXX_frameYY image or its "
                                   "patient folder (its ED and ES frames)")
            loose.setdefault(path.parent, []).append(path)
        elif path.is_file() and path.suffix == ".h5":
            scans.append(_h5_scan(path))
        elif path.is_dir() and any((path / d).is_dir() for d in (data.CASES_DIR, data.IMAGES_DIR)):  # a data root
            cases = data.root_case_files(path)  # (either layout: the release's, a prepared set's)
            if not cases:
                raise PredictError(f"INPUT {path}: a data root without h5 cases in {data.CASES_DIR} or "
                                   f"{data.IMAGES_DIR}")
            scans += [_h5_scan(f) for f in cases]
        elif path.is_dir() and (path / data.H5_NAME).is_file():
            scans.append(_h5_scan(path / data.H5_NAME))
        elif path.is_dir() and (volumes := acdc.h5_volume_files(path)):  # SSL4MIS's release, or its data/
            scans += [_h5_scan(f) for f in volumes]
        elif path.is_dir() and (path / "Info.cfg").is_file():  # an ACDC patient folder
            scans += _acdc_frames(path)
        elif path.is_dir() and (patients := formats.acdc_patient_folders(path)):  # training/, testing/, the root
            scans += sorted((s for folder in patients for s in _acdc_frames(folder)), key=lambda s: s.id)
        elif path.is_dir():
            folder = path / "imagesTs" if (path / "dataset.json").is_file() and (path / "imagesTs").is_dir() else path
            files = formats.nifti_files(folder)
            not_frames = [f for f in files if acdc.not_a_frame(f)]
            if not_frames:  # (ACDC files without their Info.cfg: the labels and the cine are no scans)
                print(f"INPUT {path}: left out {len(not_frames)} ACDC label (_gt) and 4D cine (_4d) file(s), e.g. "
                      f"{not_frames[0].name}", flush=True)
                files = [f for f in files if f not in not_frames]
            if not files:
                raise PredictError(f"INPUT {path}: no NIfTI images (.nii, .nii.gz) or h5 cases in it")
            scans += _nifti_scans(files, folder)
        elif path.exists():
            raise PredictError(f"INPUT {path}: neither a NIfTI file (.nii, .nii.gz), an h5 case nor a folder of them")
        else:
            raise PredictError(f"INPUT {path}: no such file or folder")
    for folder, files in loose.items():
        scans += _nifti_scans(sorted(set(files)), folder)
    seen: dict[str, Scan] = {}
    for scan in scans:
        if scan.id in seen:
            raise PredictError(f"INPUT: two inputs are case {scan.id} ({seen[scan.id].files[0]} and {scan.files[0]}); "
                               "their outputs would share a name")
        seen[scan.id] = scan
    return scans


def _nifti_scans(files: list[Path], folder: Path) -> list[Scan]:
    grouped = formats.group_channels(files, folder)  # the rule prepare reads sources by
    return [Scan(case_id, "nifti", paths) for case_id, paths in grouped.items()]


def _acdc_frames(folder: Path) -> list[Scan]:
    """The ED and ES frame files of an ACDC patient folder, by frame number (``find_scans``)."""
    frames = acdc.phase_frames(folder / "Info.cfg")
    patients = sorted({m["patient"] for f in formats.nifti_files(folder) if (m := acdc.NIFTI_FILE.match(f.name))})
    if len(patients) != 1:
        raise PredictError(f"INPUT {folder}: an ACDC patient folder (it holds Info.cfg) with " + (
            f"the files of patients {', '.join(patients)}; keep one a folder" if patients else
            "no patientXXX_frameYY.nii.gz frame files"))
    images = [acdc.frame_file(folder, f"{patients[0]}_frame{frame:02d}", f"the {phase} frame, Info.cfg's {phase}: "
                              f"{frame}") for phase, frame in sorted(zip(acdc.PHASES, frames), key=lambda p: p[1])]
    return [Scan(formats.strip_ending(image.name), "nifti", (image,)) for image in images]


def _h5_scan(path: Path) -> Scan:
    case_id, root = data.case_of_file(path, f"INPUT {path}")  # (a root when the file sits in a root's layout)
    return Scan(case_id, "ssl4mis-h5" if acdc.is_h5_volume(path, root is not None) else "h5", (path,), root=root)


def check_scan(scan: Scan, model: Model, max_voxels: int = MAX_VOXELS) -> None:
    """Headers only, before any work: a 3D volume of the model's one channel, at a spacing the model can take,
    of at most ``max_voxels`` voxels."""
    if scan.kind in ("h5", "ssl4mis-h5"):
        scan.image = scan.files[0]
        shape = data.h5_shapes(scan.image, ("image",))["image"]  # (refuses links to other files, huge claims)
        if len(shape) != 3:
            raise PredictError(f"INPUT {scan.image}: image of shape {shape}; the model reads 3D volumes (X, Y, Z)")
        _check_voxel_count(scan.image, shape, max_voxels)
        _check_size(scan.image, shape[::-1] if scan.kind == "ssl4mis-h5" else shape, model)
        if scan.root is not None and scan.root.is_dir():
            data.read_record(scan.root)  # its data set's record (the case's affine), checked before any work
        return
    import nibabel

    wanted = model.channel
    if len(scan.files) > 1:
        if wanted is None or wanted >= len(scan.files):
            raise PredictError(f"INPUT {scan.files[0].parent}: case {scan.id} has {len(scan.files)} channel files and "
                               f"the model reads one ({_channel_name(model)}); "
                               + ("give --channel INDEX" if wanted is None else f"channel {wanted} is not among them"))
        scan.image = scan.files[wanted]
    else:
        scan.image = scan.files[0]
    try:
        header = nibabel.load(str(scan.image))
        shape, affine = tuple(header.shape), np.asarray(header.affine, np.float64)
    except Exception as e:  # noqa: BLE001 (nibabel raises many types for truncated or foreign files)
        raise DataError(f"INPUT {scan.image}: unreadable NIfTI file ({type(e).__name__}: {e})") from None
    affine = formats.check_affine(affine, f"INPUT {scan.image}: the NIfTI affine (sform / qform / pixdim)")
    _check_voxel_count(scan.image, shape, max_voxels)  # the whole file is read, every channel
    if len(shape) == 4 and shape[3] > 1 and len(scan.files) == 1:
        if wanted is None or wanted >= shape[3]:
            raise PredictError(f"INPUT {scan.image}: {shape[3]} channels (shape {shape}) and the model reads one "
                               f"({_channel_name(model)}); "
                               + ("give --channel INDEX" if wanted is None else f"channel {wanted} is not among them"))
        scan.channel = wanted
        shape = shape[:3]
    elif len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise PredictError(f"INPUT {scan.image}: a {len(shape)}D image of shape {shape}; the model reads 3D volumes "
                           "(X, Y, Z) of one channel")
    _check_size(scan.image, shape, model)
    _check_spacing(scan.image, affine, model)


def _channel_name(model: Model) -> str:
    return f"channel {model.record.get('channel')!r}" if model.record else "one channel"


def _check_voxel_count(path: Path, shape, max_voxels: int) -> None:
    """From the header, before the data: a small compressed file can claim a huge volume."""
    count = math.prod(int(n) for n in shape)
    if count > max_voxels:
        raise PredictError(f"INPUT {path}: its header claims shape {tuple(shape)} = {count:,} voxels, more than "
                           f"--max-voxels {max_voxels:,}; not read (raise --max-voxels if the scan is real)")


def check_values(scan: Scan) -> None:
    """Every voxel of the scan's image finite (read once, before any output is written: a refusal never
    comes after a prediction). An h5 case gets its layout's full check (``data.read_h5_case``)."""
    if scan.kind == "h5":
        data.read_h5_case(scan.id, scan.image, labeled=False)
        return
    if scan.kind == "ssl4mis-h5":
        acdc.read_h5_volume(scan.image)
        return
    image, _ = formats.read_volume(scan.image, scan.channel)
    if not np.issubdtype(image.dtype, np.number) or not np.isfinite(image).all():
        raise DataError(f"INPUT {scan.image}: the image is not all finite real numbers")


def _check_size(path: Path, shape, model: Model) -> None:
    if min(shape) < model.downsample:
        raise PredictError(f"INPUT {path}: shape {tuple(shape)} is smaller than the model's downsample "
                           f"{model.downsample} along an axis")


def _check_spacing(path: Path, affine: np.ndarray, model: Model) -> None:
    """Without resampling the model sees the scan's own voxels: refuse a spacing far from its data's."""
    preset = planning.recorded_preset(model.record) if model.record else None  # (auto: the recorded plan's)
    if preset is not None and preset.spacing is not None:
        return  # resampled to the preset's spacing
    spacing = voxel_sizes(affine)
    if model.record is None:
        known = np.array([data.LA_SPACING])
    else:
        if preset is None or preset.orientation is not None:  # prepare orients to RAS first (acdc: the file's axes)
            ras = np.empty(3)
            ras[ras_axes(affine)] = spacing
            spacing = ras
        known = np.array([c["spacing"] for c in (model.record.get("cases") or {}).values() if c.get("spacing")])
        if not known.size:
            return
    lo, hi = known.min(0) / SPACING_FACTOR, known.max(0) * SPACING_FACTOR
    if not np.all((spacing >= lo) & (spacing <= hi)):
        raise PredictError(f"INPUT {path}: spacing {tuple(round(float(s), 3) for s in spacing)} mm is more than "
                           f"{SPACING_FACTOR:g}x off the model's data ({tuple(round(float(s), 3) for s in known.min(0))}"
                           f" .. {tuple(round(float(s), 3) for s in known.max(0))} mm) and its preprocessing does "
                           "not resample; resample the scan first")


def plan_outputs(scans: list[Scan], out: Path, args) -> None:
    """Each scan's output paths; refused if two scans would share one, if one is an input (the same path or
    inode: never replaced, whatever the flags), or if one exists (without --overwrite)."""
    names: dict[str, str] = {}
    for scan in scans:
        kinds = {"mask": ""} | ({"uncertainty": "_uncertainty"} if args.uncertainty else {}) \
            | ({"probabilities": "_probabilities"} if args.probabilities else {})
        for kind, suffix in kinds.items():
            name = f"{scan.id}{suffix}.nii.gz"
            if name in names:
                raise PredictError(f"--out {out}: cases {names[name]} and {scan.id} would both write {name}")
            names[name] = scan.id
            scan.outputs[kind] = out / name
    inputs = [f for s in scans for f in s.files]
    for output in (p for s in scans for p in s.outputs.values()):
        source = next((f for f in inputs if os.path.lexists(output) and files.same_file(output, f)), None)
        if source is not None:
            raise PredictError(f"--out {out}: {output.name} would be written over the input {source}; an input is "
                               "never replaced (not even with --overwrite): choose another --out")
    taken = [p for s in scans for p in s.outputs.values() if os.path.lexists(p)]
    if taken and not args.overwrite:
        raise PredictError(f"--out {out}: {taken[0].name} already exists ({len(taken)} output file(s) there); pass "
                           "--overwrite to replace them, or choose another --out")


# ----------------------------------------------------------------------------- reading and preprocessing
@dataclass
class Loaded:
    scan: Scan
    image: np.ndarray  # float32 (X, Y, Z) on the model's grid
    geometry: dict  # affine_original, shape_original (the input's grid), affine, shape (the model's grid)
    header: object | None  # the input's NIfTI header (None for an h5 case)
    inputs: list[dict]  # [{"file", "sha256"}] of the files read
    preprocessing: dict | None  # prepare's case record, for a prepared set's NIfTI scan


def read_scan(scan: Scan, model: Model) -> Loaded:
    """The scan on the model's grid, and what maps that grid back to the input's."""
    inputs = [{"file": str(scan.image.resolve()), "sha256": files.sha256(scan.image)}]
    if scan.kind == "h5":
        case = data.read_h5_case(scan.id, scan.image, labeled=False)
        record = data.read_record(scan.root) if scan.root is not None and scan.root.is_dir() else None
        saved = ((record or {}).get("cases") or {}).get(scan.id) or {}
        if saved.get("affine") is not None and list(saved.get("shape", [])) == list(case.image.shape):
            affine = np.asarray(saved["affine"], np.float64)
        else:
            affine = np.diag([*(data.case_spacing(record, scan.id) or (1.0, 1.0, 1.0)), 1.0])  # (none kept: voxels)
        return Loaded(scan, case.image, _same_grid(affine, case.image.shape), None, inputs, None)
    if scan.kind == "ssl4mis-h5":  # prepare's (X, Y, Z) min-max'ed grid; the outputs in the file's (Z, Y, X)
        image = acdc.read_h5_volume(scan.image)
        geometry = {"affine_original": acdc.H5_AXES.tolist(), "shape_original": list(image.shape[::-1]),
                    "affine": np.eye(4).tolist(), "shape": list(image.shape)}
        return Loaded(scan, image, geometry, None, inputs, {"axes_original": "(Z, Y, X), SSL4MIS's h5 order",
                                                            "intensity": "min-max, as prepare --preset acdc"})
    import nibabel

    header = nibabel.load(str(scan.image)).header
    if model.record is None:  # the LA release: no preprocessing
        image, affine = formats.read_volume(scan.image, scan.channel)
        if not np.issubdtype(image.dtype, np.number) or not np.isfinite(image).all():
            raise DataError(f"INPUT {scan.image}: the image is not all finite real numbers")
        return Loaded(scan, np.ascontiguousarray(image, np.float32), _same_grid(affine, image.shape), header,
                      inputs, None)
    name = model.record["preset"]
    plan = prepare.Plan(name, planning.recorded_preset(model.record),
                        formats.Source(scan.image.parent, "nifti", [], None), scan.channel or 0,
                        str(model.record.get("channel")), None, None, model.record["labels"],
                        {scan.id: "predicted"}, {})
    case = formats.SourceCase(scan.id, "unlabeled", (scan.image,), None, channels_in_file=scan.channel is not None)
    image, _, record = prepare.transform_case(case, plan)
    geometry = {k: record[k] for k in ("affine_original", "shape_original", "affine", "shape")}
    return Loaded(scan, image, geometry, header, inputs, record)


def _same_grid(affine: np.ndarray, shape) -> dict:
    return {"affine_original": affine.tolist(), "shape_original": list(shape), "affine": affine.tolist(),
            "shape": list(shape)}


# ----------------------------------------------------------------------------- inference
def predict_image(model: Model, image: np.ndarray, passes: int | None, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(averaged softmax (C, X, Y, Z), predictive entropy (X, Y, Z) of ``passes`` MC-dropout passes or None); a 2D
    model's slice by slice (``inference.predict_volume`` dispatches on ``model.slice_size``)."""
    settings = model.settings(autocast)
    probs = inference.predict_volume(model.net, image, settings)[1]
    if not passes:
        return probs, None
    s = settings  # (the mask's settings: its passes blended, or for a 2D model taken slice by slice, as the mask)
    mean = uncertainty.mc_dropout_mean(model.net, image, passes, s.patch_size, s.stride_xy, s.stride_z, s.num_classes,
                                       s.batch_size, s.autocast_dtype, s.downsample, s.blend, s.slice_size)
    return probs, uncertainty.predictive_entropy(mean).clamp_(0.0, math.log(model.num_classes))


# ----------------------------------------------------------------------------- writing
def write_nifti(path: Path, array: np.ndarray, affine, header, what: str) -> None:
    """``array`` as a gzipped NIfTI with the input's affine and header (new ones for an h5 case), through
    ``files.atomic_write`` (``plan_outputs`` decided, under the folder's lock, that it may be written)."""
    import nibabel

    img = nibabel.Nifti1Image(array, np.asarray(affine, np.float64), header=header)
    h = img.header
    h.set_data_dtype(array.dtype)
    h.set_slope_inter(None, None)  # stored values are the values: no scaling inherited from the input
    h["cal_min"] = h["cal_max"] = 0
    h["descrip"] = f"uamt_fast.predict {what}".encode()[:80]
    payload = gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
    files.atomic_write(path, lambda f: f.write(payload))  # (under --out's lock: plan_outputs' look still holds)


# ----------------------------------------------------------------------------- the run
def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device cuda: no CUDA device is available (torch {torch.__version__})")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace(
        "auto", "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import nibabel  # noqa: F401 (the outputs are NIfTI files)
    except ImportError:
        raise ImportError("predict writes NIfTI files and needs nibabel: pip install 'uamt_fast[data]'") from None
    model = load_model_and_data(args, device)
    scans = find_scans(args.inputs)
    if model.record is None and any(s.kind == "nifti" for s in scans) and model.config.get("data") \
            and not model.roots:
        raise PredictError(f"MODEL {model.path}: the data it was trained on ({model.config['data']}) is not "
                           "there, so its preprocessing is unknown; give --data (the prepared set's folder)")
    if model.record is not None and any(s.kind == "nifti" for s in scans):
        try:
            import monai  # noqa: F401 (prepare's transforms)
        except ImportError:
            raise ImportError("predict runs prepare's MONAI transforms on NIfTI scans of a prepared set: pip install "
                              "'uamt_fast[data]'") from None
    for scan in scans:
        check_scan(scan, model, args.max_voxels)
    out = Path(args.out)
    plan_outputs(scans, out, args)
    for scan in scans:  # every voxel of every input, before anything is written
        check_values(scan)
    files.make_folder(out, "predictions")
    with files.FolderLock(out, "--out", "predict") as lock:  # one predict a folder: the look below holds till the end
        lock.remove_stale_temporaries()
        plan_outputs(scans, out, args)
        return predict_all(scans, model, args, device, out, read_record(out, args.overwrite, PredictError))


def predict_all(scans: list[Scan], model: Model, args, device: torch.device, out: Path, old: dict) -> int:
    """Predict the checked scans into ``out`` (locked); predictions.json, merged into ``old``, is rewritten
    atomically after every case."""
    autocast = torch.bfloat16 if device.type == "cuda" and not args.no_amp else None
    run = {"model": str(model.path.resolve()), "config": model.config, "uamt_fast": uamt_fast.__version__,
           "started": _now(), "finished": None,
           "settings": {"dims": 3 if model.slice_size is None else 2, "patch": list(model.patch),
                        # (a 2D model has no windows: its slices are resized to slice_size; no strides nor blend)
                        "eval_stride_xy": model.stride_xy if model.slice_size is None else None,
                        "eval_stride_z": model.stride_z if model.slice_size is None else None,
                        "slice_size": None if model.slice_size is None else list(model.slice_size),
                        "downsample": model.downsample, "batch": model.batch, "num_classes": model.num_classes,
                        "device": str(device), "autocast": None if autocast is None else "bfloat16",
                        "uncertainty_passes": args.uncertainty,
                        "blend": model.blend if model.slice_size is None else None,
                        "preprocessing": (f"prepare preset {model.record['preset']!r}, channel "
                                          f"{model.record.get('channel')!r}" if model.record else
                                          "none (the LA release layout)"), "data": model.roots}}
    record_path, cases, shown = out / RECORD_NAME, [], progress.CaseProgress(len(scans))  # a line a case
    with ThreadPoolExecutor(max_workers=1) as reader:  # reads (and preprocesses) the next scan meanwhile
        ahead = reader.submit(read_scan, scans[0], model)
        try:
            for k, scan in enumerate(scans):
                loaded = ahead.result()
                if k + 1 < len(scans):
                    ahead = reader.submit(read_scan, scans[k + 1], model)
                cases.append(predict_one(loaded, model, args, autocast))
                write_record(out, old, run, cases)
                shown.finished(scan.id)
        except BaseException:
            ahead.cancel()
            raise
    run["finished"] = _now()
    write_record(out, old, run, cases)
    print(f"predicted {len(scans)} case(s) into {out}; record: {record_path}")
    return 0


def predict_one(loaded: Loaded, model: Model, args, autocast) -> dict:
    """Predict one scan, map it back to the input's grid, write its files; returns its predictions.json entry."""
    scan, geometry = loaded.scan, loaded.geometry
    probs, entropy = predict_image(model, loaded.image, args.uncertainty, autocast)
    labels = probs.argmax(0).to(torch.uint8)  # the argmax train.py --eval scores
    affine = np.asarray(geometry["affine_original"], np.float64)
    mask = to_input_grid(labels[None].float(), geometry, [0.0], "nearest")[0].to(torch.uint8)
    write_nifti(scan.outputs["mask"], mask.cpu().numpy(), affine, loaded.header, "labels")
    if entropy is not None:
        back = to_input_grid(entropy[None], geometry, [0.0], "bilinear")[0]
        write_nifti(scan.outputs["uncertainty"], back.cpu().numpy().astype(np.float32), affine, loaded.header,
                    "uncertainty")
    if args.probabilities:
        background = [1.0] + [0.0] * (model.num_classes - 1)
        back = to_input_grid(probs, geometry, background, "bilinear")
        write_nifti(scan.outputs["probabilities"], np.ascontiguousarray(back.permute(1, 2, 3, 0).cpu().numpy(),
                                                                        np.float32),
                    affine, loaded.header, "probabilities")
    return {"case": scan.id, "inputs": loaded.inputs, "outputs": {k: p.name for k, p in scan.outputs.items()},
            "shape": list(mask.shape), "model_grid_shape": list(loaded.image.shape),
            "preprocessing": loaded.preprocessing, "predicted": _now()}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


__all__ = ["RECORD_FORMAT", "RECORD_NAME", "Model", "PredictError", "channel_index", "find_scans",
           "load_model_and_data", "main", "make_parser", "predict_image", "run", "to_input_grid"]


if __name__ == "__main__":
    sys.exit(main())
