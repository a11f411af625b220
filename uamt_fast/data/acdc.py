"""ACDC (cardiac cine MRI) for ``prepare --preset acdc``: its two forms read into cases, and SSL4MIS's split.

Two forms, told apart by ``formats.acdc_form`` (the raw one where SRC holds both: it keeps the voxel size):

- **raw**, the challenge's download: ``patientXXX/`` folders in SRC or in its ``training/``, ``testing/`` or
  ``database/...`` (``formats.ACDC_RAW_FOLDERS``), each with ``Info.cfg`` (``ED: <frame>``, ``ES: <frame>``,
  Group, Height, NbFrame, Weight), ``patientXXX_frameYY.nii.gz`` and its label ``patientXXX_frameYY_gt.nii.gz``
  for the ED and the ES frame (``patientXXX_4d.nii.gz``, the whole cine, is not read). The ED frame is case
  ``patientXXX_frame01``, the ES frame ``patientXXX_frame02``, as SSL4MIS's lists name them (the frame numbers
  read are the record's ``split.frames``). Each case then goes through ``prepare.transform_case`` with the
  ``acdc`` preset (the file's own axes, this module's ``min_max``), as predict's scans do; its spacing (mm) is
  the NIfTI header's.
- **h5**, SSL4MIS's preprocessed release: ``data/patientXXX_frameYY.h5`` (``image`` and ``label`` (Z, Y, X),
  SimpleITK's order of the NIfTI array, the image min-max'ed by code/dataloaders/acdc_data_processing.py) and
  ``data/slices/patientXXX_frameYY_slice_K.h5`` (2D); a volume whose file ``data/`` lacks is stacked from its
  slices in K order. ``transform_h5_case`` stores it transposed to (X, Y, Z): the raw form's array exactly. The
  release keeps no voxel size, so its cases record none: their metrics are in voxels only (as SSL4MIS's own
  are; the raw form also gives mm), predict takes a NIfTI frame at any spacing, and the record's
  ``split.spacing`` says so. SRC's ``train.list``, ``train_slices.list``,
  ``val.list`` and ``test.list``, where present, must agree with SSL4MIS's split.

The split (``split``): SSL4MIS's by patient (``uamt_fast.data.acdc_split``) in its order: ``train.list`` its
training volumes (every one labeled; the trainer's ``--labeled-patients N`` labels the first N patients',
``labeled_cases``), ``val.list`` and ``test.list``. A folder with only some of the patients gets the split's
subset, in its order, and a note says so: no patient moves between lists, so a test patient never trains and a
reduced run is still honest (the note says its numbers are not the benchmark's). A patient folder outside the
split (the challenge's testing patients 101-150) is left out with a note. Labels: 0 background, 1 RV,
2 myocardium, 3 LV (ACDC's own values).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from uamt_fast import files
from uamt_fast.data import formats
from uamt_fast.data.acdc_split import LABELED_SLICES, PATIENTS
from uamt_fast.data.cases import read_h5_arrays
from uamt_fast.data.layout import DataError
from uamt_fast.data.presets import PRESETS

SOURCE = "HiLab-git/SSL4MIS @06df604 data/ACDC/{train,val,test}.list (kept in uamt_fast.data.acdc_split)"
PHASES = ("ED", "ES")  # case patientXXX_frame01, patientXXX_frame02
CHANNEL = "MRI"
VOLUME_FILE = re.compile(r"^patient\d{3}_frame\d{2}\.h5$")
SLICE_FILE = re.compile(r"^(?P<volume>patient\d{3}_frame\d{2})_slice_(?P<slice>\d+)\.h5$")
# The raw form's NIfTI files: a frame, its label (_gt) or the 4D cine (_4d)
NIFTI_FILE = re.compile(r"^(?P<patient>patient\d{3})_(?:frame\d{2}(?P<label>_gt)?|(?P<cine>4d))\.nii(?:\.gz)?$")
CLASSES = sorted(PRESETS["acdc"].labels.values())


def volume_ids(patients) -> list[str]:
    """SSL4MIS's case ids of ``patients`` (numbers), in order: ``patientNNN_frame01``, ``patientNNN_frame02``."""
    return [f"patient{n:03d}_frame{k:02d}" for n in patients for k in (1, 2)]


