"""TensorRT: build an engine from ONNX, load and run it (``TensorRTEngine``), refit its weights.

Written against TensorRT's public Python API as of 10.x (``Builder``, ``OnnxParser``, ``IBuilderConfig``,
optimisation profiles, ``ITimingCache``, ``Refitter``, ``IExecutionContext.execute_async_v3``) and imported
lazily: nothing here imports ``tensorrt`` until a function needs it.

Precision: fp16 engines are built from the fp16 ONNX graph as *strongly typed* networks (the graph's
types are the engine's types; TensorRT 10 deprecates the weakly typed FP16 builder flag, which later
releases drop). fp32 engines come from the fp32 graph with no precision flag (TF32 allowed, TensorRT's
default).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dreampose.utils import PathLike, atomic_file

from .engine import Engine, EngineError
from .metadata import import_tensorrt
from .refit import RefitError, WeightMap, weight_value

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TrtBuildOptions:
    """TensorRT builder settings.

    Attributes:
        precision: 'fp32' or 'fp16' (fp16: strongly typed network from the fp16 ONNX).
        optimization_level: builder optimisation level 0..5 (TensorRT's default 3; 5 searches longest).
        workspace_bytes: the workspace memory-pool limit (None: TensorRT's default, the whole device).
        refittable: build with the REFIT flag so that weights can be replaced later.
        timing_cache: file to read the timing cache from and write it back to (None: no persistent cache).
    """

    precision: str = "fp16"
    optimization_level: int = 3
    workspace_bytes: int | None = None
    refittable: bool = False
    timing_cache: Path | None = None

    def to_dict(self) -> dict:
        return {"precision": self.precision, "optimization_level": self.optimization_level,
                "workspace_bytes": self.workspace_bytes, "refittable": self.refittable}


class _TrtLogger:
    """A TensorRT ILogger that forwards to Python logging (created on demand: needs tensorrt)."""

    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            trt = import_tensorrt()

            class Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT callback
                    level = {
                        trt.ILogger.INTERNAL_ERROR: logging.ERROR,
                        trt.ILogger.ERROR: logging.ERROR,
                        trt.ILogger.WARNING: logging.WARNING,
                        trt.ILogger.INFO: logging.DEBUG,
                    }.get(severity, logging.DEBUG)
                    logger.log(level, "TensorRT: %s", msg)

            cls._instance = Logger()
        return cls._instance


def build_engine(
    onnx_path: PathLike,
    engine_path: PathLike,
    profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
    options: TrtBuildOptions,
) -> float:
    """Build a serialized TensorRT engine (plan) from an ONNX file. Returns the build time in seconds.

    Args:
        onnx_path: the ONNX graph (external data beside it is found by the parser).
        engine_path: where to write the plan (atomically).
        profile: input name -> (min, opt, max) shape: one optimisation profile.
        options: TrtBuildOptions.

    Raises EngineError with the parser's messages when the graph does not parse, or when the build fails.
    """
    trt = import_tensorrt()
    log = _TrtLogger.get()
    t0 = time.perf_counter()
    builder = trt.Builder(log)
    flags = 0
    if options.precision == "fp16":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.builder_optimization_level = int(options.optimization_level)
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(opt_profile)

    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_data)
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    with atomic_file(engine_path) as tmp:
        tmp.write_bytes(bytes(memoryview(plan)))
    if cache_path is not None:
        with atomic_file(cache_path) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    seconds = time.perf_counter() - t0
    logger.info("built TensorRT engine %s in %.1f s", engine_path, seconds)
    return seconds


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
    }
    for name, td in (("INT64", torch.int64), ("BF16", torch.bfloat16)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if dt not in table:
        raise EngineError(f"TensorRT data type {dt} has no torch equivalent")
    return table[dt]


class TensorRTEngine(Engine):
    """``Engine`` over a TensorRT plan, on the current CUDA device.

    Buffers are torch tensors bound by address; ``infer`` copies the feed into them (skipped when the feed
    tensor already is the buffer) and runs ``execute_async_v3`` on ``stream``. With ``cuda_graph=True``
    the first call at a given shape warms up, the second captures a CUDA graph, later calls replay it
    (inputs must keep their shapes; a new shape re-allocates and re-captures).
    """

    def __init__(self, path: PathLike, cuda_graph: bool = False) -> None:
        super().__init__(path)
        self.use_cuda_graph = cuda_graph
        self.engine = None
        self.context = None
        self.buffers: dict[str, torch.Tensor] = {}
        self._graph = None
        self._calls = 0

    def load(self) -> None:
        trt = import_tensorrt()
        if not self.path.is_file():
            raise EngineError(f"{self.path}: engine file not found (run `dreampose-rt build-engine`)")
        runtime = trt.Runtime(_TrtLogger.get())
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.path}: TensorRT cannot deserialize this plan (other TensorRT version or GPU?); rebuild it")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self.input_dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.input_names}
        self.output_dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.output_names}

    def profile_shapes(self, name: str) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) of input ``name`` in profile 0."""
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(lo), tuple(opt), tuple(hi)

    def allocate_buffers(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
        """Set the input shapes (checked against the profile), allocate every I/O buffer on the GPU."""
        for name, shape in self.input_shapes(shapes).items():
            lo, _, hi = self.profile_shapes(name)
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                raise EngineError(f"{self.path.name}: input {name!r} shape {shape} is outside the profile {lo} .. {hi}")
            if not self.context.set_input_shape(name, shape):
                raise EngineError(f"{self.path.name}: TensorRT rejected shape {shape} for {name!r}")
        missing = self.context.infer_shapes()
        if missing:
            raise EngineError(f"{self.path.name}: shapes still unknown for {list(missing)}")
        self.buffers, self.shapes = {}, {}
        for name in (*self.input_names, *self.output_names):
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self.input_dtypes.get(name) or self.output_dtypes[name]
            self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
            self.shapes[name] = shape
        self._graph, self._calls = None, 0
        return dict(self.shapes)

    def infer(self, feed: Mapping[str, torch.Tensor], stream: Any = None) -> dict[str, torch.Tensor]:
        """Copy ``feed`` into the input buffers and run on ``stream`` (default: torch's current stream).

        Returns the output buffers (engine-owned; valid once ``stream`` has reached this point)."""
        self.check_feed(feed)
        if any(tuple(feed[n].shape) != self.shapes.get(n) for n in self.input_names):
            self.allocate_buffers({n: feed[n].shape for n in self.input_names})
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            for name in self.input_names:
                if feed[name].data_ptr() != self.buffers[name].data_ptr():
                    self.buffers[name].copy_(feed[name], non_blocking=True)
            if self._graph is not None:
                self._graph.replay()
            elif self.use_cuda_graph and self._calls >= 1:
                self._capture(stream)
                self._graph.replay()
            elif not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{self.path.name}: TensorRT execution failed")
        self._calls += 1
        return {n: self.buffers[n] for n in self.output_names}

    def _capture(self, stream: torch.cuda.Stream) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{self.path.name}: TensorRT execution failed during CUDA-graph capture")
        self._graph = graph

    def refit(self, weight_map: WeightMap, state_dict: Mapping[str, torch.Tensor], constants: Mapping[str, np.ndarray]) -> float:
        """Replace the engine's weights in place from ``state_dict`` via ``weight_map``. Returns seconds.

        ``constants`` supplies the graph's own constants (initializers no parameter maps to) in case
        TensorRT reports them missing. Raises RefitError if a weight is unknown to the map, ambiguous, or
        if TensorRT refuses the refit; the engine must then be rebuilt. Save with ``save``.
        """
        trt = import_tensorrt()
        if not self.loaded:
            self.load()
        t0 = time.perf_counter()
        refitter = trt.Refitter(self.engine, _TrtLogger.get())
        keep = []  # the arrays must outlive refit_cuda_engine()
        names = list(refitter.get_all_weights())
        unknown = [n for n in names if n not in weight_map.bindings and n not in constants]
        if unknown:
            raise RefitError(f"{self.path.name}: {len(unknown)} engine weights are not in the weight map (e.g. {unknown[:3]}); rebuild")
        for name in names:
            if name not in weight_map.bindings:
                continue
            arr = weight_value(weight_map.bindings[name], state_dict, name)
            keep.append(arr)
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise RefitError(f"{self.path.name}: TensorRT refused new values for {name!r}; rebuild")
        for name in refitter.get_missing_weights():
            if name not in constants:
                raise RefitError(f"{self.path.name}: TensorRT needs weight {name!r}, which neither map nor graph supplies; rebuild")
            arr = np.ascontiguousarray(constants[name])
            keep.append(arr)
            refitter.set_named_weights(name, trt.Weights(arr))
        if not refitter.refit_cuda_engine():
            raise RefitError(f"{self.path.name}: TensorRT refit failed; rebuild the engine")
        self._graph = None  # a refit may move weights in device memory: capture again
        seconds = time.perf_counter() - t0
        logger.info("refitted %s (%d weights) in %.2f s", self.path.name, len(keep), seconds)
        return seconds

    def save(self, path: PathLike | None = None) -> None:
        """Serialize the (refitted) engine to ``path`` (default: its own file), atomically."""
        with atomic_file(path or self.path) as tmp:
            tmp.write_bytes(bytes(memoryview(self.engine.serialize())))
