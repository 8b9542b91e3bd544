"""Crash-safe writes (fasterrcnn.files): the target is the old file or the new one, never half."""

import errno
import os

import pytest

import fasterrcnn.files as files
from fasterrcnn.files import DiskFullError, atomic_open, atomic_write_text, remove_stale_temps, stale_temps


def test_replaces_the_file_whole_syncs_the_folder_and_keeps_umask_permissions(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync_dir", lambda folder: synced.append(folder))
    target = tmp_path / "eval.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and synced == [tmp_path]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not stale_temps(tmp_path)


def test_an_error_during_the_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(target, "wb") as f:
        f.write(b"half of the new one")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous checkpoint"
    assert list(tmp_path.iterdir()) == [target]


def test_a_full_disk_says_so_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "predictions.json"
    target.write_text("[]")

    def full(path, mode, **kwargs):  # the temporary file is on a full disk: /dev/full answers ENOSPC
        tmp = path.parent / f".{path.name}.x{files.TEMP_SUFFIX}"
        os.symlink("/dev/full", tmp)
        return open(tmp, mode, **kwargs), str(tmp)

    monkeypatch.setattr(files, "_open_temp", full)
    with pytest.raises(DiskFullError) as e:
        atomic_write_text(target, "x" * 100_000)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert str(e.value).startswith(f"the disk is full: writing predictions.json in {tmp_path.resolve()} failed (")
    assert "the previous predictions.json is unchanged" in str(e.value)
    assert target.read_text() == "[]" and list(tmp_path.iterdir()) == [target]


def test_stale_temporaries_of_a_killed_writer_are_found_and_removed(tmp_path):
    left = tmp_path / ".last.pt.abc123.tmp"
    left.write_bytes(b"half")
    keep = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / "last.pt"]
    for p in keep:
        p.write_text("mine")
    assert stale_temps(tmp_path) == [left]
    assert remove_stale_temps(tmp_path) == [left]
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_mode_must_write():
    with pytest.raises(ValueError, match="mode must contain 'w'"), atomic_open("x", "rb"):
        pass
