"""Figures: the paper's Fig. 2 style case panels and training curves, as PNG files (needs matplotlib).

    python -m uamt_fast.figures panels --data LA --checkpoint supervised=runs/a/student.pt \\
        --checkpoint UA-MT=runs/b/student.pt --out figs --cases best median worst
    python -m uamt_fast.figures panels --data LA --checkpoint runs/b/student.pt --out figs --first 2
    python -m uamt_fast.figures curves runs/a runs/b --out figs/curves.png

``case_panel``: a grid of axial slices (rows) by columns image | one column per checkpoint with the
ground truth (red contour) and its prediction (blue contour) | the uncertainty map (predictive entropy
of T MC-dropout passes, 0..ln 2) of the last checkpoint; the case id and a legend above. ``panels
--cases`` picks test cases by id or as best / median / worst by the Dice of the last checkpoint
(``uamt_fast.evaluation.selection``; those cost one evaluation of each candidate case); ``--first N``: among the first N.
Predictions are the paper's sliding-window protocol on the full-resolution image (on the pooled image
for ``downsample`` > 1 runs, upsampled back, as train.py's evaluation does); a 2D model's (``--dims 2``) are
slice by slice, each Z slice resized to its ``patch[:2]`` and back, its uncertainty passes too
(``inference.predict_volume``, the dispatch train.py's evaluation and predict share). ``training_curves``:
train.py's ``metrics.jsonl`` of one or more runs, overlaid: loss terms, lambda(t), threshold H(t), mask
fraction, it/s.

matplotlib is an optional extra (``pip install 'uamt_fast[figures]'``); without it the functions raise
``ImportError`` naming that extra. Checkpoints are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from uamt_fast import data as la_data
from uamt_fast.training import checkpoints
from uamt_fast import cli, files
from uamt_fast.evaluation import inference, metrics, selection, uncertainty
from uamt_fast.nets.vnet import mc_dropout

PANEL_INCHES = 2.4  # each cell of the panel grid is PANEL_INCHES square
HEADER_INCHES = 0.35  # the strip above the grid: case id and legend
COLORS = {"ground truth": "red", "prediction": "blue"}  # the contours of the panels (two classes)
# More classes: each foreground class in its own colour, the ground truth solid and the prediction dashed.
CLASS_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:pink", "tab:olive")
LINE_WIDTH = 1.5  # contours and legend lines (points): at 0.8 a dashed outline of 100 dpi read as loose specks
DPI = 100
PREDICTION_SETTINGS = ("patch", "downsample", "eval_stride_xy", "eval_stride_z")  # shared by all panel columns
CURVES = (  # (title, metrics.jsonl keys, log scale)
    ("supervised loss terms", ("loss_ce", "loss_dice", "loss_supervised"), False),
    ("consistency loss", ("loss_consistency",), True),
    ("consistency weight λ(t)", ("consistency_weight",), False),
    ("uncertainty threshold H(t)", ("threshold",), False),
    ("mask fraction (voxels kept)", ("mask_fraction",), False),
    ("speed (it/s)", ("it_per_s",), False),
    ("val Dice (--val-every; curves only)", ("val_dice",), False),  # (drawn only for runs that logged it)
)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError naming the optional extra."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("figures need matplotlib: pip install 'uamt_fast[figures]' (or: pip install matplotlib)") \
            from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- predictions
def slice_size_of(cfg: dict) -> tuple[int, int] | None:
    """The slice size of a train.py config's model: ``patch[:2]`` for a 2D one (``dims`` 2), None for the V-Net."""
    return tuple(cfg["patch"][:2]) if cfg.get("dims", 3) == 2 else None


