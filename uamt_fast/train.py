"""Train UA-MT (Yu et al., MICCAI 2019) on the left atrium MRI data set, fast, and evaluate it.

    python train.py --demo            # or: python -m uamt_fast.train --demo, uamt_fast_train --demo
    python train.py --help            # every setting, and the usage examples (uamt_fast.training.config.EXAMPLES)

Read top to bottom: ``main`` is the sequence of steps of a run; ``train`` is the loop. Every setting is a field
of ``uamt_fast.training.config.Config`` (defaults = the paper's); ``--help`` lists them. One iteration is
``uamt_fast.training.step.train_step``; the run is assembled by ``uamt_fast.training.build``. The loop never waits
for the GPU except every --log-every iterations. A run folder holds config.json, metrics.jsonl, checkpoint.pt
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

import contextlib
import dataclasses
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uamt_fast import data, figures, files, progress
from uamt_fast.evaluation import selection
from uamt_fast.nets.unet import UNet2D
from uamt_fast.nets.vnet import VNet
from uamt_fast.training import checkpoints, distributed, metrics_log, provenance, run_folder
from uamt_fast.training.build import (  # noqa: F401 (the trainer's API: tests and benchmarks use them from here)
    build,
    data_settings,
    load_split,
    make_config,
    pick_device,
    resolve_classes,
    saved_config,
)
from uamt_fast.training.config import (  # noqa: F401
    CONFIG_FIELDS,
    DEMO_DATA,
    DEMO_DATA_DIR,
    EVAL_ONLY,
    RANGES,
    RESUME_OVERRIDABLE,
    Config,
    make_parser,
    parse_args,
)
from uamt_fast.training.report import evaluate, log_line, validation_line
from uamt_fast.training.state import Parts
from uamt_fast.training.step import TERMS, phase, schedule, student_losses, teacher_passes, train_step  # noqa: F401

EXIT = {"done": 0, "stopped": 0, "diverged": 1, "bad input": 2, "cannot write": 2, "rank failed": 3,
        "interrupted": 130}  # the exit code of each way a run ends


class NonFiniteLoss(RuntimeError):
    """A loss term or a weight went NaN / Inf; the message names the iteration and the last good checkpoint."""


@dataclass
class Run:
    """Where a run stands: its process group, folder and the last checkpoint actually saved."""

    world: distributed.World = field(default_factory=lambda: distributed.SINGLE)
    out: Path | None = None
    created: bool = False  # this call made the run folder and holds its lock (removed again if it stays empty)
    last_good: str | None = None  # "<folder>/checkpoint.pt (iteration N)"
    argv: list[str] | None = None  # the command line (recorded in config.json)

    def stopping(self) -> str:
        return f"stopping (last good checkpoint: {self.last_good})" if self.last_good else \
            "stopping (no checkpoint saved yet)"


# ----------------------------------------------------------------------------- the command
def main(argv=None) -> int:
    """``python train.py``: 0 trained (or stopped at --stop-at) and evaluated; 1 a non-finite loss, or torchrun ranks
    that disagree; 2 bad input, or a run folder that cannot be written; 3 another torchrun rank failed; 130 Ctrl-C
    (after saving a checkpoint). Every error is one line on stderr."""
    run = Run(argv=sys.argv[1:] if argv is None else list(argv))
    with contextlib.ExitStack() as held:  # the run folder's lock and the process group, until main returns
        try:
            given = parse_args(argv)
            cfg, resume_state = make_config(given)
            device = start_process(cfg, run, held)
            if cfg.eval:
                evaluate_checkpoint(cfg, given, device, run.world)
                return EXIT["done"]
            claim_run_folder(cfg, run, held, resume_state)
            parts, start = assemble(cfg, run, resume_state, held)
        except (data.DataError, ValueError, ImportError, OSError) as e:
            return refuse(e, run, held)
        env = announce(parts, run, start, resume_state)
        try:
            if run.world.main:
                provenance.write_config(run.out, dataclasses.asdict(cfg), env, parts.data_split,
                                        resumed=resume_state is not None)
            ended = train(parts, run, start, held)
            if ended == "done":
                finish(parts, run)
            return EXIT[ended]
        except (NonFiniteLoss, distributed.RankMismatch) as e:
            print(f"\ntrain.py: {e}", file=sys.stderr)
            return EXIT["diverged"]
        except RuntimeError as e:  # torchrun: a collective failed (another rank died, raised or hung)
            if not (run.world.enabled and distributed.is_comm_failure(e)):
                raise
            print(f"\ntrain.py: error: {distributed.comm_failure_line(run.world, e)}; {run.stopping()}", file=sys.stderr)
            return EXIT["rank failed"]
        except (OSError, files.FolderError) as e:  # a full disk, a folder gone, a link planted: one line, none torn
            reason = files.describe(e) if isinstance(e, OSError) else str(e)
            print(f"\ntrain.py: error: cannot write the run in {run.out} ({reason}); "
                  + (f"continue from {run.last_good} with --resume {run.out}" if run.last_good
                     else "no checkpoint saved yet"), file=sys.stderr)
            return EXIT["cannot write"]
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------- the steps of main
def start_process(cfg: Config, run: Run, held: contextlib.ExitStack) -> torch.device:
    """The process group (torchrun), the device, the threads; the optional extras a run will need, checked now."""
    run.world = distributed.setup(cfg.device, cfg.dist_timeout)  # torchrun's process group (SINGLE without it)
    held.callback(distributed.close, run.world)
    device = pick_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.figures:
        figures.pyplot()  # fail now, not after training, when the optional matplotlib is missing
        files.make_folder(cfg.figures, "figures", "--figures")
    if cfg.tensorboard:
        metrics_log.require_tensorboard()  # the same: fail now when the optional tensorboard is missing
    if cfg.eval and cfg.overwrite:
        raise ValueError("--overwrite replaces a training run; --eval never replaces anything (it writes a new "
                         "eval_<checkpoint>.json): drop --overwrite")
    if not cfg.eval and not cfg.data and not cfg.demo:
        raise ValueError("--data is required (the LA root holding train.list), or use --demo")
    return device


def claim_run_folder(cfg: Config, run: Run, held: contextlib.ExitStack, resume_state: dict | None) -> None:
    """Rank 0 alone claims the run folder (and writes the --demo data into it); every rank learns its path."""
    out = None
    if run.world.main:
        out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}")
        run.out, created = out, not out.exists()
        if resume_state is None:  # (claim refuses a folder another process writes, and overwriting the data)
            held.enter_context(run_folder.claim(out, cfg.overwrite, inputs=data.input_folders(cfg.data)))
        else:
            held.enter_context(run_folder.RunLock(out, "--resume"))
        run.created = created  # ours to tidy only once we hold its lock: a start that lost the race leaves it be
        if resume_state is None and cfg.overwrite and (out / DEMO_DATA_DIR / "train.list").is_file():
            files.remove(out, DEMO_DATA_DIR)  # the old --demo run's data (not --data: claim checked)
        if cfg.demo and not cfg.data:  # kept in the run folder, so the run can be evaluated again later
            data.write_synthetic_la(str((out / DEMO_DATA_DIR).resolve()), **DEMO_DATA)
    run.out = Path(run.world.settle(out))  # torchrun: rank 0's folder to every rank, or every rank stops with its error
    if cfg.demo and not cfg.data:
        cfg.data = [str((run.out / DEMO_DATA_DIR).resolve())]


def assemble(cfg: Config, run: Run, resume_state: dict | None, held: contextlib.ExitStack) -> tuple[Parts, int]:
    """The data checked, the model, teacher, optimizer and sampler built, a resumed run's state restored;
    returns them and the iteration the loop starts at."""
    split = data.split_fingerprint(cfg.data)  # refuses ids that are paths, lists that disagree or overlap
    resolve_classes(cfg)
    if resume_state is not None:
        distributed.check_world_size(run.world, resume_state, run.out)  # its samplers and streams are per rank
        checkpoints.check_same_data(resume_state, split, run.out)
    parts = build(cfg, rank=run.world.rank)
    parts.data_split = split
    parts.test_cases = load_split(cfg, "test")
    parts.val_cases = load_split(cfg, "val") if cfg.val_every else []
    start = 0
    if resume_state is not None:
        start = checkpoints.restore_training(parts, resume_state, run.out / "checkpoint.pt")
        distributed.restore_rank(run.world, parts, resume_state, run.out / "checkpoint.pt")
        if start >= cfg.iterations and (run.out / "eval.json").is_file():
            raise ValueError(f"--resume {run.out}: the run is finished (it has eval.json); evaluate it again with "
                             f"--eval {run.out}")
        if run.world.main:
            run_folder.drop_metrics_after(run.out / "metrics.jsonl", start)  # logged after the checkpoint: again
        run.last_good = f"{run.out / 'checkpoint.pt'} (iteration {start})"
    parts.ddp, parts.lr_factor = distributed.wrap(run.world, parts, cfg.sync_bn), distributed.lr_factor(run.world, cfg)
    # DDP goes before the process group is closed (the stack unwinds in reverse). Its reducer holds the group:
    # freed last, with the GIL held, the group's destructor joins a gloo worker that needs the GIL to drop a
    # collective's tensors, and the rank hangs at exit (seen after --stop-at under torchrun).
    held.callback(setattr, parts, "ddp", None)
    return parts, start


def refuse(error: Exception, run: Run, held: contextlib.ExitStack) -> int:
    """Bad input before any training: one line on stderr (every rank stops), no empty run folder left behind."""
    message = files.describe(error) if isinstance(error, OSError) else str(error)
    run.world.settle(error=message)  # (torchrun, an error before the folder was shared: the other ranks stop too)
    if run.world.main:
        print(f"train.py: error: {message}", file=sys.stderr)
    out = run.out
    if run.created and out is not None and run_folder.is_empty_but_lock(out):
        (out / run_folder.LOCK_NAME).unlink(missing_ok=True)
        held.close()
        out.rmdir()
    return EXIT["bad input"]


def announce(parts: Parts, run: Run, start: int, resume_state: dict | None) -> dict:
    """The header lines (the environment, the global batch under torchrun, the run); returns the environment
    that config.json records."""
    cfg, device = parts.cfg, parts.device
    env = provenance.environment(device, run.argv)
    if run.world.enabled:  # the global batch and the lr rule, in the log and in config.json
        env["distributed"] = distributed.describe(run.world, cfg)
        print(distributed.summary_line(run.world, cfg))
    if device.type == "cuda":
        print(f"GPU {env['gpu']}, CUDA {env['cuda']}, cuDNN {env['cudnn']} (bf16 3D convs are slow off cuDNN: "
              f"pytorch#166122, cuDNN 9.8-9.14; channels_last_3d={parts.memory_format == torch.channels_last_3d})")
    if resume_state is not None:
        print(f"resumed {run.out} at iteration {start}")
    slices = f" ({parts.sampler.n_labeled} slices), 2D" if cfg.dims == 2 else ""  # (SSL4MIS counts slices)
    print(f"{cfg.method}: {cfg.labeled} labeled{slices}, {cfg.iterations} iterations, patch {cfg.patch}, "
          f"n_filters {cfg.n_filters}, downsample {cfg.downsample}, device {device} -> {run.out}")
    return env


# ----------------------------------------------------------------------------- the loop
def train(parts: Parts, run: Run, start: int, held: contextlib.ExitStack) -> str:
    """Iterations ``start`` .. --iterations with their log lines and checkpoints; returns "done", "stopped"
    (--stop-at) or "interrupted" (Ctrl-C: the iteration finishes and a checkpoint is saved). Device-side
    accumulators; the host reads them every --log-every iterations. The console shows a line after the first
    iteration and the ETA on every line (``uamt_fast.progress``: wall time only, no added sync)."""
    cfg, device, world, out = parts.cfg, parts.device, run.world, run.out
    bad_at = torch.full((), -1, dtype=torch.long, device=device)  # first iteration with a non-finite term
    bad_term = torch.zeros((), dtype=torch.long, device=device)  # which term (index into TERMS)
    window = torch.zeros(5, device=device)  # sums of CE, Dice, consistency, mask fraction, uncertainty
    monitor, stop, n_window = provenance.gpu_monitor(device), [], 0
    guard = Guard(parts, run, bad_at, bad_term)
    log = held.enter_context(contextlib.closing(metrics_log.MetricsLog(out, cfg.tensorboard, start)
                                                if world.main else distributed.NoLog()))
    if not world.enabled:  # (under torchrun Ctrl-C ends every rank: ranks would stop at different iterations)
        signal.signal(signal.SIGINT, lambda *_: stop.append("interrupted"))  # finish the iteration, save, exit
    console = progress.TrainingProgress(start, cfg.iterations)  # (its clock starts now, with the loop's)
    t_log = t0 = time.perf_counter()
    for iteration in range(start, cfg.iterations):
        terms, stats = train_step(parts, iteration)
        done = iteration + 1
        nonfinite = ~torch.isfinite(terms)
        first = nonfinite.any() & (bad_at < 0)
        bad_at.copy_(torch.where(first, done, bad_at))
        bad_term.copy_(torch.where(first, nonfinite.int().argmax(), bad_term))
        window += torch.cat([terms, stats])
        n_window += 1

        if done % cfg.log_every == 0 or done == cfg.iterations:
            guard.check_finite()
            means = distributed.mean_over_ranks(world, window / n_window)  # torchrun: averaged over the ranks
            distributed.check_same_weights(world, {"student": parts.student, "teacher": parts.teacher}, done)
            line = log_record(parts, iteration, means.tolist(), n_window / (time.perf_counter() - t_log))  # sync
            log.write(line | monitor())
            console.update(done, log_line(line, cfg.iterations))  # (the device is idle: the rate is exact here)
            window.zero_()
            n_window, t_log = 0, time.perf_counter()
        else:
            console.update(done)
        if cfg.val_every and done % cfg.val_every == 0 and world.main:  # curves only: no checkpoint is picked
            line = validation_line(parts.student, cfg, parts.val_cases, done)
            log.write(line)
            console.write(f"iter {done}/{cfg.iterations} | val Dice {line['val_dice']:.4f} ({len(parts.val_cases)} "
                          f"cases, {line['val_seconds']:.1f} s)")
        if done % cfg.save_every == 0 and done < cfg.iterations:
            guard.save(done)
        if stop or done == cfg.stop_at:
            guard.save(done)
            console.write(f"{stop[0] if stop else 'stopped'} at iteration {done}; continue with --resume {out}")
            return "interrupted" if stop else "stopped"
    seconds = time.perf_counter() - t0  # the last iteration logged, so the device is idle: a true time
    guard.save(cfg.iterations)  # (checks the losses and the weights first)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if start < cfg.iterations:  # (a run stopped during its final evaluation trains nothing on --resume)
        speed = {"train_seconds": seconds, "it_per_s": (cfg.iterations - start) / seconds}
        if device.type == "cuda":
            speed["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"trained {cfg.iterations - start} iterations in {seconds:.1f} s ({speed['it_per_s']:.2f} it/s"
              + (f", peak GPU memory {speed['peak_gpu_mem_gb']:.2f} GiB)" if device.type == "cuda" else ")"))
        log.write({"iteration": cfg.iterations, **speed})
    return "done"


def log_record(parts: Parts, iteration: int, means: list[float], it_per_s: float) -> dict:
    """The metrics.jsonl line after 0-based ``iteration``: the window's mean losses, only the terms the method has."""
    cfg, (ce, dice, cons, mask, unc) = parts.cfg, means
    lr, weight, threshold = schedule(cfg, iteration)
    line = {"iteration": iteration + 1, "lr": lr * parts.lr_factor, "loss_ce": ce, "loss_dice": dice,
            "loss_supervised": 0.5 * (ce + dice)}
    if cfg.method != "supervised":  # no teacher, no consistency term
        line |= {"loss_consistency": cons, "consistency_weight": weight}
    if cfg.method == "uamt":  # only UA-MT has an uncertainty mask
        line |= {"threshold": threshold, "mask_fraction": mask, "uncertainty_mean": unc}
    line["it_per_s"] = it_per_s
    if parts.device.type == "cuda":
        line["gpu_mem_gb"] = torch.cuda.max_memory_allocated(parts.device) / 2**30
    return line


