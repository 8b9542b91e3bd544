"""Crash-safe writes: a kill, a power cut or a full disk during a write leaves the previous file whole.

    with atomic_open(run_dir / "eval.json", "w") as f:
        json.dump(data, f)

The data goes to a temporary file in the same folder (``.<name>.<random>.tmp``), is flushed and
fsynced, then renamed over the target (``os.replace``, atomic on POSIX and Windows), and the folder
is fsynced so that the rename itself survives a power cut. On any error the temporary file is
removed; a write that fails because the disk is full raises ``DiskFullError`` naming the folder.
A process killed outright (SIGKILL) can leave a temporary file behind; ``remove_stale_temps``
clears them. Standard library only, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the folder and what is free there."""


def is_disk_full(error: BaseException | None) -> bool:
    """True if ``error`` or an exception it was raised from or during is ENOSPC / EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    return shutil.disk_usage(folder).free


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_temp(path: Path, mode: str, **kwargs):
    """-> (file object, temporary path) next to ``path``, with the permissions a new file would get."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError, AttributeError):
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a plain open() would give 0666 & ~umask
    return os.fdopen(fd, mode, **kwargs), tmp


def open_temp(path: str | os.PathLike, mode: str = "w", **kwargs):
    """-> (file object, temporary path) next to ``path`` with the mode a plain open() gives (umask), for
    a writer that renames it over ``path`` itself (a file streamed over a whole run)."""
    return _open_temp(Path(path), mode, **kwargs)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs):
    """A file object for writing ``path`` in one piece: the target changes only if the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a whole file: mode must contain 'w', got {mode!r}")
    path = Path(path)
    f, tmp = _open_temp(path, mode, **kwargs)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    fsync_dir(path.parent)


def disk_full_error(path: Path, error: BaseException) -> DiskFullError:
    folder = path.parent.resolve()
    try:
        free = f"{format_bytes(free_bytes(folder))} free"
    except OSError:
        free = "free space unknown"
    previous = f"the previous {path.name} is unchanged" if path.exists() else f"{path.name} was not written"
    e = DiskFullError(
        f"the disk is full: writing {path.name} in {folder} failed ({free}); {previous}. "
        "Free some space there, or write elsewhere"
    )
    e.errno = errno.ENOSPC
    return e


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Temporary files ``atomic_open`` left in ``folder`` when its process was killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.name.count(".") >= 3 and p.is_file()
    )


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    removed = []
    for p in stale_temps(folder):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
