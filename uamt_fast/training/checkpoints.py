"""Opening train.py checkpoints safely: ``torch.load(weights_only=True)`` only, every failure one line.

train.py writes two kinds of files, both plain dicts of tensors, numbers, strings and containers:

- ``student.pt`` / ``teacher.pt``: ``{"model": state_dict, "config": train.py's Config as a dict}``;
- ``checkpoint.pt``: ``{"iteration", "config", "student", "teacher", "optimizer", "sampler", "rng_cpu"[, "rng_cuda"],
  "data_split"}``, written by ``training_state`` and read back by ``restore_training``; under torchrun also
  ``"world_size"`` and ``"ranks"`` (every rank's sampler and RNG states: ``uamt_fast.training.distributed``).

People share checkpoints, so opening one must never run code from it: every read here goes through the
weights-only unpickler, which refuses anything but those types. A file that needs more (an arbitrary
pickled object, which could run code while unpickling) is refused before any of it is built, and every
other problem (missing file, truncated or foreign file, missing keys, weights that do not fit or are not all
finite, a model setting out of range) is a
``CheckpointError`` (a ``ValueError``) of one line naming the file and what was expected.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch

from uamt_fast.nets.unet import UNet2D
from uamt_fast.nets.vnet import MAX_FILTERS, VNet
from uamt_fast.training.state import Parts

MODEL_SETTINGS = ("n_filters", "dropout")  # the config fields that build the network (and "dims": 2 the U-Net,
# 3 or absent, as in configs before 2D training, the V-Net)


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) used; the message is one line and names the file."""


