"""What stands at a path that should be a file or a folder, said in words, for errors that name the real problem."""

from __future__ import annotations

import errno
import os
import stat
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
