"""Train UA-MT (Yu et al., MICCAI 2019) on the left atrium MRI data set, fast, and evaluate it.

    python train.py --demo                                 # synthetic data, reduced sizes, CPU, ~1 minute
    python train.py --data /path/to/LA               # released code: 16 labeled, 6000 iterations (UA-MT-UN)
    python train.py --data /path/to/LA --consistency-on all   # the paper's "UA-MT" rows (--labeled 8, 16, 24)
    python train.py --data /path/to/LA --method mt   # mean teacher without the uncertainty mask
    python train.py --data /path/to/LA --method mt-dice   # mean teacher, soft-Dice consistency (paper: MT-Dice)
    python train.py --data LA_part1 --data LA_part2 --data LA_part3   # the data set in several folders (data.py pack)
    python train.py --data /path/to/LA --method supervised [--no-dropout]  # Bayesian / vanilla V-Net
    python train.py --resume runs/<run>                    # continue a run from its last checkpoint
    python train.py --eval runs/<run>/student.pt --data /path/to/LA       # evaluate only: runs/<run>/eval_student.json
    python train.py --data /path/to/LA --out runs/a --overwrite            # replace the run in runs/a
    python train.py --eval runs/<run> --data /path/to/LA --cases ID1 ID2   # two test cases only (--first N: the first N)
    python train.py --eval runs/<run> --data /path/to/LA --figures figs --figures-cases best median worst
    python train.py --data /path/to/LA --tensorboard   # metrics.jsonl's scalars also in runs/<run>/tensorboard
    torchrun --nproc_per_node 4 train.py --data /path/to/LA   # DDP over 4 GPUs: global batch 4 x 4 crops (--lr-scale, --sync-bn)
    # reduced real-data run on a 2-core CPU, ~30 min (volumes downsampled 2x, narrower V-Net, shorter schedule):
    python train.py --data /path/to/LA --downsample 2 --n-filters 4 --patch 64 48 32 --iterations 800 --threads 1

Every setting is a field of ``Config`` below (defaults = the paper's); ``--help`` lists them. One
iteration (``train_step``): sample 2 labeled + 2 unlabeled crops -> the EMA teacher makes T=8 noisy
MC-dropout passes plus one target pass, batched into one forward with per-pass ("ghost") batch norm ->
the student forward -> 0.5 (CE + Dice) on the labeled crops + lambda(i) * uncertainty-masked consistency
(fused Triton loss) -> SGD step -> EMA of the teacher (one fused launch). The loop never waits for the
GPU except every --log-every iterations. A run folder holds config.json, metrics.jsonl, checkpoint.pt
(rolling, atomic), student.pt / teacher.pt and eval.json. The student is the evaluated model. A folder that
holds a run is never written over (--resume it, or --overwrite), an --eval never replaces an earlier
evaluation, and checkpoints are read with torch.load(weights_only=True): opening one never runs code from it.

Shorter runs than the paper's 6000 iterations: the consistency ramp (40 periods of 150 iterations) and the
threshold ramp (over --iterations, as released) still span the whole run; the lr keeps its absolute
schedule (/10 at 2500 and 5000, --lr-step), so a run of <= 2500 iterations trains at --lr throughout
(scaling the steps down measured worse on the reduced real-data run: 27% test Dice after 200 iterations
with steps at 83 and 167, vs 56% after 400 iterations at 0.01). With --downsample k the training volumes
are pooled k-fold once at load; evaluation slides the windows over the pooled test image, upsamples the averaged softmax
back and scores it against the full-resolution label, so every eval.json is in full-resolution voxels.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import uamt_fast
from uamt_fast.training import checkpoints, distributed, metrics_log, provenance, run_folder
from uamt_fast import cli, data, figures, files, reference
from uamt_fast.evaluation import inference, selection
from uamt_fast.nets.vnet import MAX_FILTERS, VNet

TERMS = ("cross-entropy", "dice", "consistency")  # the loss terms, in the order train_step returns them


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # I/O
    data: list = field(default_factory=list)  # LA root (train.list, test.list, case folders); repeat it for parts
    out: str = ""  # run folder; default runs/<timestamp>-<method>
    resume: str = ""  # run folder to continue from its checkpoint.pt (the saved config is reused)
    eval: str = ""  # evaluate this checkpoint (student.pt, teacher.pt, checkpoint.pt; a run folder: its student.pt), exit
    demo: bool = False  # synthetic LA-like data (kept in the run folder) + reduced sizes: the whole pipeline in ~1 min on CPU
    overwrite: bool = False  # replace the run already in --out (its config, metrics, checkpoints, evaluations)
    figures: str = ""  # write PNG figures here after the evaluation: per-case panels (and the run's training curves)
    cases: list = field(default_factory=list)  # evaluate only these test case ids, in this order (default: all of test.list)
    first: int = 0  # evaluate only the first N test cases (of --cases if given); 0: all
    figures_cases: list = field(default_factory=list)  # panels of these evaluated cases: ids, or best / median / worst by Dice (default: all); each costs figures_passes evaluations
    figures_passes: int = 8  # T stochastic (MC-dropout) passes for the uncertainty map of the panels
    # method
    method: str = "uamt"  # uamt | mt (no uncertainty mask) | mt-dice (soft-Dice consistency) | supervised (no teacher)
    consistency_on: str = "unlabeled"  # unlabeled (released code, paper's UA-MT-UN) | all (paper's UA-MT)
    labeled: int = 16  # the first N ids of train.list are labeled, the rest unlabeled (paper: 8, 16, 24)
    dropout: bool = True  # Dropout3d(0.5) in the V-Net ("Bayesian V-Net"); --no-dropout = vanilla V-Net
    n_filters: int = 16  # V-Net width of the first stage
    num_classes: int = 0  # classes incl. background; 0: the data's (prepare's dataset.json; 2 for the LA release)
    patch: tuple = (112, 112, 80)  # training crop (X Y Z), multiples of 16; also the sliding-window size
    downsample: int = 1  # average-pool images / majority-pool labels by this factor once at load (CPU runs)
    batch_labeled: int = 2  # labeled crops per batch
    batch_unlabeled: int = 2  # unlabeled crops per batch
    # optimisation (SGD, lr / 10 every lr_step iterations)
    iterations: int = 6000  # training iterations
    lr: float = 0.01  # base learning rate
    lr_step: int = 2500  # divide lr by 10 every this many iterations (not scaled: short runs stay at --lr)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    # mean teacher
    ema_decay: float = 0.99  # teacher EMA decay, warm-up alpha = min(1 - 1/(i+1), decay)
    consistency: float = 0.1  # final consistency weight lambda
    consistency_rampup: float = 40.0  # lambda ramps over this many periods: 0.1 * sigmoid_rampup(i // period, 40)
    consistency_period: int = 0  # iterations per ramp period (released: 150); 0: 150 * iterations / 6000
    mc_passes: int = 8  # T stochastic teacher passes for the uncertainty
    noise_std: float = 0.1  # teacher input noise clamp(N(0, std^2), -clip, clip)
    noise_clip: float = 0.2  # clip of the teacher input noise
    # speed (each can be switched off alone, for benchmarks/train_step.py)
    device: str = "auto"  # auto | cuda | cpu
    teacher_chunks: int = 1  # forward calls for the T+1 teacher passes: 1 = one batch of (T+1)*B; T+1 = released
    amp: bool = True  # bf16 autocast for student and teacher (CUDA only; fp32 master weights)
    channels_last: bool | None = None  # channels_last_3d activations and weights; default: on for CUDA
    compile: bool | None = None  # torch.compile the student loss and the teacher forward; default: on for CUDA
    compile_mode: str = "default"  # torch.compile: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    compile_blocks: bool = False  # regional compilation: each V-Net block compiled alone (no fusion across blocks)
    compile_cache: str = "~/.cache/uamt_fast"  # persistent compile caches: a second run starts warm; "": torch's /tmp
    cudnn_benchmark: bool = True  # cuDNN autotuner picks each conv's algorithm (CUDA); off: cuDNN's heuristics
    sgd: str = "auto"  # SGD implementation: auto (fused on CUDA, torch's default elsewhere) | fused | foreach | loop
    full_res_contiguous: bool = False  # with channels_last_3d: the full-resolution convs run in the contiguous layout
    fused_loss: bool = True  # fused Triton uncertainty-consistency loss (CPU tensors use the reference math)
    fused_ema: bool = True  # single-launch EMA over a flat parameter buffer
    reference_ops: bool = False  # the plain PyTorch reference loss and EMA (sets --no-fused-loss --no-fused-ema)
    data_device: str = "auto"  # where volumes live and crops are cut: auto (= training device) | cuda | cpu
    threads: int = 0  # torch CPU threads; 0: torch's default (one per core). Matters on a CPU: on 2 shared cores a 20-case evaluation took 40 s with 1 thread, 116 s with the default
    # logging, checkpoints, evaluation
    seed: int = 1337  # seeds the model init, the sampler generator and the noise/dropout streams (released: 1337)
    log_every: int = 50  # iterations between log lines (the only host-device syncs in the loop)
    save_every: int = 1000  # iterations between checkpoints
    stop_at: int = 0  # stop after this iteration with a checkpoint, before any final save or evaluation (continue with --resume); 0: never
    eval_stride_xy: int = 18  # sliding-window stride in the axial plane (paper: 18)
    eval_stride_z: int = 4  # sliding-window stride along the last axis (paper: 4)
    eval_batch: int = 4  # windows per forward in the evaluation
    # torchrun (uamt_fast/distributed.py; no effect without it)
    sync_bn: bool = False  # batch-norm statistics over all ranks' crops (default: per rank, each rank's batch alone)
    lr_scale: str = "none"  # none: --lr whatever the world size | linear: --lr x world size (the global batch grows with it)
    dist_timeout: int = 600  # seconds a collective waits for the other ranks before the run stops
    tensorboard: bool = False  # also write metrics.jsonl's scalars to <run>/tensorboard (pip install 'uamt_fast[tensorboard]'); the JSONL stays the record

    def __post_init__(self):
        self.patch = tuple(self.patch) if isinstance(self.patch, (list, tuple)) else self.patch
        self.data = [self.data] if isinstance(self.data, str) else self.data  # saved configs before: one str
        if type(self.figures_cases) is int:  # saved configs before ids and picks: a count (panels now follow --first)
            self.figures_cases = []
        # a config read from a file may hold anything: types first, then choices and ranges
        cli.check_fields(self, RANGES, CHOICES)
        _check_patch(self.patch)
        self.data = [d for d in self.data if d]
        if self.reference_ops:
            self.fused_loss = self.fused_ema = False
        if self.batch_unlabeled < 1 and self.method != "supervised":
            raise ValueError(f"--batch-unlabeled must be >= 1 for --method {self.method}; got {self.batch_unlabeled}")
        if self.eval_stride_xy > min(self.patch[:2]) or self.eval_stride_z > self.patch[2]:
            raise ValueError(f"--eval-stride-xy {self.eval_stride_xy} / --eval-stride-z {self.eval_stride_z}: a stride "
                             f"larger than the window (--patch {' '.join(map(str, self.patch))}) leaves voxels that no "
                             "window covers")
        # The consistency ramp spans the run, as in the paper (40 periods of 150 = 6000 iterations).
        self.consistency_period = self.consistency_period or max(1, round(150 * self.iterations / 6000))


# The valid values of each numeric setting, checked in Config and shown in --help: "[a, b]" / "(a, b]" are
# intervals, ">= a" / "> a" half-lines; floats must also be finite (nan and inf are never a setting). The
# upper bounds of the floats keep every value (and lr * grad) inside float32, where the optimizer works.
RANGES = {
    "first": ">= 0", "figures_passes": "[1, 1024]", "labeled": ">= 1", "n_filters": f"[1, {MAX_FILTERS}]",
    "num_classes": "[0, 255]",
    "downsample": "[1, 16]", "batch_labeled": "[1, 1024]", "batch_unlabeled": "[0, 1024]", "iterations": ">= 1",
    "lr": "(0, 1000]", "lr_step": ">= 1", "momentum": "[0, 1)", "weight_decay": "[0, 1]", "ema_decay": "[0, 1]",
    "consistency": "[0, 1000]", "consistency_rampup": "[0, 1000000]", "consistency_period": ">= 0",
    "mc_passes": "[1, 1024]", "noise_std": "[0, 1000]", "noise_clip": "[0, 1000]", "teacher_chunks": "[1, 1025]",
    "threads": "[0, 4096]",
    "seed": f"[0, {2**63 - 1}]", "log_every": ">= 1", "save_every": ">= 1", "stop_at": ">= 0",
    "eval_stride_xy": ">= 1", "eval_stride_z": ">= 1", "eval_batch": "[1, 4096]", "dist_timeout": "[1, 86400]",
}
def _check_patch(patch) -> None:
    if len(patch) != 3 or any(p < 16 or p % 16 or p > 1024 for p in patch):
        raise ValueError(f"--patch must be three multiples of 16 in [16, 1024] (four stride-2 V-Net stages); got {patch}")


CHOICES = {"method": ("uamt", "mt", "mt-dice", "supervised"), "consistency_on": ("unlabeled", "all"),
           "compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
           "sgd": ("auto", "fused", "foreach", "loop"), "device": ("auto", "cuda", "cpu"),
           "data_device": ("auto", "cuda", "cpu"), "lr_scale": ("none", "linear")}


# The --demo sizes: same code path, smaller everything. Flags given on the command line still win.
# One thread: measured 43 s vs 213 s for 2 threads on the shared 2-core CI machine (OpenMP spin-waits).
DEMO = {"n_filters": 4, "patch": (32, 32, 16), "labeled": 4, "iterations": 120, "log_every": 20, "save_every": 60,
        "eval_stride_xy": 16, "eval_stride_z": 8, "threads": 1}
DEMO_DATA = {"n_train": 12, "n_test": 4, "shape": (48, 48, 32), "seed": 0}
DEMO_DATA_DIR = "demo_data"  # the --demo data set, inside the run folder
# On --resume these may differ from the saved config; everything else must match (same run).
RESUME_OVERRIDABLE = {"data", "resume", "out", "device", "compile", "compile_mode", "compile_blocks", "compile_cache",
                      "cudnn_benchmark", "log_every", "save_every", "stop_at",
                      "eval_stride_xy", "eval_stride_z", "eval_batch", "data_device", "threads",
                      "figures", "figures_cases", "figures_passes", "cases", "first", "tensorboard", "dist_timeout"}
EVAL_ONLY = {"cases", "first", "figures_cases"}  # --eval takes these from its command line, never from the checkpoint


def parse_args(argv=None) -> dict:
    """The command line -> {field: value} for the flags actually given (defaults come from Config)."""
    return vars(make_parser().parse_args(argv))


def make_parser() -> argparse.ArgumentParser:
    """One flag per Config field (``uamt_fast.cli.dataclass_parser``); the usage examples of this file's
    docstring close the --help text."""
    return cli.dataclass_parser(Config, __doc__.split("\n")[0], "examples:\n" + __doc__.split("\n\n")[1], RANGES,
                                CHOICES, appended=("data",))


# ----------------------------------------------------------------------------- data
def load_split(cfg: Config, split: str):
    """Cases of ``split`` read once ("unlabeled": prepare's unlabeled.list, images only; "test": only those of
    --cases / --first, the --figures-cases picks checked against them before any work); training cases are
    downsampled once (test cases stay at full resolution: ``evaluate`` scores full-resolution labels)."""
    if split == "unlabeled":
        return [data.downsample(c, cfg.downsample) for c in
                data.load_cases(cfg.data, data.read_unlabeled(cfg.data), labeled=False)]
    ids = data.read_list(cfg.data, split)
    if split == "test":
        ids = selection.test_ids(ids, cfg.cases, cfg.first)
        selection.check_picks(cfg.figures_cases, ids)
        return data.load_cases(cfg.data, ids)
    return [data.downsample(c, cfg.downsample) for c in data.load_cases(cfg.data, ids)]


def data_settings(roots) -> dict:
    """The settings a prepared data set brings (prepare's dataset.json: its class count, and its preset's
    patch and sliding-window strides); flags given on the command line win. None for the LA release."""
    record = data.read_record(roots) if roots else None
    if record is None:
        return {}
    train_settings = record.get("train") or {}
    settings = {k: train_settings[k] for k in ("patch", "eval_stride_xy", "eval_stride_z") if k in train_settings}
    return settings | {"num_classes": record["num_classes"]}


def resolve_classes(cfg: Config) -> None:
    """``cfg.num_classes`` := the data's class count; a different one given (or saved) is refused."""
    classes = data.num_classes(cfg.data)
    if cfg.num_classes not in (0, classes):
        raise ValueError(f"--num-classes {cfg.num_classes}: the data ({', '.join(cfg.data)}) has {classes} classes")
    cfg.num_classes = classes