def split_lists() -> dict[str, list[str]]:
    """SSL4MIS's ``{"train": ids, "val": ids, "test": ids}``, each in its list's order (140 / 20 / 40)."""
    return {name: volume_ids(patients) for name, patients in PATIENTS.items()}


def labeled_cases(train_ids: list[str], patients: int) -> list[str]:
    """The volumes of the first ``patients`` patients of ``train_ids`` (train.list's order), as SSL4MIS's
    ``patients_to_slices`` takes the first lines of train_slices.list, which holds the same patients in the same
    order (``acdc_split.LABELED_SLICES``: its slice counts, 3 -> 68 and 7 -> 136 on the full set)."""
    order = list(dict.fromkeys(i.split("_frame")[0] for i in train_ids))
    if not 1 <= patients <= len(order):
        raise DataError(f"--labeled-patients {patients}: the training list holds {len(order)} patients")
    chosen = set(order[:patients])
    return [i for i in train_ids if i.split("_frame")[0] in chosen]


# ----------------------------------------------------------------------------- the two forms
def read_source(src, unlabeled_dir=None) -> formats.Source:
    """The cases of ``src`` in either form (the module docstring), those of SSL4MIS's split only."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    if unlabeled_dir is not None:
        raise DataError("--unlabeled: --preset acdc takes its unlabeled slices from the training patients past "
                        "--labeled-patients; it adds no folder")
    form = formats.acdc_form(src)
    if form is None:
        raise DataError(f"{src}: not an ACDC folder (no patientXXX/ folders of the challenge's raw form, no "
                        "data/*.h5 of SSL4MIS's release)")
    return read_raw(src) if form == "raw" else read_h5(src)


def read_raw(src: Path) -> formats.Source:
    """The challenge's folders: the ED and ES frame of each patient of the split, with their labels."""
    folders: dict[int, Path] = {}
    for folder in formats.acdc_patient_folders(src):
        number = int(formats.ACDC_PATIENT.match(folder.name)["number"])
        if number in folders:
            raise DataError(f"{folder}: patient {folder.name} is also {folders[number]}; keep one copy")
        folders[number] = folder
    in_split = {n for patients in PATIENTS.values() for n in patients}
    cases = []
    for number in sorted(folders.keys() & in_split):
        folder = folders[number]
        for k, (phase, frame) in enumerate(zip(PHASES, phase_frames(folder / "Info.cfg")), 1):
            stem = f"{folder.name}_frame{frame:02d}"
            what = f"the {phase} frame, Info.cfg's {phase}: {frame}"
            image, label = frame_file(folder, stem, what), frame_file(folder, f"{stem}_gt", f"the label of {what}")
            cases.append(formats.SourceCase(f"{folder.name}_frame{k:02d}", "labeled", (image,), label))
    source = formats.Source(src, "acdc-raw", [CHANNEL], None, cases)
    source.notes.append(f"{src}: ACDC's raw form; each patient's ED frame is case patientXXX_frame01 and its ES frame "
                        "patientXXX_frame02, as SSL4MIS names them (the frames read: dataset.json split.frames)")
    _note_outside(source, [f"patient{n:03d}" for n in sorted(folders.keys() - in_split)], "patient folder(s)")
    return source


def phase_frames(info: Path) -> tuple[int, int]:
    """(ED frame, ES frame) of an ACDC ``Info.cfg`` (``ED: 1`` and ``ES: 12`` lines, among others)."""
    try:
        text = info.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{info}: missing; each ACDC patient folder has an Info.cfg naming its ED and ES "
                        "frames") from None
    except OSError as e:
        raise DataError(f"{info}: cannot read it ({files.describe(e)})") from None
    fields = dict(m.groups() for line in text.splitlines() if (m := re.match(r"\s*(\w+)\s*:\s*(.*?)\s*$", line)))
    frames = []
    for phase in PHASES:
        value = fields.get(phase, "")
        if not (value.isascii() and value.isdigit() and int(value) >= 1):
            raise DataError(f"{info}: no '{phase}: <frame number>' line" + (f" ({phase}: {value!r})" if value else "")
                            + "; ACDC's Info.cfg names the ED and ES frames")
        frames.append(int(value))
    if frames[0] == frames[1]:
        raise DataError(f"{info}: ED and ES are both frame {frames[0]}; expected two frames")
    return frames[0], frames[1]


