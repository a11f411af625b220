"""A training run assembled from its settings: the Config of the command line (or of a checkpoint to resume),
the data's classes and splits, the device, and ``build``: model, EMA teacher, optimizer and batch sampler.

``--dims 3`` builds the V-Net and ``TwoStreamSampler``'s 3D crops; ``--dims 2`` SSL4MIS's 2D U-Net
(``uamt_fast.nets.unet.UNet2D``) and ``SliceSampler``'s slices, with channels_last (never channels_last_3d).
A data set prepared with a benchmark preset that has a protocol (``acdc``) brings that protocol too."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

import uamt_fast
from uamt_fast import cli, data, files
from uamt_fast.data import acdc, formats
from uamt_fast.data.presets import PRESETS
from uamt_fast.data.sampling import SliceSampler
from uamt_fast.evaluation import selection
from uamt_fast.training import checkpoints, distributed, run_folder
from uamt_fast.training.config import CONFIG_FIELDS, DEMO, LA_LABELED, RESUME_OVERRIDABLE, Config
from uamt_fast.training.state import Parts
from uamt_fast.training.step import student_losses


# ----------------------------------------------------------------------------- the settings
def make_config(given: dict) -> tuple[Config, dict | None]:
    """Config from the flags (+ --demo sizes and the data's settings, or the saved config and checkpoint on
    --resume). The --data roots become absolute paths: config.json and the checkpoints record them so, and
    predict or --eval find the data from any working folder (config.json's argv keeps them as given). A new
    run's values that the command line did not give carry where they came from (``Config.origins``: errors
    say "--patch 112 112 80 (the default)"); --labeled 0 becomes the data's default (``resolve_labeled``)."""
    if given.get("data"):
        given = given | {"data": [os.path.abspath(root) for root in given["data"]]}
        for root in given["data"]:  # a source folder given for a prepared one: say what prepares it
            if not (Path(root) / "train.list").is_file() and (source := formats.unprepared_source(Path(root))):
                raise ValueError(f"--data {root}: {source}")
    if given.get("resume"):
        if given.get("overwrite"):
            raise ValueError("--resume continues a run and --overwrite would discard it: give one of them")
        path = Path(given["resume"]) / "checkpoint.pt"
        if not path.is_file():
            stopped = run_folder.run_files(path.parent)  # a run killed before its first checkpoint left these
            raise ValueError(f"--resume {given['resume']}: no checkpoint.pt in that folder" + (
                f"; the run there stopped before its first checkpoint (--save-every): start it again with --out "
                f"{given['resume']} --overwrite" if stopped else ""))
        state = checkpoints.read(path, "--resume")
        missing = [k for k in checkpoints.TRAINING_KEYS if k not in state]
        if missing:
            raise ValueError(f"--resume {path}: not a train.py checkpoint.pt (lacks {', '.join(missing)})")
        saved = dataclasses.asdict(saved_config(checkpoints.config_of(state, path, "--resume", CONFIG_FIELDS),
                                                path, "--resume"))
        changed = {k for k, v in given.items() if k not in RESUME_OVERRIDABLE and _norm(v) != _norm(saved[k])}
        if changed:
            raise ValueError(f"--resume: cannot change {', '.join(cli.flag(k) for k in sorted(changed))} "
                             f"of a run (allowed: {', '.join(sorted(RESUME_OVERRIDABLE))})")
        return Config(**(saved | given | {"out": given["resume"], "resume": given["resume"]})), state
    demo = DEMO if given.get("demo") else {}
    record = data.read_record(given["data"]) if given.get("data") else None
    brought = data_settings(record)
    if "labeled" in given and "labeled_patients" not in given:  # --labeled N replaces a preset's patient count
        brought.pop("labeled_patients", None)
    origins = ({name: "the default" for name in CONFIG_FIELDS} | {name: "the --demo size" for name in demo}
               | {name: f"the data set's {data.RECORD_NAME}" for name in brought}
               | {name: f"the {record['preset']} preset's protocol" for name in preset_protocol(record)
                  if name in brought})
    cfg = Config(**(demo | brought | given), origins={k: v for k, v in origins.items() if k not in given})
    if cfg.data and not cfg.eval:  # (--eval takes the checkpoint's own)
        resolve_labeled(cfg)
    return cfg, None


