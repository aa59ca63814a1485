"""The file system, safely: atomic writes of files and folders (a temporary sibling, then one rename), checks
that an output is writable and stays apart from the inputs, and errors that say why a path cannot be used.
Knows nothing of models or tensors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from evomerge.errors import SpecError
from evomerge.refs import lexists

# errors that mean the output's file system is full (or the file too large for it): reported, never a traceback
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# room a temporary sibling's name takes beyond the target's: ``.`` ``NAME`` ``.tmp-PID-HEX8``
TEMP_ROOM = 32


def os_reason(err: OSError) -> str:
    """Why a path cannot be used, in words (a link loop, a name too long, no permission ...)."""
    words = {errno.ELOOP: "a symlink loop", errno.ENAMETOOLONG: "a name too long for the file system",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOENT: "not found"}
    return words.get(err.errno, err.strerror or str(err))


def regular_file(path: Path) -> Path:
    """``path`` when it is a regular file that can be opened for reading (through its links); SpecError otherwise:
    a FIFO or device would block or never end, a folder, a link loop or a name too long would be a traceback."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISREG(mode):
            with path.open("rb"):
                return path
    except OSError as err:
        raise SpecError(f"{path}: cannot read it ({os_reason(err)})") from None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(
        mode) else "a device"
    raise SpecError(f"{path}: not a regular file ({kind}); a model's files must be regular files")


def check_output_folder(out: Path, force: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse, before any compute, an output that would destroy or nest with a ``protected`` folder (the
    inputs, a run folder being exported) or the files they hold, an existing one unless forced, and a location
    we cannot write (a link loop, a name too long)."""
    check_name_lengths(out, "output folder")
    check_apart(out, "output folder", protected)
    if out.exists() and not force:
        raise SpecError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SpecError(f"output path {out} exists and is not a folder")
    parent = next(p for p in resolved(out, "output folder").parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"cannot write output folder {out}: {parent} is not a writable folder")


def check_apart(folder: Path, what: str, protected: Sequence[Path]) -> None:
    """Refuse a folder we are to write (``what``: an output, a run folder) that is, contains or lies inside a
    ``protected`` folder, or is or contains a file one of them holds, wherever its links lead: replacing or
    filling such a folder would destroy or change an input, ``--force`` or not."""
    target = resolved(folder, what)
    for keep in protected:
        places = [(resolved(keep, "input"), True), *((file, False) for file in _held_files(keep))]
        for place, nests in places:
            relation = _relation(target, place, nests)
            if relation:
                where = keep if nests else f"{place} (a file of {keep})"
                raise SpecError(f"{what} {folder} {relation} {where}, which must stay untouched; choose another")


def resolved(path: Path, what: str) -> Path:
    """``path`` with its links followed; SpecError when they loop (or a name is too long)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # Python 3.11 reports a loop as RuntimeError
        reason = os_reason(err) if isinstance(err, OSError) else "a symlink loop"
        raise SpecError(f"{what} {path}: its path cannot be followed ({reason})") from None


def check_name_lengths(path: Path, what: str) -> None:
    """Every name in ``path`` fits the file system (the temporary sibling's longer name is shortened to fit), and
    so does the whole path with room for that sibling's."""
    full = Path(os.path.abspath(path))
    existing = next(p for p in [full, *full.parents] if lexists(p))
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = next((part for part in full.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise SpecError(f"{what} {path}: the name {long[:40]}... is longer than the {name_max} bytes the file system "
                        f"allows")
    if len(os.fsencode(full)) + TEMP_ROOM > path_max:
        raise SpecError(f"{what} {path}: the path is longer than the {path_max - TEMP_ROOM} bytes the file system "
                        f"allows")


def _relation(target: Path, place: Path, nests: bool) -> str | None:
    """How a folder to write stands to a place to keep: is it, contains it, or lies inside it (a folder's only:
    ``nests``); None when apart."""
    if target == place:
        return "is"
    if target in place.parents:
        return "contains"
    return "lies inside" if nests and place in target.parents else None


def _held_files(folder: Path) -> list[Path]:
    """Where the files of ``folder`` really are: a Hugging Face cache snapshot's files are links into the
    cache's ``blobs/``, a local model's may link anywhere. Its own files only (what a model or run folder
    reads lies there); none for a folder that cannot be read (opening it as a model reports why)."""
    try:
        return [item.resolve() for item in sorted(folder.iterdir()) if item.is_file()]
    except OSError:
        return []


def _temp_stem(target: Path) -> str:
    """``target``'s name in its temporary siblings' names: shortened (with a hash of the rest) where the sibling's
    name would otherwise be too long for the file system."""
    name = target.name
    if len(os.fsencode(name)) + TEMP_ROOM <= 255:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    return os.fsdecode(os.fsencode(name)[:200]) + "~" + digest


def _temp_sibling(target: Path) -> Path:
    """A hidden name beside ``target`` that records the writing process, so a later run can tell a stale
    leftover (its writer is dead) from another run's work in progress."""
    return target.with_name(f".{_temp_stem(target)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary siblings of ``target`` left by killed writers; nothing else."""
    pattern = re.compile(rf"^\.{re.escape(_temp_stem(target))}\.tmp-(\d+)-[0-9a-f]{{8}}$")
    for item in target.parent.iterdir():
        match = pattern.match(item.name)
        if match and not _alive(int(match.group(1))):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder (normal permissions); on success it replaces ``out`` in one rename.

    A killed merge leaves only its hidden temporary sibling, which the next run into ``out`` removes. A failed
    one (a full disk: one SpecError line) leaves nothing: no temporary folder, no parent folder it created."""
    out = resolved(out, "output folder")
    made = missing_folders(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        tmp = _temp_sibling(out)
        tmp.mkdir()  # mode 0o777 less the umask, like any folder the user makes
    except OSError as err:
        remove_empty_folders(made)
        raise SpecError(f"cannot write output folder {out}: {os_reason(err)}") from None
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{_temp_stem(out)}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except OSError as err:
        if err.errno not in FULL:
            raise
        raise SpecError(f"cannot write output folder {out}: {os_reason(err)}; nothing was written") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if not out.exists():
            remove_empty_folders(made)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what creating it would make."""
    return [p for p in (folder, *folder.parents) if not lexists(p)]


def remove_empty_folders(made: Sequence[Path]) -> None:
    """Remove the folders a failed write created (``missing_folders`` before it), as long as they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and a rename (mode 0o666 less the umask); a failed write
    leaves the file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_sibling(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
