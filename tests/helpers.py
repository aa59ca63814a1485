"""Helpers shared by test modules (imported as ``helpers``; pytest puts this folder on the path)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` without opening anything but regular files (a FIFO is never opened): a link
    and its target, a regular file's hash, any other entry's kind. Equal snapshots: nothing written or removed."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            entries[str(path.relative_to(root))] = (
                ("link", os.readlink(path)) if stat.S_ISLNK(mode) else
                ("file", hashlib.sha256(path.read_bytes()).hexdigest()) if stat.S_ISREG(mode) else
                ("kind", stat.S_IFMT(mode)))
    return entries