def read(path, flag: str = "checkpoint") -> dict:
    """The dict saved in ``path``, read with ``torch.load(weights_only=True)`` on the CPU.

    ``flag`` starts every error message (train.py passes the command-line flag, e.g. ``--eval``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"{flag} {path}: not a torch checkpoint ({_first_line(e)})") from None
        raise CheckpointError(f"{flag} {path}: refused: it holds Python objects beyond tensors, numbers and plain "
                              "containers, and unpickling those could run code from the file (uamt_fast loads with "
                              "weights_only=True only; nothing in it was run)") from None
    except Exception as e:  # the weights-only unpickler fails on garbage in many ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{flag} {path}: not a readable torch checkpoint, truncated or another format "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{flag} {path}: expected a dict saved by train.py, got a {type(state).__name__}")
    return state


def config_of(state: dict, path, flag: str = "checkpoint", known_fields=None) -> dict:
    """The ``config`` dict of a checkpoint, checked: a dict with the V-Net's settings; with ``known_fields``
    (train.py's Config field names) no field outside them. Fields newer than the file are simply absent."""
    cfg = state.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{flag} {path}: not a train.py checkpoint (no 'config' dict; keys: "
                              f"{sorted(map(str, state))})")
    unknown = sorted(map(str, set(cfg) - set(known_fields))) if known_fields is not None else []
    if unknown:
        raise CheckpointError(f"{flag} {path}: its config has fields this train.py does not know: {', '.join(unknown)}")
    missing = [k for k in MODEL_SETTINGS if k not in cfg]
    if missing:
        raise CheckpointError(f"{flag} {path}: its config lacks {', '.join(missing)} (needed to build the V-Net)")
    classes = cfg.get("num_classes", 2)  # (configs before multi-class data have none: 2)
    if type(classes) is not int or not 0 <= classes <= 255:
        raise CheckpointError(f"{flag} {path}: bad model setting num_classes={classes!r:.40} (expected an int in [0, 255])")
    dims = cfg.get("dims", 3)
    if type(dims) is not int or dims not in (2, 3):
        raise CheckpointError(f"{flag} {path}: bad model setting dims={dims!r:.40} (expected 2 or 3)")
    if type(cfg["n_filters"]) is not int or not 1 <= cfg["n_filters"] <= MAX_FILTERS \
            or not isinstance(cfg["dropout"], bool):
        raise CheckpointError(f"{flag} {path}: bad model settings n_filters={cfg['n_filters']!r:.40} (expected an int "
                              f"in [1, {MAX_FILTERS}]), dropout={cfg['dropout']!r:.40} (expected a bool)")
    return cfg


def load_weights(model: torch.nn.Module, weights, path, flag: str = "checkpoint", what: str = "model") -> None:
    """``model.load_state_dict(weights)``, with a one-line error naming the file and the first mismatch."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{flag} {path}: '{what}' is not a state dict of tensors")
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{flag} {path}: '{what}' does not fit this {type(model).__name__}: {len(missing)} "
                              f"missing tensors {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}")
    for k, v in expected.items():
        if weights[k].shape != v.shape:
            raise CheckpointError(f"{flag} {path}: '{what}' tensor {k} has shape {tuple(weights[k].shape)}, "
                                  f"the {type(model).__name__} expects {tuple(v.shape)}")
    bad = first_nonfinite(weights)
    if bad is not None:
        raise CheckpointError(f"{flag} {path}: '{what}' tensor {bad} holds NaN or Inf values (a diverged run's "
                              "weights): refused")
    model.load_state_dict(weights)


def first_nonfinite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` (a state dict) with a NaN or Inf, else None.
    One host sync for the whole dict."""
    names = [k for k, v in tensors.items() if v.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).cpu()
    return None if bool(finite.all()) else names[int((~finite).nonzero()[0])]


def load_vnet(path, device="cpu", flag: str = "checkpoint", known_fields=None) -> tuple[VNet | UNet2D, dict, Path]:
    """The network of a student.pt / teacher.pt / checkpoint.pt (its student), or of a run folder's student.pt,
    on ``device``: the V-Net, or the 2D U-Net of a --dims 2 run (``network_of``); with its saved config and the
    file read. Never runs code from the file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "student.pt").is_file():
            raise CheckpointError(f"{flag} {path}: a folder without student.pt (give the checkpoint file)")
        path = path / "student.pt"
    state = read(path, flag)
    cfg = config_of(state, path, flag, known_fields)
    what = "model" if "model" in state else "student"
    if what not in state:
        raise CheckpointError(f"{flag} {path}: holds neither 'model' (student.pt, teacher.pt) nor 'student' "
                              "(checkpoint.pt)")
    model = network_of(cfg)
    load_weights(model, state[what], path, flag, what)
    return model.to(device), cfg, path


def network_of(cfg: dict) -> VNet | UNet2D:
    """A fresh network for a checked saved config (``config_of``): its dims, classes, width and dropout."""
    return network_class(cfg.get("dims", 3))(num_classes=cfg.get("num_classes") or 2, n_filters=cfg["n_filters"],
                                              dropout=cfg["dropout"])


def network_class(dims: int) -> type[VNet] | type[UNet2D]:
    """The network a run of ``dims`` trains: the V-Net (3) or SSL4MIS's 2D U-Net (2); both take
    ``(num_classes, n_filters, dropout)`` and keep the same contract (``bn_groups``, ``mc_dropout``)."""
    return UNet2D if dims == 2 else VNet


# ----------------------------------------------------------------------------- train.py's checkpoint.pt
TRAINING_KEYS = ("iteration", "config", "student", "optimizer", "sampler", "rng_cpu")  # what --resume needs


def training_state(parts: Parts, iteration: int) -> dict:
    """Everything that makes --resume continue the run bit-for-bit (on CPU), from the run's ``Parts`` (``uamt_fast.training.state``):
    weights, teacher BN buffers, optimizer momentum, sampler and RNG states, iteration count, config and
    the case lists it trains on."""
    state = {"iteration": iteration, "config": dataclasses.asdict(parts.cfg), "student": parts.student.state_dict(),
             "optimizer": parts.optimizer.state_dict(), "sampler": parts.sampler.state_dict(),
             "rng_cpu": torch.get_rng_state()}
    if parts.data_split is not None:  # the case lists it trains on: --resume refuses other data
        state["data_split"] = parts.data_split
    if parts.teacher is not None:
        state["teacher"] = parts.teacher.state_dict()
    if parts.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(parts.device)
    return state


def restore_training(parts: Parts, state: dict, path: Path = Path("checkpoint.pt")) -> int:
    """Load a ``training_state`` dict into the run's ``Parts``; returns its iteration. A checkpoint that does
    not fit is a one-line CheckpointError."""
    load_weights(parts.student, state["student"], path, "--resume", "student")
    if parts.teacher is not None:
        load_weights(parts.teacher, state.get("teacher"), path, "--resume", "teacher")
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"--resume {path}: the optimizer state does not fit this run ({_first_line(e)})") from None
    restore_streams(parts, state, path)
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise CheckpointError(f"--resume {path}: bad iteration {state['iteration']!r}")
    return state["iteration"]


def restore_streams(parts: Parts, streams: dict, path, whose: str = "") -> None:
    """The sampler and RNG states of ``streams`` (a checkpoint, or one rank's part of it) into ``parts``."""
    try:
        parts.sampler.load_state_dict(streams["sampler"])
        torch.set_rng_state(streams["rng_cpu"])
        if "rng_cuda" in streams and parts.device.type == "cuda":
            torch.cuda.set_rng_state(streams["rng_cuda"], parts.device)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"--resume {path}: {whose}sampler or RNG state does not fit this run "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def check_same_data(state: dict, split: dict, path) -> None:
    """--resume: the case lists of --data (``uamt_fast.data.split_fingerprint``) must be the run's own (a run
    resumed on other data would finish with exit 0, trained on two data sets). Checkpoints written before
    the lists were recorded pass."""
    saved = state.get("data_split")
    if not isinstance(saved, dict) or saved.get("sha256") == split["sha256"]:
        return
    for name in ("train", "test"):
        ours, theirs = list(split[name]), list(saved.get(name) or [])
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise CheckpointError(f"--resume {path}: the data's {name}.list differs from the run's ({len(ours)} ids "
                                  f"vs {len(theirs)}, first difference at line {first + 1}); give the --data the run "
                                  "was trained on")
    raise CheckpointError(f"--resume {path}: the data's case lists differ from the run's (hash {split['sha256'][:12]} "
                          f"vs {str(saved.get('sha256'))[:12]}); give the --data the run was trained on")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


__all__ = ["CheckpointError", "read", "config_of", "load_weights", "first_nonfinite", "load_vnet", "network_class",
           "network_of", "TRAINING_KEYS", "training_state", "restore_training", "restore_streams", "check_same_data"]
