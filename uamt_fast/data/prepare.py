"""``python -m uamt_fast.data prepare SRC OUT [--preset NAME]``: any source folder -> the layout train.py reads.

SRC is a Decathlon, nnU-Net v2 raw or plain NIfTI folder (``uamt_fast.data.formats``), or with ``--preset acdc``
ACDC's raw folder or SSL4MIS's h5 release (``uamt_fast.data.acdc``: its split, val.list included). OUT gets::

    OUT/train.list, OUT/test.list, OUT/unlabeled.list (only when there are unlabeled cases), OUT/val.list (acdc)
    OUT/cases/<id>.h5                                image float32 (X, Y, Z), one input channel;
                                                     label uint8 (X, Y, Z) in 0..C-1 (none for unlabeled cases)
                                                     and 255 where not annotated (nnU-Net's "ignore" label)
    OUT/dataset.json                                 format "uamt_fast.prepared/1": classes, labels, channel,
                                                     "ignore_label": 255 when the source declares "ignore",
                                                     patch, strides and batch for train.py, split, the plan
                                                     (--preset auto) and per case everything done to it (to
                                                     map a prediction back)

Per case the record holds: ``role``; ``files`` (``image``: [the channel file read], ``label``: file or null)
and their ``sha256``; ``orientation_original`` (e.g. "LPS"), ``affine_original``, ``shape_original`` and
``spacing_original`` (mm along the source array's axes); ``orientation`` ("RAS"), ``spacing`` (mm along the
stored axes), ``shape_resampled`` (the grid after orientation and resampling), ``crop_box`` ([lo, hi) per
axis in that grid), ``shape`` and ``affine`` of the stored arrays; ``intensity`` (kind and parameters) and
``label_map`` (source value -> stored value). A prediction on the stored grid goes back to the source
image's grid by resampling it (nearest) from ``affine`` to ``shape_original`` / ``affine_original``.

``--preset auto`` (the default) plans from the data set before any case is written, as nnU-Net v2 does
(``uamt_fast.data.planning``): a fingerprint of the training cases (labeled and unlabeled; never a test case),
then the target spacing, the crop to the non-zero region, the normalisation (CT: clipped and z-scored with the
data set's foreground statistics; anything else: z-scored per case), patch, strides and batch; prepare prints
the plan and records it as ``plan`` (each decision with its value and how it was derived). The other presets
(``uamt_fast.data.presets``) are fixed benchmark settings; ``none`` only orients and checks.

Each case, with MONAI's transforms: ``Orientationd`` to RAS; ``Spacingd`` to the preset's (or plan's) spacing
(image bilinear, label nearest); a CT window ``ScaleIntensityRanged`` to [0, 1]; ``CropForegroundd`` on the
image (never on a label: its positive voxels after the window, or with auto its non-zero voxels); an MR z-score
``NormalizeIntensityd`` with the statistics recorded, or auto's normalisation (``planning.normalize``). An
unlabeled case is never given a label file to open: its ``SourceCase.label`` is None from ``formats`` on.

Writes are crash-safe: each h5 is written under a temporary name and renamed; ``dataset.json`` and then
the lists (``train.list`` last) are written after every case, each atomically. A prepare that stops early
leaves no list, so nothing reads its cases. MONAI and nibabel are the optional extra ``uamt_fast[data]``
and are imported only when a prepare runs.

The presets live in ``uamt_fast.data.presets``, the auto plan in ``uamt_fast.data.planning``; OUT while a
prepare runs (its lock, the staging folder, the swap) in ``uamt_fast.data.output_folder``.
"""
from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uamt_fast import cli, files, progress
from uamt_fast.data import acdc, formats, layout, planning
from uamt_fast.data.affine import voxel_sizes
from uamt_fast.data.layout import DataError
from uamt_fast.data.output_folder import LISTS, OutputFolder
from uamt_fast.data.presets import PRESETS, Preset

