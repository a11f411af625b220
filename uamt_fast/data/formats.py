"""Source data sets as people have them: which files make each case, and in which role.

Three layouts, told apart by ``SRC/dataset.json``:

- **msd** (Medical Segmentation Decathlon): ``dataset.json`` with ``training`` (a list of
  ``{"image", "label"}``, paths relative to SRC) and ``test`` (image paths, or ``{"image"}`` entries);
  ``imagesTr/``, ``labelsTr/``, ``imagesTs/``. A multi-modal MSD image is one 4D file whose last axis
  holds the ``modality`` channels. A ``training`` entry with no ``label`` (``{"image": path}``) is an unlabeled
  case, and so is an image of ``imagesTr`` that ``training`` leaves out (``Source.notes`` says how many; a label
  file that ``training`` leaves out is still refused: its case would be neither labeled nor unlabeled).
- **nnunet** (nnU-Net v2 raw): ``dataset.json`` with ``channel_names`` (v1: ``modality``), ``labels``
  (name -> value) and ``file_ending``; ``imagesTr/{case}_{XXXX}{file_ending}``, one 3D file per channel;
  ``labelsTr/{case}{file_ending}``. An image with no label file is an unlabeled case.
- **nifti** (no ``dataset.json``): ``imagesTr/`` (or SRC itself) of ``.nii`` / ``.nii.gz`` files and
  ``labelsTr/`` with the same names; channel files ``{case}_{XXXX}`` as in nnU-Net when every image
  is named so. An image with no label file is an unlabeled case.

Two more forms are recognised here and read by ``uamt_fast.data.acdc`` (``--preset acdc``): ACDC's raw
challenge folder (``patientXXX/`` folders, ``acdc_patient_folders``) and SSL4MIS's preprocessed h5 release
(``data/*.h5``, ``data/slices/*.h5``); ``acdc_form`` tells them apart, and any other preset is refused on them
in one line that names ``--preset acdc``.

In every layout ``imagesTs/`` with ``labelsTs/`` (the common extension of both) are the test cases; a
folder given as ``--unlabeled DIR`` adds unlabeled cases. An unlabeled case has ``label = None`` here,
so nothing downstream can open a label file for it.

Hidden files (a name starting with ``.``: ``.DS_Store``, macOS's ``._x.nii.gz``) are skipped in every folder of
every layout. Everything wrong with a folder is a ``DataError`` of one line naming the file: a list naming a
missing file, a file the list does not name, a case id that is a path, a case in both training and test, ...
Only ``read_volume`` needs nibabel; the rest reads file names and JSON. The naming rules (``nifti_files``,
``strip_ending``, ``group_channels``, ``CHANNEL_SUFFIX``) are public: ``uamt_fast.predict`` reads its input
scans by the same rules as ``prepare`` reads a source.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uamt_fast.data import layout
from uamt_fast.data.affine import check_affine  # (re-exported: the check read_volume makes of every affine)
from uamt_fast.data.layout import DataError, check_case_id
from uamt_fast.files import read_json

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's {case}_{XXXX}
ACDC_PATIENT = re.compile(r"^patient(?P<number>\d{3})$")  # ACDC's patient folders: patient001 ... patient150
# Where ACDC's patient folders are: SRC itself (its training/ folder given), or the challenge's training/ and
# testing/ folders (patients 001-100 and 101-150), bare or under the release's database/.
ACDC_RAW_FOLDERS = (".", "training", "testing", "database/training", "database/testing")


@dataclass(frozen=True)
class SourceCase:
    """One case of a source folder: its image file(s) (one per channel, or one 4D file) and its label."""

    id: str
    role: str  # "labeled" | "unlabeled" | "test"
    images: tuple[Path, ...]
    label: Path | None  # None for an unlabeled case, always
    channels_in_file: bool = False  # MSD multi-modal: one 4D file holds every channel


@dataclass
class Source:
    """A source folder: its layout, its channels, its declared labels (name -> value, or None) and cases."""

    path: Path
    layout: str  # "msd" | "nnunet" | "nifti"
    channel_names: list[str]
    labels: dict[str, int] | None
    cases: list[SourceCase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, for the user: what was read not as written

    def by_role(self, role: str) -> list[SourceCase]:
        return [c for c in self.cases if c.role == role]


# ----------------------------------------------------------------------------- reading a folder
def read_source(src, unlabeled_dir=None) -> Source:
    """The cases of ``src`` (an msd, nnunet or nifti folder) plus the images of ``unlabeled_dir``."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    meta = read_json(src / "dataset.json", "the data set description (Decathlon / nnU-Net)", DataError) \
        if (src / "dataset.json").is_file() else None
    if meta is None:
        source = _read_nifti(src)
    elif meta.get("format") == layout.RECORD_FORMAT:
        raise DataError(f"{src}: a set that prepare wrote already, which needs no prepare: train.py --data {src} "
                        "reads it as it is")
    elif "training" in meta and not ("channel_names" in meta or "file_ending" in meta):
        source = _read_msd(src, meta)
    elif "file_ending" in meta or "channel_names" in meta:
        source = _read_nnunet(src, meta)
    else:
        raise DataError(f"{src / 'dataset.json'}: neither a Decathlon file (no 'training' list) nor an nnU-Net v2 "
                        f"file (no 'channel_names' / 'file_ending')")
    if unlabeled_dir is not None:
        source.cases += _unlabeled_folder(Path(unlabeled_dir), len(source.channel_names))
    _refuse_repeats(source)
    if not source.by_role("labeled"):
        raise DataError(f"{src}: no labeled training case (an image in imagesTr with its label in labelsTr)")
    return source


