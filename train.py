"""Train UA-MT (Yu et al., MICCAI 2019) on the left atrium MRI data set, fast, and evaluate it.

    python train.py --demo                                 # synthetic data, reduced sizes, CPU, ~1 minute
    python train.py --data ../shared/data/LA               # released code: 16 labeled, 6000 iterations (UA-MT-UN)
    python train.py --data ../shared/data/LA --consistency-on all   # the paper's "UA-MT" rows (--labeled 8, 16, 24)
    python train.py --data ../shared/data/LA --method mt   # mean teacher without the uncertainty mask
    python train.py --data ../shared/data/LA --method mt-dice   # mean teacher, soft-Dice consistency (paper: MT-Dice)
    python train.py --data LA_part1 --data LA_part2 --data LA_part3   # the data set in several folders (data.py pack)
    python train.py --data ../shared/data/LA --method supervised [--no-dropout]  # Bayesian / vanilla V-Net
    python train.py --resume runs/<run>                    # continue a run from its last checkpoint
    python train.py --eval runs/<run>/student.pt --data ../shared/data/LA       # evaluate only: runs/<run>/eval_student.json
    python train.py --data ../shared/data/LA --out runs/a --overwrite            # replace the run in runs/a
    python train.py --eval runs/<run>/student.pt --data ../shared/data/LA --figures figs --figures-cases 2
    # reduced real-data run on a 2-core CPU, ~30 min (volumes downsampled 2x, narrower V-Net, shorter schedule):
    python train.py --data ../shared/data/LA --downsample 2 --n-filters 4 --patch 64 48 32 --iterations 800 --threads 1

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
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import uamt_fast
from uamt_fast import checkpoints, data, figures, inference, reference
from uamt_fast.vnet import VNet

TERMS = ("cross-entropy", "dice", "consistency")  # the loss terms, in the order train_step returns them
METHODS = ("uamt", "mt", "mt-dice", "supervised")  # --method


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
    figures_cases: int = 0  # panels for the first N test cases only (0: all); each costs figures_passes evaluations
    figures_passes: int = 8  # T stochastic (MC-dropout) passes for the uncertainty map of the panels
    # method
    method: str = "uamt"  # uamt | mt (no uncertainty mask) | mt-dice (soft-Dice consistency) | supervised (no teacher)
    consistency_on: str = "unlabeled"  # unlabeled (released code, paper's UA-MT-UN) | all (paper's UA-MT)
    labeled: int = 16  # the first N ids of train.list are labeled, the rest unlabeled (paper: 8, 16, 24)
    dropout: bool = True  # Dropout3d(0.5) in the V-Net ("Bayesian V-Net"); --no-dropout = vanilla V-Net
    n_filters: int = 16  # V-Net width of the first stage
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
    threads: int = 0  # torch CPU threads; 0: torch's default (one per core). 1 is faster on a busy shared CPU
    # logging, checkpoints, evaluation
    seed: int = 1337  # seeds the model init, the sampler generator and the noise/dropout streams (released: 1337)
    log_every: int = 50  # iterations between log lines (the only host-device syncs in the loop)
    save_every: int = 1000  # iterations between checkpoints
    stop_at: int = 0  # stop after this iteration with a checkpoint, before any final save or evaluation (continue with --resume); 0: never
    eval_stride_xy: int = 18  # sliding-window stride in the axial plane (paper: 18)
    eval_stride_z: int = 4  # sliding-window stride along the last axis (paper: 4)
    eval_batch: int = 4  # windows per forward in the evaluation

    def __post_init__(self):
        self.patch = tuple(int(p) for p in self.patch)
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)  # saved configs before: one str
        self.data = [d for d in self.data if d]
        if self.reference_ops:
            self.fused_loss = self.fused_ema = False
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.consistency_on not in ("unlabeled", "all"):
            raise ValueError(f"--consistency-on must be 'unlabeled' or 'all'; got {self.consistency_on!r}")
        if self.compile_mode not in COMPILE_MODES or self.sgd not in ("auto", "fused", "foreach", "loop"):
            raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)} and --sgd one of auto, fused, "
                             f"foreach, loop; got {self.compile_mode!r}, {self.sgd!r}")
        if self.device not in ("auto", "cuda", "cpu") or self.data_device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device/--data-device must be auto, cuda or cpu; got {self.device!r}/{self.data_device!r}")
        if len(self.patch) != 3 or any(p < 16 or p % 16 for p in self.patch):
            raise ValueError(f"--patch must be three positive multiples of 16 (four stride-2 V-Net stages); got {self.patch}")
        for name in ("labeled", "n_filters", "downsample", "batch_labeled", "iterations", "lr_step", "mc_passes",
                     "teacher_chunks", "log_every", "save_every", "eval_stride_xy", "eval_stride_z", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.threads < 0 or self.stop_at < 0 or self.figures_cases < 0 or self.figures_passes < 1:
            raise ValueError(f"--threads, --stop-at, --figures-cases must be >= 0 and --figures-passes >= 1; got "
                             f"{self.threads}, {self.stop_at}, {self.figures_cases}, {self.figures_passes}")
        if self.batch_unlabeled < 1 and self.method != "supervised":
            raise ValueError(f"--batch-unlabeled must be >= 1 for --method {self.method}; got {self.batch_unlabeled}")
        # The consistency ramp spans the run, as in the paper (40 periods of 150 = 6000 iterations).
        self.consistency_period = self.consistency_period or max(1, round(150 * self.iterations / 6000))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

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
                      "figures", "figures_cases", "figures_passes"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's default also prints the usage)
        raise ValueError(message)


def parse_args(argv=None) -> dict:
    """The command line -> {field: value} for the flags actually given (defaults come from Config).

    One flag per Config field, its --help text the field's comment and default; booleans as --x / --no-x;
    the usage examples of this file's docstring close the --help text.
    """
    comments = dict(re.findall(r"^    (\w+): [^#\n]*# (.*)$", inspect.getsource(Config), re.MULTILINE))
    examples = __doc__.split("\n\n")[1]
    p = _Parser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n" + examples)
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        if f.default not in (None, "", dataclasses.MISSING):  # (MISSING: a default_factory, i.e. --data)
            shown = {True: "on", False: "off"}.get(f.default, f.default) if isinstance(f.default, bool) else f.default
            help += f" (default: {' '.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
        help = help.replace("%", "%%")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        elif f.name == "data":
            p.add_argument(flag, action="append", metavar="DIR", help=help)
        elif f.name == "patch":
            p.add_argument(flag, type=int, nargs=3, metavar=("X", "Y", "Z"), help=help)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], help=help)
    return vars(p.parse_args(argv))


# ----------------------------------------------------------------------------- data
def downsample_case(case, k: int):
    """Image average-pooled by k (each output voxel = mean of a k^3 block), label by majority (block mean
    >= 0.5); a remainder smaller than k along an axis is dropped."""
    if k == 1:
        return case
    image = torch.as_tensor(np.asarray(case.image))[None, None]
    label = torch.as_tensor(np.asarray(case.label)).float()[None, None]
    image = F.avg_pool3d(image, k)[0, 0].numpy()
    label = (F.avg_pool3d(label, k)[0, 0] >= 0.5).to(torch.uint8).numpy()
    return dataclasses.replace(case, image=image, label=label)


def load_split(cfg: Config, split: str):
    """Cases of ``split`` read once; training cases are downsampled once (test cases stay at full
    resolution: ``evaluate`` scores full-resolution labels)."""
    cases = data.load_cases(cfg.data, data.read_list(cfg.data, split))
    return [downsample_case(c, cfg.downsample) for c in cases] if split == "train" else cases


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
    compile_cache_file: Path | None = None  # where the compiled artifacts go after the first iteration


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu"))


def build(cfg: Config, train_cases=None) -> Parts:
    """Model, EMA teacher, optimizer and batch sampler for ``cfg`` (reads the train split unless given)."""
    device = pick_device(cfg)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    train_cases = load_split(cfg, "train") if train_cases is None else train_cases
    labeled_ids, unlabeled_ids = data.semi_supervised_split([c.id for c in train_cases], cfg.labeled)
    by_id = {c.id: c for c in train_cases}
    if cfg.method != "supervised" and not unlabeled_ids:
        raise ValueError(f"--labeled {cfg.labeled} leaves no unlabeled case for --method {cfg.method}")
    data_device = device if cfg.data_device == "auto" else torch.device(cfg.data_device)
    # (the sampler refuses a patch larger than every volume: its crops would be mostly zero padding)
    sampler = data.TwoStreamSampler(
        [by_id[i] for i in labeled_ids], [by_id[i] for i in unlabeled_ids] if cfg.method != "supervised" else [],
        patch_size=cfg.patch, batch_labeled=cfg.batch_labeled,
        batch_unlabeled=cfg.batch_unlabeled if cfg.method != "supervised" else 0,
        device=data_device, seed=cfg.seed)

    memory_format = torch.channels_last_3d if (cfg.channels_last if cfg.channels_last is not None else cuda) \
        else torch.contiguous_format
    student = VNet(n_filters=cfg.n_filters, dropout=cfg.dropout).to(device, memory_format=memory_format)
    if cfg.full_res_contiguous:
        student.full_res_memory_format_(torch.contiguous_format)
    # The teacher starts as a copy of the student (the released code initialises it separately, but the
    # first EMA step, alpha = 0, overwrites it; only iteration 0's target, weighted 6.7e-4, differs).
    teacher = None
    if cfg.method != "supervised":
        teacher = VNet(n_filters=cfg.n_filters, dropout=cfg.dropout).to(device, memory_format=memory_format)
        if cfg.full_res_contiguous:
            teacher.full_res_memory_format_(torch.contiguous_format)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        teacher.train()  # as released: the teacher normalises by batch statistics and keeps dropout on
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
    losses_fn, teacher_fn, cache_file = student_losses, teacher, None
    if compile_:
        cache_file = compile_cache(cfg.compile_cache)
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
    return Parts(cfg, device, student, teacher, optimizer, sampler, losses_fn, teacher_fn, memory_format,
                 compile_cache_file=cache_file)


def compile_cache(folder: str) -> Path | None:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels, autotuning) at ``folder``
    and load the portable artifacts file saved there by an earlier run; returns that file's path (saved
    after the first compiled iteration) or None for ``folder`` = "". A TORCHINDUCTOR_CACHE_DIR already
    in the environment wins. Takes effect only before this process's first compilation."""
    if not folder:
        return None
    root = Path(folder).expanduser()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    path = root / f"artifacts-torch{torch.__version__}-{_device_tag()}.bin"
    loader = getattr(torch.compiler, "load_cache_artifacts", None)  # torch >= 2.7
    if loader is not None and path.is_file():
        try:
            loader(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - a stale or foreign cache only costs a cold start
            print(f"train.py: ignoring compile cache {path} ({type(e).__name__}: {e})", file=sys.stderr)
    return path


def _device_tag() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def save_compile_artifacts(path: Path) -> None:
    """Write the compiled artifacts of this process (``torch.compiler.save_cache_artifacts``) to ``path``,
    atomically; copied to another machine with the same GPU and versions, they make its first run warm."""
    saver = getattr(torch.compiler, "save_cache_artifacts", None)  # torch >= 2.7
    try:
        artifacts = saver() if saver is not None else None
        if artifacts is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(artifacts[0])
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs the next run a cold start
        print(f"train.py: compile cache not saved to {path} ({type(e).__name__}: {e})", file=sys.stderr)


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
                   n_labeled: int, method: str, consistency_on: str, fused_loss: bool):
    """Student forward and the UA-MT objective.

    images (B, 1, *S), labels (B, *S) with the labeled rows first; target (b, C, *S) and mc_logits
    (T, b, C, *S) from the teacher for the b rows that get consistency; weight lambda and threshold H
    are 0-dim device tensors. Returns the total loss, the terms (CE, Dice, consistency) and the
    uncertainty statistics (mask fraction, mean uncertainty), all device tensors.
    """
    logits = student(images)  # (B, C, *S)
    lab_logits, lab = logits[:n_labeled].float(), labels[:n_labeled]
    ce, dice = reference.cross_entropy(lab_logits, lab), reference.dice_loss(lab_logits, lab)
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
    return lr, weight, reference.uncertainty_threshold(iteration, cfg.iterations)


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
        group["lr"] = lr
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
            parts.student, images, labels, target, mc_logits,
            torch.full((), weight, device=dev), torch.full((), threshold, device=dev),  # fill kernels, no sync
            n_labeled=cfg.batch_labeled, method=cfg.method, consistency_on=cfg.consistency_on,
            fused_loss=cfg.fused_loss)
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
    if parts.compile_cache_file is not None:  # everything is compiled by now: keep it for the next run
        save_compile_artifacts(parts.compile_cache_file)
        parts.compile_cache_file = None
    if cuda_graphs:  # graph outputs live in memory the next replay reuses
        return terms.detach().clone(), stats.detach().clone()
    return terms.detach(), stats.detach()


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``: a crash mid-save
    leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checkpoint_state(parts: Parts, iteration: int) -> dict:
    """Everything that makes --resume continue the run bit-for-bit (on CPU): weights, teacher BN buffers,
    optimizer momentum, sampler and RNG states, iteration count and config."""
    state = {"iteration": iteration, "config": dataclasses.asdict(parts.cfg), "student": parts.student.state_dict(),
             "optimizer": parts.optimizer.state_dict(), "sampler": parts.sampler.state_dict(),
             "rng_cpu": torch.get_rng_state()}
    if parts.teacher is not None:
        state["teacher"] = parts.teacher.state_dict()
    if parts.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(parts.device)
    return state


