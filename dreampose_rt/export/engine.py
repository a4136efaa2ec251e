"""The engine interface the runtime drives, and its ONNX Runtime implementation.

An engine knows tensors, names and shapes, nothing about diffusion::

    engine = OrtEngine("out/unet.onnx")            # or TensorRTEngine("out/unet.plan")
    engine.load()
    engine.allocate_buffers({"latents": (12, 4, 80, 64), ...})   # optional: fixes shapes, binds buffers
    out = engine.infer({"latents": x, ...}, stream)               # dict name -> torch.Tensor

``infer`` returns tensors owned by the engine: they are overwritten by the next call (clone to keep).
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dreampose.utils import DreamPoseError, PathLike

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]

_NP_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}
_ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}
_TORCH_TO_NP = {v: k for k, v in _NP_TO_TORCH.items()}


class EngineError(DreamPoseError):
    """A wrong feed (name, shape, dtype), an engine that cannot be loaded, or one that must be rebuilt."""


class Engine(abc.ABC):
    """One inference graph. Subclasses: ``OrtEngine`` (ONNX Runtime), ``TensorRTEngine`` (TensorRT).

    Attributes (after ``load``):
        input_names, output_names: I/O names in graph order.
        input_dtypes, output_dtypes: name -> torch dtype.
        device: where ``infer`` expects inputs and returns outputs.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.input_names: tuple[str, ...] = ()
        self.output_names: tuple[str, ...] = ()
        self.input_dtypes: dict[str, torch.dtype] = {}
        self.output_dtypes: dict[str, torch.dtype] = {}
        self.device = torch.device("cpu")
        self.shapes: dict[str, Shape] = {}

    @abc.abstractmethod
    def load(self) -> None:
        """Read the engine file and prepare an execution context."""

    @abc.abstractmethod
    def allocate_buffers(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
        """Fix the input shapes and allocate output buffers. Returns every I/O name -> shape."""

    @abc.abstractmethod
    def infer(self, feed: Mapping[str, torch.Tensor], stream: Any = None) -> dict[str, torch.Tensor]:
        """Run once on ``feed`` (name -> tensor, every input). Returns name -> output tensor (engine-owned)."""

    @property
    def loaded(self) -> bool:
        return bool(self.input_names)

    def input_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
        """Load if needed, then every input's shape from ``shapes`` as a tuple of ints (a missing one is an
        error naming it). The common first half of ``allocate_buffers``."""
        if not self.loaded:
            self.load()
        out: dict[str, Shape] = {}
        for name in self.input_names:
            if name not in shapes:
                raise EngineError(f"{self.path.name}: no shape given for input {name!r}")
            out[name] = tuple(int(d) for d in shapes[name])
        return out

    def check_feed(self, feed: Mapping[str, torch.Tensor]) -> None:
        """Every input present, nothing unknown, dtypes right; errors name the tensor."""
        if not self.loaded:
            raise EngineError(f"{self.path}: engine not loaded (call load() first)")
        missing = [n for n in self.input_names if n not in feed]
        unknown = [n for n in feed if n not in self.input_names]
        if missing or unknown:
            raise EngineError(f"{self.path.name}: feed is missing {missing} / has unknown {unknown}; inputs are {list(self.input_names)}")
        for name in self.input_names:
            t = feed[name]
            if not isinstance(t, torch.Tensor):
                raise EngineError(f"{self.path.name}: input {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != self.input_dtypes[name]:
                raise EngineError(f"{self.path.name}: input {name!r} must be {self.input_dtypes[name]}, got {t.dtype}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, inputs={list(self.input_names)}, outputs={list(self.output_names)})"


class OrtEngine(Engine):
    """``Engine`` over ONNX Runtime. CPU by default; the CUDA provider where onnxruntime-gpu is installed.

    Inputs and outputs are bound by pointer (IOBinding): no copies on the way in, and outputs land in
    torch buffers allocated on the engine's device once the output shapes are known (after the first call
    at a given input shape).

    Args:
        path: the ONNX file.
        providers: ONNX Runtime execution providers, best first (default: CUDA if available, then CPU).
        device_id: the CUDA device for the CUDA provider.
        threads: intra-op threads (0: ONNX Runtime's default).
    """

    def __init__(self, path: PathLike, providers: Sequence[str] | None = None, device_id: int = 0, threads: int = 0) -> None:
        super().__init__(path)
        self.providers = list(providers) if providers is not None else None
        self.device_id = device_id
        self.threads = threads
        self.session = None
        self._outputs: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise EngineError(f"{self.path}: engine file not found (run `dreampose-rt build-engine`)")
        available = ort.get_available_providers()
        providers = self.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise EngineError(f"ONNX Runtime provider(s) {unknown} not available here; available: {available}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidGraph types
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({e})") from e
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda", self.device_id) if on_cuda else torch.device("cpu")
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names = tuple(i.name for i in ins)
        self.output_names = tuple(o.name for o in outs)
        self.input_dtypes = {i.name: _ORT_TYPES[i.type] for i in ins}
        self.output_dtypes = {o.name: _ORT_TYPES[o.type] for o in outs}
        self._declared = {i.name: tuple(d if isinstance(d, int) else -1 for d in i.shape) for i in ins}
        logger.debug("loaded %s on %s", self.path, self.session.get_providers())

    def allocate_buffers(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
        """Check ``shapes`` against the graph's static dims; output buffers follow at the first ``infer``."""
        for name, shape in self.input_shapes(shapes).items():
            declared = self._declared[name]
            if len(shape) != len(declared) or any(d >= 0 and d != s for d, s in zip(declared, shape)):
                raise EngineError(f"{self.path.name}: input {name!r} has shape {shape}, the graph takes {declared}")
        if {n: tuple(shapes[n]) for n in self.input_names} != {n: self.shapes.get(n) for n in self.input_names}:
            self._outputs = {}
        self.shapes = {n: tuple(int(d) for d in shapes[n]) for n in self.input_names}
        self.shapes.update({n: tuple(t.shape) for n, t in self._outputs.items()})
        return dict(self.shapes)

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool) -> None:
        kind = "cuda" if t.is_cuda else "cpu"
        dev = t.device.index or 0
        fn = binding.bind_output if output else binding.bind_input
        fn(name, kind, dev, _TORCH_TO_NP[t.dtype], list(t.shape), t.data_ptr())

    def infer(self, feed: Mapping[str, torch.Tensor], stream: Any = None) -> dict[str, torch.Tensor]:
        """Run the graph. ``stream`` (a torch.cuda.Stream) is synchronised first so inputs are ready;
        ONNX Runtime's own run is synchronous."""
        self.check_feed(feed)
        if {n: tuple(feed[n].shape) for n in self.input_names} != {n: self.shapes.get(n) for n in self.input_names}:
            self.allocate_buffers({n: feed[n].shape for n in self.input_names})
        if stream is not None:
            stream.synchronize()
        inputs = {n: feed[n].to(self.device).contiguous() for n in self.input_names}
        binding = self.session.io_binding()
        for name, t in inputs.items():
            self._bind(binding, name, t, output=False)
        if self._outputs:
            for name, t in self._outputs.items():
                self._bind(binding, name, t, output=True)
        else:
            for name in self.output_names:
                binding.bind_output(name, "cuda" if self.device.type == "cuda" else "cpu", self.device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise EngineError(f"{self.path.name}: ONNX Runtime failed ({e})") from e
        if not self._outputs:  # first call at these shapes: keep the outputs as the buffers from now on
            for name, value in zip(self.output_names, binding.get_outputs()):
                if self.device.type == "cuda":
                    t = torch.empty(value.shape(), dtype=self.output_dtypes[name], device=self.device)
                    # Copy ORT's buffer once; later calls write into ``t`` directly.
                    t.copy_(torch.from_dlpack(value.to_dlpack()) if hasattr(value, "to_dlpack") else torch.from_numpy(value.numpy()))
                else:
                    t = torch.from_numpy(np.array(value.numpy(), copy=True))
                self._outputs[name] = t
            self.shapes.update({n: tuple(t.shape) for n, t in self._outputs.items()})
        return dict(self._outputs)