def _refuse_ready_layout(src: Path) -> None:
    """A source without NIfTI images in the LA release's h5 layout (its root, or its folder of case folders),
    which train.py reads as it is, or an ACDC form (``acdc_form``), which ``--preset acdc`` reads: refused in one
    line that says so, not as "no NIfTI images", which would send the user looking for some."""
    form = acdc_form(src)
    if form is not None:
        raise DataError(f"{src}: {ACDC_FORMS[form]}; prepare it with --preset acdc")
    if (src / layout.IMAGES_DIR).is_dir() or (src / "train.list").is_file():
        raise DataError(f"{src}: the LA release's h5 layout (train.list, '{layout.IMAGES_DIR}'), which needs no "
                        f"prepare: train.py --data {src} reads it as it is")
    if any((d / layout.H5_NAME).is_file() for d in src.iterdir() if d.is_dir()):
        raise DataError(f"{src}: case folders of the LA release's h5 layout ({layout.H5_NAME}), which need no "
                        f"prepare: train.py --data {src.parent} reads the release (train.list and this folder) "
                        "as it is")


def _read_msd(src: Path, meta: dict) -> Source:
    where = src / "dataset.json"
    channels = _names(meta.get("modality", {"0": "image"}), where, "modality")
    labels = _msd_labels(meta.get("labels"), where)
    training = meta["training"]
    if not isinstance(training, list):
        raise DataError(f"{where}: 'training' must be a list of {{\"image\", \"label\"}} entries")
    cases = []
    for k, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{where}: training entry {k + 1} is not {{\"image\": path, \"label\": path}}")
        image = _listed_file(src, entry["image"], where, "imagesTr")
        label = entry.get("label")
        label = None if label is None else _listed_file(src, label, where, "labelsTr")
        case_id = check_case_id(strip_ending(image.name), f"{where} ({entry['image']})")
        if label is not None and strip_ending(label.name) != case_id:
            raise DataError(f"{where}: training entry {case_id} names the label of another case: {entry['label']}")
        cases.append(SourceCase(case_id, "labeled" if label else "unlabeled", (image,), label, len(channels) > 1))
    if isinstance(meta.get("numTraining"), int) and meta["numTraining"] != len(training):
        raise DataError(f"{where}: numTraining is {meta['numTraining']} but 'training' lists {len(training)} cases")
    listed = {c.images[0].name for c in cases}
    unlisted = [p for p in nifti_files(src / "imagesTr") if p.name not in listed]  # images only: unlabeled cases
    cases += [SourceCase(check_case_id(strip_ending(p.name), str(p)), "unlabeled", (p,), None, len(channels) > 1)
              for p in unlisted]
    _same_files(src / "labelsTr", {c.label.name for c in cases if c.label}, where, "'training'", missing_ok=True)
    test = meta.get("test", [])
    if not isinstance(test, list):
        raise DataError(f"{where}: 'test' must be a list of image paths or {{\"image\": path}} entries, got "
                        f"{type(test).__name__}")
    test_images = []
    for k, entry in enumerate(test):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise DataError(f"{where}: test entry {k + 1} is {entry!r:.60}, expected an image path or "
                            f"{{\"image\": path}}")
        test_images.append(_listed_file(src, image, where, "imagesTs"))
    _same_files(src / "imagesTs", {p.name for p in test_images}, where, "'test'", missing_ok=True)
    test_cases = [(check_case_id(strip_ending(p.name), f"{where} (test {p.name})"), (p,)) for p in test_images]
    cases += _test_cases(test_cases, src, len(channels) > 1, None)
    source = Source(src, "msd", channels, labels, cases)
    if unlisted:
        source.notes.append(f"{src / 'imagesTr'}: {len(unlisted)} image(s) that {where.name}'s 'training' list leaves "
                            f"out added as unlabeled cases ({', '.join(strip_ending(p.name) for p in unlisted[:5])}"
                            f"{', ...' if len(unlisted) > 5 else ''})")
    return source


def _read_nnunet(src: Path, meta: dict) -> Source:
    where = src / "dataset.json"
    names = meta.get("channel_names", meta.get("modality"))
    if names is None:
        raise DataError(f"{where}: no 'channel_names' (nnU-Net v2) or 'modality' (v1)")
    channels = _names(names, where, "channel_names")
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{where}: 'file_ending' must be a string like \".nii.gz\", got {ending!r}")
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{where}: file_ending {ending!r} is not NIfTI ({', '.join(NIFTI_ENDINGS)}); "
                        f"only NIfTI is read")
    labels = _nnunet_labels(meta.get("labels"), where)
    train = _channel_cases(src / "imagesTr", ending, len(channels), where)
    label_dir = src / "labelsTr"
    label_files = {p.name for p in visible_files(label_dir)}
    strays = sorted(n for n in label_files if not n.endswith(ending) or n[: -len(ending)] not in train)
    if strays:
        raise DataError(f"{label_dir / strays[0]}: a label file with no image {strays[0][: -len(ending)]}_0000{ending} "
                        f"in imagesTr (dataset.json file_ending {ending!r})")
    cases = [SourceCase(case_id, "labeled" if f"{case_id}{ending}" in label_files else "unlabeled", files,
                        label_dir / f"{case_id}{ending}" if f"{case_id}{ending}" in label_files else None)
             for case_id, files in train.items()]
    n_labeled = sum(c.role == "labeled" for c in cases)
    if isinstance(meta.get("numTraining"), int) and meta["numTraining"] not in (n_labeled, len(cases)):
        raise DataError(f"{where}: numTraining is {meta['numTraining']} but imagesTr holds {len(cases)} cases "
                        f"({n_labeled} with a label in labelsTr)")
    test = _channel_cases(src / "imagesTs", ending, len(channels), where) if (src / "imagesTs").is_dir() else {}
    cases += _test_cases(list(test.items()), src, False, ending)
    return Source(src, "nnunet", channels, labels, cases)