RESUME_KEYS = ("iteration", "config", "student", "optimizer", "sampler", "rng_cpu")


def restore(parts: Parts, state: dict, path: Path = Path("checkpoint.pt")) -> int:
    """Load a checkpoint_state dict into ``parts``; a checkpoint that does not fit is a one-line ValueError."""
    checkpoints.load_weights(parts.student, state["student"], path, "--resume", "student")
    if parts.teacher is not None:
        checkpoints.load_weights(parts.teacher, state.get("teacher"), path, "--resume", "teacher")
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and parts.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], parts.device)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ValueError(f"--resume {path}: optimizer, sampler or RNG state does not fit this run "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise ValueError(f"--resume {path}: bad iteration {state['iteration']!r}")
    return state["iteration"]


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def load_model(path: Path, device: torch.device) -> tuple[VNet, dict, Path]:
    """--eval: the V-Net of a checkpoint or run folder, its config and the file read (uamt_fast.checkpoints:
    weights_only loading, one-line errors; the config may hold only fields this train.py knows)."""
    return checkpoints.load_vnet(path, device, "--eval", CONFIG_FIELDS)


# ----------------------------------------------------------------------------- logging helpers
def environment(device: torch.device, argv: list) -> dict:
    """Versions, device and command line, for config.json."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "uamt_fast": uamt_fast.__version__, "device": str(device), "argv": argv,
           "started": datetime.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return env


def gpu_monitor(device: torch.device):
    """A function returning {gpu_util, gpu_power_w} via nvidia-ml-py, or {} when unavailable."""
    if device.type != "cuda":
        return dict
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is optional
        return dict
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except pynvml.NVMLError:  # no usable NVML (e.g. in some containers): simply not logged
        return dict
    return lambda: {"gpu_util": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "gpu_power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000}


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


def evaluate(model: VNet, cfg: Config, cases, out_dir: Path, name: str = "eval.json", checkpoint: str | None = None) -> dict:
    """The paper's sliding-window protocol on ``cases`` (full resolution); prints the table and writes it to
    ``out_dir / name`` (a new file: if that name is taken, ``<stem>-2.json``, ``-3``... so an evaluation never
    replaces another), with a ``source`` record (checkpoint, data, case ids, settings). Strict JSON: an
    undefined distance (empty mask) is ``null``, counted in ``nan_cases``.

    With --downsample k the windows (``cfg.patch``, strides ``cfg.eval_stride_*``) slide over the
    k-times downsampled image; the averaged softmax is upsampled trilinearly back to full resolution
    (each low-resolution voxel sits at the centre of its k^3 block, ``align_corners=False``), the
    remainder voxels dropped by the pooling take their nearest neighbour's value, and the argmax is
    scored against the full-resolution label.
    """
    model.eval()
    t0 = time.perf_counter()
    result = inference.evaluate(model, cases, patch_size=cfg.patch, stride_xy=cfg.eval_stride_xy,
                                stride_z=cfg.eval_stride_z, batch_size=cfg.eval_batch, downsample=cfg.downsample)
    print(inference.format_table(result))
    print(f"evaluated {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    result["source"] = {
        "checkpoint": checkpoint, "data": cfg.data, "split": "test", "case_ids": [str(c.id) for c in cases],
        "settings": {k: getattr(cfg, k) for k in ("patch", "eval_stride_xy", "eval_stride_z", "eval_batch",
                                                  "downsample", "n_filters", "dropout")},
        "uamt_fast": uamt_fast.__version__, "evaluated": datetime.datetime.now().isoformat(timespec="seconds")}
    path = new_file(out_dir / name)
    path.write_text(json.dumps(_strict_json(result), indent=1, allow_nan=False))
    print(f"wrote {path}")
    return result


def new_file(path: Path) -> Path:
    """``path`` if free, else ``<stem>-2<suffix>``, ``-3``, ...: the first name not taken."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _strict_json(x):
    """NaN / Inf -> None (JSON null), recursively: strict JSON parsers reject bare NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def write_figures(model: VNet, cfg: Config, cases, run_dir: Path) -> None:
    """--figures: panels of the first --figures-cases test cases, and the run's training curves if it has a log."""
    out = Path(cfg.figures)
    name = "UA-MT" if cfg.method == "uamt" else cfg.method
    for path in figures.write_panels({name: model}, cases[: cfg.figures_cases or None], out, dataclasses.asdict(cfg),
                                     cfg.figures_passes):
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
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise ValueError(f"--resume {path}: not a train.py checkpoint.pt (lacks {', '.join(missing)})")
        saved = checkpoints.config_of(state, path, "--resume", CONFIG_FIELDS)
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        changed = {k for k, v in given.items()
                   if k not in RESUME_OVERRIDABLE and _norm(v) != _norm(saved.get(k, defaults[k]))}
        if changed:
            raise ValueError(f"--resume: cannot change {', '.join('--' + k.replace('_', '-') for k in sorted(changed))} "
                             f"of a run (allowed: {', '.join(sorted(RESUME_OVERRIDABLE))})")
        try:
            return Config(**(saved | given | {"out": given["resume"], "resume": given["resume"]})), state
        except TypeError as e:
            raise ValueError(f"--resume {path}: bad saved config ({e})") from None
    return Config(**((DEMO if given.get("demo") else {}) | given)), None


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "teacher.pt", "eval.json")