class Guard:
    """Never save weights that went through a non-finite loss, nor weights an update broke; remember the last
    checkpoint actually saved (``run.last_good``) for every stop message."""

    def __init__(self, parts: Parts, run: Run, bad_at: torch.Tensor, bad_term: torch.Tensor):
        self.parts, self.run, self.bad_at, self.bad_term = parts, run, bad_at, bad_term

    def check_finite(self) -> None:
        """A host-device sync point (torchrun: a collective, every rank stops at the same iteration)."""
        at, term, rank = distributed.first_nonfinite(self.run.world, self.bad_at, self.bad_term)
        if at >= 0:
            raise NonFiniteLoss(f"non-finite {TERMS[term]} loss at iteration {at}{self.run.world.on(rank)}; "
                                f"{self.run.stopping()}")

    def save(self, done: int) -> None:
        self.check_finite()
        parts, run = self.parts, self.run
        for name, model in (("student", parts.student), ("teacher", parts.teacher)):
            bad = None if model is None else checkpoints.first_nonfinite(model.state_dict())
            if bad is not None:
                raise NonFiniteLoss(f"non-finite {name} weight {bad} after iteration {done}; {run.stopping()}")
        ranks = distributed.gather_rank_states(run.world, parts)  # torchrun: every rank's sampler and RNG states
        if run.world.main:
            files.atomic_save(checkpoints.training_state(parts, done) | ranks, run.out / "checkpoint.pt")
        run.last_good = f"{run.out / 'checkpoint.pt'} (iteration {done})"


