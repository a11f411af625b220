"""The released UA-MT training iteration, written the way the authors' code runs it: the baseline of
``benchmarks/train_step.py``.

Source: github.com/yulequan/UA-MT @80d0a34, ``code/train_LA_meanteacher_certainty_unlabel.py``,
``code/dataloaders/la_heart.py``, ``code/utils/{losses,ramps}.py``. Kept as released:

- data: a ``Dataset`` that opens ``<id>/mri_norm2.h5`` and reads the whole volume on every item,
  numpy ``RandomRotFlip`` -> ``RandomCrop`` -> ``ToTensor`` in ``DataLoader`` workers (4, pinned
  memory, the two-stream batch sampler of 2 labeled + 2 unlabeled ids); an "epoch" is
  ``labeled // 2`` batches and the loader (its workers too) starts again each epoch;
- model: fp32, eager, default memory format; the EMA model is initialised separately and its
  parameters detached; both in training mode (batch statistics, dropout on);
- one teacher forward of the 2 noisy unlabeled crops (the target), then T/2 = 4 sequential forwards
  of the doubled batch into a preallocated fp32 buffer; softmax, reshape, mean, log, sum for the
  uncertainty; softmax MSE, compare, masked sums for the loss (unfused);
- SGD step, then the per-parameter ``mul_().add_()`` EMA with the warm-up alpha;
- cuDNN as the release sets it by default (``--deterministic 1``: ``benchmark=False``,
  ``deterministic=True``); ``cudnn_benchmark=True`` gives the variant without that;
- the host reads the scalars the release logs every iteration (``loss.item()`` and the TensorBoard
  scalars; the writer itself is left out).

Generalised only where a benchmark needs it: the crop size, T, the class count and the device.
"""
from __future__ import annotations

import itertools
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from uamt_fast import data, files
from uamt_fast.nets.vnet import VNet


# ----------------------------------------------------------------------------- data, as released
class LAHeart(Dataset):
    """``base_dir/<id>/mri_norm2.h5`` read in full on every ``__getitem__`` (no cache)."""

    def __init__(self, base_dir: str | Path, ids: list[str], transform=None):
        self.base_dir, self.image_list, self.transform = Path(base_dir), list(ids), transform

    def __len__(self):
        return len(self.image_list)

    def __getitem__(self, idx):
        with h5py.File(self.base_dir / self.image_list[idx] / "mri_norm2.h5", "r") as h5f:
            sample = {"image": h5f["image"][:], "label": h5f["label"][:]}
        return self.transform(sample) if self.transform else sample