def resolve_labeled(cfg: Config) -> None:
    """``cfg.labeled`` 0 := the data's default: every id of a prepared set's train.list (its labeled training
    cases: the unlabeled ones are in unlabeled.list), or the LA release's ``LA_LABELED`` (the paper's 16 of 80;
    also for a Config made in code without data); its origin goes into ``cfg.origins``. With
    ``--labeled-patients N``: the volumes of the first N patients (``labeled_from_patients``)."""
    if cfg.labeled_patients:
        labeled = labeled_from_patients(cfg)
        if cfg.labeled not in (0, labeled):  # (a resumed or saved config holds both, resolved alike)
            raise ValueError(f"{cfg.setting('labeled')} and {cfg.setting('labeled_patients')} disagree: the first "
                             f"{cfg.labeled_patients} patients are {labeled} volumes; give one of them")
        cfg.labeled = labeled
        cfg.origins["labeled"] = f"the volumes of {cfg.setting('labeled_patients')}"
        return
    if cfg.labeled:
        return
    if cfg.data and data.read_record(cfg.data) is not None:
        cfg.labeled = len(data.read_list(cfg.data, "train"))
        origin = "the default for a prepared set: all of its train.list"
    else:
        cfg.labeled, origin = LA_LABELED, "the default for the LA release"
    cfg.origins["labeled"] = origin


def labeled_from_patients(cfg: Config) -> int:
    """How many leading ids of train.list ``--labeled-patients N`` labels: on an ``acdc`` set both frames of the
    first N patients (``uamt_fast.data.acdc.labeled_cases``; SSL4MIS's patients_to_slices takes the first lines of
    train_slices.list, the same patients' slices: 3 -> 68, 7 -> 136 on the full set); on any other set, and
    for a Config without data, one volume a patient (the first N ids)."""
    record = data.read_record(cfg.data) if cfg.data else None
    if record is None or record.get("preset") != "acdc":
        return cfg.labeled_patients
    try:
        return len(acdc.labeled_cases(data.read_list(cfg.data, "train"), cfg.labeled_patients))
    except data.DataError as e:  # ("--labeled-patients N: the training list holds M patients")
        raise ValueError(f"{cfg.setting('labeled_patients')}: {str(e).partition(': ')[2]} in "
                         f"{', '.join(cfg.data)}; give a smaller --labeled-patients") from None