@torch.no_grad()
def uncertainty_map(model, image, passes: int, *, patch, stride_xy: int = 18, stride_z: int = 4, downsample: int = 1,
                    batch_size: int = 4, blend: str = "mean", slice_size=None) -> torch.Tensor:
    """Predictive entropy ``-sum_c mu_c ln(mu_c + 1e-6)`` of the mean of ``passes`` MC-dropout predictions (X, Y, Z).

    Each pass is a whole prediction of the case (``inference.predict_volume``: sliding windows, or slice by slice
    for a 2D model, ``slice_size`` (h, w); the model's ``num_classes``, 2 if it has none) with dropout on (batch
    norm in eval mode), so the map costs ``passes`` evaluations of the case; ``passes`` < 1 is refused (ValueError).
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"uncertainty_map: passes={passes!r}; expected an integer >= 1")
    model.eval()
    settings = inference.InferenceSettings(tuple(patch), stride_xy, stride_z, getattr(model, "num_classes", 2),
                                           batch_size, None, downsample, blend, slice_size)
    with mc_dropout(model):
        mean = sum(inference.predict_volume(model, image, settings)[1] for _ in range(passes)) / passes
    return uncertainty.predictive_entropy(mean)


def axial_slices(label: np.ndarray, n: int = 3) -> list[int]:
    """``n`` axial (last-axis) slice indices spread over the labeled extent (the whole volume if empty)."""
    z = np.flatnonzero(label.reshape(-1, label.shape[-1]).any(0))
    lo, hi = (int(z[0]), int(z[-1])) if z.size else (0, label.shape[-1] - 1)
    return sorted({int(round(lo + (hi - lo) * q)) for q in np.linspace(0.2, 0.8, n)})


# ----------------------------------------------------------------------------- figures
@torch.no_grad()
def case_panel(models: dict, case, path, *, patch, stride_xy: int = 18, stride_z: int = 4, downsample: int = 1,
               passes: int = 8, n_slices: int = 3, batch_size: int = 4, blend: str = "mean", slice_size=None,
               class_names: dict | None = None) -> Path:
    """Write the Fig. 2 style panel of ``case`` (``.id``, ``.image``, ``.label``) for ``{name: model}`` to ``path``.

    Rows: ``n_slices`` axial slices. Columns: image, then per model the ground truth (red) and its
    prediction (blue) with the case Dice in the title (more than two classes: each class in its own colour,
    ground truth solid, prediction dashed, the mean Dice over the classes), then the uncertainty of the
    last model on [0, ln C]. Above the
    grid: the whole case id and the legend. The PNG is ``PANEL_INCHES * DPI`` pixels a cell (plus the
    ``HEADER_INCHES`` strip). The uncertainty map may show seams at window borders:
    each sliding window of each pass draws its own dropout masks (``blend="gaussian"`` fades them: the config's
    ``blend``, as the evaluation combines the windows). ``slice_size`` (h, w): 2D models, predicted slice by
    slice (``inference.predict_volume``). ``class_names`` name the legend's classes (``draw_legend``). Refused
    (ValueError): no models, ``passes`` or ``n_slices`` < 1.
    """
    plt = pyplot()
    if not models:
        raise ValueError("case_panel: no models given")
    for name, value in (("passes", passes), ("n_slices", n_slices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"case_panel: {name}={value!r}; expected an integer >= 1")
    predictions = {}
    for name, model in models.items():  # (predictions as train.py evaluates them: at full resolution)
        model.eval()
        settings = inference.InferenceSettings(tuple(patch), stride_xy, stride_z, getattr(model, "num_classes", 2),
                                               batch_size, None, downsample, blend, slice_size)
        predictions[name] = inference.predict_volume(model, case.image, settings)[0]
    entropy = uncertainty_map(list(models.values())[-1], case.image, passes, patch=patch, stride_xy=stride_xy,
                              stride_z=stride_z, downsample=downsample, batch_size=batch_size,
                              blend=blend, slice_size=slice_size).cpu().numpy()

    ignore = getattr(case, "ignore_label", None)
    ignored = None if ignore is None else np.asarray(case.label) == ignore
    slices = axial_slices(case.label if ignored is None else np.where(ignored, 0, case.label), n_slices)
    columns = 2 + len(models)
    height = PANEL_INCHES * len(slices) + HEADER_INCHES
    fig, axes = plt.subplots(len(slices), columns, figsize=(PANEL_INCHES * columns, height), dpi=DPI, squeeze=False)
    fig.suptitle(f"case {case.id}", x=0.01, y=1 - 0.5 * HEADER_INCHES / height, ha="left", va="center", fontsize=9)
    classes = getattr(list(models.values())[-1], "num_classes", 2)
    draw_legend(plt, fig, classes, ("ground truth", "prediction"), height, class_names)
    for row, z in enumerate(slices):
        image, label = case.image[:, :, z].T, case.label[:, :, z].T  # x to the right, y down
        if ignored is not None:  # not-annotated voxels (nnU-Net's ignore label): background, and not scored
            label = np.where(ignored[:, :, z].T, 0, label)
        axes[row, 0].imshow(image, cmap="gray")
        axes[row, 0].set_title(f"z={z}", fontsize=8)
        for col, (name, pred) in enumerate(predictions.items(), 1):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            draw_outlines(ax, {"ground truth": label, "prediction": pred[:, :, z].T}, classes)
            scored, truth = (pred, case.label) if ignored is None else (np.where(ignored, 0, pred),
                                                                         np.where(ignored, 0, case.label))
            dice = metrics.labelmap_metrics(scored, truth, classes)["dice"] if classes > 2 else \
                metrics.dice(scored, truth)
            ax.set_title(f"{name}: Dice {100 * dice:.1f}%" if row == 0 else name, fontsize=8)
        shown = axes[row, -1].imshow(entropy[:, :, z].T, cmap="inferno", vmin=0, vmax=math.log(classes))
        axes[row, -1].set_title(f"uncertainty ({list(models)[-1]}, T={passes})", fontsize=8)
        fig.colorbar(shown, ax=axes[row, -1], fraction=0.046, pad=0.02)
    for ax in axes.flat:
        ax.set_axis_off()
    return save_figure(plt, fig, path, top=1 - HEADER_INCHES / height)


def predicted_panel(image_file, mask_file, path, uncertainty_file=None, label_file=None, n_slices: int = 3) -> Path:
    """The Fig. 2 style panel of a scan as ``python -m uamt_fast.predict`` leaves it: the NIfTI image, the
    predicted mask over it and the ground truth if a label file is given, drawn and labelled as ``case_panel``
    draws them (``draw_outlines``, ``draw_legend``), and the uncertainty map if given, all in the scan's own
    geometry (needs nibabel)."""
    from uamt_fast.data import formats

    plt = pyplot()
    image, affine = formats.read_volume(Path(image_file))
    arrays = {}
    for name, file in (("mask", mask_file), ("uncertainty", uncertainty_file), ("label", label_file)):
        if file is not None:
            arrays[name], other = formats.read_volume(Path(file))
            if arrays[name].shape != image.shape or not np.allclose(other, affine, atol=1e-4):
                raise ValueError(f"{file}: shape {arrays[name].shape} or affine differ from the image's "
                                 f"({image.shape}, {image_file}); give the files of one scan")
    mask = np.rint(arrays["mask"]).astype(np.int64)
    label = np.rint(arrays["label"]).astype(np.int64) if "label" in arrays else None
    classes = max(2, int(mask.max()) + 1, int(label.max()) + 1 if label is not None else 0)
    slices = axial_slices(mask if label is None else label, n_slices)
    columns = 2 + ("uncertainty" in arrays)
    height = PANEL_INCHES * len(slices) + HEADER_INCHES
    fig, axes = plt.subplots(len(slices), columns, figsize=(PANEL_INCHES * columns, height), dpi=DPI, squeeze=False)
    fig.suptitle(Path(image_file).name, x=0.01, y=1 - 0.5 * HEADER_INCHES / height, ha="left", va="center",
                 fontsize=9)
    draw_legend(plt, fig, classes, ("prediction",) if label is None else ("ground truth", "prediction"), height)
    for row, z in enumerate(slices):
        axes[row, 0].imshow(image[:, :, z].T, cmap="gray")
        axes[row, 0].set_title(f"z={z}", fontsize=8)
        axes[row, 1].imshow(image[:, :, z].T, cmap="gray")
        shown = {"prediction": mask[:, :, z].T} if label is None else {"ground truth": label[:, :, z].T,
                                                                       "prediction": mask[:, :, z].T}
        draw_outlines(axes[row, 1], shown, classes)
        axes[row, 1].set_title("predicted mask", fontsize=8)
        if "uncertainty" in arrays:
            shown = axes[row, 2].imshow(arrays["uncertainty"][:, :, z].T, cmap="inferno", vmin=0,
                                        vmax=math.log(classes))
            axes[row, 2].set_title("uncertainty", fontsize=8)
            fig.colorbar(shown, ax=axes[row, 2], fraction=0.046, pad=0.02)
    for ax in axes.flat:
        ax.set_axis_off()
    return save_figure(plt, fig, path, top=1 - HEADER_INCHES / height)


def outline_style(kind: str, c: int, classes: int) -> tuple[str, str]:
    """(colour, line style) of class ``c``'s outline in the ``kind`` ("ground truth" or "prediction") map: two
    classes, ground truth red and prediction blue, both solid; more, each class its own colour (``CLASS_COLORS``),
    the ground truth solid and the prediction dashed."""
    if classes == 2:
        return COLORS[kind], "solid"
    return CLASS_COLORS[(c - 1) % len(CLASS_COLORS)], "solid" if kind == "ground truth" else "dashed"


def draw_outlines(ax, maps: dict, classes: int) -> None:
    """The contour of each foreground class of each ``{kind: (H, W) label map}`` on ``ax``, styled by
    ``outline_style`` (a class that fills the slice or is absent has no contour)."""
    for c in range(1, classes):
        for kind, labels in maps.items():
            inside = labels == c
            if inside.any() and not inside.all():
                color, style = outline_style(kind, c, classes)
                ax.contour(inside, levels=[0.5], colors=color, linewidths=LINE_WIDTH, linestyles=style)


def draw_legend(plt, fig, classes: int, kinds, height: float, class_names: dict | None = None) -> None:
    """The legend of ``draw_outlines`` in the header strip of ``fig`` (``height`` inches tall): two classes, one
    entry a map of ``kinds`` in its colour; more, one entry a map of ``kinds`` in its line style (gray) and one a
    foreground class in its colour, named by ``class_names`` ({"1": "RV"}, the data set's) or "class 1" ..
    "class C-1"."""
    if classes == 2:
        handles = [plt.Line2D([], [], color=COLORS[k], linewidth=LINE_WIDTH, label=k) for k in kinds]
    else:
        handles = [plt.Line2D([], [], color="gray", linewidth=LINE_WIDTH, linestyle=outline_style(k, 1, classes)[1],
                              label=k) for k in kinds]
        handles += [plt.Line2D([], [], color=outline_style("ground truth", c, classes)[0], linewidth=3,
                               label=(class_names or {}).get(str(c), f"class {c}")) for c in range(1, classes)]
    fig.legend(handles=handles, loc="center right", bbox_to_anchor=(0.99, 1 - 0.5 * HEADER_INCHES / height),
               ncol=min(len(handles), 6), fontsize=8, frameon=False)


def save_figure(plt, fig, path, top: float = 1.0) -> Path:
    """Lay out ``fig`` below ``top`` (a fraction of its height), write it to ``path`` (its folder made if needed)
    and free it."""
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=DPI))
    plt.close(fig)
    return path


def read_metrics(path) -> list[dict]:
    """The per-log-interval lines of a train.py ``metrics.jsonl`` and its --val-every lines (the final speed line
    left out)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "lr" in r or "val_dice" in r]
    if not any("lr" in r for r in rows):
        raise ValueError(f"{path}: no training log lines (a run logs every --log-every iterations)")
    return rows