class RandomCrop:
    def __init__(self, output_size):
        self.output_size = output_size

    def __call__(self, sample):
        image, label = sample["image"], sample["label"]
        if any(label.shape[i] <= self.output_size[i] for i in range(3)):  # pad the sample if necessary
            pads = [(max((self.output_size[i] - label.shape[i]) // 2 + 3, 0),) * 2 for i in range(3)]
            image = np.pad(image, pads, mode="constant", constant_values=0)
            label = np.pad(label, pads, mode="constant", constant_values=0)
        (w, h, d) = image.shape
        w1 = np.random.randint(0, w - self.output_size[0])
        h1 = np.random.randint(0, h - self.output_size[1])
        d1 = np.random.randint(0, d - self.output_size[2])
        sl = (slice(w1, w1 + self.output_size[0]), slice(h1, h1 + self.output_size[1]), slice(d1, d1 + self.output_size[2]))
        return {"image": image[sl], "label": label[sl]}


class RandomRotFlip:
    def __call__(self, sample):
        image, label = sample["image"], sample["label"]
        k = np.random.randint(0, 4)
        image, label = np.rot90(image, k), np.rot90(label, k)
        axis = np.random.randint(0, 2)
        return {"image": np.flip(image, axis=axis).copy(), "label": np.flip(label, axis=axis).copy()}


class ToTensor:
    def __call__(self, sample):
        image = sample["image"]
        image = image.reshape(1, *image.shape).astype(np.float32)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(sample["label"]).long()}


class TwoStreamBatchSampler(Sampler):
    """Each batch: ``batch_size - secondary_batch_size`` ids of one pass over the primary (labeled)
    ids, then secondary (unlabeled) ids from an endless shuffle. ``len`` = primary // primary batch."""

    def __init__(self, primary_indices, secondary_indices, batch_size, secondary_batch_size):
        self.primary_indices, self.secondary_indices = primary_indices, secondary_indices
        self.secondary_batch_size = secondary_batch_size
        self.primary_batch_size = batch_size - secondary_batch_size
        if not (len(primary_indices) >= self.primary_batch_size > 0 and len(secondary_indices) >= secondary_batch_size > 0):
            raise ValueError(f"TwoStreamBatchSampler: need >= {self.primary_batch_size} labeled and "
                             f">= {secondary_batch_size} unlabeled ids, got {len(primary_indices)} and {len(secondary_indices)}")

    def __iter__(self):
        primary = np.random.permutation(self.primary_indices)
        secondary = itertools.chain.from_iterable(
            np.random.permutation(self.secondary_indices) for _ in itertools.count())
        return (a + b for a, b in zip(_grouper(primary, self.primary_batch_size),
                                      _grouper(secondary, self.secondary_batch_size)))

    def __len__(self):
        return len(self.primary_indices) // self.primary_batch_size


def _grouper(iterable, n):
    args = [iter(iterable)] * n
    return zip(*args)


def released_loader(base_dir, labeled_ids, unlabeled_ids, patch, batch_size=4, labeled_bs=2, num_workers=4, seed=1337,
                    pin_memory=True) -> DataLoader:
    """The release's training ``DataLoader``: labeled ids first, then unlabeled; batches of
    ``labeled_bs`` labeled + ``batch_size - labeled_bs`` unlabeled crops (dicts of 'image' (B, 1, *patch)
    float32 and 'label' (B, *patch) int64)."""
    ids = list(labeled_ids) + list(unlabeled_ids)
    n_lab = len(labeled_ids)
    db_train = LAHeart(base_dir, ids, transform=_Compose([RandomRotFlip(), RandomCrop(tuple(patch)), ToTensor()]))
    sampler = TwoStreamBatchSampler(list(range(n_lab)), list(range(n_lab, len(ids))), batch_size, batch_size - labeled_bs)
    return DataLoader(db_train, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_WorkerInit(seed))


def endless(loader):
    """Epoch after epoch of ``loader``, as the release's ``for epoch ...: for batch in trainloader`` (the
    workers start again every epoch)."""
    while True:
        yield from loader


def write_release_h5(job) -> None:
    """Write one case as the release stores it: ``(path, image, label)`` -> ``mri_norm2.h5``, gzip level 4."""
    path, image, label = job
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_h5(path, lambda f: (
        f.create_dataset("image", data=np.asarray(image, dtype=np.float32), compression="gzip", compression_opts=4),
        f.create_dataset("label", data=np.asarray(label, dtype=np.uint8), compression="gzip", compression_opts=4)))


def release_h5_folder(roots, cases, workdir) -> Path:
    """Folder of ``<id>/mri_norm2.h5`` for the released loader, which reads one folder.

    ``roots``: one LA root or several (``uamt_fast.data.as_roots``); each case is looked up with
    ``data.find_case``. When one root holds all ``cases`` as h5, that root's release folder itself;
    else a folder in ``workdir`` with a link to each case's h5 file in the root holding it, and the
    cases held only packed written there as the release stores them, by a process pool (HDF5
    serialises threads). Call it before CUDA is initialised (the pool forks)."""
    roots = data.as_roots(roots)
    sources = [data.find_case(roots, c.id) / data.IMAGES_DIR / c.id / data.H5_NAME for c in cases]
    folders = {path.parents[1] for path in sources}
    if len(folders) == 1 and all(path.is_file() for path in sources):
        return folders.pop()
    out = Path(workdir) / "h5"
    to_write = []
    for case, source in zip(cases, sources):
        path = out / case.id / data.H5_NAME
        if source.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(source.resolve())
        else:
            to_write.append((path, case.image, case.label))
    if to_write:
        with ProcessPoolExecutor(max_workers=max(1, min(len(to_write), os.cpu_count() or 1))) as pool:
            list(pool.map(write_release_h5, to_write))
    return out


# ----------------------------------------------------------------------------- losses and ramps, as released
def sigmoid_rampup(current, rampup_length):
    if rampup_length == 0:
        return 1.0
    current = np.clip(current, 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


def dice_loss(score, target):
    target = target.float()
    smooth = 1e-5
    intersect = torch.sum(score * target)
    y_sum = torch.sum(target * target)
    z_sum = torch.sum(score * score)
    return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)


def softmax_mse_loss(input_logits, target_logits):
    return (F.softmax(input_logits, dim=1) - F.softmax(target_logits, dim=1)) ** 2


# ----------------------------------------------------------------------------- the trainer
@dataclass
class ReferenceConfig:
    base_dir: str  # folder holding <id>/mri_norm2.h5 (the release's "2018LA_Seg_Training Set")
    labeled_ids: list
    unlabeled_ids: list
    patch: tuple = (112, 112, 80)
    n_filters: int = 16
    num_classes: int = 2
    T: int = 8
    batch_size: int = 4
    labeled_bs: int = 2
    base_lr: float = 0.01
    ema_decay: float = 0.99
    consistency: float = 0.1
    consistency_rampup: float = 40.0
    max_iterations: int = 6000
    num_workers: int = 4
    seed: int = 1337
    cudnn_benchmark: bool = False  # the release's default --deterministic 1 sets False (and deterministic=True)
    device: str = "cuda"


class ReferenceTrainer:
    """The released loop, one iteration per ``step()``. Data comes from an endless chain of epochs
    of a ``DataLoader`` that is re-entered (workers restarted) every epoch, as the release's
    ``for epoch_num ...: for i_batch, sampled_batch in enumerate(trainloader)`` does."""

    def __init__(self, cfg: ReferenceConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.loader = released_loader(cfg.base_dir, cfg.labeled_ids, cfg.unlabeled_ids, cfg.patch, cfg.batch_size,
                                      cfg.labeled_bs, cfg.num_workers, cfg.seed, pin_memory=self.device.type == "cuda")
        self.model = self._create_model()
        self.ema_model = self._create_model(ema=True)
        self.model.train()
        self.ema_model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.base_lr, momentum=0.9, weight_decay=0.0001)
        self._batches = self._epochs()
        self.iter_num = 0

    def _create_model(self, ema=False):
        model = VNet(in_channels=1, num_classes=self.cfg.num_classes, n_filters=self.cfg.n_filters, dropout=True)
        model = model.to(self.device)
        if ema:
            for param in model.parameters():
                param.detach_()
        return model

    def _epochs(self):
        return endless(self.loader)

    def cudnn_flags(self):
        """The cuDNN flags this trainer runs under (set them around ``step``)."""
        return {"benchmark": self.cfg.cudnn_benchmark, "deterministic": not self.cfg.cudnn_benchmark}

    def update_ema_variables(self, alpha, global_step):
        alpha = min(1 - 1 / (global_step + 1), alpha)
        for ema_param, param in zip(self.ema_model.parameters(), self.model.parameters()):
            ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)

    def step(self) -> dict:
        """One released iteration; returns the logged scalars (read on the host, as released)."""
        cfg, dev = self.cfg, self.device
        labeled_bs, T, iter_num = cfg.labeled_bs, cfg.T, self.iter_num
        sampled_batch = next(self._batches)
        volume_batch, label_batch = sampled_batch["image"], sampled_batch["label"]
        volume_batch, label_batch = volume_batch.to(dev), label_batch.to(dev)
        unlabeled_volume_batch = volume_batch[labeled_bs:]

        noise = torch.clamp(torch.randn_like(unlabeled_volume_batch) * 0.1, -0.2, 0.2)
        ema_inputs = unlabeled_volume_batch + noise
        outputs = self.model(volume_batch)
        with torch.no_grad():
            ema_output = self.ema_model(ema_inputs)
        volume_batch_r = unlabeled_volume_batch.repeat(2, 1, 1, 1, 1)
        stride = volume_batch_r.shape[0] // 2
        preds = torch.zeros([stride * T, cfg.num_classes, *cfg.patch], device=dev)
        for i in range(T // 2):
            ema_inputs = volume_batch_r + torch.clamp(torch.randn_like(volume_batch_r) * 0.1, -0.2, 0.2)
            with torch.no_grad():
                preds[2 * stride * i:2 * stride * (i + 1)] = self.ema_model(ema_inputs)
        preds = F.softmax(preds, dim=1)
        preds = preds.reshape(T, stride, cfg.num_classes, *cfg.patch)
        preds = torch.mean(preds, dim=0)
        uncertainty = -1.0 * torch.sum(preds * torch.log(preds + 1e-6), dim=1, keepdim=True)

        loss_seg = F.cross_entropy(outputs[:labeled_bs], label_batch[:labeled_bs])
        outputs_soft = F.softmax(outputs, dim=1)
        loss_seg_dice = dice_loss(outputs_soft[:labeled_bs, 1, :, :, :], label_batch[:labeled_bs] == 1)
        supervised_loss = 0.5 * (loss_seg + loss_seg_dice)

        consistency_weight = cfg.consistency * sigmoid_rampup(iter_num // 150, cfg.consistency_rampup)
        consistency_dist = softmax_mse_loss(outputs[labeled_bs:], ema_output)
        threshold = (0.75 + 0.25 * sigmoid_rampup(iter_num, cfg.max_iterations)) * np.log(2)
        mask = (uncertainty < threshold).float()
        consistency_dist = torch.sum(mask * consistency_dist) / (2 * torch.sum(mask) + 1e-16)
        consistency_loss = consistency_weight * consistency_dist
        loss = supervised_loss + consistency_loss

        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.update_ema_variables(cfg.ema_decay, iter_num)

        self.iter_num = iter_num = iter_num + 1
        logged = {  # the release's writer.add_scalar / logging.info reads, each a host sync
            "uncertainty/mean": uncertainty[0, 0].mean().item(), "uncertainty/max": uncertainty[0, 0].max().item(),
            "uncertainty/min": uncertainty[0, 0].min().item(), "uncertainty/mask_per": (torch.sum(mask) / mask.numel()).item(),
            "loss/loss": loss.item(), "loss/loss_seg": loss_seg.item(), "loss/loss_seg_dice": loss_seg_dice.item(),
            "train/consistency_loss": consistency_loss.item(), "train/consistency_dist": consistency_dist.item(),
        }
        if iter_num % 2500 == 0:
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = cfg.base_lr * 0.1 ** (iter_num // 2500)
        if not math.isfinite(logged["loss/loss"]):
            raise FloatingPointError(f"reference trainer: non-finite loss at iteration {iter_num}")
        return logged


class _Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample


class _WorkerInit:  # picklable worker_init_fn (random.seed(seed + worker_id), as released)
    def __init__(self, seed):
        self.seed = seed

    def __call__(self, worker_id):
        random.seed(self.seed + worker_id)
