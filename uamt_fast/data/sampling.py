"""Which training cases are labeled, and the training batches drawn from them.

``semi_supervised_split`` is the paper's split (the first ``labeled`` ids of train.list). ``TwoStreamSampler``
draws the training batches exactly as the released code does (its TwoStreamBatchSampler, RandomRotFlip and
RandomCrop), on any device, from one CPU generator; ``SliceSampler`` the 2D batches of SSL4MIS's 2D trainers
(the same two streams over slices, its RandomGenerator's augmentation).
"""
from __future__ import annotations

import torch

from uamt_fast.data.augmentation import padding, rot_flip_2d, rot_flip_crop, rotate_nearest
from uamt_fast.data.cases import Case
from uamt_fast.data.layout import DataError
from uamt_fast.evaluation.slicewise import apply_zoom, zoom_map  # (the evaluation's resize: SSL4MIS's too)


def semi_supervised_split(train_ids, labeled: int, name: str | None = None) -> tuple[list[str], list[str]]:
    """The paper's split: the first ``labeled`` ids are labeled, the rest unlabeled (16 of 80 = 20%). ``name``: how
    an error names the count (train.py: "--labeled 16 (the default for the LA release)"; else "labeled=16")."""
    train_ids = list(train_ids)
    if not 1 <= labeled <= len(train_ids):
        raise DataError(f"{name or f'labeled={labeled}'}: need 1 <= labeled <= {len(train_ids)} (the number of "
                        "training ids)")
    return train_ids[:labeled], train_ids[labeled:]


