"""A train.py run folder: one process at a time, never written over, every file written atomically.

A run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (rolling), ``student.pt``,
``teacher.pt``, ``eval.json`` and ``eval_*.json``, plus ``run.lock``. The process that trains into the
folder (a new run, ``--overwrite`` or ``--resume``) holds an exclusive ``fcntl.flock`` on ``run.lock``
for its whole life; the lock file names its pid. A second claimant (another start or a ``--resume`` of a
running run) is refused with one line naming that pid. The kernel drops the lock when the process dies,
however it dies (``kill -9`` included), so a lock is never stale and nothing has to be cleaned up.

Every failure is a ``RunFolderError`` (a ``ValueError``) of one line naming the folder or file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path

import torch

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "teacher.pt", "eval.json")
LOCK_NAME = "run.lock"


class RunFolderError(ValueError):
    """A run folder that cannot be used now; the message is one line and names it."""


def make_folder(out, purpose: str, flag: str = "--out") -> Path:
    """``mkdir -p out`` and a check that files can be created in it; one-line errors for a path that is a
    file, lies under a file, or cannot be written (permissions, a read-only file system, a full disk)."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RunFolderError(f"{flag} {out}: " + ("is a file" if blocker == out else f"{blocker} is a file")
                             + f"; expected a folder for the {purpose}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the only sure test: root ignores permission bits, mounts do not
            pass
    except OSError as e:
        raise RunFolderError(f"{flag} {out}: cannot write the {purpose} there ({describe(e)})") from None
    return out


class RunLock:
    """An exclusive ``flock`` on ``folder/run.lock``, held until ``release()`` or the process ends."""

    def __init__(self, folder: Path, flag: str):
        self.path = Path(folder) / LOCK_NAME
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"{flag} {folder}: cannot create its lock file {LOCK_NAME} ({describe(e)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"{flag} {folder}: cannot lock {self.path} ({describe(e)})") from None
            raise RunFolderError(f"{flag} {folder}: a run is in progress there (pid {holder} holds {self.path}); "
                                 "wait for it to end, or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim(out, overwrite: bool, flag: str = "--out") -> RunLock:
    """Create and lock the run folder ``out`` for a new run. A folder that already holds a run is refused
    unless ``overwrite``, which then deletes that run's files, and only those (other files stay)."""
    out = make_folder(out, "run", flag)
    lock = RunLock(out, flag)  # first the lock, then the look: two claimants cannot both see a free folder
    try:
        found = [n for n in RUN_FILES if (out / n).exists()] + sorted(p.name for p in out.glob("eval_*.json"))
        if found and not overwrite:
            raise RunFolderError(f"{flag} {out} already holds a run ({', '.join(found)}): continue it with --resume "
                                 f"{out}, choose a new --out, or pass --overwrite to replace it")
        for name in found:
            (out / name).unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def is_empty_but_lock(folder: Path) -> bool:
    return folder.is_dir() and all(p.name == LOCK_NAME for p in folder.iterdir())


def new_file(path: Path) -> Path:
    """``path`` if free, else ``<stem>-2<suffix>``, ``-3``, ...: the first name not taken."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temp file in ``path``'s folder, fsync, then rename over ``path``: a crash or a
    full disk mid-write leaves the previous file intact and no temp file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through ``atomic_write``."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


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
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def describe(e: OSError) -> str:
    """``[Errno 28] No space left on device`` as one short phrase, with the file when the error names one."""
    what = e.strerror or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


__all__ = ["RUN_FILES", "LOCK_NAME", "RunFolderError", "make_folder", "RunLock", "claim", "new_file", "atomic_write",
           "atomic_save", "atomic_write_text", "drop_metrics_after", "describe"]