FORMAT = layout.RECORD_FORMAT
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world axes (nibabel's convention): RAS+
IGNORE_NAME = "ignore"  # nnU-Net v2's reserved label name: voxels not annotated (stored as layout.IGNORE_LABEL)
AUTO_TEST_FRACTION = 0.2  # the hold-out without imagesTs or a flag: the LA release's 20 test of 100 scans


@dataclass
class Plan:
    """Everything decided before the cases are read: what to do to each case and where it goes."""

    preset_name: str
    preset: Preset
    source: formats.Source
    channel_index: int
    channel_name: str
    allowed: set[int] | None  # source label values a label file may hold; None: any integer >= 0
    lut: dict[int, int] | None  # source value -> target value; None: foreground (> 0 -> 1)
    labels: dict[str, int]
    roles: dict[str, str]  # case id -> role
    split: dict
    ignore: int | None = None  # source value of nnU-Net's "ignore" label (stored as layout.IGNORE_LABEL); None: none
    data_plan: dict | None = None  # --preset auto: the plan made from the data (planning.make_plan); else None


# ----------------------------------------------------------------------------- the command
def add_command(commands, fmt: dict) -> None:
    """The ``prepare`` subcommand of ``python -m uamt_fast.data``."""
    p = commands.add_parser("prepare", help="turn an MSD, nnU-Net or NIfTI folder into the layout train.py reads",
                            description="Turn a Medical Segmentation Decathlon, nnU-Net v2 raw or plain NIfTI folder "
                            "into the layout train.py reads (h5 cases, train.list, test.list, unlabeled.list) and a "
                            "dataset.json record of every step. Needs pip install 'uamt_fast[data]'.", **fmt)
    p.add_argument("src", help="source folder (dataset.json + imagesTr/labelsTr/imagesTs, or NIfTI files)")
    p.add_argument("out", help="output folder (created; refused if it holds a prepared set, unless --overwrite)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="auto",
                   help="auto: spacing, intensity, crop, patch, strides planned from the data as nnU-Net v2 does; "
                   "la, pancreas, brats2019: a benchmark's fixed settings (the LA h5 release needs no prepare; la is "
                   "LA exported to NIfTI); acdc: ACDC's raw folder or SSL4MIS's h5 release, SSL4MIS's split and "
                   "preprocessing; none: orientation and the checks only (default: auto)")
    p.add_argument("--channel", action="append", metavar="NAME|INDEX",
                   help="the input channel, by name (dataset.json) or index (default: the preset's, or the only one)")
    p.add_argument("--unlabeled", metavar="DIR", help="a folder of NIfTI images to add as unlabeled cases")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--test-fraction", type=cli.number(float, "(0, 1)"), metavar="F",
                      help="hold out this fraction in (0, 1) of the labeled cases as test cases (when SRC has no "
                      "imagesTs + labelsTs)")
    held.add_argument("--test-count", type=cli.number(int, ">= 1"), metavar="N",
                      help="hold out N >= 1 labeled cases as test cases (when SRC has no imagesTs + labelsTs)")
    p.add_argument("--seed", type=cli.number(int, ">= 0"), default=0, metavar="S",
                   help="seed >= 0 of the hold-out draw (default: 0)")
    p.add_argument("--workers", type=cli.number(int, "[1, 64]"), default=min(4, os.cpu_count() or 1), metavar="W",
                   help="cases prepared at once, in [1, 64] (default: min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared set already in OUT")