def claim_run_folder(out: Path, overwrite: bool) -> None:
    """Create the run folder ``out``; refuse one that already holds a run, unless ``overwrite`` (which
    deletes that run's files, and only those: other files in the folder are left alone)."""
    found = [n for n in RUN_FILES if (out / n).exists()] + sorted(p.name for p in out.glob("eval_*.json"))
    if found and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}): continue it with --resume {out}, "
                         "choose a new --out, or pass --overwrite to replace it")
    for name in found:
        (out / name).unlink()
    if overwrite and (out / DEMO_DATA_DIR / "train.list").is_file():
        shutil.rmtree(out / DEMO_DATA_DIR)
    make_folder(out, "run")


def make_folder(out: Path, purpose: str) -> None:
    """``mkdir -p out``, or a one-line error when ``out`` is a file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a folder for the {purpose}")
    out.mkdir(parents=True, exist_ok=True)


def evaluate_checkpoint(cfg: Config, given: dict, device: torch.device) -> None:
    """--eval: the checkpoint's own settings (width, patch, downsample), the data of the command line or of its
    run, results in a new eval_<checkpoint>.json beside it (or in --out) that never replaces an earlier one."""
    model, saved, path = load_model(Path(cfg.eval), device)
    overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
    ecfg = Config(**({k: v for k, v in saved.items() if k not in ("out", "resume", "eval", "overwrite")}
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
    cases = load_split(ecfg, "test")
    out = Path(cfg.out) if cfg.out else path.parent
    make_folder(out, "evaluation")
    evaluate(model, ecfg, cases, out, name=f"eval_{path.stem}.json", checkpoint=str(path))
    if cfg.figures:
        write_figures(model, ecfg, cases, path.parent)


def main(argv=None) -> int:
    # -- configuration, run folder and bad input (one line on stderr, exit code 2)
    created = False  # this call made the run folder (removed again if it stays empty)
    try:
        given = parse_args(argv)
        cfg, resume_state = make_config(given)
        device = pick_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.figures:
            figures.pyplot()  # fail now, not after training, when the optional matplotlib is missing
        if cfg.eval:
            if cfg.overwrite:
                raise ValueError("--overwrite replaces a training run; --eval never replaces anything (it writes a new "
                                 "eval_<checkpoint>.json): drop --overwrite")
            evaluate_checkpoint(cfg, given, device)
            return 0
        if not cfg.data and not cfg.demo:
            raise ValueError("--data is required (the LA root holding train.list), or use --demo")
        out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}")
        if resume_state is None:
            created = not out.exists()
            claim_run_folder(out, cfg.overwrite)
        if cfg.demo and not cfg.data:  # kept in the run folder, so the run can be evaluated again later
            cfg.data = [str((out / DEMO_DATA_DIR).resolve())]
            data.write_synthetic_la(cfg.data[0], **DEMO_DATA)
        parts = build(cfg)
        parts.test_cases = load_split(cfg, "test")
        start = 0
        if resume_state is not None:
            start = restore(parts, resume_state, out / "checkpoint.pt")
            if start >= cfg.iterations and (out / "eval.json").is_file():
                raise ValueError(f"--resume {out}: the run is finished (it has eval.json); evaluate it again with "
                                 f"--eval {out}")
    except (data.DataError, ValueError, ImportError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        if created and out.is_dir() and not any(out.iterdir()):  # bad --data etc.: leave no empty run folder
            out.rmdir()
        return 2

    # -- config.json, versions
    env = environment(device, sys.argv[1:] if argv is None else list(argv))
    if device.type == "cuda":
        print(f"GPU {env['gpu']}, CUDA {env['cuda']}, cuDNN {env['cudnn']} (bf16 3D convs are slow off cuDNN: "
              f"pytorch#166122, cuDNN 9.8-9.14; channels_last_3d={parts.memory_format == torch.channels_last_3d})")
    if resume_state is not None:
        print(f"resumed {out} at iteration {start}")
    else:
        (out / "config.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "environment": env}, indent=1))
    print(f"{cfg.method}: {cfg.labeled} labeled, {cfg.iterations} iterations, patch {cfg.patch}, "
          f"n_filters {cfg.n_filters}, downsample {cfg.downsample}, device {device} -> {out}")

    # -- the loop (device-side accumulators; the host reads them every --log-every iterations)
    bad_at = torch.full((), -1, dtype=torch.long, device=device)  # first iteration with a non-finite term
    bad_term = torch.zeros((), dtype=torch.long, device=device)  # which term (index into TERMS)
    window = torch.zeros(5, device=device)  # sums of CE, Dice, consistency, mask fraction, uncertainty
    monitor, stop = gpu_monitor(device), []
    signal.signal(signal.SIGINT, lambda *_: stop.append("interrupted"))  # finish the iteration, save, exit

    def check_finite():  # a host-device sync point
        if int(bad_at) >= 0:
            raise NonFiniteLoss(f"non-finite {TERMS[int(bad_term)]} loss at iteration {int(bad_at)}; "
                                f"stopping (last good checkpoint: {out / 'checkpoint.pt'})")

    def save_checkpoint(done):
        check_finite()  # never save weights that went through a non-finite loss
        atomic_save(checkpoint_state(parts, done), out / "checkpoint.pt")

    t_log = t_bar = t0 = time.perf_counter()
    n_window = 0
    try:
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
                ce, dice, cons, mask, unc = (window / n_window).tolist()  # sync
                now = time.perf_counter()
                lr, weight, threshold = schedule(cfg, iteration)
                line = {"iteration": done, "lr": lr, "loss_ce": ce, "loss_dice": dice, "loss_supervised": 0.5 * (ce + dice)}
                if cfg.method != "supervised":  # no teacher, no consistency term
                    line |= {"loss_consistency": cons, "consistency_weight": weight}
                if cfg.method == "uamt":  # only UA-MT has an uncertainty mask
                    line |= {"threshold": threshold, "mask_fraction": mask, "uncertainty_mean": unc}
                line["it_per_s"] = n_window / (now - t_log)
                if device.type == "cuda":
                    line["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                line |= monitor()
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
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
        save_checkpoint(cfg.iterations)  # (checks the non-finite flag first)
    except NonFiniteLoss as e:
        print(f"\ntrain.py: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # -- the end: final weights, speed, evaluation of the student
    atomic_save({"model": parts.student.state_dict(), "config": dataclasses.asdict(cfg)}, out / "student.pt")
    if parts.teacher is not None:
        atomic_save({"model": parts.teacher.state_dict(), "config": dataclasses.asdict(cfg)}, out / "teacher.pt")
    speed = {"train_seconds": elapsed, "it_per_s": (cfg.iterations - start) / elapsed}
    if device.type == "cuda":
        speed["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if start < cfg.iterations:  # (a run stopped during its final evaluation trains nothing on --resume)
        print(f"trained {cfg.iterations - start} iterations in {elapsed:.1f} s ({speed['it_per_s']:.2f} it/s"
              + (f", peak GPU memory {speed['peak_gpu_mem_gb']:.2f} GiB)" if device.type == "cuda" else ")"))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": cfg.iterations, **speed}) + "\n")
    evaluate(parts.student, cfg, parts.test_cases, out, name="eval.json", checkpoint=str(out / "student.pt"))
    if cfg.figures:
        write_figures(parts.student, cfg, parts.test_cases, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
