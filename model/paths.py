"""What stands at a path that should be a file or a folder, and whether a folder can be written, said in words, for
errors that name the real problem."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


def what_is(path: str | os.PathLike, want: str = "file") -> str | None:
    """None when path is a `want` ("file" or "folder"), links followed; else what it is, as the rest of a sentence
    that starts with the path: "does not exist", "is a folder, not a file", "is a symbolic link that loops", ..."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of its path is a file)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        return f"cannot be read ({e.strerror or e})"
    if want == "file" and stat.S_ISREG(mode) or want == "folder" and stat.S_ISDIR(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISREG(mode):
        return "is a file, not a folder"
    return f"is not a regular {want} (a device, socket or pipe)"


def cannot_write(folder: str | os.PathLike) -> str | None:
    """None when files can be made in folder, or, if it does not exist yet, in the nearest folder above it (so it can be
    created); else why not, as the rest of a sentence that starts with the path: "does not take new files (Permission
    denied)", "cannot be created: /proc does not take new files (No such file or directory)". Tried by making and
    removing an empty file there, as modes cannot tell (root ignores them; /proc and /sys refuse whatever they say)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("."))
    problem = what_is(existing, "folder")
    if problem is None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        except OSError as e:
            problem = f"does not take new files ({e.strerror or type(e).__name__})"
        else:
            os.close(fd)
            os.unlink(probe)
            return None
    return problem if existing == folder else f"cannot be created: {existing} {problem}"