def _read_nifti(src: Path) -> Source:
    image_dir = src / "imagesTr" if (src / "imagesTr").is_dir() else src
    files = nifti_files(image_dir)
    if not files:
        _refuse_ready_layout(src)
        raise DataError(f"{src}: no dataset.json and no NIfTI images (.nii, .nii.gz) in {image_dir}")
    label_dir = src / "labelsTr"
    labels = {strip_ending(p.name): p for p in nifti_files(label_dir)}
    grouped = group_channels(files, image_dir, label_stems=set(labels))
    n_channels = len(next(iter(grouped.values())))
    strays = sorted(set(labels) - set(grouped))
    if strays:
        raise DataError(f"{labels[strays[0]]}: a label file with no image of that name in {image_dir}")
    cases = [SourceCase(check_case_id(case_id, str(image_dir)), "labeled" if case_id in labels else "unlabeled",
                        paths, labels.get(case_id)) for case_id, paths in grouped.items()]
    if (src / "imagesTs").is_dir():
        test = group_channels(nifti_files(src / "imagesTs"), src / "imagesTs", n_channels,
                              {strip_ending(p.name) for p in nifti_files(src / "labelsTs")})
        cases += _test_cases(list(test.items()), src, False, None)
    return Source(src, "nifti", [str(k) for k in range(n_channels)], None, cases)


