"""Atomic writes: a file or a whole folder is written beside its target under a temporary name, then renamed over it.

Temporary names are `.<name>.<pid>-<random>.tmp` (file or folder) beside `<name>`, pid being the writing process's.
A kill -9 can leave one behind; every later write of `<name>` removes those whose process is gone, and a write by the
sole writer of `<name>` removes them all, also those of older versions without a pid (see remove_stale_temps).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _running(pid: int) -> bool:
    """Whether a process of this pid exists (a temp of a running process may still be written)."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) is no probe (on Windows it ends the process): assume it runs
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _dead(pid: str | None, sole_writer: bool) -> bool:
    """Whether a temp of this writer pid (None: an older version's, without one) is a dead write's leftover."""
    if sole_writer:
        return True
    if pid is None:
        return False  # only the sole writer can tell it is dead
    if int(pid) == os.getpid():
        return False  # this process's own: another of its threads may be writing it
    return not _running(int(pid))


def temp_prefix(path: str | os.PathLike) -> str:
    """The start of the temporary names of `path`'s writes by this process: `.<name>.<pid>-`."""
    return f".{Path(path).name}.{os.getpid()}-"


def remove_stale_temps(path: str | os.PathLike, sole_writer: bool = False) -> None:
    """Delete `.<name>.<pid>-<random>.tmp` files and folders beside `path` whose process is gone: what writes of `path`
    killed before their rename left. Safe for any process at any time: a running writer's temps are left alone.

    sole_writer: this process is the only writer of `path` (a checkpoint folder has one: the trainer's rank 0, or
    quantize.py for its --out), so every temp of `path` is dead, also those of older versions (`.<name>.<random>.tmp`).
    Temps of other names are left alone; they go when their own name is next written.
    """
    path = Path(path)
    stale = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-)?[^.]+\.tmp")  # no dot in the random part: not another name's
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = stale.fullmatch(entry.name)
        if not (match and _dead(match.group(1), sole_writer)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sole_writer: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename, else it is removed.

    A kill at any instant leaves either the old file or the new one, never a half-written file; leftovers of killed
    earlier writes of `path` are removed first (all of them when this process is its sole writer).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path, sole_writer)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # The mode open() would have given (mkstemp makes files owner-only); set at the end, as a writer may have
        # replaced the temp file with one of its own.
        tmp_path.chmod(0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def aside_path(path: str | os.PathLike) -> Path:
    """Where atomic_dir keeps the old folder for the instant between its two renames: `.<name>.old` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what a kill left of an earlier atomic_dir(path): restore the old folder if the new one never got in, and
    delete the aside copy and dead builds. Only for the sole writer of `path` (see remove_stale_temps)."""
    path, aside = Path(path), aside_path(path)
    if aside.is_dir():
        if path.exists():  # killed while deleting the old folder: the new one is in place
            shutil.rmtree(aside)
        else:  # killed between the two renames: the old folder is still the current one
            os.replace(aside, path)
    remove_stale_temps(path, sole_writer=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; on success it replaces `path` whole, else it is removed.

    Readers see the old folder or the new one, never a mix. The swap is two renames (old aside, new in) and then the
    old folder is deleted; recover_dir, run first, repairs a kill at any of those points. Only for the sole writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    build = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        build.chmod(0o777 & ~_umask())  # the mode mkdir would have given (mkdtemp makes folders owner-only)
        yield build
        if path.exists():
            os.replace(path, aside_path(path))
            os.replace(build, path)
            shutil.rmtree(aside_path(path))
        else:
            os.replace(build, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a UTF-8 text file (leftovers of killed earlier writes of it go)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write a binary file (leftovers of killed earlier writes of it go)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
