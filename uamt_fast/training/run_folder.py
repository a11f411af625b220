"""A train.py run folder: one process at a time, never written over, every file written atomically.

A run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (rolling), ``student.pt``,
``teacher.pt``, ``eval.json`` and ``eval_*.json``, plus ``run.lock``. The process that trains into the
folder (a new run, ``--overwrite`` or ``--resume``) holds an exclusive ``fcntl.flock`` on ``run.lock``
for its whole life; the lock file names its pid. A second claimant (another start or a ``--resume`` of a
running run) is refused with one line naming that pid. The kernel drops the lock when the process dies,
however it dies (``kill -9`` included), so a lock is never stale and nothing has to be cleaned up.

Writes, the lock and removals go through ``uamt_fast.files`` (no link followed, nothing replaced half-written).
Every failure is a ``RunFolderError`` (``files.FolderError``, a ``ValueError``) of one line naming the folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from uamt_fast import files
from uamt_fast.files import LOCK_NAME

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "teacher.pt", "eval.json")
RunFolderError = files.FolderError  # a run folder that cannot be used now; one line naming it


def RunLock(folder: Path, flag: str) -> files.FolderLock:  # noqa: N802 (reads as the lock it returns)
    """The run folder's lock (``files.FolderLock``), held by the process that trains into it; the temporary
    files of a killed run go."""
    lock = files.FolderLock(folder, flag, "train.py")
    lock.remove_stale_temporaries()
    return lock


def claim(out, overwrite: bool, flag: str = "--out", inputs=()) -> files.FolderLock:
    """Create and lock the run folder ``out`` for a new run. A folder that already holds a run is refused
    unless ``overwrite``, which then deletes that run's files, and only those (other files stay). With
    ``overwrite`` a folder that is, holds or lies inside one of ``inputs`` (the data) is refused up front:
    nothing is removed where the run's own data lives."""
    for folder in inputs if overwrite else ():
        if files.overlaps(out, folder):
            relation = "is" if Path(out).resolve() == Path(folder).resolve() else "overlaps"
            raise RunFolderError(f"{flag} {out}: --overwrite would remove files where the run's data lives ({folder}; "
                                 f"{flag} {relation} that folder); choose another {flag}")
    out = files.make_folder(out, "run", flag)
    lock = RunLock(out, flag)  # first the lock, then the look: two claimants cannot both see a free folder
    try:
        found = run_files(out)
        if found and not overwrite:  # --resume only where it can work: from a checkpoint.pt
            raise RunFolderError(f"{flag} {out} already holds a run ({', '.join(found)}): "
                                 + (f"continue it with --resume {out}, choose a new --out, or pass --overwrite to "
                                    "replace it" if "checkpoint.pt" in found else
                                    "it saved no checkpoint.pt to resume from (stopped before its first one, "
                                    "--save-every): pass --overwrite to start it again, or choose a new --out"))
        for name in found:
            files.remove(out, name)  # a link planted there goes, never what it points to
    except BaseException:
        lock.release()
        raise
    return lock


def run_files(folder: Path) -> list[str]:
    """The names of the run's files in ``folder`` (``RUN_FILES``, then ``eval_*.json``); [] for none, or no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [n for n in RUN_FILES if os.path.lexists(folder / n)] + sorted(p.name for p in folder.glob("eval_*.json"))


def is_empty_but_lock(folder: Path) -> bool:
    return folder.is_dir() and all(p.name == LOCK_NAME for p in folder.iterdir())


def drop_metrics_after(path: Path, iteration: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``iteration`` (a resumed run logs the later ones again:
    after a kill they would appear twice); returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int) and record["iteration"] <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        files.atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


__all__ = ["RUN_FILES", "LOCK_NAME", "RunFolderError", "RunLock", "claim", "drop_metrics_after", "run_files"]