def not_a_frame(path: Path) -> str | None:
    """What an ACDC NIfTI file that is no frame is (a label, the 4D cine), in words; None for any other file."""
    match = NIFTI_FILE.match(Path(path).name)
    if match is None or not (match["label"] or match["cine"]):
        return None
    return "a label (ACDC's _gt file)" if match["label"] else "ACDC's 4D cine"


def frame_file(folder: Path, stem: str, what: str) -> Path:
    """``folder``'s ``{stem}.nii.gz`` (or ``.nii``); refused in one line naming it and ``what`` it is if absent."""
    for ending in formats.NIFTI_ENDINGS:
        if (folder / f"{stem}{ending}").is_file():
            return folder / f"{stem}{ending}"
    raise DataError(f"{folder / f'{stem}.nii.gz'}: missing ({what})")


def read_h5(src: Path) -> formats.Source:
    """SSL4MIS's release: a case per volume of the split found in ``data/`` or, stacked, in ``data/slices/``."""
    data = src / "data"
    volumes = {p.name[:-3]: p for p in _h5_files(data, VOLUME_FILE, "patientXXX_frameYY.h5")}
    slices: dict[str, dict[int, Path]] = {}
    for path in _h5_files(data / "slices", SLICE_FILE, "patientXXX_frameYY_slice_K.h5"):
        match = SLICE_FILE.match(path.name)
        slices.setdefault(match["volume"], {})[int(match["slice"])] = path
    _check_folder_lists(src)
    found = volumes.keys() | slices.keys()
    in_split = {i for ids in split_lists().values() for i in ids}
    cases = []
    for case_id in sorted(found & in_split):
        paths = (volumes[case_id],) if case_id in volumes else _slice_files(data / "slices", case_id, slices[case_id])
        cases.append(formats.SourceCase(case_id, "labeled", paths, paths[0]))  # (image and label in each file)
    source = formats.Source(src, "acdc-h5", [CHANNEL], None, cases)
    stacked = sum(len(c.images) > 1 for c in cases)
    source.notes.append(f"{src}: SSL4MIS's h5 form; it keeps no voxel size, so the cases record none (metrics in "
                        "voxels only, as SSL4MIS scores; prepare the raw form for mm)"
                        + (f"; {stacked} volume(s) stacked from data/slices (no data/<id>.h5)" if stacked else ""))
    _note_outside(source, sorted(found - in_split), "volume(s)")
    return source


def _h5_files(folder: Path, name: re.Pattern, expected: str) -> list[Path]:
    paths = [p for p in formats.visible_files(folder) if p.suffix == ".h5"]
    for path in paths:
        if not name.match(path.name):
            raise DataError(f"{path}: not named {expected} as SSL4MIS's h5 files are")
    return paths


def _slice_files(folder: Path, case_id: str, by_index: dict[int, Path]) -> tuple[Path, ...]:
    """The slices of one volume in order: numbered 0..n-1 or 1..n (SSL4MIS's lists start at 1), none missing."""
    first = min(by_index)
    gap = next((k for k in range(first, first + len(by_index)) if k not in by_index), None)
    if first not in (0, 1) or gap is not None:
        raise DataError(f"{folder / f'{case_id}_slice_{first if first not in (0, 1) else gap}.h5'}: slices of "
                        f"{case_id} numbered {sorted(by_index)[:3]}...; expected 0..n-1 or 1..n with none missing")
    return tuple(by_index[k] for k in sorted(by_index))


def _check_folder_lists(src: Path) -> None:
    """SRC's own lists, where present, name each volume in the list SSL4MIS's split puts it in."""
    home = {i: name for name, ids in split_lists().items() for i in ids}
    for file_name, name in (("train.list", "train"), ("train_slices.list", "train"), ("val.list", "val"),
                            ("test.list", "test")):
        path = src / file_name
        lines = path.read_text(encoding="utf-8", errors="replace").split() if path.is_file() else []
        wrong = next((line for line in lines if home.get(line.split("_slice_")[0]) != name), None)
        if wrong is not None:
            where = home.get(wrong.split("_slice_")[0])
            raise DataError(f"{path}: names {wrong}, which SSL4MIS's split puts in "
                            f"{f'{where}.list' if where else 'no list'}; --preset acdc uses SSL4MIS's split")