def training_curves(runs: dict, path) -> Path:
    """Write the training curves of ``{name: run folder or metrics.jsonl}`` (overlaid) to ``path``: a 2 x 3 grid
    (3 x 3 with a --val-every curve)."""
    plt = pyplot()
    logs = {name: read_metrics(p) for name, p in runs.items()}
    validated = any("val_dice" in r for rows in logs.values() for r in rows)
    curves = [c for c in CURVES if c[1] != ("val_dice",) or validated]
    grid_rows = -(-len(curves) // 3)
    fig, axes = plt.subplots(grid_rows, 3, figsize=(3 * 3.6, grid_rows * 2.8), dpi=DPI)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax, (title, keys, log) in zip(axes.flat, curves):
        for name, rows in logs.items():
            for key in keys:
                points = [(r["iteration"], r[key]) for r in rows if key in r]
                if points:
                    label = f"{name} {key}" if len(keys) > 1 and len(logs) > 1 else (key if len(keys) > 1 else name)
                    ax.plot(*zip(*points), label=label, linewidth=1)
        if log and any(line.get_ydata().min() > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_lines() and (len(keys) > 1 or len(logs) > 1):
            ax.legend(fontsize=6)
    return save_figure(plt, fig, path)


# ----------------------------------------------------------------------------- checkpoints and the command line
def write_panels(models: dict, cases, out_dir, cfg: dict, passes: int = 8, class_names: dict | None = None
                 ) -> list[Path]:
    """``case_panel`` for each case into ``out_dir/panel-<id>.png``; sizes and strides from a train.py config.
    Case ids must be plain names (``uamt_fast.data.check_case_id``): ``a/b`` or ``../x`` would leave ``out_dir``."""
    cases = list(cases)
    for case in cases:
        la_data.check_case_id(case.id, "write_panels")
    return [case_panel(models, case, Path(out_dir) / f"panel-{case.id}.png", patch=tuple(cfg["patch"]),
                       stride_xy=cfg["eval_stride_xy"], stride_z=cfg["eval_stride_z"],
                       downsample=cfg.get("downsample", 1), passes=passes, batch_size=cfg.get("eval_batch", 4),
                       blend=cfg.get("blend", "mean"),  # (a config from before --blend: the plain average)
                       slice_size=slice_size_of(cfg),  # (a 2D model: slice by slice, as train.py evaluated it)
                       class_names=class_names)
            for case in cases]


def check_output(path, flag: str, folder: bool) -> Path:
    """ValueError (one line, naming ``flag``) unless ``path`` can be the output folder (``folder``) or
    output file: not a file (a folder), not a folder (a file), and nothing above it is a file."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file; give a folder for the panels")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give the path of the PNG file to write")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{flag} {path}: {above} is a file, not a folder")
    return path


def main(argv=None) -> int:
    parser = cli.OneLineParser(prog="python -m uamt_fast.figures", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    panels = commands.add_parser("panels", help="Fig. 2 style panels of test cases for one or more checkpoints")
    panels.add_argument("--data", action="append", required=True, help="LA root; repeat for a data set in parts")
    panels.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                        help="a train.py student.pt (repeat: side by side, the last one's uncertainty is shown; "
                        "names, by default the checkpoint's folder name, must differ)")
    panels.add_argument("--out", required=True, help="output folder (panel-<case>.png); not a file")
    panels.add_argument("--cases", nargs="+", default=[], metavar="ID",
                        help="test case ids, or best / median / worst by the last checkpoint's Dice (ranking costs "
                        "an evaluation of each candidate case; default: every candidate)")
    panels.add_argument("--first", type=cli.number(int, ">= 0"), default=0, metavar="N",
                        help="candidates: the first N >= 0 test cases only (default: 0, all)")
    panels.add_argument("--passes", type=cli.number(int, "[1, 1024]"), default=8, metavar="T",
                        help="MC-dropout passes for the uncertainty map, T in [1, 1024] (default: 8)")
    predicted = commands.add_parser("predicted", help="the panel of a scan predicted by python -m uamt_fast.predict")
    predicted.add_argument("image", help="the scan (NIfTI), as given to predict")
    predicted.add_argument("mask", help="its {case}.nii.gz from predict")
    predicted.add_argument("--uncertainty", help="its {case}_uncertainty.nii.gz (predict --uncertainty T)")
    predicted.add_argument("--label", help="a ground-truth NIfTI of the scan (two classes: red, the prediction "
                           "blue; more: solid, the prediction dashed, each class its own colour)")
    predicted.add_argument("--out", required=True, help="output PNG file (not a folder)")
    curves = commands.add_parser("curves", help="training curves of one or more run folders, overlaid")
    curves.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    curves.add_argument("--out", required=True, help="output PNG file (not a folder)")
    try:
        args = parser.parse_args(argv)
        check_output(args.out, "--out", folder=args.command == "panels")
        if args.command == "curves":
            print(training_curves({Path(r).name if Path(r).is_dir() else r: r for r in args.runs}, args.out))
            return 0
        if args.command == "predicted":
            print(predicted_panel(args.image, args.mask, args.out, args.uncertainty, args.label))
            return 0
        models, configs = {}, []
        for spec in args.checkpoint:
            name, _, path = spec.rpartition("=")
            name = name or Path(path).parent.name
            if name in models:
                raise ValueError(f"--checkpoint {spec}: the name {name!r} is taken by an earlier --checkpoint; "
                                 "give each its own NAME=PATH")
            models[name], cfg, _ = checkpoints.load_vnet(path, flag="--checkpoint")
            configs.append({k: tuple(cfg[k]) if k == "patch" else cfg[k] for k in PREDICTION_SETTINGS}
                           | {"slice_size": slice_size_of(cfg)})  # (2D and 3D models predict differently)
        if any(c != configs[0] for c in configs):
            raise ValueError(f"the checkpoints were trained with different {PREDICTION_SETTINGS} or dims: {configs}")
        ids = selection.test_ids(la_data.read_list(args.data, "test"), first=args.first)
        selection.check_picks(args.cases, ids, "--cases")
        ranked = any(p in selection.PICKS for p in args.cases)
        cases = la_data.load_cases(args.data, ids if ranked or not args.cases else dict.fromkeys(args.cases))
        rows = None
        if ranked:  # the Dice of each candidate, by the last checkpoint (whose uncertainty the panels show)
            rows = inference.evaluate(list(models.values())[-1], cases, patch_size=tuple(cfg["patch"]),
                                      stride_xy=cfg["eval_stride_xy"], stride_z=cfg["eval_stride_z"],
                                      batch_size=cfg.get("eval_batch", 4), downsample=cfg.get("downsample", 1),
                                      blend=cfg.get("blend", "mean"), slice_size=slice_size_of(cfg),
                                      num_classes=cfg.get("num_classes") or 2)["cases"]  # (ACDC's 4, ...)
        for path in write_panels(models, selection.panel_cases(cases, rows, args.cases), args.out, cfg, args.passes,
                                 la_data.label_names(args.data)):
            print(path)
    except (ValueError, OSError, ImportError) as e:  # (OSError: a folder that cannot be made or written; DataError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
