"""The output folder of ``prepare`` (``OutputFolder``: OUT while a prepare runs) and a prepared set's list files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from uamt_fast import files
from uamt_fast.data import layout
from uamt_fast.data.layout import DataError

LISTS = ("train.list", "test.list", "unlabeled.list", "val.list")  # a prepared set's case lists (unlabeled.list,
# val.list: when it has any; val.list: --preset acdc, SSL4MIS's)
SWAP_ORDER = (*LISTS, layout.RECORD_NAME)  # out of OUT in this order, in reversed: train.list (which makes
# OUT a data root) goes first and comes back last


class OutputFolder:
    """OUT while a prepare runs: locked, the new set built aside, swapped in only when it is whole.

    On entry, before any case is read: OUT is created if absent and locked (``files.FolderLock``: a second
    prepare, or a train.py / predict writing there, is refused naming the holder's pid); a folder holding a
    data set that prepare did not write is refused, one holding a prepared set is refused unless
    ``overwrite``; a case of the new set found at either of its places (``layout.case_places``: ``cases/<id>.h5``,
    or the release folder an older prepare wrote) that is not the old set's is refused; links at the set's
    places are refused (``files.subfolder``). Cases (``cases/<id>.h5``), ``dataset.json`` and lists are written
    into a staging folder *inside* OUT (``.prepare-XXXX``: on OUT's file system, so the swap is renames, and
    under OUT's lock, so a staging folder left by a killed prepare is removed by the next one). ``swap_in``
    moves the old set's lists (``train.list`` first: OUT is no data root while it changes), record and case
    files (at either place: a set an older prepare wrote in the release layout goes as well) into the staging
    folder, the new ones into OUT (``train.list`` last), and removes the staging folder with the old set in
    it. Any failure before ``swap_in`` leaves the old set exactly as it was and removes the staging folder; a
    first prepare that fails leaves no OUT behind (nothing a reader could take for a data set).
    """

    STAGING_PREFIX = ".prepare-"

    def __init__(self, out, overwrite: bool, case_ids: list[str]):
        self.out, self.overwrite, self.case_ids = Path(out), overwrite, case_ids
        self.lock = self.staging = self.old = None

    def __enter__(self) -> OutputFolder:
        out = self.out
        self.created = not os.path.lexists(out)
        layout.make_folder(out, "output folder")
        try:
            self.lock = files.FolderLock(out, "OUT", "prepare")  # first the lock, then the look
            self.old = self._existing_set()
            files.subfolder(out, layout.CASES_DIR)
            if os.path.lexists(out / layout.IMAGES_DIR):  # an older prepare's set: its cases move out from there
                files.subfolder(out, layout.IMAGES_DIR)  # (a link is refused: nothing is moved out of another folder)
            for case_id in self.case_ids:
                for there in layout.case_places(out, case_id):
                    if os.path.lexists(there) and case_id not in self.old.get("cases", {}):
                        raise DataError(f"output folder {out}: {there} exists and is not part of a prepared set "
                                        "there; choose another folder")
            for stale in out.glob(self.STAGING_PREFIX + "*"):  # left by a killed prepare (we hold the lock)
                files.remove(out, stale.name)
            self.staging = Path(tempfile.mkdtemp(prefix=self.STAGING_PREFIX, dir=out))
        except BaseException as e:
            self._abandon()
            if isinstance(e, files.FolderError):
                raise DataError(str(e)) from None
            raise
        return self

    def _existing_set(self) -> dict:
        """The prepared set in OUT (its dataset.json record), {} for none; refused as described above."""
        found = [n for n in (layout.RECORD_NAME, *LISTS) if os.path.lexists(self.out / n)]
        if not found:
            return {}
        old = _prepared_record(self.out / layout.RECORD_NAME)
        if old is None:
            raise DataError(f"output folder {self.out} holds a data set that prepare did not write "
                            f"({', '.join(found)}); choose another folder")
        if not self.overwrite:
            raise DataError(f"output folder {self.out} already holds a prepared set ({', '.join(found)}); pass "
                            "--overwrite to replace it, or choose another folder")
        cases = old.get("cases")
        for case_id in cases if isinstance(cases, dict) else ():
            layout.check_case_id(case_id, str(self.out / layout.RECORD_NAME))
        return old if isinstance(cases, dict) else old | {"cases": {}}

    def write_record(self, record: dict, lists: dict[str, list[str]]) -> None:
        try:
            files.atomic_write_text(self.staging / layout.RECORD_NAME, json.dumps(record, indent=1) + "\n")
            for name, ids in lists.items():
                if ids:
                    files.atomic_write_text(self.staging / name, "".join(f"{i}\n" for i in ids))
        except OSError as e:
            raise DataError(f"output folder {self.out}: cannot write {Path(e.filename or layout.RECORD_NAME).name} "
                            f"({files.describe(e)})") from None

    def swap_in(self) -> None:
        out, staging = self.out, self.staging
        old = staging / "replaced"  # the old set goes here, and with the staging folder
        for folder in (layout.CASES_DIR, layout.IMAGES_DIR):
            (old / folder).mkdir(parents=True)
        for name in SWAP_ORDER:
            if os.path.lexists(out / name):
                os.rename(out / name, old / name)  # a link is moved as the link
        for case_id in self.old.get("cases", {}):
            for there, aside in zip(layout.case_places(out, case_id), layout.case_places(old, case_id)):
                if os.path.lexists(there):
                    os.rename(there, aside)
        for case_id in self.case_ids:
            os.rename(layout.prepared_case_path(staging, case_id), layout.prepared_case_path(out, case_id))
        for name in reversed(SWAP_ORDER):
            if (staging / name).is_file():
                os.rename(staging / name, out / name)
        files.remove(out, staging.name)
        self.staging = None
        self._remove_if_empty(layout.IMAGES_DIR)  # the release layout of an older prepare's set, emptied

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self._abandon()
        elif self.lock is not None:
            self.lock.release()

    def _abandon(self) -> None:
        """After a failure: the staging folder goes; what this prepare added to an otherwise empty OUT goes too
        (the empty case folder, the lock file, OUT itself when this prepare created it)."""
        if self.staging is not None:
            files.remove(self.out, self.staging.name)
            self.staging = None
        if self.lock is None:  # never locked: the folder is not ours to tidy
            return
        self._remove_if_empty(layout.CASES_DIR)
        if {p.name for p in self.out.iterdir()} <= {files.LOCK_NAME}:
            files.remove(self.out, files.LOCK_NAME)
            if self.created:
                self.out.rmdir()
        self.lock.release()

    def _remove_if_empty(self, name: str) -> None:
        """``OUT/name`` goes when it is a real folder with nothing in it."""
        folder = self.out / name
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def _prepared_record(path: Path) -> dict | None:
    """The record of the prepared set at ``path``, or None when it is none (missing, unreadable, foreign)."""
    try:
        record = files.read_json(path, "a prepared set's record")
    except ValueError:
        return None
    return record if record.get("format") == layout.RECORD_FORMAT else None


__all__ = ["LISTS", "OutputFolder"]