def run(args) -> int:
    """Run ``prepare`` from parsed arguments: 0, or 2 after one line on stderr for bad input. (It prints the
    error itself: under ``python -m uamt_fast.data`` the caller's DataError is ``__main__``'s, not this one.)"""
    try:
        record, seconds = progress.timed(prepare, args.src, args.out, args.preset, channel=args.channel,
                                         unlabeled=args.unlabeled, test_fraction=args.test_fraction,
                                         test_count=args.test_count, seed=args.seed, workers=args.workers,
                                         overwrite=args.overwrite)
    except (DataError, files.FolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    roles = [c["role"] for c in record["cases"].values()]
    val = f"{roles.count('val')} val, " if "val" in roles else ""  # (acdc: SSL4MIS's val.list)
    print(f"prepared {roles.count('labeled')} labeled, {roles.count('unlabeled')} unlabeled, {val}"
          f"{roles.count('test')} test cases ({record['num_classes']} classes, channel {record['channel']!r}, preset "
          f"{args.preset}) in {args.out} in {seconds:.1f} s; test cases: {', '.join(record['split']['order']['test'])} "
          f"({record['split']['test']})")
    return 0


def prepare(src, out, preset: str = "auto", *, channel=None, unlabeled=None, test_fraction=None, test_count=None,
            seed: int = 0, workers: int = 1, overwrite: bool = False) -> dict:
    """Prepare ``src`` into ``out`` (see the module docstring); returns the dataset.json record. With ``auto``
    the plan is printed (stdout) before any case is written."""
    _require_extra()
    src, out = Path(src), Path(out)
    if preset not in PRESETS:
        raise DataError(f"--preset {preset!r}: not one of {sorted(PRESETS)}")
    source = acdc.read_source(src, unlabeled) if preset == "acdc" else formats.read_source(src, unlabeled)
    if src.resolve() == out.resolve() or src.resolve() in out.resolve().parents:
        raise DataError(f"output folder {out} is inside the source folder {src}; choose a folder outside it")
    plan = _plan(preset, source, channel, test_fraction, test_count, seed, workers)
    for line in planning.describe(plan.data_plan) if plan.data_plan is not None else []:
        print(line, flush=True)
    for note in source.notes:  # images added as unlabeled (formats), classes merged, test cases drawn (_split)
        print(note, flush=True)
    with OutputFolder(out, overwrite, list(plan.roles)) as target:  # one prepare a folder; the old set until the end
        cases = [c for c in source.cases if c.id in plan.roles]
        print(f"preparing {len(cases)} cases:", flush=True)
        records = _prepare_all(cases, plan, target.staging, workers)
        record = _record(plan, source, src, cases, records)
        target.write_record(record, {name: plan.split["order"].get(name.split(".")[0], []) for name in LISTS})
        target.swap_in()
    return record


def _record(plan: Plan, source: formats.Source, src: Path, cases, records: dict) -> dict:
    p = plan.preset
    record = {"format": FORMAT, "preset": plan.preset_name, "num_classes": len(plan.labels), "labels": plan.labels,
              **({} if plan.ignore is None else {"ignore_label": layout.IGNORE_LABEL}),  # not annotated: no class
              "channel": plan.channel_name,
              "train": {"patch": list(p.patch), "eval_stride_xy": p.stride_xy, "eval_stride_z": p.stride_z,
                        "batch_labeled": p.batch_labeled, "batch_unlabeled": p.batch_unlabeled, **p.protocol},
              **({} if plan.data_plan is None else {"plan": plan.data_plan}),  # --preset auto: what and how
              "source": {"path": str(src.resolve()), "layout": source.layout}, "split": plan.split,
              "cases": {c.id: records[c.id] for c in cases}}
    return record


def _require_extra() -> None:
    try:
        import monai  # noqa: F401
        import nibabel  # noqa: F401
    except ImportError as e:
        raise DataError(f"prepare needs nibabel and MONAI ({e.name or 'import'} is missing): "
                        f"pip install 'uamt_fast[data]'") from None


# ----------------------------------------------------------------------------- the plan
def _plan(preset_name: str, source: formats.Source, channel, test_fraction, test_count, seed, workers=1) -> Plan:
    preset = PRESETS[preset_name]
    index, name = _pick_channel(source, preset, channel)
    allowed, lut, labels, ignore = _label_plan(preset_name, preset, source)
    if preset_name == "acdc":  # SSL4MIS's fixed split by patient (with its val.list)
        split, roles = acdc.split(source, test_fraction is not None or test_count is not None)
    else:
        split, roles = _split(preset, source, test_fraction, test_count, seed)
    plan = Plan(preset_name, preset, source, index, name, allowed, lut, labels, roles, split, ignore)
    if preset_name == "auto":  # planned from the training cases (labeled, unlabeled), read and checked once each
        def read(case):
            _, image, affine, label, _ = _read_case(case, plan)
            return image, affine, label, plan.ignore

        training = [c for c in source.cases if roles.get(c.id) in ("labeled", "unlabeled")]
        print(f"fingerprint of the {len(training)} training cases (read once each):", flush=True)
        found = planning.fingerprint(training, read, workers, progress.CaseProgress(len(training)).finished)
        plan.data_plan = planning.make_plan(found, name, source.layout != "nifti")  # plain NIfTI names no channel
        plan.preset = planning.preset_of_plan(plan.data_plan)
    return plan


def _pick_channel(source: formats.Source, preset: Preset, channel) -> tuple[int, str]:
    names = source.channel_names
    asked = [part.strip() for c in channel or [] for part in str(c).split(",") if part.strip()]
    if len(asked) > 1:
        raise DataError(f"--channel names {len(asked)} channels ({', '.join(asked)}); the trainer reads one input "
                        f"channel: give one --channel")
    wanted = asked[0] if asked else preset.channel
    if wanted is None:  # (a preset that names its channel, brats2019's FLAIR, gets that one or a refusal)
        if len(names) > 1:
            raise DataError(f"{source.path} has {len(names)} input channels ({', '.join(names)}); the trainer reads "
                            f"one channel: choose it with --channel NAME|INDEX")
        return 0, names[0]
    if wanted.isdigit() and int(wanted) < len(names) and wanted not in names:
        return int(wanted), names[int(wanted)]
    found = [k for k, n in enumerate(names) if n.lower() == wanted.lower()]
    if not found:
        raise DataError(f"{'--channel' if asked else 'preset channel'} {wanted!r}: not a channel of {source.path} "
                        f"(channels: {', '.join(f'{k}={n}' for k, n in enumerate(names))})"
                        + ("" if asked else f"; if one of them is the {wanted} scan, name it with --channel"))
    return found[0], names[found[0]]


def _label_plan(preset_name: str, preset: Preset, source: formats.Source):
    """(allowed source values or None, source -> target lookup or None for foreground, target labels, the
    source value of the ignore label or None).

    nnU-Net v2's ignore label (a label named exactly "ignore" in dataset.json, nnU-Net's
    documentation/ignore_label.md): voxels that are not annotated. It must be the highest label value; it is
    no class (the class count leaves it out) and is stored as ``layout.IGNORE_LABEL``, which the losses and
    metrics leave out. A preset that merges the classes (brats2019: whole tumour) says which in ``source.notes``."""
    declared, ignore = source.labels, None
    if declared and IGNORE_NAME in declared:
        ignore, highest = declared[IGNORE_NAME], max(declared.values())
        if ignore != highest:
            raise DataError(f"{source.path / 'dataset.json'}: field 'labels': \"{IGNORE_NAME}\" is {ignore}, but "
                            f"the ignore label must be the highest label value (here {highest}); give it "
                            f"{highest + 1} or more (nnU-Net v2's rule)")
        declared = {n: v for n, v in declared.items() if n != IGNORE_NAME}
    extra = {} if ignore is None else {ignore: layout.IGNORE_LABEL}
    if preset.foreground:  # whole tumour: any declared values, every value > 0 -> 1
        lut = None if ignore is None else {v: int(v > 0) for v in declared.values()} | extra
        merged = [f"{n} ({v})" for n, v in sorted((declared or {}).items(), key=lambda kv: kv[1]) if v > 0]
        target = next(n for n, v in preset.labels.items() if v == 1)
        source.notes.append(f"preset {preset_name}: every label > 0 becomes class 1, {target!r}: "
                            + (f"{', '.join(merged)} merged" if merged else "the label files' values > 0 merged")
                            + "; --preset auto keeps each class")
        return (set(declared.values()) | set(extra) if declared else None), lut, dict(preset.labels), ignore
    if preset.labels is not None:
        values = set(preset.labels.values())
        if declared and not set(declared.values()) <= values:
            raise DataError(f"{source.path / 'dataset.json'}: labels {declared} do not fit preset {preset_name} "
                            f"({preset.labels}); use --preset none to keep the source's classes")
        return values | set(extra), {v: v for v in values} | extra, dict(preset.labels), ignore
    if declared is None:  # plain NIfTI: the classes are the values the label files hold
        values = sorted(_observed_values(source))
        declared = {"background" if v == 0 else f"label_{v}": v for v in values}
        if 0 not in values:
            declared = {"background": 0, **declared}
    ordered = sorted(declared.items(), key=lambda kv: kv[1])
    if not 2 <= len(ordered) <= 255:
        raise DataError(f"{source.path}: {len(ordered)} classes ({', '.join(n for n, _ in ordered)}); the trainer "
                        f"needs 2..255 (background and at least one class, stored as uint8)")
    lut = {v: k for k, (_, v) in enumerate(ordered)} | extra
    return set(lut), lut, {name: k for k, (name, _) in enumerate(ordered)}, ignore


def _observed_values(source: formats.Source) -> set[int]:
    values: set[int] = set()
    for case in source.cases:
        if case.label is not None:  # never an unlabeled case's: it has none
            label, _ = formats.read_volume(case.label)
            values |= set(_integer_values(label, case.label).tolist())
    return values


def _split(preset: Preset, source: formats.Source, test_fraction, test_count, seed) -> tuple[dict, dict]:
    """The case lists (``split["order"]``), how the test cases were chosen, and each case's role.

    The test cases: imagesTs with labelsTs where SRC has them; else --test-count / --test-fraction; else the
    preset's fixed split (pancreas); else the automatic hold-out, ``AUTO_TEST_FRACTION`` of the labeled cases
    (at least 1, leaving at least 1), drawn as the flags draw (seeded by --seed) and named in ``source.notes``."""
    dropped = sorted(c.id for c in source.cases if preset.drop and _number(c.id, None) in preset.drop)
    cases = [c for c in source.cases if c.id not in dropped]
    labeled = sorted(c.id for c in cases if c.role == "labeled")
    unlabeled = sorted(c.id for c in cases if c.role == "unlabeled")
    given_test = sorted(c.id for c in cases if c.role == "test")
    held = test_fraction is not None or test_count is not None
    split: dict = {"seed": None}
    if given_test:
        if held:
            raise DataError(f"{source.path} has imagesTs with labelsTs (the test cases); --test-fraction / "
                            f"--test-count would hold out more: drop the flag")
        test, train, split["test"] = given_test, labeled, "imagesTs with labelsTs"
    elif held or not preset.split:  # a seeded draw: the flag's count, else the automatic hold-out
        if held:
            n = test_count if test_count is not None else round(test_fraction * len(labeled))
            who = "--test-count" if test_count is not None else "--test-fraction"
            how = f"--test-count {n}" if test_count is not None else f"--test-fraction {test_fraction}"
        else:  # the LA release's own proportion (80 training, 20 test scans), at least 1, leaving at least 1
            n = min(max(1, round(AUTO_TEST_FRACTION * len(labeled))), len(labeled) - 1)
            who = "the automatic hold-out (the default without imagesTs and labelsTs)"
            how = f"automatic hold-out: {AUTO_TEST_FRACTION:.0%} of the labeled cases, at least 1, leaving at least 1"
        if not 1 <= n < len(labeled):
            raise DataError(f"{source.path}: {who} holds out {n} of {len(labeled)} labeled cases; need at least 1 "
                            "test and 1 training case" + ("" if held else " (add labeled cases, or test cases in "
                                                                           "imagesTs with labelsTs)"))
        drawn = np.random.default_rng(seed).permutation(len(labeled))[:n]
        test = sorted(labeled[k] for k in drawn)
        train = [i for i in labeled if i not in set(test)]
        split.update(test=f"{how}: {n} of {len(labeled)} labeled cases drawn with numpy default_rng(seed)"
                          f".permutation of the sorted ids", seed=seed)
        if not held:
            source.notes.append(f"test cases: {', '.join(test)} ({n} of {len(labeled)} labeled cases held out: "
                                f"{AUTO_TEST_FRACTION:.0%}, seed {seed}; --test-count N / --test-fraction F / --seed S "
                                "draw others)")
    else:
        train, test = _preset_split(preset, labeled, source)
        split["test"] = "the preset's fixed split"
    if not train:
        raise DataError(f"{source.path}: no labeled training case left after taking the test cases")
    fixed = preset.split and not held and not given_test
    split.update(dropped=dropped, order={"train": train, "test": test, "unlabeled": unlabeled},
                 train_order="the preset's list order" if fixed else "sorted ids")
    roles = {**{i: "labeled" for i in train}, **{i: "test" for i in test}, **{i: "unlabeled" for i in unlabeled}}
    return split, roles


def _preset_split(preset: Preset, labeled: list[str], source: formats.Source) -> tuple[list[str], list[str]]:
    numbers = {_number(i, source.path): i for i in labeled}
    train_n, test_n = preset.split
    unknown = sorted(i for n, i in numbers.items() if n not in train_n and n not in test_n)
    if unknown:
        raise DataError(f"{source.path}: case {unknown[0]} is in neither list of the preset's split "
                        f"(case numbers {min(train_n + test_n)}..{max(train_n + test_n)})")
    return [numbers[n] for n in train_n if n in numbers], [numbers[n] for n in test_n if n in numbers]


def _number(case_id: str, where) -> int | None:
    """The case number at the end of an id (``image0025``, ``PANCREAS_0025`` -> 25)."""
    match = re.search(r"(\d+)$", case_id)
    if match is None and where is not None:
        raise DataError(f"{where}: case id {case_id!r} ends in no case number; the preset's split names cases by "
                        f"number (image0001 ... image0082)")
    return int(match[1]) if match else None


# ----------------------------------------------------------------------------- the cases
def _prepare_all(cases, plan: Plan, staging: Path, workers: int) -> dict[str, dict]:
    """Prepare every case into the staging folder in a thread pool (nibabel, zlib, torch and h5py release the
    GIL for the heavy parts); a line a case on stdout as it finishes (``[3/20] case_003 4.1 s (ETA ...)``,
    counted in the order they finish). On the first error the other cases are cancelled (the caller removes the
    staging folder)."""
    records, shown = {}, progress.CaseProgress(len(cases))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(cases)))) as pool:
        futures = {pool.submit(progress.timed, _prepare_case, case, plan, staging): case for case in cases}
        try:
            for future in as_completed(futures):
                case = futures[future]
                records[case.id], seconds = future.result()
                shown.finished(case.id, seconds)
        except BaseException:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True)
            raise
    return records