# ----------------------------------------------------------------------------- the end
def finish(parts: Parts, run: Run) -> None:
    """The final weights (student.pt, teacher.pt), the evaluation of the student (split over the ranks under
    torchrun) and the figures."""
    cfg, out = parts.cfg, run.out
    for model in (parts.student, parts.teacher) if cfg.sync_bn else ():
        if model is not None:  # (no teacher for --method supervised)
            distributed.local_batch_norm_(model)  # the evaluation runs each rank alone
    if run.world.main:
        files.atomic_save({"model": parts.student.state_dict(), "config": dataclasses.asdict(cfg)}, out / "student.pt")
    if parts.teacher is not None and run.world.main:
        files.atomic_save({"model": parts.teacher.state_dict(), "config": dataclasses.asdict(cfg)}, out / "teacher.pt")
    result = evaluate(parts.student, cfg, parts.test_cases, out, name="eval.json", checkpoint=str(out / "student.pt"),
                      world=run.world)
    if cfg.figures and run.world.main:
        write_figures(parts.student, cfg, parts.test_cases, result, out)


def load_model(path: Path, device: torch.device) -> tuple[VNet | UNet2D, dict, Path]:
    """--eval: the V-Net (or 2D U-Net) of a checkpoint or run folder, its config and the file read (uamt_fast.training.checkpoints:
    weights_only loading, one-line errors; the config may hold only fields this trainer knows)."""
    return checkpoints.load_vnet(path, device, "--eval", CONFIG_FIELDS)


def write_figures(model: VNet | UNet2D, cfg: Config, cases, result: dict, run_dir: Path) -> None:
    """--figures: panels of the --figures-cases picks among the evaluated ``cases`` (ids, or best / median / worst
    by the Dice in ``result``), and the run's training curves if it has a log."""
    out = Path(cfg.figures)
    name = "UA-MT" if cfg.method == "uamt" else cfg.method
    picked = selection.panel_cases(cases, result["cases"], cfg.figures_cases)
    for path in figures.write_panels({name: model}, picked, out, dataclasses.asdict(cfg), cfg.figures_passes,
                                     data.label_names(cfg.data)):
        print(f"wrote {path}")
    if (run_dir / "metrics.jsonl").is_file():
        print(f"wrote {figures.training_curves({run_dir.name: run_dir}, out / 'curves.png')}")


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


if __name__ == "__main__":
    sys.exit(main())