class TwoStreamSampler:
    """Batches of ``batch_labeled`` labeled then ``batch_unlabeled`` unlabeled augmented crops.

    The released TwoStreamBatchSampler: labeled cases are visited once per epoch in a fresh random
    order (``len(labeled) // batch_labeled`` batches an epoch, a remainder is dropped); unlabeled
    cases come from an endless stream of fresh permutations (a batch may straddle two). One
    difference: the released DataLoader restarts the unlabeled stream every epoch; here it never
    restarts, so all unlabeled scans are visited equally often (same distribution per crop).

    Each crop is the released RandomRotFlip then RandomCrop: k ~ U{0..3}, rot90 by k in axes
    (0, 1); flip along a ~ U{0, 1}; zero ``padding``; start_i ~ U{0 .. padded_i - patch_i - 1}
    (numpy's exclusive high, so the last offset is never drawn). Note that rot90 then flip is
    always one of 4 reflections (flip x, flip y, transpose, anti-transpose), each with p = 1/4.

    All random draws come from one CPU ``torch.Generator``; the volumes live on ``device`` and
    cropping is pure tensor slicing there, so a batch costs no host-device sync and is identical on
    CPU and GPU. ``next()`` -> (images float32 (B, 1, *patch), labels int64 (B, *patch)), labeled
    rows first (``IGNORE_LABEL`` where a voxel is not annotated; the zero padding is background). The unlabeled
    rows' labels are real labels where the case has one (-1 where it was read without), returned for logging
    only: a semi-supervised loss must not use them. ``last_case_ids`` names the rows of the last batch.
    ``names``: how errors name ``patch_size`` and ``batch_labeled`` (train.py: its flags, with the value and where
    it came from: "--patch 112 112 80 (the default)"); by default "patch_size (112, 112, 80)", "batch_labeled=2".
    """

    def __init__(self, labeled: list[Case], unlabeled: list[Case], patch_size=(112, 112, 80), batch_labeled: int = 2,
                 batch_unlabeled: int = 2, seed: int = 0, device="cpu", names: dict[str, str] | None = None):
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise DataError(f"patch_size {tuple(patch_size)}: need 3 positive sizes")
        self._check_streams(labeled, unlabeled, batch_labeled, batch_unlabeled)
        names = {"patch_size": f"patch_size {self.patch}", "batch_labeled": f"batch_labeled={batch_labeled}",
                 **(names or {})}
        if len(labeled) < batch_labeled:
            raise DataError(f"{len(labeled)} labeled cases cannot fill {names['batch_labeled']}")
        cases = list(labeled) + list(unlabeled)
        in_plane = max(max(c.image.shape[:2]) for c in cases)  # rot90 swaps the in-plane axes
        largest = (in_plane, in_plane, max(c.image.shape[2] for c in cases))
        if any(p > s for p, s in zip(self.patch, largest)):
            raise DataError(f"{names['patch_size']} is larger than every volume (largest extents {largest}); its "
                            "crops would be mostly zero padding")
        self.batch_labeled, self.batch_unlabeled = batch_labeled, batch_unlabeled
        self.n_labeled = len(labeled)
        self.batches_per_epoch = len(labeled) // batch_labeled
        self.ids = [c.id for c in cases]
        self._keep_resident(cases, device)
        self._start_streams(seed)

    @staticmethod
    def _check_streams(labeled: list[Case], unlabeled: list[Case], batch_labeled: int, batch_unlabeled: int) -> None:
        """What both samplers require of their two streams: the batch sizes in range, unlabeled cases exactly when
        ``batch_unlabeled`` >= 1, and a label for every labeled case."""
        if batch_labeled < 1 or batch_unlabeled < 0:
            raise DataError(f"batch_labeled={batch_labeled} must be >= 1 and batch_unlabeled={batch_unlabeled} >= 0")
        if (batch_unlabeled > 0) != (len(unlabeled) > 0):
            raise DataError(f"batch_unlabeled={batch_unlabeled} with {len(unlabeled)} unlabeled cases: "
                            f"give unlabeled cases exactly when batch_unlabeled >= 1")
        unlabeled_only = [c.id for c in labeled if c.label is None]
        if unlabeled_only:
            raise DataError(f"cases {unlabeled_only[:5]} have no label and cannot be labeled cases")

    def _keep_resident(self, cases: list[Case], device) -> None:
        """The volumes and labels as tensors on ``device``, converted once (a case read without its label, from
        unlabeled.list, has None: its rows are -1, there is nothing to log)."""
        self.device = torch.device(device)
        self.images = [torch.from_numpy(c.image).to(self.device) for c in cases]
        self.labels = [None if c.label is None else torch.from_numpy(c.label).to(self.device) for c in cases]

    def _start_streams(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = -1  # index of the labeled pass the last batch came from
        self.last_case_ids: list[str] = []
        self._labeled_order: list[int] = []
        self._labeled_cursor = 0
        self._unlabeled_order: list[int] = []
        self._unlabeled_cursor = 0

    def _randint(self, high: int) -> int:  # uniform in [0, high), a host int
        return int(torch.randint(high, (), generator=self.generator))

    def _indices(self) -> list[int]:
        if self._labeled_cursor + self.batch_labeled > len(self._labeled_order):  # next epoch
            self._labeled_order = torch.randperm(self.n_labeled, generator=self.generator).tolist()
            self._labeled_cursor, self.epoch = 0, self.epoch + 1
        rows = self._labeled_order[self._labeled_cursor: self._labeled_cursor + self.batch_labeled]
        self._labeled_cursor += self.batch_labeled
        for _ in range(self.batch_unlabeled):
            if self._unlabeled_cursor == len(self._unlabeled_order):  # next pass over the unlabeled stream
                n_unlabeled = len(self.ids) - self.n_labeled
                self._unlabeled_order = torch.randperm(n_unlabeled, generator=self.generator).tolist()
                self._unlabeled_cursor = 0
            rows.append(self.n_labeled + self._unlabeled_order[self._unlabeled_cursor])
            self._unlabeled_cursor += 1
        return rows

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._indices()
        images = torch.empty((len(rows), 1, *self.patch), dtype=torch.float32, device=self.device)
        labels = torch.empty((len(rows), *self.patch), dtype=torch.int64, device=self.device)
        for b, r in enumerate(rows):
            k, flip_axis = self._randint(4), self._randint(2)
            shape = self.images[r].shape
            rotated = (shape[1], shape[0], shape[2]) if k % 2 else tuple(shape)
            pad = padding(rotated, self.patch)
            start = [self._randint(s + 2 * q - p) for s, q, p in zip(rotated, pad, self.patch)]
            images[b, 0] = rot_flip_crop(self.images[r], k, flip_axis, start, self.patch)
            if self.labels[r] is None:
                labels[b] = -1
            else:
                labels[b] = rot_flip_crop(self.labels[r], k, flip_axis, start, self.patch)
        self.last_case_ids = [self.ids[r] for r in rows]
        return images, labels

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Everything that decides future batches: a resumed sampler continues the same sequence."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch,
                "labeled_order": list(self._labeled_order), "labeled_cursor": self._labeled_cursor,
                "unlabeled_order": list(self._unlabeled_order), "unlabeled_cursor": self._unlabeled_cursor,
                "sizes": [self.n_labeled, len(self.ids) - self.n_labeled, self.batch_labeled, self.batch_unlabeled]}

    def load_state_dict(self, state: dict) -> None:
        sizes = [self.n_labeled, len(self.ids) - self.n_labeled, self.batch_labeled, self.batch_unlabeled]
        if list(state["sizes"]) != sizes:
            raise DataError(f"sampler state for (labeled, unlabeled, batch_labeled, batch_unlabeled) = "
                            f"{list(state['sizes'])} does not fit this sampler's {sizes}")
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self._labeled_order, self._labeled_cursor = list(state["labeled_order"]), int(state["labeled_cursor"])
        self._unlabeled_order, self._unlabeled_cursor = list(state["unlabeled_order"]), int(state["unlabeled_cursor"])


