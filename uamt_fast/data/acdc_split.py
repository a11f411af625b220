"""SSL4MIS's ACDC split, kept as data: HiLab-git/SSL4MIS @06df604 (2025-06-06), ``data/ACDC/train.list``,
``val.list``, ``test.list`` and ``train_slices.list``, and the slice counts of
``code/train_uncertainty_aware_mean_teacher_2D.py: patients_to_slices``.

Each list names both annotated frames of a patient, ``patientNNN_frame01`` then ``patientNNN_frame02``, patient
after patient; so the patient numbers below, in the lists' order, are the lists (``uamt_fast.data.acdc.volume_ids``
writes them out). ``LIST_SHA256`` is the digest of each file as SSL4MIS wrote it (one id and "\\n" a line), so the
expansion is checked byte for byte (tests/data/test_acdc.py). 70 / 10 / 20 patients = 140 / 20 / 40 volumes, no
patient in two lists, all of the challenge's training patients 001-100 (its testing patients 101-150 are in none).
"""
from __future__ import annotations

TRAIN_PATIENTS = (99, 38, 50, 100, 58, 21, 49, 20, 72, 40, 60, 89, 4, 56, 98, 96, 31, 18, 94, 47, 48, 55, 97, 74, 43,
                  41, 63, 37, 95, 54, 26, 88, 32, 69, 6, 71, 12, 73, 61, 17, 25, 10, 57, 29, 51, 5, 36, 46, 62, 34,
                  76, 92, 70, 77, 67, 3, 91, 16, 14, 44, 42, 90, 53, 27, 35, 86, 23, 9, 79, 15)
VAL_PATIENTS = (28, 85, 82, 87, 19, 30, 78, 45, 2, 39)
TEST_PATIENTS = (11, 13, 84, 33, 93, 22, 68, 24, 83, 81, 80, 1, 7, 66, 8, 65, 75, 64, 59, 52)
PATIENTS = {"train": TRAIN_PATIENTS, "val": VAL_PATIENTS, "test": TEST_PATIENTS}
LIST_SHA256 = {"train": "97a399f7bdbfe96b93cf8731a4bf3dd78562269bada57464fdc0dbc3f0f45746",
               "val": "61b935c936d8e12f7889e82d954f421fa25fb95305e92a476096b3242de8777d",
               "test": "98161bdfaad072bf5713d7345751ab5a2bf3e5468b8edb03fd9ebfedc4503671"}

# train_slices.list (1312 lines, sha256 1b21b2a6...a6f0648): the 2D slices of each training volume, patient by
# patient in TRAIN_PATIENTS' order (both frames of a patient have as many; the list holds each patient's slices
# together, in that order, so its first k lines are the slices of the first patients).
SLICES_PER_VOLUME = (16, 8, 10, 8, 9, 10, 7, 8, 8, 10, 9, 6, 10, 9, 7, 18, 10, 8, 10, 9, 8, 9, 8, 8, 12, 6, 8, 7, 14,
                     8, 10, 16, 10, 7, 11, 10, 10, 7, 9, 9, 9, 10, 8, 11, 10, 10, 8, 9, 10, 10, 8, 15, 6, 8, 10, 10, 8,
                     10, 10, 9, 9, 7, 7, 10, 13, 7, 9, 10, 9, 9)

# patients_to_slices("ACDC", n): SSL4MIS's labeled slices for n labeled patients, the first lines of
# train_slices.list (so the first n patients of TRAIN_PATIENTS, both frames: 3 -> 68 = 2 x (16 + 8 + 10)). Its
# key 140 counts volumes, not patients: all 70 training patients, every slice.
LABELED_SLICES = {3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 140: 1312}

__all__ = ["LABELED_SLICES", "LIST_SHA256", "PATIENTS", "SLICES_PER_VOLUME", "TEST_PATIENTS", "TRAIN_PATIENTS",
           "VAL_PATIENTS"]
