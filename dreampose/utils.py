"""Small shared helpers: the user-facing error type, atomic writes, JSON dataclasses."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Type, TypeVar

T = TypeVar("T")

PathLike = str | os.PathLike


class DreamPoseError(ValueError):
    """A problem with the user's input (a file, a shape, a value).

    The command line prints its message on one line and exits with code 2; library callers can catch
    it like any ValueError.
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file: on error the temporary file is removed and ``path`` is left
    as it was. ``suffix`` (default: ``path``'s own) keeps writers that pick a format by extension happy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the result the usual permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (which may exist).

    The new folder is complete before it appears under ``path``, and the old one is deleted only after
    the new one is in place. Between the two renames (microseconds) ``path`` does not exist; it is never
    a half-written folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old)  # onto the empty folder just made: a unique name
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> dict:
    """Read a JSON object, with an error that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DreamPoseError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DreamPoseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DreamPoseError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def dataclass_from_dict(cls: Type[T], data: dict, source: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error that names them and ``source``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise DreamPoseError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def load_frozen_module(path: PathLike, device: Any = "cpu", what: str = "module") -> Any:
    """A local network exported elsewhere (LPIPS, Inception for FID, I3D for FVD): a ``torch.export``
    program (.pt2) or a TorchScript file, on ``device``, in eval mode, with every parameter frozen.

    Errors name the file and ``what`` it was meant to be.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DreamPoseError(f"{path}: {what} not found")
    try:
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module().to(device)
        else:
            module = torch.jit.load(str(path), map_location=device)
            module.eval()
    except (RuntimeError, ValueError) as e:
        raise DreamPoseError(f"{path}: not an exported (.pt2) or TorchScript module ({e})") from None
    for p in module.parameters():
        p.requires_grad_(False)
    return module