def _prepare_case(case: formats.SourceCase, plan: Plan, out: Path) -> dict:
    """Read, check, transform and write one case; returns its record for dataset.json."""
    image, label, record = acdc.transform_h5_case(case, plan.roles[case.id], plan.source.path) \
        if acdc.is_h5_case(case) else transform_case(case, plan)  # (acdc's h5 form: no NIfTI to read)
    _write_case(out, case.id, image, label)
    return record


def transform_case(case: formats.SourceCase, plan: Plan) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read, check and transform one case as the module docstring says, writing nothing: ``(image float32,
    label uint8 or None, the case's record for dataset.json)``. ``uamt_fast.predict`` runs new scans through
    it (a case with no label) so that they get exactly the preprocessing the model's data had."""
    import nibabel
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        ClipIntensityPercentilesd,
        CropForegroundd,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    p = plan.preset
    image_file, image, affine, label, values = _read_case(case, plan)
    read = {"image": [_rel(image_file, plan.source.path)], "label": None}
    hashes = {read["image"][0]: files.sha256(image_file)}
    d = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image, np.float32)[None]),
                             affine=torch.from_numpy(affine))}
    label_map = None
    if label is not None:  # labeled and test cases only
        lut = plan.lut if plan.lut is not None else {v: int(v > 0) for v in values}
        label_map = {str(v): lut[v] for v in sorted(lut)}
        target = np.zeros(label.shape, np.uint8)
        for v in values:
            target[label == v] = lut[v]
        read["label"] = _rel(case.label, plan.source.path)
        hashes[read["label"]] = files.sha256(case.label)
        d["label"] = MetaTensor(torch.from_numpy(target[None].astype(np.float32)), affine=torch.from_numpy(affine))
    keys = list(d)
    if p.orientation is not None:  # (acdc keeps the file's axes: the short-axis slices stay on the last one)
        d = Orientationd(keys, axcodes=p.orientation, labels=RAS_LABELS)(d)
    if p.spacing is not None:
        modes = ["bilinear", "nearest"][: len(keys)]
        d = Spacingd(keys, pixdim=p.spacing, mode=modes, padding_mode="border", dtype=np.float32)(d)
    shape_resampled = list(d["image"].shape[1:])
    intensity = {"kind": p.intensity["kind"]}
    if p.intensity["kind"] == "ct_window":
        lo, hi = p.intensity["window"]
        d = ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(d)
        intensity.update(window=[lo, hi], range=[0.0, 1.0])
    crop_box = [[0, s] for s in shape_resampled]
    if p.crop:  # the image's positive voxels (body after the CT window, brain in MR) or, with auto, its
        # non-zero ones on the raw intensities (nnU-Net crop_to_nonzero, before its normalisation): never the label.
        # (nnU-Net crops and normalises before it resamples; here every preset resamples first, so crop_box is in
        # the resampled grid for all; the bilinear resampling moves the non-zero border by at most a voxel.)
        select = {"select_fn": lambda x: x != 0} if p.crop == "nonzero" else {}  # (MONAI's default: x > 0)
        d = CropForegroundd(keys, source_key="image", allow_smaller=True, **select)(d)
        crop_box = [[int(a), int(b)] for a, b in zip(d["foreground_start_coord"], d["foreground_end_coord"])]
        if any(b <= a for a, b in crop_box):
            raise DataError(f"{image_file}: no {'non-zero' if p.crop == 'nonzero' else 'positive'} voxel to crop "
                            f"to after the {p.intensity['kind']} step")
    if p.intensity["kind"] == "zscore":
        percentile = p.intensity["clip_percentile"]
        upper = float(np.percentile(d["image"].numpy(), percentile))
        d = ClipIntensityPercentilesd("image", lower=None, upper=percentile)(d)
        voxels = d["image"].numpy()
        voxels = voxels[voxels > 0]
        if voxels.size < 2 or not voxels.std() > 0:
            raise DataError(f"{image_file}: fewer than two distinct positive voxels; cannot z-score it")
        mean, std = float(voxels.mean()), float(voxels.std())
        d = NormalizeIntensityd("image", subtrahend=mean, divisor=std)(d)
        intensity.update(over="voxels > 0", mean=mean, std=std, clip_percentile=percentile, clip_upper=upper)
    out_image = np.ascontiguousarray(d["image"].numpy()[0], np.float32)
    if p.intensity["kind"] in ("ct_normalization", "zscore_normalization"):  # auto's plan, after the crop as nnU-Net's
        out_image, used = planning.normalize(out_image, p.intensity)
        intensity.update(used)
    if p.intensity["kind"] == "minmax":  # acdc: per volume to [0, 1], as SSL4MIS
        out_image, used = acdc.min_max(out_image, image_file)
        intensity.update(used)
    out_label = None if "label" not in d else np.ascontiguousarray(np.rint(d["label"].numpy()[0]), np.uint8)
    if not np.isfinite(out_image).all():
        raise DataError(f"{image_file}: non-finite values after the {p.intensity['kind']} step")
    final_affine = np.asarray(d["image"].affine, np.float64)
    record = {"role": plan.roles[case.id], "files": read, "sha256": hashes,
              "orientation_original": "".join(nibabel.aff2axcodes(affine)),
              "orientation": p.orientation or "".join(nibabel.aff2axcodes(affine)),
              "affine_original": affine.tolist(), "shape_original": list(image.shape),
              "spacing_original": voxel_sizes(affine).tolist(), "spacing": voxel_sizes(final_affine).tolist(),
              "shape_resampled": shape_resampled, "crop_box": crop_box, "shape": list(out_image.shape),
              "affine": final_affine.tolist(), "intensity": intensity, "label_map": label_map}
    return out_image, out_label, record


