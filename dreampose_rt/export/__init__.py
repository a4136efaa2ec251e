"""Export of DreamPose's networks to ONNX and engines (ONNX Runtime, TensorRT), installed as ``dreampose_rt.export``.

Modules: ``networks`` (one wrapper per network: names, axes, profiles, sample inputs), ``onnx_export``
(export, clean-up, external data, hashes, the check against PyTorch), ``engine`` (the Engine interface and
its ONNX Runtime implementation), ``tensorrt_backend`` (build / load / refit with TensorRT, imported lazily),
``refit`` (the weight map), ``metadata`` (JSON beside every engine), ``build`` (``build_engines``) and
``cli`` (the ``build-engine`` subcommand).
"""

from .build import BuildOptions, build_engines, export_key, load_engines
from .engine import Engine, EngineError, OrtEngine
from .metadata import EngineMetadata, EngineMismatchError, check_metadata
from .networks import CondEncoderExport, ShapeSpec, UNetExport, VAEDecoderExport, make_wrapper
from .onnx_export import ExportCheckError, check_onnx, export_onnx, state_dict_hash
from .refit import RefitError, WeightMap, build_weight_map, refit_onnx

__all__ = [
    "BuildOptions", "build_engines", "export_key", "load_engines",
    "Engine", "EngineError", "OrtEngine",
    "EngineMetadata", "EngineMismatchError", "check_metadata",
    "CondEncoderExport", "ShapeSpec", "UNetExport", "VAEDecoderExport", "make_wrapper",
    "ExportCheckError", "check_onnx", "export_onnx", "state_dict_hash",
    "RefitError", "WeightMap", "build_weight_map", "refit_onnx",
]