# ----------------------------------------------------------------------------- model, optimizer, sampler
@dataclass
class Parts:
    """Everything one training iteration touches (built by ``build``, used by ``train_step``)."""

    cfg: Config
    device: torch.device
    student: VNet
    teacher: VNet | None  # None for --method supervised
    optimizer: torch.optim.SGD
    sampler: object  # the data module's two-stream batch sampler
    student_losses: object  # student_losses, or its torch.compile'd version
    teacher_forward: object  # teacher, or its torch.compile'd version
    memory_format: torch.memory_format = torch.contiguous_format
    test_cases: list = field(default_factory=list)
    data_split: dict | None = None  # data.split_fingerprint of cfg.data, saved in checkpoints
    ddp: object = None  # under torchrun: the student in DistributedDataParallel (the forward train_step runs)
    lr_factor: float = 1.0  # --lr-scale linear under torchrun: the world size
    ignore_label: int | None = None  # the label of not-annotated voxels (the data's record), kept out of CE and Dice


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
    labeled_ids, unlabeled_ids = data.semi_supervised_split([c.id for c in train_cases], cfg.labeled)
    by_id = {c.id: c for c in train_cases}
    if cfg.method != "supervised" and cfg.data:  # prepare's unlabeled.list: images without labels
        extra = load_split(cfg, "unlabeled")
        by_id |= {c.id: c for c in extra}
        unlabeled_ids += [c.id for c in extra]
    if cfg.method != "supervised" and not unlabeled_ids:
        raise ValueError(f"--labeled {cfg.labeled} leaves no unlabeled case for --method {cfg.method}")
    data_device = device if cfg.data_device == "auto" else torch.device(cfg.data_device)
    # (the sampler refuses a patch larger than every volume: its crops would be mostly zero padding)
    sampler = data.TwoStreamSampler(
        [by_id[i] for i in labeled_ids], [by_id[i] for i in unlabeled_ids] if cfg.method != "supervised" else [],
        patch_size=cfg.patch, batch_labeled=cfg.batch_labeled,
        batch_unlabeled=cfg.batch_unlabeled if cfg.method != "supervised" else 0,
        device=data_device, seed=distributed.rank_seed(cfg.seed, rank))

    memory_format = torch.channels_last_3d if (cfg.channels_last if cfg.channels_last is not None else cuda) \
        else torch.contiguous_format
    classes = cfg.num_classes or 2
    student = VNet(num_classes=classes, n_filters=cfg.n_filters, dropout=cfg.dropout).to(device, memory_format=memory_format)
    if cfg.full_res_contiguous:
        student.full_res_memory_format_(torch.contiguous_format)
    # The teacher starts as a copy of the student (the released code initialises it separately, but the
    # first EMA step, alpha = 0, overwrites it; only iteration 0's target, weighted 6.7e-4, differs).
    teacher = None
    if cfg.method != "supervised":
        teacher = VNet(num_classes=classes, n_filters=cfg.n_filters, dropout=cfg.dropout).to(device, memory_format=memory_format)
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
            raise ValueError(f"--compile-cache {folder}: cannot use {path} ({run_folder.describe(e)})") from None
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ValueError(f"--compile-cache {folder}: {path} is owned by uid {st.st_uid} with mode "
                             f"{st.st_mode & 0o777:o}; inductor runs code from its cache, so it must be yours and "
                             f"writable by you alone (chmod go-w {path}), or give --compile-cache ''")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))