def _note_outside(source: formats.Source, names: list[str], what: str) -> None:
    if names:
        source.notes.append(f"{source.path}: {len(names)} {what} outside SSL4MIS's split (the challenge's 001-100) "
                            f"left out: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")


# ----------------------------------------------------------------------------- the split
def split(source: formats.Source, held: bool) -> tuple[dict, dict[str, str]]:
    """(the record's ``split``, each case's role: ``labeled`` / ``val`` / ``test``) for the cases of ``source``
    (``read_source``): SSL4MIS's lists, in their order, restricted to the cases found."""
    if held:
        raise DataError("--test-fraction / --test-count: --preset acdc uses SSL4MIS's test.list; drop the flag")
    have = {c.id for c in source.cases}
    lists = split_lists()
    order = {name: [i for i in ids if i in have] for name, ids in lists.items()}
    for name in ("train", "test"):
        if not order[name]:
            raise DataError(f"{source.path}: no patient of SSL4MIS's {name}.list (patients "
                            f"{', '.join(f'{n:03d}' for n in PATIENTS[name][:3])}, ...); --preset acdc needs one "
                            f"training and one test patient at least")
    if len(have) < sum(len(ids) for ids in lists.values()):
        counts = " / ".join(f"{len(order[n])}" for n in lists)
        source.notes.append(f"{source.path}: {len(have)} of the 200 volumes of SSL4MIS's split ({len(have) // 2} of "
                            f"its 100 patients): train / val / test {counts} volumes, its subset in its order; scores "
                            "are not the benchmark's (140 / 20 / 40)")
    frames = {c.id: {"phase": PHASES[int(c.id[-2:]) - 1], "frame": int(re.search(r"_frame(\d+)", c.images[0].name)[1])}
              for c in source.cases if source.layout == "acdc-raw"}
    record = {"seed": None, "source": SOURCE, "test": "SSL4MIS's test.list", "val": "SSL4MIS's val.list (for "
              "curves only, never to select a checkpoint)", "dropped": [], "order": {**order, "unlabeled": []},
              "train_order": "SSL4MIS's train.list, patient by patient: --labeled-patients N labels the first N",
              "labeled_slices": {str(k): v for k, v in LABELED_SLICES.items()},
              "spacing": ("each case's NIfTI header (mm)" if source.layout == "acdc-raw" else
                          "none in SSL4MIS's h5 release: metrics in voxels only"),
              **({"frames": frames} if frames else {})}
    roles = {i: role for name, role in (("train", "labeled"), ("val", "val"), ("test", "test")) for i in order[name]}
    return record, roles


# ----------------------------------------------------------------------------- a case
def min_max(image: np.ndarray, where) -> tuple[np.ndarray, dict]:
    """``(image - min) / (max - min)`` over the whole volume, as acdc_data_processing.py (SSL4MIS @06df604) does
    (in float64, stored float32), and its record; DataError naming ``where`` for a constant image."""
    lo, hi = float(image.min()), float(image.max())
    if not hi > lo:
        raise DataError(f"{where}: every voxel is {lo!r}; min-max scaling needs two values")
    scaled = ((np.asarray(image, np.float64) - lo) / (hi - lo)).astype(np.float32)
    return scaled, {"kind": "minmax", "min": lo, "max": hi, "range": [0.0, 1.0]}


# SSL4MIS's h5 arrays are (Z, Y, X): array index (z, y, x) is voxel (x, y, z) of the stored (X, Y, Z) volume, the
# affine of an h5 volume's own array onto that volume's grid (no voxel size: the release keeps none)
H5_AXES = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def h5_image(image: np.ndarray, where) -> tuple[np.ndarray, dict]:
    """An SSL4MIS (Z, Y, X) image as prepare stores it, (X, Y, Z) float32 min-max'ed, and its intensity record;
    DataError naming ``where`` unless it is all finite real numbers."""
    if not (np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image) and np.isfinite(image).all()):
        raise DataError(f"{where}: the image is not all finite real numbers (dtype {image.dtype})")
    return min_max(image.transpose(2, 1, 0), where)


def is_h5_volume(path: Path, in_data_root: bool) -> bool:
    """A volume file of SSL4MIS's release (``patientXXX_frameYY.h5``, outside a data root's layout: a prepared
    set's ``cases/`` holds the same names in (X, Y, Z))."""
    return not in_data_root and VOLUME_FILE.match(Path(path).name) is not None