class SliceSampler(TwoStreamSampler):
    """2D batches as SSL4MIS's 2D trainers draw them (HiLab-git/SSL4MIS @06df604, code/train_uncertainty_aware_
    mean_teacher_2D.py with code/dataloaders/dataset.py): ``batch_labeled`` labeled then ``batch_unlabeled``
    unlabeled slices, each resized to ``patch_size`` (X, Y[, 1]).

    The items are the slices along the last axis of the cases, case by case in the given order (SSL4MIS's
    train_slices.list holds a patient's slices together, in train.list's order: its first labeled slices are
    these); the two streams are ``TwoStreamSampler``'s (its TwoStreamBatchSampler over slice indices). Each
    slice goes through RandomGenerator: with p 0.5 rot90 by k ~ U{0..3} then a flip along a ~ U{0, 1}, else a
    rotation by an angle ~ U{-20..19} degrees (np.random.randint(-20, 20)) with nearest-voxel sampling and zeros
    outside, image and label alike (``uamt_fast.data.augmentation``); then both are resized to the patch,
    nearest voxel (scipy's zoom order 0, SSL4MIS's for the image too: ``slicewise.zoom_map``, the evaluation's
    map, kept on the device per slice shape). All draws come from one
    CPU generator.
    ``next()`` -> (images float32 (B, 1, X, Y), labels int64 (B, X, Y)); ``last_case_ids`` names the rows
    ``<case id>_slice_<k>``, k from 1 (SSL4MIS's slice file names).
    """

    def __init__(self, labeled: list[Case], unlabeled: list[Case], patch_size=(256, 256), batch_labeled: int = 12,
                 batch_unlabeled: int = 12, seed: int = 0, device="cpu", names: dict[str, str] | None = None):
        size = tuple(int(p) for p in patch_size)
        if not (len(size) == 2 or (len(size) == 3 and size[2] == 1)) or min(size) < 1:
            raise DataError(f"patch_size {tuple(patch_size)}: need 2 positive sizes (or X, Y, 1)")
        self._check_streams(labeled, unlabeled, batch_labeled, batch_unlabeled)
        names = {"batch_labeled": f"batch_labeled={batch_labeled}", **(names or {})}
        cases = list(labeled) + list(unlabeled)
        self.patch = size[:2]
        self._keep_resident(cases, device)
        self.slices = [(v, z) for v, c in enumerate(cases) for z in range(c.image.shape[-1])]  # (volume, slice)
        self.ids = [f"{cases[v].id}_slice_{z + 1}" for v, z in self.slices]
        self.n_labeled = sum(c.image.shape[-1] for c in labeled)
        if self.n_labeled < batch_labeled:
            raise DataError(f"{self.n_labeled} labeled slices ({len(labeled)} cases) cannot fill "
                            f"{names['batch_labeled']}")
        self.batch_labeled, self.batch_unlabeled = batch_labeled, batch_unlabeled
        self.batches_per_epoch = self.n_labeled // batch_labeled
        self.zoom_maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._start_streams(seed)

    def _uniform(self) -> float:  # U[0, 1), a host float
        return float(torch.rand((), generator=self.generator))

    def augment(self, image: torch.Tensor, label: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RandomGenerator on one slice (X, Y): rot90 + flip or a rotation, then the resize to the patch."""
        if self._uniform() < 0.5:  # (SSL4MIS: random.random() < 0.5)
            k, flip_axis = self._randint(4), self._randint(2)
            planes = [rot_flip_2d(p, k, flip_axis) for p in (image, label) if p is not None]
        else:
            angle = self._randint(40) - 20  # np.random.randint(-20, 20): -20 .. 19
            planes = [rotate_nearest(p, angle) for p in (image, label) if p is not None]
        planes = [self.resize(p) for p in planes]
        return planes[0], planes[1] if label is not None else None

    def resize(self, plane: torch.Tensor) -> torch.Tensor:
        """``slicewise.zoom_nearest(plane, patch)``: scipy's order-0 zoom (0 where scipy writes its cval), its
        ``zoom_map`` made once per slice shape and kept on the device."""
        shape = tuple(plane.shape)
        if shape not in self.zoom_maps:
            self.zoom_maps[shape] = zoom_map(shape, self.patch, self.device)
        return apply_zoom(plane, self.zoom_maps[shape])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._indices()
        images = torch.empty((len(rows), 1, *self.patch), dtype=torch.float32, device=self.device)
        labels = torch.empty((len(rows), *self.patch), dtype=torch.int64, device=self.device)
        for b, r in enumerate(rows):
            v, z = self.slices[r]
            label = self.labels[v][..., z] if self.labels[v] is not None else None
            image, label = self.augment(self.images[v][..., z], label)
            images[b, 0] = image
            labels[b] = label if label is not None else -1
        self.last_case_ids = [self.ids[r] for r in rows]
        return images, labels

    __next__ = next


__all__ = ["SliceSampler", "TwoStreamSampler", "semi_supervised_split"]