# ----------------------------------------------------------------------------- one training iteration
def teacher_passes(teacher_forward, teacher: VNet, x: torch.Tensor, passes: int, chunks: int,
                   noise_std: float, noise_clip: float) -> torch.Tensor:
    """``passes`` noisy stochastic teacher predictions of ``x`` (B, 1, *S) -> logits (passes, B, C, *S).

    Each pass sees its own noise clamp(N(0, std^2), +-clip) (drawn here, all at once, on x's device) and
    its own dropout masks. The passes go through the network in ``chunks`` forward calls; a forward of
    p stacked passes uses ghost batch norm (``bn_groups = p``), so each pass is normalised by its own
    batch statistics exactly as in a forward of its own.
    """
    noisy = x.unsqueeze(0) + reference.teacher_noise(x.expand(passes, *x.shape), noise_std, noise_clip)  # (P, B, 1, *S)
    out = []
    for group in torch.tensor_split(noisy, min(chunks, passes)):  # group: (p, B, 1, *S)
        teacher.bn_groups = group.shape[0]
        out.append(teacher_forward(group.flatten(0, 1)).unflatten(0, group.shape[:2]))  # (p, B, C, *S)
    return torch.cat(out) if len(out) > 1 else out[0]


def student_losses(student, images, labels, target, mc_logits, weight, threshold, *,
                   n_labeled: int, method: str, consistency_on: str, fused_loss: bool,
                   ignore_index: int | None = None):
    """Student forward and the UA-MT objective.

    images (B, 1, *S), labels (B, *S) with the labeled rows first; target (b, C, *S) and mc_logits
    (T, b, C, *S) from the teacher for the b rows that get consistency; weight lambda and threshold H
    are 0-dim device tensors. Returns the total loss, the terms (CE, Dice, consistency) and the
    uncertainty statistics (mask fraction, mean uncertainty), all device tensors. ``ignore_index``: labeled
    voxels with this label (not annotated) enter neither CE nor Dice; the consistency term sees every voxel.
    """
    logits = student(images)  # (B, C, *S)
    lab_logits, lab = logits[:n_labeled].float(), labels[:n_labeled]
    ce = reference.cross_entropy(lab_logits, lab, ignore_index)
    dice = reference.dice_loss(lab_logits, lab, ignore_index)
    zero = ce.new_zeros(())
    consistency, mask_fraction, uncertainty = zero, zero, zero
    if method != "supervised":
        s = logits[n_labeled:] if consistency_on == "unlabeled" else logits
        if method == "mt":  # the mean-teacher baseline: softmax MSE over every voxel, no mask
            consistency, mask_fraction = reference.softmax_mse(s.float(), target.float()).mean(), ce.new_ones(())
        elif method == "mt-dice":  # the paper's MT-Dice: soft Dice between the softmaxes, no mask
            consistency, mask_fraction = reference.softmax_dice_consistency(s.float(), target.float()), ce.new_ones(())
        elif fused_loss:
            consistency, stats = uamt_fast.uncertainty_consistency_loss(s, target, mc_logits, threshold, return_stats=True)
            mask_fraction, uncertainty = stats[0], stats[1]
        else:
            consistency = reference.uncertainty_consistency_loss(s.float(), target.float(), mc_logits.float(), threshold)
            u = reference.predictive_entropy(mc_logits.float())
            mask_fraction, uncertainty = (u < threshold).float().mean(), u.mean()
    loss = 0.5 * (ce + dice) + weight * consistency
    return loss, torch.stack([ce, dice, consistency]), torch.stack([mask_fraction, uncertainty])