def saved_config(saved: dict, path: Path, flag: str) -> Config:
    """The Config of a checkpoint's saved dict, every field type- and range-checked like a flag."""
    try:
        return Config(**saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{flag} {path}: its saved config is not valid ({e})") from None


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v



# ----------------------------------------------------------------------------- data
def load_split(cfg: Config, split: str):
    """Cases of ``split`` read once ("unlabeled": prepare's unlabeled.list, images only; "val": ``val_ids``;
    "test": only those of --cases / --first, the --figures-cases picks checked against them before any work);
    training cases are downsampled once (test and val cases stay at full resolution: ``evaluate`` scores
    full-resolution labels)."""
    if split == "unlabeled":
        return [data.downsample(c, cfg.downsample) for c in
                data.load_cases(cfg.data, data.read_unlabeled(cfg.data), labeled=False)]
    if split == "val":
        return data.load_cases(cfg.data, val_ids(cfg))
    ids = data.read_list(cfg.data, split)
    if split == "test":
        ids = selection.test_ids(ids, cfg.cases, cfg.first)
        selection.check_picks(cfg.figures_cases, ids)
        return data.load_cases(cfg.data, ids)
    return [data.downsample(c, cfg.downsample) for c in data.load_cases(cfg.data, ids)]


def data_settings(record: dict | None) -> dict:
    """The settings a prepared data set's record brings: its class count and its ``train`` (the preset's or the
    auto plan's patch, sliding-window strides and batch; a benchmark preset's protocol too, as acdc's SSL4MIS
    settings: ``uamt_fast.data.presets``); flags given on the command line win. None for the LA release (no
    record)."""
    if record is None:
        return {}
    # (the preset's protocol first: a set prepared before it was recorded in "train" still brings it)
    return preset_protocol(record) | dict(record.get("train") or {}) | {"num_classes": record["num_classes"]}


def preset_protocol(record: dict | None) -> dict:
    """The protocol fields of the record's preset (``Preset.protocol``, e.g. acdc's dims, iterations, ...)."""
    preset = (record or {}).get("preset")
    return PRESETS[preset].protocol if preset in PRESETS else {}


def resolve_classes(cfg: Config) -> None:
    """``cfg.num_classes`` := the data's class count; a different one given (or saved) is refused."""
    classes = data.num_classes(cfg.data)
    if cfg.num_classes not in (0, classes):
        raise ValueError(f"--num-classes {cfg.num_classes}: the data ({', '.join(cfg.data)}) has {classes} classes")
    cfg.num_classes = classes


def val_ids(cfg: Config) -> list[str]:
    """The ids of the data's val.list (--val-every: scored for curves only), none of them a test case."""
    try:
        ids, test = data.read_list(cfg.data, "val"), set(data.read_list(cfg.data, "test"))
    except data.DataError as e:
        raise ValueError(f"{cfg.setting('val_every')}: {e} (prepare --preset acdc writes SSL4MIS's val.list)") from None
    shared = [i for i in ids if i in test]
    if shared:
        raise ValueError(f"{cfg.setting('val_every')}: case {shared[0]} is in both val.list and test.list of "
                         f"{', '.join(cfg.data)}; a test case is never scored before the end")
    return ids


# ----------------------------------------------------------------------------- model, optimizer, sampler
def pick_device(cfg: Config) -> torch.device:
    for flag, value in (("--device", cfg.device), ("--data-device", cfg.data_device)):
        if value == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{flag} cuda: no CUDA device is available (torch {torch.__version__})")
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu"))


def build(cfg: Config, train_cases=None, rank: int = 0) -> Parts:
    """Model, EMA teacher, optimizer and batch sampler for ``cfg`` (reads the train split unless given); ``rank``
    (torchrun) seeds the sampler and the noise / dropout streams by (seed, rank), the weights by seed alone."""
    device = pick_device(cfg)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    train_cases = load_split(cfg, "train") if train_cases is None else train_cases
    resolve_labeled(cfg)  # (a Config made in code: make_config resolved the command line's)
    labeled_ids, unlabeled_ids = data.semi_supervised_split([c.id for c in train_cases], cfg.labeled,
                                                            cfg.setting("labeled"))
    by_id = {c.id: c for c in train_cases}
    if cfg.method != "supervised" and cfg.data:  # prepare's unlabeled.list: images without labels
        extra = load_split(cfg, "unlabeled")
        by_id |= {c.id: c for c in extra}
        unlabeled_ids += [c.id for c in extra]
    if cfg.method != "supervised" and not unlabeled_ids:
        raise ValueError(f"{cfg.setting('labeled')} leaves no unlabeled case for --method {cfg.method}: give a smaller "
                         "--labeled (the rest of train.list trains as unlabeled), add unlabeled images (prepare "
                         "--unlabeled DIR), or --method supervised")
    data_device = device if cfg.data_device == "auto" else torch.device(cfg.data_device)
    # (the 3D sampler refuses a patch larger than every volume: its crops would be mostly zero padding; the 2D
    # one resizes every slice to the patch)
    sampler = (SliceSampler if cfg.dims == 2 else data.TwoStreamSampler)(
        [by_id[i] for i in labeled_ids], [by_id[i] for i in unlabeled_ids] if cfg.method != "supervised" else [],
        patch_size=cfg.patch, batch_labeled=cfg.batch_labeled,
        batch_unlabeled=cfg.batch_unlabeled if cfg.method != "supervised" else 0,
        device=data_device, seed=distributed.rank_seed(cfg.seed, rank),
        names={"patch_size": cfg.setting("patch"), "batch_labeled": cfg.setting("batch_labeled")})

    channels_last = torch.channels_last if cfg.dims == 2 else torch.channels_last_3d
    memory_format = channels_last if (cfg.channels_last if cfg.channels_last is not None else cuda) \
        else torch.contiguous_format
    classes = cfg.num_classes or 2
    network = checkpoints.network_class(cfg.dims)
    student = network(num_classes=classes, n_filters=cfg.n_filters, dropout=cfg.dropout).to(device, memory_format=memory_format)
    if cfg.full_res_contiguous:
        student.full_res_memory_format_(torch.contiguous_format)
    # The teacher starts as a copy of the student (the released code initialises it separately, but the
    # first EMA step, alpha = 0, overwrites it; only iteration 0's target, weighted 6.7e-4, differs).
    teacher = None
    if cfg.method != "supervised":
        teacher = network(num_classes=classes, n_filters=cfg.n_filters, dropout=cfg.dropout).to(device, memory_format=memory_format)
        if cfg.full_res_contiguous:
            teacher.full_res_memory_format_(torch.contiguous_format)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        teacher.train()  # as released: the teacher normalises by batch statistics and keeps dropout on
    if rank:  # every rank starts from the same weights, then draws its own noise and dropout masks
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
    if cfg.fused_ema and teacher is not None:
        # One contiguous buffer per model (parameters become views) -> the EMA is a single kernel launch.
        uamt_fast.flatten_parameters_(student)
        uamt_fast.flatten_parameters_(teacher)
    sgd = cfg.sgd if cfg.sgd != "auto" else ("fused" if cuda else "default")
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=sgd == "fused" or None, foreach={"foreach": True, "loop": False}.get(sgd))
    if cuda:
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # a process-wide switch

    compile_ = cfg.compile if cfg.compile is not None else cuda
    losses_fn, teacher_fn = student_losses, teacher
    if compile_:
        compile_cache(cfg.compile_cache)
        options = {"mode": None if cfg.compile_mode == "default" else cfg.compile_mode}
        if cfg.compile_blocks:  # regional compilation: the blocks compile, the glue between them runs eager
            # every block shares Module._call_impl's code object: one cache entry per block and batch size
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for model in (student, teacher) if teacher is not None else (student,):
                for block in model.children():
                    block.compile(dynamic=False, **options)
        else:
            losses_fn = torch.compile(student_losses, **options)
            teacher_fn = torch.compile(teacher, **options) if teacher is not None else None
    ignore = next((c.ignore_label for c in train_cases if getattr(c, "ignore_label", None) is not None), None)
    return Parts(cfg, device, student, teacher, optimizer, sampler, losses_fn, teacher_fn, memory_format,
                 ignore_label=ignore)


