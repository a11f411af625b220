"""train.py's settings: ``Config`` (one field a flag, defaults = the paper's), their ranges and choices, the
--demo sizes, and the command line built from them.

Every field's comment is its ``--help`` text; ``RANGES`` and ``CHOICES`` are checked in ``Config`` (a config read
from a checkpoint is checked like a flag) and shown in ``--help``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from uamt_fast import cli
from uamt_fast.evaluation.inference import BLENDS
from uamt_fast.nets.vnet import MAX_FILTERS

DESCRIPTION = 'Train UA-MT (Yu et al., MICCAI 2019) on the left atrium MRI data set, fast, and evaluate it.'
EXAMPLES = """    python train.py --demo                                 # synthetic data, reduced sizes, CPU, ~1 minute
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
    python train.py --data /path/to/ACDC_prepared --labeled-patients 3   # ACDC (prepare --preset acdc): 2D, SSL4MIS's protocol
    python train.py --data /path/to/prepared --dims 2 --patch 128 128 1   # any prepared set, slice by slice (2D U-Net)
    python train.py --data /path/to/LA --tensorboard   # metrics.jsonl's scalars also in runs/<run>/tensorboard
    torchrun --nproc_per_node 4 train.py --data /path/to/LA   # DDP over 4 GPUs: global batch 4 x 4 crops (--lr-scale, --sync-bn)
    # reduced real-data run on a 2-core CPU, ~30 min (volumes downsampled 2x, narrower V-Net, shorter schedule):
    python train.py --data /path/to/LA --downsample 2 --n-filters 4 --patch 64 48 32 --iterations 800 --threads 1"""


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
    labeled: int = 0  # the first N ids of train.list are labeled, the rest unlabeled (paper: 8, 16, 24); 0: the data's default, every case of a prepared set's train.list (16 for the LA release)
    labeled_patients: int = 0  # ACDC: the volumes of the first N patients of train.list are labeled, both frames (SSL4MIS: 3 -> 68, 7 -> 136 slices); another set: the first N volumes (= --labeled N); 0: --labeled decides
    dims: int = 3  # 3: the V-Net on 3D crops; 2: SSL4MIS's 2D U-Net on slices along the last axis (--patch X Y 1), resized to the patch, for any prepared set
    dropout: bool = True  # Dropout3d(0.5) in the V-Net ("Bayesian V-Net"); --no-dropout = vanilla V-Net
    n_filters: int = 16  # V-Net width of the first stage
    num_classes: int = 0  # classes incl. background; 0: the data's (prepare's dataset.json; 2 for the LA release)
    patch: tuple = (112, 112, 80)  # training crop (X Y Z), multiples of 16; also the sliding-window size. --dims 2: X Y 1, each slice resized to X x Y
    downsample: int = 1  # average-pool images / majority-pool labels by this factor once at load (CPU runs)
    batch_labeled: int = 2  # labeled crops per batch
    batch_unlabeled: int = 2  # unlabeled crops per batch
    # optimisation (SGD, lr / 10 every lr_step iterations, or the poly decay)
    iterations: int = 6000  # training iterations
    lr: float = 0.01  # base learning rate
    lr_schedule: str = "step"  # step: lr / 10 every --lr-step iterations (UA-MT's release) | poly: lr (1 - i / --iterations)^0.9 (SSL4MIS's 2D trainers)
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
    threshold_bound: str = "ln-c"  # where the uncertainty threshold ramps to: ln-c (ln C, the largest entropy of C classes: the paper's) | ln-2 (SSL4MIS's 2D UA-MT whatever C, as the published ACDC numbers were made: to compare with them)
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
    val_every: int = 0  # score the data's val.list every N iterations into metrics.jsonl (val_dice, per class): curves only, never a checkpoint choice (SSL4MIS scores its val every 200); 0: never
    blend: str = "mean"  # overlapping windows of the evaluation (and of predict, by default): mean (the paper's plain average) | gaussian (MONAI's / nnU-Net's weights, sigma 1/8 of the window: fainter seams at window borders)
    # torchrun (uamt_fast/distributed.py; no effect without it)
    sync_bn: bool = False  # batch-norm statistics over all ranks' crops (default: per rank, each rank's batch alone)
    lr_scale: str = "none"  # none: --lr whatever the world size | linear: --lr x world size (the global batch grows with it)
    dist_timeout: int = 600  # seconds a collective waits for the other ranks before the run stops
    tensorboard: bool = False  # also write metrics.jsonl's scalars to <run>/tensorboard (pip install 'uamt_fast[tensorboard]'); the JSONL stays the record
    # Not a setting (an InitVar: no flag, not saved): where each value the command line did not give came from
    # ({"labeled": "the default for the LA release", "patch": "the default"}), for error messages (``setting``).
    origins: dataclasses.InitVar[dict | None] = None

    def setting(self, name: str) -> str:
        """``--labeled 16 (the default for the LA release)``: the flag and its value, and where the value came
        from when the command line did not give it (``origins``, filled by ``training.build.make_config``)."""
        value = getattr(self, name)
        shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        origin = self.origins.get(name)
        return f"{cli.flag(name)} {shown}" + (f" ({origin})" if origin else "")

    def __post_init__(self, origins: dict | None):
        self.origins = dict(origins or {})
        self.patch = tuple(self.patch) if isinstance(self.patch, (list, tuple)) else self.patch
        self.data = [self.data] if isinstance(self.data, str) else self.data  # saved configs before: one str
        if type(self.figures_cases) is int:  # saved configs before ids and picks: a count (panels now follow --first)
            self.figures_cases = []
        # a config read from a file may hold anything: types first, then choices and ranges
        cli.check_fields(self, RANGES, CHOICES)
        if self.dims == 2 and len(self.patch) == 3 and self.patch[2] != 1 and "patch" in self.origins:
            self.patch = (*self.patch[:2], 1)  # a 3D default or a data set's 3D patch: its slice
        _check_patch(self.patch, self.dims)
        self.data = [d for d in self.data if d]
        if self.reference_ops:
            self.fused_loss = self.fused_ema = False
        if self.dims == 2 and self.downsample != 1:  # (the slice-wise evaluation has no pooled path either)
            raise ValueError(f"{self.setting('downsample')}: --dims 2 resizes every slice to the patch; drop "
                             "--downsample (or give a smaller --patch X Y 1)")
        if self.dims == 2 and self.blend != "mean":  # (slices have no overlapping windows to blend)
            raise ValueError(f"{self.setting('blend')}: --dims 2 predicts whole slices, no overlapping windows to "
                             "blend; drop it")
        if self.batch_unlabeled < 1 and self.method != "supervised":
            raise ValueError(f"--batch-unlabeled must be >= 1 for --method {self.method}; got {self.batch_unlabeled}")
        # (--dims 2 evaluates whole slices resized to the patch: no windows, the strides are not used)
        if self.dims == 3 and (self.eval_stride_xy > min(self.patch[:2]) or self.eval_stride_z > self.patch[2]):
            raise ValueError(f"{self.setting('eval_stride_xy')} / {self.setting('eval_stride_z')}: a stride larger "
                             f"than the window ({self.setting('patch')}) leaves voxels that no window covers")
        # The consistency ramp spans the run, as in the paper (40 periods of 150 = 6000 iterations).
        self.consistency_period = self.consistency_period or max(1, round(150 * self.iterations / 6000))


# The valid values of each numeric setting, checked in Config and shown in --help: "[a, b]" / "(a, b]" are
# intervals, ">= a" / "> a" half-lines; floats must also be finite (nan and inf are never a setting). The
# upper bounds of the floats keep every value (and lr * grad) inside float32, where the optimizer works.
RANGES = {
    "first": ">= 0", "figures_passes": "[1, 1024]", "labeled": ">= 0", "labeled_patients": ">= 0", "dims": "[2, 3]",
    "n_filters": f"[1, {MAX_FILTERS}]",
    "num_classes": "[0, 255]",
    "downsample": "[1, 16]", "batch_labeled": "[1, 1024]", "batch_unlabeled": "[0, 1024]", "iterations": ">= 1",
    "lr": "(0, 1000]", "lr_step": ">= 1", "momentum": "[0, 1)", "weight_decay": "[0, 1]", "ema_decay": "[0, 1]",
    "consistency": "[0, 1000]", "consistency_rampup": "[0, 1000000]", "consistency_period": ">= 0",
    "mc_passes": "[1, 1024]", "noise_std": "[0, 1000]", "noise_clip": "[0, 1000]", "teacher_chunks": "[1, 1025]",
    "threads": "[0, 4096]", "val_every": ">= 0",
    "seed": f"[0, {2**63 - 1}]", "log_every": ">= 1", "save_every": ">= 1", "stop_at": ">= 0",
    "eval_stride_xy": ">= 1", "eval_stride_z": ">= 1", "eval_batch": "[1, 4096]", "dist_timeout": "[1, 86400]",
}
def _check_patch(patch, dims: int = 3) -> None:
    if dims == 2:  # one slice: X, Y and a depth of 1 (prepare --preset acdc's (256, 256, 1))
        if len(patch) != 3 or patch[2] != 1 or any(p < 16 or p % 16 or p > 1024 for p in patch[:2]):
            raise ValueError(f"--dims 2: --patch must be X Y 1, X and Y multiples of 16 in [16, 1024] (four 2x2 "
                             f"pools of the U-Net); got {patch}")
        return
    if len(patch) != 3 or any(p < 16 or p % 16 or p > 1024 for p in patch):
        raise ValueError(f"--patch must be three multiples of 16 in [16, 1024] (four stride-2 V-Net stages); got {patch}")


CHOICES = {"method": ("uamt", "mt", "mt-dice", "supervised"), "consistency_on": ("unlabeled", "all"),
           "compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
           "sgd": ("auto", "fused", "foreach", "loop"), "device": ("auto", "cuda", "cpu"),
           "data_device": ("auto", "cuda", "cpu"), "lr_scale": ("none", "linear"), "blend": BLENDS,
           "lr_schedule": ("step", "poly"), "threshold_bound": ("ln-c", "ln-2")}


LA_LABELED = 16  # --labeled's default for the LA release (no dataset.json): the paper's 16 of 80 (20%)

# The --demo sizes: same code path, smaller everything. Flags given on the command line still win.
# One thread: measured 43 s vs 213 s for 2 threads on the shared 2-core CI machine (OpenMP spin-waits).
DEMO = {"n_filters": 4, "patch": (32, 32, 16), "labeled": 4, "iterations": 120, "log_every": 20, "save_every": 60,
        "eval_stride_xy": 16, "eval_stride_z": 8, "threads": 1}
DEMO_DATA = {"n_train": 12, "n_test": 4, "shape": (48, 48, 32), "seed": 0}
DEMO_DATA_DIR = "demo_data"  # the --demo data set, inside the run folder
# On --resume these may differ from the saved config; everything else must match (same run).
RESUME_OVERRIDABLE = {"data", "resume", "out", "device", "compile", "compile_mode", "compile_blocks", "compile_cache",
                      "cudnn_benchmark", "log_every", "save_every", "stop_at", "val_every",
                      "eval_stride_xy", "eval_stride_z", "eval_batch", "blend", "data_device", "threads",
                      "figures", "figures_cases", "figures_passes", "cases", "first", "tensorboard", "dist_timeout"}
EVAL_ONLY = {"cases", "first", "figures_cases"}  # --eval takes these from its command line, never from the checkpoint


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def parse_args(argv=None) -> dict:
    """The command line -> {field: value} for the flags actually given (defaults come from Config)."""
    return vars(make_parser().parse_args(argv))


def make_parser() -> argparse.ArgumentParser:
    """One flag per Config field (``uamt_fast.cli.dataclass_parser``); ``EXAMPLES`` close the --help text."""
    return cli.dataclass_parser(Config, DESCRIPTION, "examples:\n" + EXAMPLES, RANGES, CHOICES, appended=("data",))
