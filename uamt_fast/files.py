"""How uamt_fast writes and removes files: no link followed, no file replaced half-written, one writer per folder.

Every command that writes (``train.py``, ``prepare``, ``predict``, ``pack``, the figures) goes through here:

- ``atomic_write(path, write)``: the bytes go to a temporary file created *exclusively* with an unpredictable
  name in ``path``'s folder (``tempfile.mkstemp``: ``O_CREAT | O_EXCL | O_NOFOLLOW``, so no existing path, and
  no link planted at a guessable name, is ever opened), are fsynced, then ``os.replace`` puts the file at
  ``path``. ``os.replace`` replaces a link found at ``path`` by the file; it never writes through it. A crash
  or a full disk leaves the previous file intact and removes the temporary one.
- ``append_line``: metrics logs are appended through ``O_NOFOLLOW`` to a regular file with one link only.
- ``FolderLock``: an exclusive ``fcntl.flock`` on ``folder/run.lock`` (opened ``O_NOFOLLOW``; a link or a
  hard-linked file there is refused), held for the writer's life and dropped by the kernel however the
  process ends. The lock file names the holder's pid and command, which a second claimant is told.
- ``remove(folder, name)``: deletion under ``--overwrite`` removes the entry itself (a link is unlinked, never
  what it points to; a folder is removed by ``shutil.rmtree``, which does not descend into links), and only
  entries reached from ``folder`` through real folders: it never leaves the folder.

Every refusal is a ``FolderError`` (a ``ValueError``) of one line naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

LOCK_NAME = "run.lock"
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's temporary names (tempfile.mkstemp's 8 letters)


class FolderError(ValueError):
    """A folder or file that cannot be written now; the message is one line and names it."""


def describe(e: OSError) -> str:
    """``[Errno 28] No space left on device`` as one short phrase, with the file when the error names one."""
    what = e.strerror or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


# ----------------------------------------------------------------------------- folders
def make_folder(out, purpose: str, flag: str = "--out") -> Path:
    """``mkdir -p out`` and a check that files can be created in it; one-line errors for a path that is a
    file, lies under a file, or cannot be written (permissions, a read-only file system, a full disk)."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FolderError(f"{flag} {out}: " + ("is a file" if blocker == out else f"{blocker} is a file")
                          + f"; expected a folder for the {purpose}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # the only sure test: root ignores permission bits, mounts do not
            pass
    except OSError as e:
        raise FolderError(f"{flag} {out}: cannot write the {purpose} there ({describe(e)})") from None
    return out


# ----------------------------------------------------------------------------- atomic writes
def _file_mode() -> int:
    """0o666 less the umask (what ``open`` would give), read without changing the umask: ``os.umask`` is
    process-wide and prepare writes from several threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def _finished_temporary(path: Path, write):
    """A new temporary file beside ``path`` (exclusive, unpredictable name, mode as ``open`` would give),
    filled by ``write(f)`` and fsynced; yields its path and removes it afterwards unless it was renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w+b") as f:  # read and write: h5py reads back what it writes
            fd = -1  # the file object owns it now
            write(f)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path, write) -> None:
    """``write(f)`` into a new temporary file beside ``path``, fsync, then ``os.replace`` onto ``path``."""
    path = Path(path)
    with _finished_temporary(path, write) as tmp:
        os.replace(tmp, path)