def compile_cache(folder: str) -> None:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels, autotuning) at
    ``folder/inductor``, so a second run starts warm; ``folder`` = "" keeps torch's default. A
    TORCHINDUCTOR_CACHE_DIR already in the environment wins. Takes effect only before the first compilation.

    Inductor unpickles its cache entries, so whoever can write the folder can run code in this process:
    the folder is used only if it belongs to this user and no one else may write to it (it is created
    0700), and nothing is ever loaded from a file copied in (torch's portable ``save_cache_artifacts`` /
    ``load_cache_artifacts`` path is not used: its file is a pickle too).
    """
    if not folder:
        return
    root = Path(folder).expanduser()
    for path in (root, root / "inductor"):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = path.stat()
        except OSError as e:
            raise ValueError(f"--compile-cache {folder}: cannot use {path} ({files.describe(e)})") from None
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ValueError(f"--compile-cache {folder}: {path} is owned by uid {st.st_uid} with mode "
                             f"{st.st_mode & 0o777:o}; inductor runs code from its cache, so it must be yours and "
                             f"writable by you alone (chmod go-w {path}), or give --compile-cache ''")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))


__all__ = ["build", "compile_cache", "data_settings", "labeled_from_patients", "load_split", "make_config",
           "pick_device", "preset_protocol", "resolve_classes", "resolve_labeled", "saved_config", "val_ids"]
