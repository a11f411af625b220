"""Which training cases are labeled, and the training batches drawn from them.

``semi_supervised_split`` is the paper's split (the first ``labeled`` ids of train.list). ``TwoStreamSampler``
draws the training batches exactly as the released code does (its TwoStreamBatchSampler, RandomRotFlip and
RandomCrop), on any device, from one CPU generator.
"""
from __future__ import annotations

import torch

from uamt_fast.data.augmentation import padding, rot_flip_crop
from uamt_fast.data.cases import Case
from uamt_fast.data.layout import DataError


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
        if batch_labeled < 1 or batch_unlabeled < 0:
            raise DataError(f"batch_labeled={batch_labeled} must be >= 1 and batch_unlabeled={batch_unlabeled} >= 0")
        names = {"patch_size": f"patch_size {self.patch}", "batch_labeled": f"batch_labeled={batch_labeled}",
                 **(names or {})}
        if len(labeled) < batch_labeled:
            raise DataError(f"{len(labeled)} labeled cases cannot fill {names['batch_labeled']}")
        if (batch_unlabeled > 0) != (len(unlabeled) > 0):
            raise DataError(f"batch_unlabeled={batch_unlabeled} with {len(unlabeled)} unlabeled cases: "
                            f"give unlabeled cases exactly when batch_unlabeled >= 1")
        cases = list(labeled) + list(unlabeled)
        in_plane = max(max(c.image.shape[:2]) for c in cases)  # rot90 swaps the in-plane axes
        largest = (in_plane, in_plane, max(c.image.shape[2] for c in cases))
        if any(p > s for p, s in zip(self.patch, largest)):
            raise DataError(f"{names['patch_size']} is larger than every volume (largest extents {largest}); its "
                            "crops would be mostly zero padding")
        self.batch_labeled, self.batch_unlabeled = batch_labeled, batch_unlabeled
        self.n_labeled = len(labeled)
        self.batches_per_epoch = len(labeled) // batch_labeled
        self.device = torch.device(device)
        self.ids = [c.id for c in cases]
        self.images = [torch.from_numpy(c.image).to(self.device) for c in cases]  # converted once, kept resident
        unlabeled_only = [c.id for c in labeled if c.label is None]
        if unlabeled_only:
            raise DataError(f"cases {unlabeled_only[:5]} have no label and cannot be labeled cases")
        # (a case read without its label, from unlabeled.list, gives rows of -1: there is nothing to log)
        self.labels = [None if c.label is None else torch.from_numpy(c.label).to(self.device) for c in cases]
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


__all__ = ["TwoStreamSampler", "semi_supervised_split"]