def write_new(path, write) -> Path:
    """``write(f)`` into a file at ``path``, or at ``<stem>-2<suffix>``, ``-3``, ... when taken: the first name
    free, claimed atomically (``os.link`` of the finished temporary file fails on an existing name, so two
    writers never pick one name and nothing is replaced). Returns the path written."""
    path = Path(path)
    with _finished_temporary(path, write) as tmp:
        candidate, n = path, 1
        while True:
            try:
                os.link(tmp, candidate, follow_symlinks=False)
                return candidate
            except FileExistsError:
                n += 1
                candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` through ``atomic_write``."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_h5(path, fill) -> None:
    """An HDF5 file written by ``fill(h5py.File)`` through ``atomic_write`` (h5py writes to the open file object,
    never opening a path itself)."""
    import h5py

    def write(f):
        with h5py.File(f, "w") as h5:
            fill(h5)

    atomic_write(path, write)


def _open_regular(path: Path, flags: int, what: str) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``, refused unless the result is a regular file with one link."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FolderError(f"{path}: is a symbolic link; uamt_fast never writes through a link ({what}): remove "
                              "it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise FolderError(f"{path}: is {kind}; uamt_fast writes its {what} only into a file of its own: remove it")
    return fd


def open_log(path):
    """``path`` open for appending (binary), created if absent, never through a link (a log a child process
    writes into, say)."""
    return os.fdopen(_open_regular(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, "log"), "ab")


def append_line(path, text: str) -> None:
    """Append ``text`` (one line, newline included) to ``path``, created if absent, never through a link."""
    with open_log(path) as f:
        f.write(text.encode())


# ----------------------------------------------------------------------------- one writer per folder
class FolderLock:
    """An exclusive ``flock`` on ``folder/run.lock``, held until ``release()`` or the process ends.

    ``what`` names the holder for a second claimant ("train.py", "prepare", "predict"); ``flag`` names the
    command-line argument that gave the folder, for the messages."""

    def __init__(self, folder, flag: str, what: str):
        folder = Path(folder)
        self.path = folder / LOCK_NAME
        try:
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT, "lock")
        except OSError as e:
            raise FolderError(f"{flag} {folder}: cannot create its lock file {LOCK_NAME} ({describe(e)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = " ".join(os.pread(self._fd, 200, 0).decode(errors="replace").split()) or "unknown"
            os.close(self._fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderError(f"{flag} {folder}: cannot lock {self.path} ({describe(e)})") from None
            pid, _, command = holder.partition(" ")
            raise FolderError(f"{flag} {folder}: {command or 'another writer'} is in progress there (pid {pid} holds "
                              f"{self.path}); wait for it to end, or choose another folder") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {what}\n".encode(), 0)

    def remove_stale_temporaries(self) -> list[str]:
        """Remove the temporary files a killed writer left in the locked folder (``.<name>.XXXXXXXX.tmp``, as
        ``atomic_write`` names them): only the lock's holder may, as no other writer of ours can be using them."""
        folder = self.path.parent
        stale = [p.name for p in folder.iterdir() if TEMPORARY.fullmatch(p.name) and not p.is_dir()]
        for name in stale:
            remove(folder, name)
        return stale

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def subfolder(folder, *names: str) -> Path:
    """``folder/names[0]/.../names[-1]``, each level created if absent; a level that exists as a link or a file
    is refused, so what is written below it stays inside ``folder``."""
    path = Path(folder)
    for name in names:
        path = path / name
        if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
            raise FolderError(f"{path}: is {'a symbolic link' if path.is_symlink() else 'not a folder'}; uamt_fast "
                              "writes only into real folders below the one it was given: remove it")
        try:
            path.mkdir(exist_ok=True)
        except FileExistsError:  # a link or file appeared since the look
            return subfolder(folder, *names)
    return path


# ----------------------------------------------------------------------------- removal that stays inside
def remove(folder, *names: str) -> bool:
    """Remove ``folder/names[0]/.../names[-1]`` itself: a file or link is unlinked, a real folder removed with
    everything in it (``shutil.rmtree`` unlinks the links it meets, never descending into them). The walk
    from ``folder`` opens each intermediate folder ``O_NOFOLLOW``: below a link nothing is removed. Returns
    whether something was removed."""
    if not names or any(n in ("", ".", "..") or "/" in n for n in names):
        raise ValueError(f"remove: {names!r} is not a path of plain names")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names[:-1]:
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return False  # gone, a file, or a link: nothing of ours below it
                raise
            os.close(fd)
            fd = child
        try:
            st = os.lstat(names[-1], dir_fd=fd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(names[-1], dir_fd=fd)
        else:
            os.unlink(names[-1], dir_fd=fd)
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- identity of files
def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` are one file: the same resolved path, or the same inode (a hard link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def overlaps(a, b) -> bool:
    """Whether folders ``a`` and ``b`` (resolved) are one, or one lies inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents




# ----------------------------------------------------------------------------- reading a JSON file
def read_json(path, what: str, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in ``path`` (UTF-8). Every way reading it can fail (no such file, unreadable, not UTF-8,
    not JSON, nested too deeply for the parser, an integer of too many digits, not an object) is ``error`` (the
    caller's ValueError subclass: DataError, ...) of one line naming the file and ``what`` it should hold."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to read (arrays or objects inside each other about "
                    f"{sys.getrecursionlimit()} levels deep)") from None
    except ValueError as e:  # json.JSONDecodeError, or an integer of more digits than Python converts
        raise error(f"{path}: {what} is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: {what} is a JSON {type(value).__name__}; expected a JSON object {{...}}")
    return value


__all__ = ["LOCK_NAME", "FolderError", "FolderLock", "append_line", "atomic_save", "atomic_write", "atomic_write_h5",
           "atomic_write_text", "describe", "make_folder", "open_log", "overlaps", "read_json", "remove", "same_file",
           "sha256", "subfolder", "write_new"]


# ----------------------------------------------------------------------------- JSON a strict parser reads
def json_safe(x):
    """``x`` with what ``json.dumps`` would write as non-standard JSON or refuse made plain, recursively: a NaN or
    infinite float becomes None (null: strict parsers reject bare NaN), a tuple a list, a dict key its ``str``,
    and a value that is not None, a str, int, bool or float (a Path, say) its ``str``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x if x is None or isinstance(x, (str, int, bool)) else str(x)


__all__ += ["json_safe"]