def schedule(cfg: Config, iteration: int) -> tuple[float, float, float]:
    """(learning rate, consistency weight lambda, uncertainty threshold H) at 0-based ``iteration``."""
    lr = reference.learning_rate(iteration, cfg.lr, cfg.lr_step)
    weight = reference.consistency_weight(iteration, cfg.consistency, cfg.consistency_rampup, cfg.consistency_period)
    return lr, weight, reference.uncertainty_threshold(iteration, cfg.iterations, cfg.num_classes or 2)


def phase(name: str):
    """A named range in a torch.profiler trace (``benchmarks/profile_step.py`` attributes GPU time by it);
    a no-op context when no profiler runs."""
    return torch.profiler.record_function("uamt:" + name) if torch.autograd._profiler_enabled() \
        else contextlib.nullcontext()


def train_step(parts: Parts, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One UA-MT iteration at 0-based ``iteration``; returns (terms (3,), stats (2,)) on the device, no host sync."""
    cfg, dev = parts.cfg, parts.device
    lr, weight, threshold = schedule(cfg, iteration)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr * parts.lr_factor
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda")
    cuda_graphs = cfg.compile_mode == "reduce-overhead" and dev.type == "cuda" and cfg.compile is not False
    if cuda_graphs:  # a new step: the compiled parts' graph outputs of the last one may be overwritten
        torch.compiler.cudagraph_mark_step_begin()

    # data: 2 labeled + 2 unlabeled augmented crops, labeled rows first
    with phase("data"):
        images, labels = parts.sampler.next()  # (B, 1, *patch) float32, (B, *patch) int64
        images = images.to(dev, non_blocking=True).contiguous(memory_format=parts.memory_format)
        labels = labels.to(dev, non_blocking=True)

    # teacher: T MC-dropout passes + 1 target pass on noisy inputs, no grad, batched
    target = mc_logits = None
    if cfg.method != "supervised":
        x = images[cfg.batch_labeled:] if cfg.consistency_on == "unlabeled" else images
        passes = cfg.mc_passes + 1 if cfg.method == "uamt" else 1
        with phase("teacher"), torch.no_grad(), amp:
            out = teacher_passes(parts.teacher_forward, parts.teacher, x, passes, cfg.teacher_chunks,
                                 cfg.noise_std, cfg.noise_clip)  # (P, b, C, *S)
        target, mc_logits = out[0], out[1:]  # pass 0 is the target, as the released code draws it first

    # student: forward, losses, backward, SGD step
    if cfg.method == "supervised":
        images, labels = images[: cfg.batch_labeled], labels[: cfg.batch_labeled]
    with phase("student"), amp:
        loss, terms, stats = parts.student_losses(
            parts.student if parts.ddp is None else parts.ddp, images, labels, target, mc_logits,
            torch.full((), weight, device=dev), torch.full((), threshold, device=dev),  # fill kernels, no sync
            n_labeled=cfg.batch_labeled, method=cfg.method, consistency_on=cfg.consistency_on,
            fused_loss=cfg.fused_loss, ignore_index=parts.ignore_label)
    with phase("backward"):
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
        parts.optimizer.step()

    # teacher EMA with the warm-up alpha of the global step (alpha = 0 at step 0: teacher := student)
    if parts.teacher is not None:
        with phase("ema"):
            ema = uamt_fast.ema_update_ if cfg.fused_ema else reference.ema_update_
            ema(parts.teacher, parts.student, cfg.ema_decay, step=iteration)
    if cuda_graphs:  # graph outputs live in memory the next replay reuses
        return terms.detach().clone(), stats.detach().clone()
    return terms.detach(), stats.detach()


# ----------------------------------------------------------------------------- checkpoints
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def load_model(path: Path, device: torch.device) -> tuple[VNet, dict, Path]:
    """--eval: the V-Net of a checkpoint or run folder, its config and the file read (uamt_fast.training.checkpoints:
    weights_only loading, one-line errors; the config may hold only fields this train.py knows)."""
    return checkpoints.load_vnet(path, device, "--eval", CONFIG_FIELDS)


# ----------------------------------------------------------------------------- logging helpers
def progress(done: int, total: int, rate: float, end: str = "") -> None:
    """A one-line progress bar with it/s and ETA on stderr (only when it is a terminal)."""
    if not sys.stderr.isatty():
        return
    eta = (total - done) / rate if rate > 0 else math.inf
    bar = "#" * int(30 * done / total)
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
    print(f"\r[{bar:<30}] {done}/{total} {rate:.2f} it/s ETA {eta_s}", end=end, file=sys.stderr, flush=True)


def log_line(line: dict, iterations: int) -> str:
    """One printed line of a metrics.jsonl record: only the fields the method has."""
    text = f"iter {line['iteration']}/{iterations} | CE {line['loss_ce']:.4f} Dice loss {line['loss_dice']:.4f}"
    if "loss_consistency" in line:
        text += f" | consistency {line['loss_consistency']:.2e} x {line['consistency_weight']:.4f}"
    if "mask_fraction" in line:
        text += f" | mask {line['mask_fraction']:.3f} H {line['threshold']:.3f}"
    return text + f" | {line['it_per_s']:.2f} it/s"


class NonFiniteLoss(RuntimeError):
    pass


def evaluate(model: VNet, cfg: Config, cases, out_dir: Path, name: str = "eval.json", checkpoint: str | None = None,
             world: distributed.World = distributed.SINGLE) -> dict:
    """The paper's sliding-window protocol on ``cases`` (full resolution); prints the table and writes it to
    ``out_dir / name`` (a new file: if that name is taken, ``<stem>-2.json``, ``-3``... so an evaluation never
    replaces another), with a ``source`` record (checkpoint, data, case ids, settings). Strict JSON: an
    undefined distance (empty mask) is ``null``, counted in ``nan_cases``.

    With --downsample k the windows (``cfg.patch``, strides ``cfg.eval_stride_*``) slide over the
    k-times downsampled image; the averaged softmax is upsampled trilinearly back to full resolution
    (each low-resolution voxel sits at the centre of its k^3 block, ``align_corners=False``), the
    remainder voxels dropped by the pooling take their nearest neighbour's value, and the argmax is
    scored against the full-resolution label. Under torchrun each rank scores its share of the cases and
    rank 0 writes the one file.
    """
    model.eval()
    t0 = time.perf_counter()
    distributed.from_rank0_(world, model)  # torchrun: every rank scores the saved weights and BN statistics
    mine = distributed.shard(world, cases)
    result = inference.evaluate(model, mine, patch_size=cfg.patch, stride_xy=cfg.eval_stride_xy,
                                stride_z=cfg.eval_stride_z, batch_size=cfg.eval_batch, downsample=cfg.downsample,
                                num_classes=cfg.num_classes or 2) if mine or not world.enabled else None
    result = distributed.gather_evaluation(world, result, cases)
    if not world.main:
        return result
    print(inference.format_table(result))
    print(f"evaluated {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    result["source"] = {
        "checkpoint": checkpoint, "data": cfg.data, "split": "test", "case_ids": [str(c.id) for c in cases],
        "settings": {k: getattr(cfg, k) for k in ("patch", "eval_stride_xy", "eval_stride_z", "eval_batch",
                                                  "downsample", "n_filters", "dropout", "num_classes")},
        "uamt_fast": uamt_fast.__version__, "evaluated": datetime.datetime.now().isoformat(timespec="seconds")}
    text = json.dumps(_strict_json(result), indent=1, allow_nan=False)
    path = files.write_new(out_dir / name, lambda f: f.write(text.encode()))  # eval-2.json ... when taken
    print(f"wrote {path}")
    return result


def _strict_json(x):
    """NaN / Inf -> None (JSON null), recursively: strict JSON parsers reject bare NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def write_figures(model: VNet, cfg: Config, cases, result: dict, run_dir: Path) -> None:
    """--figures: panels of the --figures-cases picks among the evaluated ``cases`` (ids, or best / median / worst
    by the Dice in ``result``), and the run's training curves if it has a log."""
    out = Path(cfg.figures)
    name = "UA-MT" if cfg.method == "uamt" else cfg.method
    picked = selection.panel_cases(cases, result["cases"], cfg.figures_cases)
    for path in figures.write_panels({name: model}, picked, out, dataclasses.asdict(cfg), cfg.figures_passes):
        print(f"wrote {path}")
    if (run_dir / "metrics.jsonl").is_file():
        print(f"wrote {figures.training_curves({run_dir.name: run_dir}, out / 'curves.png')}")


# ----------------------------------------------------------------------------- main
def make_config(given: dict) -> tuple[Config, dict | None]:
    """Config from the flags (+ --demo sizes, or the saved config and checkpoint on --resume)."""
    if given.get("resume"):
        if given.get("overwrite"):
            raise ValueError("--resume continues a run and --overwrite would discard it: give one of them")
        path = Path(given["resume"]) / "checkpoint.pt"
        if not path.is_file():
            raise ValueError(f"--resume {given['resume']}: no checkpoint.pt in that folder")
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
    return Config(**((DEMO if given.get("demo") else {}) | data_settings(given.get("data")) | given)), None


def saved_config(saved: dict, path: Path, flag: str) -> Config:
    """The Config of a checkpoint's saved dict, every field type- and range-checked like a flag."""
    try:
        return Config(**saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{flag} {path}: its saved config is not valid ({e})") from None


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def evaluate_checkpoint(cfg: Config, given: dict, device: torch.device, world=distributed.SINGLE) -> None:
    """--eval: the checkpoint's own settings (width, patch, downsample), the data of the command line or of its
    run, results in a new eval_<checkpoint>.json beside it (or in --out) that never replaces an earlier one."""
    model, saved, path = load_model(Path(cfg.eval), device)
    saved = dataclasses.asdict(saved_config(saved, path, "--eval"))
    overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
    ecfg = Config(**({k: v for k, v in saved.items() if k not in {"out", "resume", "eval", "overwrite", *EVAL_ONLY}}
                     | overrides | {"eval": str(path)}))
    if "data" not in given and not all((Path(root) / "test.list").is_file() for root in ecfg.data or [""]):
        demo = path.parent / DEMO_DATA_DIR  # a --demo run keeps its synthetic data in its folder
        if (demo / "test.list").is_file():
            ecfg.data = [str(demo)]
        else:
            raise ValueError(f"--eval {path}: the data it was trained on ({', '.join(ecfg.data) or 'none saved'}) is not there; "
                             "give --data (for a --demo run: python -m uamt_fast.data synth DIR --train "
                             f"{DEMO_DATA['n_train']} --test {DEMO_DATA['n_test']} --shape "
                             f"{' '.join(map(str, DEMO_DATA['shape']))} --seed {DEMO_DATA['seed']})")
    classes = data.num_classes(ecfg.data)
    if classes != model.num_classes:
        raise ValueError(f"--eval {path}: the model predicts {model.num_classes} classes, the data "
                         f"({', '.join(ecfg.data)}) has {classes}")
    ecfg.num_classes = model.num_classes
    cases = load_split(ecfg, "test")
    out = files.make_folder(cfg.out or path.parent, "evaluation")  # writable? checked before the work
    result = evaluate(model, ecfg, cases, out, name=f"eval_{path.stem}.json", checkpoint=str(path), world=world)
    if cfg.figures and world.main:
        write_figures(model, ecfg, cases, result, path.parent)


def main(argv=None) -> int:
    with contextlib.ExitStack() as held:  # the run folder's lock: held until main returns or the process ends
        return _main(argv, held)


def _main(argv, held: contextlib.ExitStack) -> int:
    # -- configuration, run folder and bad input (one line on stderr, exit code 2)
    out, created = None, False  # created: this call made the run folder (removed again if it stays empty)
    world = distributed.SINGLE  # torchrun: this process's rank, the world size, the backend
    try:
        given = parse_args(argv)
        cfg, resume_state = make_config(given)
        world = distributed.setup(cfg.device, cfg.dist_timeout)  # torchrun's process group (SINGLE without it)
        held.callback(distributed.close, world)
        device = pick_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.figures:
            figures.pyplot()  # fail now, not after training, when the optional matplotlib is missing
            files.make_folder(cfg.figures, "figures", "--figures")
        if cfg.tensorboard:
            metrics_log.require_tensorboard()  # the same: fail now when the optional tensorboard is missing
        if cfg.eval:
            if cfg.overwrite:
                raise ValueError("--overwrite replaces a training run; --eval never replaces anything (it writes a new "
                                 "eval_<checkpoint>.json): drop --overwrite")
            evaluate_checkpoint(cfg, given, device, world)
            return 0
        if not cfg.data and not cfg.demo:
            raise ValueError("--data is required (the LA root holding train.list), or use --demo")
        if world.main:  # one writer: rank 0 alone claims the run folder (and writes the --demo data into it)
            out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}")
            created = not out.exists()
            if resume_state is None:  # (claim refuses a folder another process writes, and overwriting the data)
                held.enter_context(run_folder.claim(out, cfg.overwrite, inputs=data.input_folders(cfg.data)))
                if cfg.overwrite and (out / DEMO_DATA_DIR / "train.list").is_file():
                    files.remove(out, DEMO_DATA_DIR)  # the old --demo run's data (not --data: claim checked)
            else:
                held.enter_context(run_folder.RunLock(out, "--resume"))
            if cfg.demo and not cfg.data:  # kept in the run folder, so the run can be evaluated again later
                data.write_synthetic_la(str((out / DEMO_DATA_DIR).resolve()), **DEMO_DATA)
        out = Path(world.settle(out))  # torchrun: rank 0's folder to every rank, or every rank stops with its error
        if cfg.demo and not cfg.data:
            cfg.data = [str((out / DEMO_DATA_DIR).resolve())]
        split = data.split_fingerprint(cfg.data)  # refuses ids that are paths, lists that disagree or overlap
        resolve_classes(cfg)
        if resume_state is not None:
            distributed.check_world_size(world, resume_state, out)  # its samplers and streams are per rank
            checkpoints.check_same_data(resume_state, split, out)
        parts = build(cfg, rank=world.rank)
        parts.data_split = split
        parts.test_cases = load_split(cfg, "test")
        start = 0
        if resume_state is not None:
            start = checkpoints.restore_training(parts, resume_state, out / "checkpoint.pt")
            distributed.restore_rank(world, parts, resume_state, out / "checkpoint.pt")
            if start >= cfg.iterations and (out / "eval.json").is_file():
                raise ValueError(f"--resume {out}: the run is finished (it has eval.json); evaluate it again with "
                                 f"--eval {out}")
            if world.main:
                run_folder.drop_metrics_after(out / "metrics.jsonl", start)  # logged after the checkpoint: again
        parts.ddp, parts.lr_factor = distributed.wrap(world, parts, cfg.sync_bn), distributed.lr_factor(world, cfg)
    except (data.DataError, ValueError, ImportError, OSError) as e:
        message = run_folder.describe(e) if isinstance(e, OSError) else str(e)
        world.settle(error=message)  # (torchrun, an error before the folder was shared: the other ranks stop too)
        if world.main:
            print(f"train.py: error: {message}", file=sys.stderr)
        if created and out is not None and run_folder.is_empty_but_lock(out):  # leave no empty run folder
            (out / run_folder.LOCK_NAME).unlink(missing_ok=True)
            held.close()
            out.rmdir()
        return 2

    # -- config.json, versions
    env = provenance.environment(device, sys.argv[1:] if argv is None else list(argv))
    if world.enabled:  # the global batch and the lr rule, in the log and in config.json
        env["distributed"] = distributed.describe(world, cfg)
        print(distributed.summary_line(world, cfg))
    if device.type == "cuda":
        print(f"GPU {env['gpu']}, CUDA {env['cuda']}, cuDNN {env['cudnn']} (bf16 3D convs are slow off cuDNN: "
              f"pytorch#166122, cuDNN 9.8-9.14; channels_last_3d={parts.memory_format == torch.channels_last_3d})")
    if resume_state is not None:
        print(f"resumed {out} at iteration {start}")
    print(f"{cfg.method}: {cfg.labeled} labeled, {cfg.iterations} iterations, patch {cfg.patch}, "
          f"n_filters {cfg.n_filters}, downsample {cfg.downsample}, device {device} -> {out}")

    # -- the loop (device-side accumulators; the host reads them every --log-every iterations)
    bad_at = torch.full((), -1, dtype=torch.long, device=device)  # first iteration with a non-finite term
    bad_term = torch.zeros((), dtype=torch.long, device=device)  # which term (index into TERMS)
    window = torch.zeros(5, device=device)  # sums of CE, Dice, consistency, mask fraction, uncertainty
    monitor, stop = provenance.gpu_monitor(device), []
    last_good = f"{out / 'checkpoint.pt'} (iteration {start})" if resume_state is not None else None

    def stopping() -> str:
        return f"stopping (last good checkpoint: {last_good})" if last_good else "stopping (no checkpoint saved yet)"

    def check_finite():  # a host-device sync point (torchrun: a collective, every rank stops at the same iteration)
        at, term, rank = distributed.first_nonfinite(world, bad_at, bad_term)
        if at >= 0:
            raise NonFiniteLoss(f"non-finite {TERMS[term]} loss at iteration {at}{world.on(rank)}; {stopping()}")

    def save_checkpoint(done):
        nonlocal last_good
        check_finite()  # never save weights that went through a non-finite loss,
        for name, model in (("student", parts.student), ("teacher", parts.teacher)):  # nor weights an update broke
            bad = None if model is None else checkpoints.first_nonfinite(model.state_dict())
            if bad is not None:
                raise NonFiniteLoss(f"non-finite {name} weight {bad} after iteration {done}; {stopping()}")
        ranks = distributed.gather_rank_states(world, parts)  # torchrun: every rank's sampler and RNG states
        if world.main:
            files.atomic_save(checkpoints.training_state(parts, done) | ranks, out / "checkpoint.pt")
        last_good = f"{out / 'checkpoint.pt'} (iteration {done})"

    t_log = t_bar = t0 = time.perf_counter()
    n_window = 0
    if not world.enabled:  # (under torchrun Ctrl-C ends every rank: ranks would stop at different iterations)
        signal.signal(signal.SIGINT, lambda *_: stop.append("interrupted"))  # finish the iteration, save, exit
    try:
        if world.main:
            provenance.write_config(out, dataclasses.asdict(cfg), env, split, resumed=resume_state is not None)
        log = held.enter_context(contextlib.closing(metrics_log.MetricsLog(out, cfg.tensorboard, start)
                                                    if world.main else distributed.NoLog()))
        for iteration in range(start, cfg.iterations):
            terms, stats = train_step(parts, iteration)
            done = iteration + 1
            nonfinite = ~torch.isfinite(terms)
            first = nonfinite.any() & (bad_at < 0)
            bad_at = torch.where(first, done, bad_at)
            bad_term = torch.where(first, nonfinite.int().argmax(), bad_term)
            window += torch.cat([terms, stats])
            n_window += 1

            now = time.perf_counter()
            if now - t_bar > 0.5:
                progress(done, cfg.iterations, (done - start) / (now - t0))
                t_bar = now
            if done % cfg.log_every == 0 or done == cfg.iterations:
                check_finite()
                means = distributed.mean_over_ranks(world, window / n_window)  # torchrun: averaged over the ranks
                distributed.check_same_weights(world, {"student": parts.student, "teacher": parts.teacher}, done)
                ce, dice, cons, mask, unc = means.tolist()  # sync
                now = time.perf_counter()
                lr, weight, threshold = schedule(cfg, iteration)
                line = {"iteration": done, "lr": lr * parts.lr_factor, "loss_ce": ce, "loss_dice": dice, "loss_supervised": 0.5 * (ce + dice)}
                if cfg.method != "supervised":  # no teacher, no consistency term
                    line |= {"loss_consistency": cons, "consistency_weight": weight}
                if cfg.method == "uamt":  # only UA-MT has an uncertainty mask
                    line |= {"threshold": threshold, "mask_fraction": mask, "uncertainty_mean": unc}
                line["it_per_s"] = n_window / (now - t_log)
                if device.type == "cuda":
                    line["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                line |= monitor()
                log.write(line)
                print(f"\r{log_line(line, cfg.iterations)}", flush=True)
                window.zero_()
                n_window, t_log = 0, now
            if done % cfg.save_every == 0 and done < cfg.iterations:
                save_checkpoint(done)
            if stop or done == cfg.stop_at:
                save_checkpoint(done)
                print(f"{stop[0] if stop else 'stopped'} at iteration {done}; continue with --resume {out}")
                return 130 if stop else 0
        elapsed = time.perf_counter() - t0  # the last iteration logged, so the device is idle: a true time
        progress(cfg.iterations, cfg.iterations, (cfg.iterations - start) / elapsed, end="\n")
        save_checkpoint(cfg.iterations)  # (checks the losses and the weights first)
        signal.signal(signal.SIGINT, signal.default_int_handler)

        # -- the end: final weights, speed, evaluation of the student (split over the ranks under torchrun)
        for model in (parts.student, parts.teacher) if cfg.sync_bn else ():
            if model is not None:  # (no teacher for --method supervised)
                distributed.local_batch_norm_(model)  # the evaluation runs each rank alone
        if world.main:
            files.atomic_save({"model": parts.student.state_dict(), "config": dataclasses.asdict(cfg)},
                                   out / "student.pt")
        if parts.teacher is not None and world.main:
            files.atomic_save({"model": parts.teacher.state_dict(), "config": dataclasses.asdict(cfg)},
                                   out / "teacher.pt")
        speed = {"train_seconds": elapsed, "it_per_s": (cfg.iterations - start) / elapsed}
        if device.type == "cuda":
            speed["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if start < cfg.iterations:  # (a run stopped during its final evaluation trains nothing on --resume)
            print(f"trained {cfg.iterations - start} iterations in {elapsed:.1f} s ({speed['it_per_s']:.2f} it/s"
                  + (f", peak GPU memory {speed['peak_gpu_mem_gb']:.2f} GiB)" if device.type == "cuda" else ")"))
            log.write({"iteration": cfg.iterations, **speed})
        result = evaluate(parts.student, cfg, parts.test_cases, out, name="eval.json", checkpoint=str(out / "student.pt"),
                          world=world)
        if cfg.figures and world.main:
            write_figures(parts.student, cfg, parts.test_cases, result, out)
    except (NonFiniteLoss, distributed.RankMismatch) as e:
        print(f"\ntrain.py: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torchrun: a collective failed (another rank died, raised or hung)
        if not (world.enabled and distributed.is_comm_failure(e)):
            raise
        print(f"\ntrain.py: error: {distributed.comm_failure_line(world, e)}; {stopping()}", file=sys.stderr)
        return 3
    except (OSError, files.FolderError) as e:  # a full disk, a folder gone, a link planted: one line, none torn
        reason = run_folder.describe(e) if isinstance(e, OSError) else str(e)
        print(f"\ntrain.py: error: cannot write the run in {out} ({reason}); "
              + (f"continue from {last_good} with --resume {out}" if last_good else "no checkpoint saved yet"),
              file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
