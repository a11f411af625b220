"""What a training run reports: the printed log line (its progress and ETA: ``uamt_fast.progress``), and the
evaluation of a model on the test cases written to a new ``eval.json`` (``uamt_fast.evaluation.inference.evaluate``
under the paper's protocol; under torchrun each rank scores its share and rank 0 writes the one file)."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import uamt_fast
from uamt_fast import data, files
from uamt_fast.evaluation import inference
from uamt_fast.nets.unet import UNet2D
from uamt_fast.nets.vnet import VNet
from uamt_fast.training import distributed
from uamt_fast.training.config import Config


def log_line(line: dict, iterations: int) -> str:
    """One printed line of a metrics.jsonl record: only the fields the method has."""
    text = f"iter {line['iteration']}/{iterations} | CE {line['loss_ce']:.4f} Dice loss {line['loss_dice']:.4f}"
    if "loss_consistency" in line:
        text += f" | consistency {line['loss_consistency']:.2e} x {line['consistency_weight']:.4f}"
    if "mask_fraction" in line:
        text += f" | mask {line['mask_fraction']:.3f} H {line['threshold']:.3f}"
    return text + f" | {line['it_per_s']:.2f} it/s"


def score(model: VNet | UNet2D, cfg: Config, cases) -> dict:
    """``inference.evaluate`` of ``cases`` with the run's settings (windows, strides, blend; a --dims 2 model
    slice by slice), printing nothing; the model's train / eval modes are restored after."""
    return inference.evaluate(model, cases, patch_size=cfg.patch, stride_xy=cfg.eval_stride_xy,
                              stride_z=cfg.eval_stride_z, batch_size=cfg.eval_batch, downsample=cfg.downsample,
                              num_classes=cfg.num_classes or 2, blend=cfg.blend,
                              slice_size=tuple(cfg.patch[:2]) if cfg.dims == 2 else None)  # 2D: slice by slice


def validation_line(model: VNet | UNet2D, cfg: Config, cases, done: int) -> dict:
    """The metrics.jsonl line of --val-every after ``done`` iterations: the student's mean Dice and 95HD on the
    val cases, and each class's Dice (``val_dice_<name>``), scored as the test cases are at the end. For the
    curves only: nothing reads it to pick a checkpoint."""
    t0 = time.perf_counter()
    result = score(model, cfg, cases)
    line = {"iteration": done, "val_dice": result["mean"]["dice"], "val_hd95": result["mean"]["hd95"]}
    names = data.label_names(cfg.data)
    for c, metrics in result.get("mean_per_class", {}).items():
        line[f"val_dice_{names.get(c, c)}"] = metrics["dice"]
    return files.json_safe(line | {"val_seconds": time.perf_counter() - t0})


def evaluate(model: VNet | UNet2D, cfg: Config, cases, out_dir: Path, name: str = "eval.json",
             checkpoint: str | None = None,
             world: distributed.World = distributed.SINGLE) -> dict:
    """The paper's sliding-window protocol on ``cases`` (full resolution; a --dims 2 model: every slice resized to
    ``cfg.patch[:2]`` and back, SSL4MIS's ACDC protocol); prints the table and writes it to
    ``out_dir / name`` (a new file: if that name is taken, ``<stem>-2.json``, ``-3``... so an evaluation never
    replaces another), with a ``source`` record (checkpoint, data, case ids, settings). Strict JSON: an
    undefined distance (empty mask) is ``null``, counted in ``nan_cases``.

    With --downsample k the windows (``cfg.patch``, strides ``cfg.eval_stride_*``) slide over the
    k-times downsampled image; the averaged softmax is upsampled trilinearly back to full resolution
    (each low-resolution voxel sits at the centre of its k^3 block, ``align_corners=False``), the
    remainder voxels dropped by the pooling take their nearest neighbour's value, and the argmax is
    scored against the full-resolution label. ``cfg.blend`` combines overlapping windows (mean: the paper's
    plain average; gaussian: ``inference.importance_map``'s weights). Under torchrun each rank scores its share
    of the cases and rank 0 writes the one file.
    """
    model.eval()
    t0 = time.perf_counter()
    distributed.from_rank0_(world, model)  # torchrun: every rank scores the saved weights and BN statistics
    mine = distributed.shard(world, cases)
    result = score(model, cfg, mine) if mine or not world.enabled else None
    result = distributed.gather_evaluation(world, result, cases)
    if not world.main:
        return result
    names = data.label_names(cfg.data)
    if names and "mean_per_class" in result:  # the per-class lines by the data set's names ("1": "RV")
        result["class_names"] = {c: name for c, name in names.items() if c in result["mean_per_class"]}
    print(inference.format_table(result))
    print(f"evaluated {len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    result["source"] = {
        "checkpoint": checkpoint, "data": cfg.data, "split": "test", "case_ids": [str(c.id) for c in cases],
        "settings": {k: getattr(cfg, k) for k in ("dims", "patch", "eval_stride_xy", "eval_stride_z", "eval_batch",
                                                  "blend", "downsample", "n_filters", "dropout", "num_classes")},
        "uamt_fast": uamt_fast.__version__, "evaluated": datetime.datetime.now().isoformat(timespec="seconds")}
    text = json.dumps(files.json_safe(result), indent=1, allow_nan=False)
    path = files.write_new(out_dir / name, lambda f: f.write(text.encode()))  # eval-2.json ... when taken
    print(f"wrote {path}")
    return result


__all__ = ["evaluate", "log_line", "score", "validation_line"]
