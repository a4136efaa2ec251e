"""Output folders: the project writes only into folders it may write into, and never half-writes one.

The rule, for every command and library call that writes a folder:

* the folder does not exist, or is empty, or holds this command's own earlier output, recognised by the
  marker file :data:`MARKER` that the project writes into every output folder (JSON: which command wrote
  it, with which version). Anything else (a user's folder, a folder another command wrote, a file) is
  refused with one line that says why and what to do instead;
* an output folder is never one of the command's inputs, nor a folder that contains one, nor the
  working directory or a folder that contains it;
* a folder written in one piece appears complete or not at all (:func:`atomic_dir`: written under a
  temporary name beside it, renamed into place; every failure path removes the temporary names).

Folders written bit by bit (a training run, an engine folder, a render's work folder) are claimed with
:func:`claim_output_dir` once every setting has been checked, and carry the marker from their creation.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .utils import DreamPoseError, PathLike

#: the marker file inside every folder the project writes
MARKER = ".dreampose-rt.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_marker(folder: PathLike) -> dict | None:
    """The marker of ``folder`` ({"command": ..., ...}), or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def _marker_text(command: str) -> str:
    from . import __version__

    return json.dumps({"command": command, "written_by": f"dreampose-rt {__version__}",
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                      indent=2) + "\n"


def write_marker(folder: PathLike, command: str) -> None:
    """Mark ``folder`` as ``command``'s output."""
    (Path(folder) / MARKER).write_text(_marker_text(command))


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_inputs_outside(out: PathLike, inputs: Iterable[PathLike | None] = (), what: str = "output") -> None:
    """Raise DreamPoseError if ``out`` is one of ``inputs`` or contains one, or is (or contains) the
    working directory."""
    target = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        src = _resolved(item)
        if _inside(src, target):
            same = "is" if src == target else "contains"
            raise DreamPoseError(f"{out}: the {what} {same} an input of this command ({item}); "
                                 f"choose another {what} path")
    if _inside(_resolved(os.getcwd()), target):
        raise DreamPoseError(f"{out}: the {what} is the working directory or contains it; choose a new folder "
                             "inside it instead")


def check_output_dir(out: PathLike, command: str, inputs: Iterable[PathLike | None] = (),
                     legacy: Callable[[Path], bool] | None = None) -> bool:
    """May ``command`` write the folder ``out``? Returns True if it exists (empty, or ``command``'s own
    earlier output, which it may replace), False if it does not exist; raises DreamPoseError otherwise.

    ``legacy``: recognises a folder that this command wrote before markers existed (an engine folder
    with its manifest, a training run with its checkpoints); it then counts as the command's own.
    """
    path = Path(out)
    check_inputs_outside(path, inputs, "output folder")
    if not path.exists():
        if path.is_symlink():
            raise DreamPoseError(f"{path}: a broken symbolic link; give a new folder path")
        if path.parent.exists() and not path.parent.is_dir():
            raise DreamPoseError(f"{path.parent}: is a file, not a folder; give an output path in a folder")
        return False
    if not path.is_dir():
        raise DreamPoseError(f"{path}: is a file, not a folder; give a new folder path (the file is left as it is)")
    try:
        entries = [p.name for p in path.iterdir()]
    except OSError as e:
        raise DreamPoseError(f"{path}: cannot list the folder ({e.strerror})") from None
    if not entries:
        return True
    marker = read_marker(path)
    if marker is not None and marker["command"] == command:
        return True
    if marker is None and legacy is not None and legacy(path):
        return True
    owner = f"the output of `{marker['command']}`" if marker is not None else "files this command did not write"
    raise DreamPoseError(f"{path}: the folder exists and holds {owner}; give a new or empty folder "
                         f"(or remove it yourself)")


def claim_output_dir(out: PathLike, command: str, inputs: Iterable[PathLike | None] = (),
                     legacy: Callable[[Path], bool] | None = None) -> Path:
    """Check ``out`` (:func:`check_output_dir`), then create it if needed and mark it as ``command``'s.
    For folders written bit by bit; call it after every setting has been checked. Returns the path."""
    path = Path(out)
    check_output_dir(path, command, inputs, legacy)
    path.mkdir(parents=True, exist_ok=True)
    if read_marker(path) is None:
        write_marker(path, command)
    return path


@contextlib.contextmanager
def output_dir(out: PathLike, command: str, inputs: Iterable[PathLike | None] = (),
               legacy: Callable[[Path], bool] | None = None, scratch: Iterable[str] = ()) -> Iterator[Path]:
    """:func:`claim_output_dir` for a block that fills the folder bit by bit: if the block fails and the
    folder was created by it and holds nothing but the marker and ``scratch`` files (nothing worth keeping,
    such as settings written first), the folder is removed again."""
    path = Path(out)
    created = not path.exists()
    claim_output_dir(path, command, inputs, legacy)
    try:
        yield path
    except BaseException:
        if created and path.is_dir():
            leftover = {p.name for p in path.iterdir()} - {MARKER, *scratch}
            if not leftover:
                shutil.rmtree(path, ignore_errors=True)
        raise


def _readable(folder: Path) -> None:
    """Give the files under ``folder`` that a library wrote owner-only (safetensors writes 0600) the modes
    of any file the user makes (0666 minus the umask): a model folder is read by other processes, users and
    cluster nodes."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            os.chmod(f, mode)


@contextlib.contextmanager
def atomic_dir(path: PathLike, command: str, inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, marked as ``command``'s.

    ``path`` is checked first (:func:`check_output_dir`): it must not exist, be empty, or hold
    ``command``'s own earlier output. The new folder is complete before it appears under ``path``, and the
    old one is deleted only after the new one is in place. Between the two renames (microseconds)
    ``path`` does not exist; it is never a half-written folder. On any failure the temporary folders are
    removed and ``path`` is as it was. Files written owner-only (safetensors' 0600) get the umask's modes.
    """
    path = Path(path)
    existed = check_output_dir(path, command, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _readable(tmp)
        write_marker(tmp, command)
        if existed:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # onto the empty folder just made: a unique name
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the old folder back
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_file(out: PathLike, inputs: Iterable[PathLike | None] = ()) -> None:
    """May a command write the file ``out``? Not if it is a folder, another kind of file (a device), or one
    of the command's inputs; an existing regular file at ``out`` is replaced (the user named it)."""
    path = Path(out)
    check_inputs_outside(path, inputs, "output")
    if path.exists():
        if path.is_dir():
            raise DreamPoseError(f"{path}: is a folder; give a file path for this output")
        if not path.is_file():
            raise DreamPoseError(f"{path}: is not a regular file; give a file path for this output")
    elif path.parent.exists() and not path.parent.is_dir():
        raise DreamPoseError(f"{path.parent}: is a file, not a folder; give an output path in a folder")


__all__ = [
    "MARKER",
    "atomic_dir",
    "check_inputs_outside",
    "check_output_dir",
    "check_output_file",
    "claim_output_dir",
    "output_dir",
    "read_marker",
    "write_marker",
]