def h5_volume_files(folder: Path) -> list[Path]:
    """The volume files of SSL4MIS's release in ``folder`` or in its ``data/`` (the release's root), sorted."""
    for where in (Path(folder), Path(folder) / "data"):
        found = sorted(f for f in where.glob("*.h5") if VOLUME_FILE.match(f.name)) if where.is_dir() else []
        if found:
            return found
    return []


def read_h5_volume(path: Path) -> np.ndarray:
    """The image of one SSL4MIS volume file on the grid prepare stores it on (``h5_image``), for predict."""
    image = read_h5_arrays(path, ("image",))["image"]
    if image.ndim != 3:
        raise DataError(f"{path}: image of shape {image.shape}; SSL4MIS's volume files hold image (Z, Y, X)")
    return h5_image(image, path)[0]


def is_h5_case(case: formats.SourceCase) -> bool:
    """A case of SSL4MIS's h5 form (``transform_h5_case`` prepares it), not a NIfTI one."""
    return case.images[0].suffix == ".h5"


def transform_h5_case(case: formats.SourceCase, role: str, src: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """One case of the h5 form read (its volume file, or its slices stacked), checked, transposed (Z, Y, X) ->
    (X, Y, Z) and min-max'ed, writing nothing: ``(image float32, label uint8, the case's record)``."""
    where = case.images[0] if len(case.images) == 1 else case.images[0].parent / f"{case.id}_slice_*.h5"
    arrays = [tuple(read_h5_arrays(path, ("image", "label")).values()) for path in case.images]
    rank = 3 if len(case.images) == 1 else 2
    shapes = {a.shape for pair in arrays for a in pair}
    if len(shapes) != 1 or len(next(iter(shapes))) != rank:
        raise DataError(f"{where}: image and label shapes {sorted(shapes)}; expected one "
                        f"{'(Z, Y, X)' if rank == 3 else '(Y, X)'} shape for both")
    image, label = (np.stack([pair[k] for pair in arrays]) if rank == 2 else arrays[0][k] for k in (0, 1))
    known = np.isin(label, CLASSES)
    if not known.all():
        raise DataError(f"{where}: label values {np.unique(label[~known])[:5].tolist()} are not ACDC's classes "
                        f"{CLASSES}")
    image, intensity = h5_image(image, where)
    label = np.ascontiguousarray(label.transpose(2, 1, 0), np.uint8)
    read = [str(p.relative_to(src)) for p in case.images]
    shape, identity = list(image.shape), np.eye(4).tolist()
    label_file = read[0] if len(read) == 1 else str(where.relative_to(src))  # (a slice stack: the pattern)
    record = {"role": role, "files": {"image": read, "label": label_file},
              "sha256": {name: files.sha256(p) for name, p in zip(read, case.images)},
              "axes_original": "(Z, Y, X), SSL4MIS's h5 order; stored transposed to (X, Y, Z)",
              "shape_original": shape, "shape": shape,  # (no spacing: the release keeps none)
              "affine_original": identity, "affine": identity, "crop_box": [[0, s] for s in shape],
              "intensity": intensity, "label_map": {str(v): v for v in CLASSES}}
    return np.ascontiguousarray(image), label, record



# ----------------------------------------------------------------------------- synthetic folders (tests, CPU runs)
SYNTHETIC_PATIENTS = (99, 38, 50, 100, 28, 11)  # 4 of SSL4MIS's training patients (its first), 1 val, 1 test


def write_synthetic(root, form: str = "raw", patients=SYNTHETIC_PATIENTS, shape=(32, 32, 6),
                    spacing=(1.5, 1.5, 10.0), seed: int = 0) -> Path:
    """A synthetic ACDC folder in ``form`` "raw" (the challenge's) or "h5" (SSL4MIS's release) of ``patients``
    (numbers; 101-150 go to ``testing/``): an ED and an ES frame each, ``shape`` (X, Y, Z) at ``spacing`` mm, an
    LV disc (3) in a myocardium ring (2) with a crescent RV (1) beside it on every slice but the first (an apex
    with none), smaller at ES; int16 intensities in noise. Raw: ``training/patientNNN/`` with Info.cfg (ES at
    frame 3 + NNN % 7, never 2), an LSA affine (not RAS: ``Orientationd`` would move the slice axis) and a 4D
    stub that must never be read. H5: what SSL4MIS's processing makes of
    the same frames (``data/<id>.h5``, ``data/slices/<id>_slice_K.h5`` from K = 1, its three lists). The same
    ``seed`` gives the same frames in both forms."""
    import h5py
    import nibabel

    root = Path(root)
    home = {n: name for name, numbers in PATIENTS.items() for n in numbers}
    lists: dict[str, list[str]] = {"train_slices": [], "val": [], "test": []}
    in_order = [n for numbers in PATIENTS.values() for n in numbers if n in patients]  # (the lists' order)
    for number in in_order + [n for n in patients if n not in home]:
        rng = np.random.default_rng([seed, number])
        name = f"patient{number:03d}"
        es = 3 + number % 7
        for k, frame in enumerate((1, es), 1):
            image, label = synthetic_frame(shape, k == 1, rng)
            if form == "raw":
                folder = root / ("training" if number <= 100 else "testing") / name
                folder.mkdir(parents=True, exist_ok=True)
                affine = np.array([[-spacing[0], 0, 0, 20.0], [0, 0, spacing[2], -30.0], [0, spacing[1], 0, 15.0],
                                   [0, 0, 0, 1.0]])  # (LSA: orienting it to RAS would move the slice axis)
                nibabel.save(nibabel.Nifti1Image(image, affine), str(folder / f"{name}_frame{frame:02d}.nii.gz"))
                nibabel.save(nibabel.Nifti1Image(label, affine), str(folder / f"{name}_frame{frame:02d}_gt.nii.gz"))
                (folder / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: NOR\nHeight: 175.0\nNbFrame: 20\n"
                                                 "Weight: 70.0\n")
                (folder / f"{name}_4d.nii.gz").write_bytes(b"a stub: prepare never reads the 4D cine")
                continue
            case_id = f"{name}_frame{k:02d}"
            volume, volume_label = min_max(image, case_id)[0].transpose(2, 1, 0), label.transpose(2, 1, 0)
            (root / "data" / "slices").mkdir(parents=True, exist_ok=True)
            with h5py.File(root / "data" / f"{case_id}.h5", "w") as f:
                f.create_dataset("image", data=volume)
                f.create_dataset("label", data=volume_label)
            for z in range(volume.shape[0]):
                with h5py.File(root / "data" / "slices" / f"{case_id}_slice_{z + 1}.h5", "w") as f:
                    f.create_dataset("image", data=volume[z])
                    f.create_dataset("label", data=volume_label[z])
            if home.get(number) == "train":
                lists["train_slices"] += [f"{case_id}_slice_{z + 1}" for z in range(volume.shape[0])]
            elif number in home:
                lists[home[number]].append(case_id)
    for name, ids in lists.items() if form == "h5" else ():
        (root / f"{name}.list").write_text("".join(f"{i}\n" for i in ids))
    return root


def synthetic_frame(shape, end_diastole: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(image int16, label uint8)`` (X, Y, Z) of one synthetic frame (``write_synthetic``)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    scale = min(shape[:2]) / 32
    lv = (5.0 if end_diastole else 4.0) * scale
    outer = lv + 3.0 * scale
    cx, cy = shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + rng.uniform(-1, 1)
    plane = np.zeros(shape[:2], np.uint8)
    plane[np.hypot(x - cx + outer, y - cy) < 0.9 * outer] = 1  # the RV: a disc beside the ring, less the ring
    plane[np.hypot(x - cx, y - cy) < outer] = 2
    plane[np.hypot(x - cx, y - cy) < lv] = 3
    label = np.repeat(plane[:, :, None], shape[2], axis=2)
    label[:, :, 0] = 0
    brightness = np.array([80.0, 420.0, 180.0, 520.0])
    image = np.rint(brightness[label] + rng.normal(0.0, 25.0, shape)).astype(np.int16)
    return image, label


__all__ = ["CHANNEL", "CLASSES", "H5_AXES", "NIFTI_FILE", "PHASES", "SOURCE", "SYNTHETIC_PATIENTS", "frame_file",
           "h5_image", "h5_volume_files", "is_h5_case", "is_h5_volume", "labeled_cases", "min_max", "not_a_frame",
           "phase_frames", "read_h5", "read_h5_volume", "read_raw", "read_source", "split", "split_lists",
           "synthetic_frame", "transform_h5_case", "volume_ids", "write_synthetic"]