def _read_case(case: formats.SourceCase, plan: Plan):
    """``(image file, image, affine, label or None, the label's distinct values or None)`` of one case, read
    (the plan's channel) and checked: the image (``_check_image``) and, where the case has one, its label
    against the image's grid and the plan's label values (``_check_label``)."""
    image_file = case.images[0] if case.channels_in_file else case.images[plan.channel_index]
    image, affine = formats.read_volume(image_file, plan.channel_index if case.channels_in_file else None)
    _check_image(image, image_file)
    if case.label is None:
        return image_file, image, affine, None, None
    label, label_affine = formats.read_volume(case.label)
    return image_file, image, affine, label, _check_label(label, label_affine, image.shape, affine, case.label, plan)


def _check_image(image: np.ndarray, path: Path) -> None:
    if not (np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image)):
        raise DataError(f"{path}: image dtype {image.dtype}; expected real numbers")
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(f"{path}: image has {int(image.size - finite.sum())} NaN or Inf voxels")
    if image.min() == image.max():
        raise DataError(f"{path}: an empty image (every voxel is {image.flat[0]!r})")


def _check_label(label, label_affine, shape, affine, path: Path, plan: Plan) -> list[int]:
    if label.shape != shape:
        raise DataError(f"{path}: label shape {label.shape} != image shape {shape}")
    if not np.allclose(label_affine, affine, rtol=0, atol=1e-3):
        raise DataError(f"{path}: label affine differs from the image's (max |difference| "
                        f"{np.abs(label_affine - affine).max():.3g} mm); image and label must share one grid")
    values = _integer_values(label, path).tolist()
    bad = [v for v in values if v < 0 or (plan.allowed is not None and v not in plan.allowed)]
    if bad:
        where = "the declared labels" + (" (dataset.json)" if plan.source.labels else " of the preset")
        raise DataError(f"{path}: label values {bad[:5]} not in {where} {sorted(plan.allowed or [])}")
    return values


