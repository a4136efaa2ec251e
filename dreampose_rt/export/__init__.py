"""Export of DreamPose's networks to ONNX and engines (ONNX Runtime, TensorRT).

Modules: ``manifest`` (the engine folder's manifest and the checks before a runtime uses it; the
shape spec), ``networks`` (one wrapper per network: names, axes, profiles, sample inputs),
``onnx_export`` (export, clean-up, external data, hashes, the check against PyTorch), ``engine`` (the
Engine interface and its ONNX Runtime implementation), ``tensorrt_engine`` (build / load / refit with
TensorRT, imported lazily), ``refit`` (the weight map), ``metadata`` (JSON beside every engine),
``build`` (``build_engines``) and ``cli`` (the ``build-engine`` subcommand).

The names below are imported on first use, so that importing the package (as the command line does)
costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BuildOptions": "build", "build_engines": "build", "export_key": "build", "load_engines": "build",
    "Engine": "engine", "EngineError": "engine", "OrtEngine": "engine",
    "ENGINE_BACKENDS": "manifest", "ENGINE_PRECISIONS": "manifest", "EngineManifest": "manifest",
    "NETWORKS": "manifest", "NetworkRecord": "manifest", "ShapeSpec": "manifest",
    "EngineMetadata": "metadata", "EngineMismatchError": "metadata", "check_metadata": "metadata",
    "CondEncoderExport": "networks", "UNetExport": "networks", "VAEDecoderExport": "networks",
    "make_wrapper": "networks",
    "ExportCheckError": "onnx_export", "check_onnx": "onnx_export", "export_onnx": "onnx_export",
    "state_dict_hash": "onnx_export",
    "RefitError": "refit", "WeightMap": "refit", "build_weight_map": "refit", "refit_onnx": "refit",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY)
