"""The state of a training run: ``Parts``, everything one iteration touches, built by
``uamt_fast.training.build.build`` and used by the step, the checkpoints and the torchrun helpers."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from uamt_fast.data import Case, TwoStreamSampler
from uamt_fast.nets.vnet import VNet
from uamt_fast.training.config import Config


@dataclass
class Parts:
    """Everything one training iteration touches (built by ``build``, used by ``train_step``)."""

    cfg: Config
    device: torch.device
    student: VNet
    teacher: VNet | None  # None for --method supervised
    optimizer: torch.optim.SGD
    sampler: TwoStreamSampler  # the labeled and unlabeled crops of each batch
    student_losses: Callable  # uamt_fast.training.step.student_losses, or its torch.compile'd version
    teacher_forward: Callable  # the teacher, or its torch.compile'd version
    memory_format: torch.memory_format = torch.contiguous_format
    test_cases: list[Case] = field(default_factory=list)
    val_cases: list[Case] = field(default_factory=list)  # --val-every: the data's val.list (curves only)
    data_split: dict | None = None  # data.split_fingerprint of cfg.data, saved in checkpoints
    ddp: torch.nn.Module | None = None  # under torchrun: the student in DistributedDataParallel (train_step's forward)
    lr_factor: float = 1.0  # --lr-scale linear under torchrun: the world size
    ignore_label: int | None = None  # the label of not-annotated voxels (the data's record), kept out of CE and Dice


__all__ = ["Parts"]