def _integer_values(label: np.ndarray, path: Path) -> np.ndarray:
    """The distinct values of ``label``; ``.tolist()`` gives each as its true Python int (an integer label keeps
    its own dtype: a uint64 2**64 - 1 is that value, not -1 as it would be in int64)."""
    if label.dtype == bool:
        return np.unique(label).astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        if not np.isfinite(label).all() or (label != np.round(label)).any():
            raise DataError(f"{path}: label holds non-integer values (dtype {label.dtype}); expected class values")
        return np.array([int(v) for v in np.unique(label).tolist()], dtype=object)
    return np.unique(label)


def _write_case(out: Path, case_id: str, image: np.ndarray, label: np.ndarray | None) -> None:
    """``cases/<id>.h5`` (``layout.prepared_case_path``) through ``files.atomic_write_h5``: a reader never sees a
    half-written file."""
    def fill(f):
        f.create_dataset("image", data=image, compression="gzip", compression_opts=1)
        if label is not None:
            f.create_dataset("label", data=label, compression="gzip", compression_opts=1)

    final = layout.prepared_case_path(out, case_id)
    try:
        files.subfolder(out, layout.CASES_DIR)
        files.atomic_write_h5(final, fill)
    except (OSError, files.FolderError) as e:
        raise DataError(f"{final}: cannot write it ({files.describe(e) if isinstance(e, OSError) else e})") from None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path.resolve())


__all__ = ["FORMAT", "PRESETS", "Plan", "Preset", "add_command", "prepare", "run", "transform_case"]
