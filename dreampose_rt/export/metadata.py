"""Metadata JSON beside every engine, and the compatibility check made before an engine is loaded.

``<engine file>.json`` records what the engine was built from and for: the backend and its version, the
GPU (name, compute capability), the ONNX graph and weight hashes, the export key, the shape profiles,
the precision. A TensorRT plan runs only on the TensorRT version and GPU architecture that built it, and
an engine is only right for the weights it holds: on any mismatch ``check_metadata`` raises
``EngineMismatchError`` saying what differs and to rebuild.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreampose.utils import PathLike, read_json, write_json

from .engine import EngineError

logger = logging.getLogger(__name__)

METADATA_VERSION = 1
REBUILD_HINT = "rebuild it with `dreampose-rt build-engine`"


class EngineMismatchError(EngineError):
    """The engine on disk was built for another GPU, backend version or model: it must be rebuilt."""


@dataclass
class EngineMetadata:
    """What one engine was built from and for.

    Attributes:
        network: the wrapper's name ('unet', 'vae_decoder', 'cond_encoder').
        backend: 'tensorrt' or 'onnxruntime'; backend_version: its version string.
        precision: 'fp32' or 'fp16'.
        device_name, compute_capability: the GPU it was built on ('cpu' and None for ONNX Runtime on CPU).
        export_key: hash of the network's architecture config and the export settings.
        graph_hash, weights_hash: hashes of the ONNX graph (structure) and of the weights the engine holds.
        profiles: input name -> [min, opt, max] shapes.
        shape_spec: the ShapeSpec the profiles came from.
        refittable: whether weights can be replaced without a rebuild.
        inputs, outputs: I/O names in order.
        extra: backend-specific facts (builder optimisation level, workspace, check report, refit source).
    """

    network: str
    backend: str
    backend_version: str
    precision: str
    device_name: str
    compute_capability: str | None
    export_key: str
    graph_hash: str
    weights_hash: str
    profiles: dict[str, list[list[int]]]
    shape_spec: dict[str, Any]
    refittable: bool
    inputs: list[str]
    outputs: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = METADATA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "metadata") -> "EngineMetadata":
        if data.get("format_version") != METADATA_VERSION:
            raise EngineMismatchError(f"{source}: metadata format {data.get('format_version')} is not {METADATA_VERSION}; {REBUILD_HINT}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in data and n not in ("extra", "created", "format_version"))
        if missing:
            raise EngineMismatchError(f"{source}: metadata lacks {missing}; {REBUILD_HINT}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: PathLike) -> None:
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "EngineMetadata":
        path = Path(path)
        if not path.is_file():
            raise EngineMismatchError(f"{path}: engine metadata not found; {REBUILD_HINT}")
        return cls.from_dict(read_json(path), str(path))


def metadata_path(engine_path: PathLike) -> Path:
    """``unet.plan`` -> ``unet.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def current_device(backend: str) -> dict[str, Any]:
    """The running environment as metadata sees it: backend version, device name, compute capability.

    TensorRT: the TensorRT version and the current CUDA device. ONNX Runtime: its version; the CUDA device
    when its CUDA provider is available, else 'cpu'. Imports are lazy; a missing backend raises EngineError.
    """
    if backend == "tensorrt":
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise EngineError("TensorRT engines need a CUDA GPU, and torch sees none")
        major, minor = torch.cuda.get_device_capability()
        return {"backend_version": trt.__version__, "device_name": torch.cuda.get_device_name(),
                "compute_capability": f"{major}.{minor}"}
    if backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                return {"backend_version": ort.__version__, "device_name": torch.cuda.get_device_name(),
                        "compute_capability": f"{major}.{minor}"}
        return {"backend_version": ort.__version__, "device_name": "cpu", "compute_capability": None}
    raise EngineError(f"unknown backend {backend!r}: choose 'onnxruntime' or 'tensorrt'")


def import_tensorrt():
    """``import tensorrt`` with an error that says what to install (the import is only done when needed)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            f"the TensorRT backend needs NVIDIA TensorRT 10 or newer (`import tensorrt` failed: {e}); "
            "install it on a CUDA machine, or use --backend onnxruntime"
        ) from e
    return trt


def check_metadata(
    meta: EngineMetadata,
    source: str,
    device: dict[str, Any] | None = None,
    graph_hash: str | None = None,
    weights_hash: str | None = None,
    export_key: str | None = None,
) -> None:
    """Raise EngineMismatchError if the engine does not fit the running device or the expected model.

    ``device`` is ``current_device(meta.backend)`` by default. TensorRT engines must match the TensorRT
    version and the compute capability exactly (a plan is built for one SM and one TensorRT release); the
    GPU name is only logged when it differs (same SM: same kernels). ONNX graphs are portable: only the
    model hashes are compared.
    """
    problems = []
    if meta.backend == "tensorrt":
        device = device if device is not None else current_device("tensorrt")
        if meta.backend_version != device["backend_version"]:
            problems.append(f"built with TensorRT {meta.backend_version}, this is TensorRT {device['backend_version']}")
        if meta.compute_capability != device["compute_capability"]:
            problems.append(
                f"built for {meta.device_name} (compute capability {meta.compute_capability}), this GPU is "
                f"{device['device_name']} ({device['compute_capability']})"
            )
        elif meta.device_name != device["device_name"]:
            logger.info("%s: built on %s, running on %s (same compute capability)", source, meta.device_name, device["device_name"])
    for label, want, have in (
        ("export settings / architecture", export_key, meta.export_key),
        ("ONNX graph", graph_hash, meta.graph_hash),
        ("weights", weights_hash, meta.weights_hash),
    ):
        if want is not None and want != have:
            problems.append(f"{label} differ (engine {have[:12]}, model {want[:12]})")
    if problems:
        raise EngineMismatchError(f"{source}: engine does not match: {'; '.join(problems)}; {REBUILD_HINT}")
