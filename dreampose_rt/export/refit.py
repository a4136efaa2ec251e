"""The weight map for refit: which engine weight (ONNX initializer) holds which PyTorch parameter, and how.

TensorRT names a refittable weight after the ONNX initializer it came from, and the exporter names an
initializer after its parameter only when it uses it as is (``unet.conv_in.weight``). Linear weights
appear transposed under generated names (``onnx::MatMul_1638``), GroupNorm scales reshaped to (C, 1, 1)
(``onnx::Mul_535``). So the map is built by content: every initializer's bytes are hashed and matched
against every parameter's bytes, as is and transposed (2-D parameters), in the ONNX dtype; the shape is
ignored (a reshape keeps the bytes). Initializers that match no parameter are constants of the graph
(shape tensors, the CLIP resize matrices) and are never refitted.

Parameters with identical values (all-ones norm scales in a freshly initialised network) cannot be told
apart by content. The exporter's own names settle most of them; what remains is kept with all its
candidates, and refitting such a weight is refused unless every candidate carries the same new values.
Trained networks have no such ties.

The map is saved as JSON beside the engine (``<network>.weightmap.json``); ``refit_onnx`` applies it to an
ONNX file (tested here), ``TensorRTEngine.refit`` to a TensorRT engine.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dreampose.utils import DreamPoseError, PathLike, read_json, write_json

logger = logging.getLogger(__name__)

WEIGHT_MAP_VERSION = 1
TRANSFORMS = ("identity", "transpose")


class RefitError(DreamPoseError):
    """Refit is impossible (unknown or ambiguous weights, wrong shapes): rebuild the engine instead."""


@dataclass(frozen=True)
class WeightBinding:
    """How to fill one engine weight from PyTorch parameters.

    Attributes:
        param: the PyTorch state-dict key (of the export wrapper) that fills it.
        transform: 'identity' (same bytes, maybe reshaped) or 'transpose' (2-D parameter, transposed).
        shape: the initializer's shape.
        dtype: the initializer's numpy dtype name ('float32', 'float16').
        candidates: other parameters with the same content when the map was built (ambiguous ties).
    """

    param: str
    transform: str
    shape: tuple[int, ...]
    dtype: str
    candidates: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"param": self.param, "transform": self.transform, "shape": list(self.shape), "dtype": self.dtype,
                "candidates": list(self.candidates)}


@dataclass
class WeightMap:
    """Engine weight name -> WeightBinding, plus the initializers that are constants of the graph."""

    bindings: dict[str, WeightBinding] = field(default_factory=dict)
    constants: list[str] = field(default_factory=list)

    @property
    def ambiguous(self) -> dict[str, tuple[str, ...]]:
        return {k: (b.param, *b.candidates) for k, b in self.bindings.items() if b.candidates}

    def to_dict(self) -> dict:
        return {
            "format_version": WEIGHT_MAP_VERSION,
            "bindings": {k: b.to_dict() for k, b in sorted(self.bindings.items())},
            "constants": sorted(self.constants),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "weight map") -> "WeightMap":
        if data.get("format_version") != WEIGHT_MAP_VERSION:
            raise RefitError(f"{source}: weight map format {data.get('format_version')} is not {WEIGHT_MAP_VERSION}; rebuild the engine")
        bindings = {
            k: WeightBinding(v["param"], v["transform"], tuple(v["shape"]), v["dtype"], tuple(v.get("candidates", ())))
            for k, v in data["bindings"].items()
        }
        return cls(bindings, list(data.get("constants", [])))

    def save(self, path: PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "WeightMap":
        return cls.from_dict(read_json(path), str(path))


def _digest(arr: np.ndarray) -> tuple[int, str, str]:
    arr = np.ascontiguousarray(arr)
    return arr.size, arr.dtype.name, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


def _param_array(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().astype(dtype) if t.is_floating_point() else t.detach().cpu().numpy()


def build_weight_map(onnx_model, state_dict: Mapping[str, torch.Tensor]) -> WeightMap:
    """Match every initializer of ``onnx_model`` to the parameters of ``state_dict`` by content hash.

    Args:
        onnx_model: an onnx ModelProto with its external data loaded.
        state_dict: the export wrapper's state dict (the weights the graph was exported with).

    Returns a WeightMap. Logs how many initializers were bound, ambiguous and constant.
    """
    from onnx import numpy_helper

    # content key -> [(param, transform)], per dtype used by the graph
    index: dict[tuple[int, str, str], list[tuple[str, str]]] = defaultdict(list)
    dtypes = set()
    inits = [(i.name, numpy_helper.to_array(i)) for i in onnx_model.graph.initializer]
    for _, arr in inits:
        if arr.dtype.kind == "f":
            dtypes.add(arr.dtype)
    for name, t in state_dict.items():
        if not t.is_floating_point():
            continue
        for dt in dtypes:
            arr = _param_array(t, dt)
            index[_digest(arr)].append((name, "identity"))
            if arr.ndim == 2 and arr.shape[0] > 1 and arr.shape[1] > 1:
                index[_digest(arr.T)].append((name, "transpose"))

    wmap = WeightMap()
    pending: dict[str, tuple[np.ndarray, list[tuple[str, str]]]] = {}
    for name, arr in inits:
        matches = index.get(_digest(arr), []) if arr.dtype.kind == "f" and arr.size > 1 else []
        if not matches:
            wmap.constants.append(name)
            continue
        by_name = [m for m in matches if m[0] == name]
        if by_name or len(matches) == 1:
            param, transform = (by_name or matches)[0]
            wmap.bindings[name] = WeightBinding(param, transform, tuple(arr.shape), arr.dtype.name)
        else:
            pending[name] = (arr, matches)
    # Ties: drop the parameters already claimed by name, then keep what is left with its candidates.
    claimed = {b.param for b in wmap.bindings.values() if not b.candidates}
    for name, (arr, matches) in pending.items():
        free = [m for m in matches if m[0] not in claimed] or matches
        param, transform = free[0]
        others = tuple(sorted({m[0] for m in free} - {param}))
        wmap.bindings[name] = WeightBinding(param, transform, tuple(arr.shape), arr.dtype.name, others)
    logger.info(
        "weight map: %d initializers bound to parameters (%d ambiguous ties), %d constants",
        len(wmap.bindings), len(wmap.ambiguous), len(wmap.constants),
    )
    return wmap


def weight_value(binding: WeightBinding, state_dict: Mapping[str, torch.Tensor], engine_name: str) -> np.ndarray:
    """The new value of one engine weight from ``state_dict``: transformed, reshaped, cast. Raises RefitError."""
    if binding.param not in state_dict:
        raise RefitError(f"refit: weight {engine_name!r} needs parameter {binding.param!r}, which the new weights lack; rebuild the engine")
    dtype = np.dtype(binding.dtype)
    arr = _param_array(state_dict[binding.param], dtype)
    for other in binding.candidates:
        if other in state_dict and not np.array_equal(arr, _param_array(state_dict[other], dtype)):
            raise RefitError(
                f"refit: weight {engine_name!r} could be {binding.param!r} or {other!r} (equal when the engine was "
                f"built, different now); rebuild the engine from these weights"
            )
    if binding.transform == "transpose":
        arr = arr.T
    elif binding.transform != "identity":
        raise RefitError(f"refit: unknown transform {binding.transform!r} for {engine_name!r}")
    if arr.size != int(np.prod(binding.shape)):
        raise RefitError(
            f"refit: weight {engine_name!r} has shape {binding.shape}, parameter {binding.param!r} has {arr.shape}; rebuild"
        )
    return np.ascontiguousarray(arr.reshape(binding.shape))


def refit_onnx(onnx_model, weight_map: WeightMap, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Replace, in place, every bound initializer of ``onnx_model`` by its value from ``state_dict``.

    Returns the number of initializers written. The same map drives the TensorRT refit; this is how it is
    tested without TensorRT.
    """
    from onnx import numpy_helper

    count = 0
    for init in onnx_model.graph.initializer:
        binding = weight_map.bindings.get(init.name)
        if binding is None:
            continue
        new = numpy_helper.from_array(weight_value(binding, state_dict, init.name), init.name)
        init.CopyFrom(new)
        count += 1
    missing = set(weight_map.bindings) - {i.name for i in onnx_model.graph.initializer}
    if missing:
        raise RefitError(f"refit: the weight map names {len(missing)} initializers the graph lacks (e.g. {sorted(missing)[:3]}); rebuild")
    return count


def weight_map_path(engine_dir: PathLike, network: str) -> Path:
    return Path(engine_dir) / f"{network}.weightmap.json"