def _test_cases(images: list[tuple[str, tuple[Path, ...]]], src: Path, in_file: bool, ending) -> list[SourceCase]:
    """imagesTs cases are test cases when labelsTs exists (each then needs its label); without labelsTs
    they cannot be scored and are not used (``Source`` keeps none of them)."""
    label_dir = src / "labelsTs"
    if not images or not label_dir.is_dir():
        return []
    found = {strip_ending(p.name): p for p in nifti_files(label_dir)}
    cases = []
    for case_id, paths in images:
        check_case_id(case_id, str(src / "imagesTs"))
        if case_id not in found:
            raise DataError(f"{label_dir}: no label for test case {case_id} (expected {case_id}"
                            f"{ending or _ending(paths[0].name)}); every imagesTs case needs one when labelsTs exists")
        cases.append(SourceCase(case_id, "test", tuple(paths), found.pop(case_id), in_file))
    if found:
        name = min(found)
        raise DataError(f"{found[name]}: a test label with no image {name} in {src / 'imagesTs'}")
    return cases


def _unlabeled_folder(folder: Path, n_channels: int) -> list[SourceCase]:
    """--unlabeled DIR: every NIfTI image in it is an unlabeled case; no label is looked for."""
    if not folder.is_dir():
        raise DataError(f"--unlabeled {folder}: not a folder")
    files = nifti_files(folder)
    if not files:
        raise DataError(f"--unlabeled {folder}: no NIfTI images (.nii, .nii.gz) in it")
    grouped = group_channels(files, folder, n_channels)
    found = len(next(iter(grouped.values())))
    if n_channels > 1 and found != n_channels:
        raise DataError(f"--unlabeled {folder}: {found} channel file(s) a case, the source has {n_channels} channels "
                        f"(name them {{case}}_0000 ... {{case}}_{n_channels - 1:04d})")
    return [SourceCase(check_case_id(case_id, f"--unlabeled {folder}"), "unlabeled", paths, None)
            for case_id, paths in grouped.items()]


# ----------------------------------------------------------------------------- checks on names and lists
def _listed_file(src: Path, entry, where: Path, folder: str) -> Path:
    """The file a dataset.json list entry names: a relative path inside SRC that exists."""
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{where}: a list entry is {entry!r}, expected a relative file path such as "
                        f"./{folder}/x.nii.gz")
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{where}: list entry {entry!r} is a path leaving {src}; entries must be relative paths "
                        f"inside it")
    path = src / rel
    if not path.is_file():
        raise DataError(f"{where}: list entry {entry!r} names a missing file {path}")
    if not path.name.endswith(NIFTI_ENDINGS):
        raise DataError(f"{where}: list entry {entry!r} is not a NIfTI file (.nii, .nii.gz)")
    return path


def _same_files(folder: Path, listed: set[str], where: Path, what: str, missing_ok: bool = False) -> None:
    """Every NIfTI file of ``folder`` is one that the ``what`` list names (the list and folder agree)."""
    if not folder.is_dir():
        if listed and not missing_ok:
            raise DataError(f"{where}: {what} lists files but {folder} does not exist")
        return
    unlisted = sorted(p.name for p in nifti_files(folder) if p.name not in listed)
    if unlisted:
        raise DataError(f"{where}: {folder / unlisted[0]} is not in the {what} list ({len(unlisted)} such files); "
                        f"the list and the folder must agree")


