"""Small shared helpers: the user-facing error type, atomic file writes, JSON dataclasses (output folders:
dreampose.outputs)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import types
import typing
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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries append advice over several lines), or its type."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


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


def _type_matches(value: Any, hint: Any) -> bool:
    """Does ``value`` (from JSON) fit the type hint? int fits float; bool fits neither; a hint this does
    not know (a dict, a callable) fits anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_matches(v, a) for v, a in zip(value, args))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def dataclass_from_dict(cls: Type[T], data: dict, source: str = "config") -> T:
    """Build dataclass ``cls`` from ``data`` (JSON: lists become tuples). An unknown key, or a value of
    the wrong type for its field, is a DreamPoseError that names the field and ``source``."""
    if not isinstance(data, dict):
        raise DreamPoseError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise DreamPoseError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            if not _type_matches(value, hints.get(f.name, Any)):
                raise DreamPoseError(f"{source}: field {f.name} must be {_type_name(hints[f.name])}, got {value!r}")
            kwargs[f.name] = value
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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
