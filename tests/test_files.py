"""uamt_fast.files, the one way every command writes: no link followed, nothing replaced half-written, removal
that stays inside its folder, one writer per folder. (The commands' own tests plant the links at their files.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from uamt_fast import files


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(b"the user's own file")
    return path


def test_atomic_write_replaces_a_link_and_never_writes_through_it(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").symlink_to(victim)
    files.atomic_write_text(out / "a.json", "new")
    assert victim.read_bytes() == b"the user's own file"
    assert not (out / "a.json").is_symlink() and (out / "a.json").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]  # no temporary file left


def test_write_new_never_replaces_and_picks_the_next_free_name(tmp_path, victim):
    (tmp_path / "eval.json").symlink_to(victim)  # taken, even by a link
    assert files.write_new(tmp_path / "eval.json", lambda f: f.write(b"1")).name == "eval-2.json"
    assert files.write_new(tmp_path / "eval.json", lambda f: f.write(b"2")).name == "eval-3.json"
    assert victim.read_bytes() == b"the user's own file" and (tmp_path / "eval-2.json").read_bytes() == b"1"


def test_remove_takes_the_entry_itself_and_never_leaves_the_folder(tmp_path, victim):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.h5").write_bytes(b"keep")
    out = tmp_path / "out"
    (out / "images" / "case1").mkdir(parents=True)
    (out / "images" / "case1" / "link.h5").symlink_to(victim)
    (out / "images" / "case2").symlink_to(outside, target_is_directory=True)
    (out / "linked").symlink_to(outside, target_is_directory=True)
    assert not files.remove(out, "linked", "keep.h5")  # below a link: nothing removed
    assert files.remove(out, "images", "case2")  # the link itself
    assert files.remove(out, "images")  # a real folder, with the link inside it
    assert victim.read_bytes() == b"the user's own file" and (outside / "keep.h5").read_bytes() == b"keep"
    assert sorted(p.name for p in out.iterdir()) == ["linked"]
    with pytest.raises(ValueError, match="plain names"):
        files.remove(out, "..", "outside")


def test_subfolder_refuses_a_link_on_the_way(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "images").symlink_to(outside, target_is_directory=True)
    with pytest.raises(files.FolderError, match="symbolic link"):
        files.subfolder(tmp_path / "out", "images", "case1")
    assert not list(outside.iterdir())
    assert files.subfolder(tmp_path / "out", "real", "case1").is_dir()


def test_the_lock_refuses_links_and_names_its_holder_across_processes(tmp_path, victim):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / files.LOCK_NAME).symlink_to(victim)
    with pytest.raises(files.FolderError, match="symbolic link"):
        files.FolderLock(tmp_path / "a", "--out", "predict")
    assert victim.read_bytes() == b"the user's own file"
    holder = textwrap.dedent(f"""
        import sys, time
        from uamt_fast import files
        lock = files.FolderLock({str(tmp_path)!r}, "OUT", "prepare")
        print("locked", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(files.FolderError, match=f"prepare is in progress there \\(pid {proc.pid} holds"):
            files.FolderLock(tmp_path, "--out", "train.py")
    finally:
        proc.kill()  # however the holder ends, the kernel drops its lock
        proc.wait(timeout=60)
    with files.FolderLock(tmp_path, "--out", "train.py") as lock:
        assert (tmp_path / files.LOCK_NAME).read_text() == f"{os.getpid()} train.py\n"
        (tmp_path / ".config.json.abcd1234.tmp").write_text("a killed writer's")
        assert lock.remove_stale_temporaries() == [".config.json.abcd1234.tmp"]