def _channel_cases(folder: Path, ending: str, n_channels: int, where: Path) -> dict[str, tuple[Path, ...]]:
    """nnU-Net image files ``{case}_{XXXX}{ending}`` -> ``{case: (channel 0 file, channel 1 file, ...)}``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not found (an nnU-Net raw folder has imagesTr/)")
    cases: dict[str, dict[int, Path]] = {}
    for path in visible_files(folder):
        match = CHANNEL_SUFFIX.match(path.name[: -len(ending)]) if path.name.endswith(ending) else None
        if match is None:
            raise DataError(f"{path}: not named {{case}}_{{XXXX}}{ending} as {where} (file_ending) says")
        case_id = check_case_id(match["case"], str(folder))
        cases.setdefault(case_id, {})[int(match["channel"])] = path
    for case_id, files in cases.items():
        if sorted(files) != list(range(n_channels)):
            missing = sorted(set(range(n_channels)) - set(files)) or sorted(set(files) - set(range(n_channels)))
            raise DataError(f"{folder}: case {case_id} has channel files {sorted(files)}, expected "
                            f"0..{n_channels - 1} ({n_channels} channel_names in {where}); first odd one: "
                            f"{case_id}_{missing[0]:04d}{ending}")
    return {case_id: tuple(files[k] for k in range(n_channels)) for case_id, files in cases.items()}


def group_channels(files: list[Path], folder: Path, n_channels: int | None = None,
                   label_stems: set[str] | None = None) -> dict[str, tuple[Path, ...]]:
    """Plain NIfTI names -> ``{case: (channel files...)}``. Files are read as nnU-Net channel files
    ``{case}_{XXXX}`` only when that reading is unambiguous: every name has the suffix, every case has
    channels 0..k-1 for one k (``n_channels`` when given, and then > 1), and every label is named
    ``{case}``; otherwise each file is one single-channel case (``la_0001.nii.gz`` stays case ``la_0001``)."""
    stems = [strip_ending(p.name) for p in files]
    if len(set(stems)) != len(stems):
        raise DataError(f"{folder}: two files give the same case id (x.nii and x.nii.gz?)")
    matches = [CHANNEL_SUFFIX.match(s) for s in stems]
    cases: dict[str, dict[int, Path]] = {}
    for m, p in zip(matches, files):
        if m:
            cases.setdefault(m["case"], {})[int(m["channel"])] = p
    counts = {len(c) for c in cases.values()}
    as_channels = (all(matches) and len(counts) == 1 and all(sorted(c) == list(range(len(c))) for c in cases.values())
                   and (n_channels is None or (n_channels > 1 and counts == {n_channels}))
                   and (label_stems is None or label_stems <= set(cases)))
    if not as_channels:
        return {check_case_id(s, str(folder)): (p,) for s, p in zip(stems, files)}
    return {check_case_id(case_id, str(folder)): tuple(chans[k] for k in sorted(chans))
            for case_id, chans in cases.items()}


def _refuse_repeats(source: Source) -> None:
    seen: dict[str, str] = {}
    for case in source.cases:
        if case.id in seen:
            roles = {seen[case.id], case.role}
            if roles == {"labeled", "test"} or roles == {"unlabeled", "test"}:
                raise DataError(f"{source.path}: case {case.id} is both a training and a test case; "
                                f"a test case must not be a training case")
            raise DataError(f"{source.path}: case id {case.id} appears twice ({seen[case.id]} and {case.role})")
        seen[case.id] = case.role


def _names(value, where: Path, key: str) -> list[str]:
    """``{"0": "FLAIR", "1": "T1w"}`` -> ``["FLAIR", "T1w"]`` (keys must be 0..n-1)."""
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty {{\"0\": name, ...}} mapping")
    try:
        keys = sorted(int(k) for k in value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{key}' keys must be channel indices \"0\", \"1\", ...; "
                        f"got {sorted(value)}") from None
    if keys != list(range(len(keys))):
        raise DataError(f"{where}: '{key}' keys must be 0..{len(keys) - 1}, got {keys}")
    return [str(value[str(k)]) for k in keys]


def _msd_labels(value, where: Path) -> dict[str, int] | None:
    """MSD ``{"0": "background", "1": "left atrium"}`` -> ``{"background": 0, "left atrium": 1}`` (a file
    written the nnU-Net way round, name -> value, is read as such)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: 'labels' must be a non-empty {{\"0\": name, ...}} mapping")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return _checked_labels({str(name): v for name, v in value.items()}, where)
    if not all(re.fullmatch(r"\s*-?\d+\s*", key) for key in value):
        raise DataError(f"{where}: Decathlon 'labels' keys must be integer values, got {sorted(value)}")
    return _checked_labels({str(name): int(key) for key, name in value.items()}, where)


def _nnunet_labels(value, where: Path) -> dict[str, int]:
    """nnU-Net ``{"background": 0, "organ": 1}``; region-based labels (lists of values) are refused."""
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: 'labels' must be a non-empty {{name: value}} mapping (nnU-Net v2)")
    for name, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise DataError(f"{where}: label {name!r} is {v!r}; only one integer value a label is supported "
                            f"(not nnU-Net's region-based lists)")
    return _checked_labels(dict(value), where)


def _checked_labels(labels: dict[str, int], where: Path) -> dict[str, int]:
    negative = sorted((v, name) for name, v in labels.items() if v < 0)
    if negative:
        raise DataError(f"{where}: label {negative[0][1]!r} is {negative[0][0]}: negative label values are not "
                        f"allowed (0 is the background, the classes 1, 2, ...)")
    values = sorted(labels.values())
    if len(set(values)) != len(values) or 0 not in values:
        raise DataError(f"{where}: labels {labels} must be distinct non-negative values including 0 (background)")
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def visible_files(folder: Path) -> list[Path]:
    """The files of ``folder``, sorted; none if it is no folder. Hidden files are left out, in every layout: a name
    starting with "." (``.DS_Store``, macOS's ``._x.nii.gz``, an editor's swap file) is never a case file."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def acdc_patient_folders(src: Path) -> list[Path]:
    """ACDC's ``patientXXX`` folders in ``src`` and its ``ACDC_RAW_FOLDERS``, by name."""
    found = [p for base in ACDC_RAW_FOLDERS if (src / base).is_dir() for p in (src / base).iterdir()
             if p.is_dir() and ACDC_PATIENT.match(p.name)]
    return sorted(found, key=lambda p: (p.name, str(p)))


def acdc_form(src: Path) -> str | None:
    """``"raw"`` when ``src`` holds ACDC's patient folders (``acdc_patient_folders``), else ``"h5"`` when its
    ``data/`` or ``data/slices/`` holds ``.h5`` files (SSL4MIS's release), else None."""
    if acdc_patient_folders(src):
        return "raw"
    h5 = [p for folder in (src / "data", src / "data" / "slices") for p in visible_files(folder) if p.suffix == ".h5"]
    return "h5" if h5 else None


ACDC_FORMS = {"raw": "ACDC patient folders", "h5": "SSL4MIS ACDC h5 files (data/*.h5)"}  # (acdc_form's, in words)


def unprepared_source(root: Path) -> str | None:
    """What ``root`` holds, in words with the command that prepares it, when it is a source ``prepare`` reads
    rather than the training layout (ACDC's two forms, NIfTI images: for train.py's one-line refusal), else None."""
    form = acdc_form(root)
    if form is not None:
        return f"{ACDC_FORMS[form]}, not the training layout; prepare it first: python -m uamt_fast.data prepare " \
               f"{root} OUT --preset acdc"
    if nifti_files(root) or nifti_files(root / "imagesTr"):
        return f"NIfTI images, not the training layout; prepare it first: python -m uamt_fast.data prepare {root} OUT"
    return None


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files (``.nii``, ``.nii.gz``) of ``folder``, sorted, hidden files left out; none if it is no folder."""
    return [p for p in visible_files(folder) if p.name.endswith(NIFTI_ENDINGS)]


def _ending(name: str) -> str:
    return next(e for e in NIFTI_ENDINGS if name.endswith(e))


def strip_ending(name: str) -> str:
    """``name`` less its NIfTI ending (``la_0001_0000.nii.gz`` -> ``la_0001_0000``); any other name as it is."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


# ----------------------------------------------------------------------------- reading a volume
def read_volume(path: Path, channel: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z), affine 4x4)`` of a NIfTI file through nibabel. ``channel``: the index into the last
    axis of a 4D file (MSD multi-modal); without it a 4D file is refused (one line, DataError)."""
    import nibabel

    try:
        img = nibabel.load(str(path))
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 (nibabel raises many types for truncated or foreign files)
        raise DataError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from None
    if array.ndim == 4 and channel is not None:
        if not 0 <= channel < array.shape[3]:
            raise DataError(f"{path}: channel {channel} asked, the file has {array.shape[3]}")
        array = array[..., channel]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: a {array.ndim}D volume of shape {array.shape}; expected 3D (X, Y, Z)"
                        + ("; put each channel in its own file (nnU-Net) or declare them in 'modality' (MSD)"
                           if array.ndim == 4 else ""))
    if array.size == 0:
        raise DataError(f"{path}: an empty image (shape {array.shape})")
    return array, check_affine(img.affine, f"{path}: the NIfTI affine (sform / qform / pixdim)")


__all__ = ["ACDC_FORMS", "ACDC_PATIENT", "ACDC_RAW_FOLDERS", "CHANNEL_SUFFIX", "NIFTI_ENDINGS", "Source",
           "SourceCase", "acdc_form", "acdc_patient_folders", "check_affine", "group_channels", "nifti_files",
           "read_source", "read_volume", "strip_ending", "unprepared_source", "visible_files"]
