"""The engine folder's manifest: what ``build-engine`` made, and every check before a runtime uses it.

An engine folder (see dreampose_rt.export.build) holds one engine per network, each with its metadata
(dreampose_rt.export.metadata: the engine's own backend version, GPU and hashes), and one manifest that
ties them together: the backend, the precision, the shapes the engines take, and one record per network.
:class:`EngineManifest` is the only reader and writer of that file; everything else asks it.

Light on purpose (no torch at import): the command line takes its choices from here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreampose.utils import DreamPoseError, PathLike, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from dreampose.model import DreamPoseModel

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
#: the runtime backends that run engines from an engine folder
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")
#: the precisions engines are built in
ENGINE_PRECISIONS = ("fp32", "fp16")
#: the networks of an engine folder, in build order
NETWORKS = ("cond_encoder", "unet", "vae_decoder")
REBUILD = "run `dreampose-rt build-engine` again"


@dataclass(frozen=True)
class ShapeSpec:
    """How far the shapes may move: frames per call and (optionally) the image resolution.

    Attributes:
        min_frames, opt_frames, max_frames: frames per engine call (the UNet sees 3x as many samples).
        height, width: the image resolution the profile is tuned for (opt).
        dynamic_resolution: if True, height and width are dynamic axes between ``min_resolution`` and
            ``max_resolution`` (pixels, both sides); otherwise the resolution is static.
    """

    min_frames: int = 1
    opt_frames: int = 4
    max_frames: int = 4
    height: int = 640
    width: int = 512
    dynamic_resolution: bool = False
    min_resolution: int = 256
    max_resolution: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.min_frames <= self.opt_frames <= self.max_frames:
            raise DreamPoseError(
                f"frames must satisfy 1 <= min <= opt <= max, got {self.min_frames} / {self.opt_frames} / {self.max_frames}"
            )
        if self.dynamic_resolution and not (
            self.min_resolution <= min(self.height, self.width) and max(self.height, self.width) <= self.max_resolution
        ):
            raise DreamPoseError(
                f"resolution {self.height} x {self.width} is outside the dynamic range "
                f"[{self.min_resolution}, {self.max_resolution}]"
            )

    def covers(self, height: int, width: int) -> bool:
        """Do the engines take images of height x width?"""
        if self.dynamic_resolution:
            return self.min_resolution <= min(height, width) and max(height, width) <= self.max_resolution
        return (height, width) == (self.height, self.width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class NetworkRecord:
    """One network of the folder: its files, I/O names, and what the last build did to it
    ('reused', 'refit' or 'built', per artifact)."""

    name: str
    onnx: str
    onnx_action: str
    engine: str
    engine_action: str
    metadata: str
    weight_map: str
    inputs: list[str]
    outputs: list[str]
    seconds: float
    check: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineManifest:
    """What an engine folder holds (``manifest.json``, written last by ``build_engines``).

    Attributes:
        backend: the runtime backend the engines are for (one of :data:`ENGINE_BACKENDS`).
        precision: one of :data:`ENGINE_PRECISIONS`.
        model_dir: the model folder whose architecture was exported; weights_from: whose weights they hold.
        shape_spec: the shapes the engines take (frames per call, resolution).
        networks: network name -> :class:`NetworkRecord`.
        seconds: how long the build took.
        versions: dreampose-rt, torch and the backend that built it.
    """

    backend: str
    precision: str
    model_dir: str
    weights_from: str
    shape_spec: ShapeSpec
    networks: dict[str, NetworkRecord]
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION

    # ---- the file ---------------------------------------------------------------------------------
    @staticmethod
    def path(engine_dir: PathLike) -> Path:
        """Where the manifest of ``engine_dir`` lives."""
        return Path(engine_dir) / MANIFEST_FILE

    @classmethod
    def exists(cls, engine_dir: PathLike) -> bool:
        """Is ``engine_dir`` an engine folder (does it have a manifest)?"""
        return cls.path(engine_dir).is_file()

    @classmethod
    def load(cls, engine_dir: PathLike) -> "EngineManifest":
        """Read the manifest of ``engine_dir``; a folder without one, or a malformed one, is a
        DreamPoseError that names the folder and says what to do."""
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise DreamPoseError(f"{engine_dir}: engine folder not found; build one with `dreampose-rt build-engine`")
        path = cls.path(engine_dir)
        if not path.is_file():
            raise DreamPoseError(f"{engine_dir}: not an engine folder (no {MANIFEST_FILE}); "
                                 "build one with `dreampose-rt build-engine`")
        data = read_json(path)
        version = data.get("format_version")
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise DreamPoseError(f"{path}: manifest format {version!r} is newer than this dreampose-rt reads "
                                 f"({MANIFEST_VERSION}); upgrade dreampose-rt or {REBUILD}")
        try:
            networks = {name: NetworkRecord(**rec) for name, rec in data["networks"].items()}
            manifest = cls(
                backend=data["backend"], precision=data["precision"], model_dir=data["model_dir"],
                weights_from=data["weights_from"], shape_spec=ShapeSpec(**data["shape_spec"]), networks=networks,
                seconds=float(data.get("seconds", 0.0)), versions=dict(data.get("versions", {})),
                format_version=version,
            )  # fmt: skip
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DreamPoseError(f"{path}: not a manifest this dreampose-rt can read ({type(e).__name__}: {e}); "
                                 f"{REBUILD}") from None
        if manifest.backend not in ENGINE_BACKENDS or manifest.precision not in ENGINE_PRECISIONS:
            raise DreamPoseError(f"{path}: backend {manifest.backend!r} / precision {manifest.precision!r} unknown; "
                                 f"{REBUILD}")
        return manifest

    def save(self, engine_dir: PathLike) -> Path:
        """Write the manifest into ``engine_dir`` (atomically). Returns its path."""
        path = self.path(engine_dir)
        write_json(path, self.to_dict())
        return path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def max_frames(self) -> int:
        """The frames per call the engines were built for (the UNet's batch is 3x this)."""
        return self.shape_spec.max_frames

    @property
    def frame_limit(self) -> int | None:
        """The most frames one call can take: a TensorRT profile ends at max_frames; ONNX graphs have a
        dynamic batch axis (None: no limit)."""
        return self.max_frames if self.backend == "tensorrt" else None

    # ---- checks -----------------------------------------------------------------------------------
    def check(self, engine_dir: PathLike, model: "DreamPoseModel", backend: str, precision: str | None = None) -> None:
        """Raise DreamPoseError unless these engines can run ``model`` for ``backend`` at ``precision``.

        Checked here: the backend the engines were built for, the precision (None: theirs), the model's
        resolution against the shapes, and that every network has an engine. When the engines are loaded
        (dreampose_rt.export.build.load_engines), each is checked against its own metadata: the weights it
        holds (against :meth:`expected_weights`), its backend version and its GPU (a TensorRT plan runs
        only where it was built).
        """
        engine_dir = Path(engine_dir)
        if self.backend != backend:
            raise DreamPoseError(f"{engine_dir}: engines were built for {self.backend!r}, not {backend!r}; "
                                 f"rebuild with `dreampose-rt build-engine --backend {backend}`")
        if precision is not None and precision != self.precision:
            raise DreamPoseError(f"{engine_dir}: engines were built in {self.precision} but {precision} was asked for; "
                                 "leave --precision out to use theirs, or rebuild")
        c = model.config
        if not self.shape_spec.covers(c.height, c.width):
            s = self.shape_spec
            raise DreamPoseError(f"{engine_dir}: engines were built for {s.height} x {s.width} but the model renders "
                                 f"{c.height} x {c.width}; rebuild them for this model")
        missing = [n for n in NETWORKS if n not in self.networks]
        if missing:
            raise DreamPoseError(f"{engine_dir}: engines for {', '.join(missing)} are missing; {REBUILD}")
        built, running = self.versions.get(self.backend), _backend_version(self.backend)
        if self.backend == "tensorrt" and built and running and built != running:
            raise DreamPoseError(f"{engine_dir}: engines were built with TensorRT {built}, this is TensorRT {running}; "
                                 f"a TensorRT plan runs only with the version that built it: {REBUILD}")

    def check_frames(self, engine_dir: PathLike, frames_per_batch: int) -> None:
        """Raise DreamPoseError if one call of ``frames_per_batch`` frames is more than the engines take."""
        if self.frame_limit is not None and frames_per_batch > self.frame_limit:
            raise DreamPoseError(f"frames_per_batch {frames_per_batch} is more than the engines in {engine_dir} take "
                                 f"({self.max_frames}); lower it, or rebuild with --max-frames {frames_per_batch}")

    def expected_weights(self, model: "DreamPoseModel") -> dict[str, str]:
        """network -> the weights hash its engine must hold to run ``model`` (what build-engine recorded
        in each engine's metadata for these weights)."""
        from .networks import make_wrapper
        from .onnx_export import state_dict_hash

        hashes = {}
        for name, rec in self.networks.items():
            kwargs = {"output": "uint8" if "image_u8" in rec.outputs else "float"} if name == "vae_decoder" else {}
            hashes[name] = state_dict_hash(make_wrapper(name, model, self.precision, **kwargs).state_dict())
        return hashes


def _backend_version(backend: str) -> str | None:
    """The running version of an engine backend (its module's ``__version__``, what build-engine recorded;
    a wheel's distribution version can differ from it, e.g. the ``tensorrt`` meta package and
    ``tensorrt-cu12``), None if it does not import."""
    import importlib

    module = {"tensorrt": "tensorrt", "onnxruntime": "onnxruntime"}.get(backend)
    if module is None:
        return None
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return None


__all__ = [
    "ENGINE_BACKENDS",
    "ENGINE_PRECISIONS",
    "EngineManifest",
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "NETWORKS",
    "NetworkRecord",
    "ShapeSpec",
]
