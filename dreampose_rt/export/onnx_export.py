"""ONNX export of a wrapper, graph clean-up, external data, content hashes, and the check against PyTorch.

Export uses the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``), which handles the diffusers
UNet, the VAE and transformers' CLIP here and needs no extra package. Clean-up uses onnx-graphsurgeon
(``fold_constants`` -> ``cleanup`` -> ``toposort``): it installs from PyPI with only onnx and numpy (no torch,
no torchvision). Models whose initializers pass 2 GB are written with their tensors in one external data
file ``<name>.onnx.data`` beside the graph (protobuf's 2 GB limit).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from dreampose.utils import DreamPoseError, PathLike

from .networks import ExportWrapper

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # bytes of initializers; leave room for the graph itself

# Tolerances of the ONNX Runtime check, as max |onnx - torch| <= atol + rtol * max|torch|.
# fp32: the 1e-4 on the tiny model (measured: ~3e-6). fp16: half-precision rounding of values of
# order 1 through ~30 layers (measured ~4e-3 at max|ref| ~3). uint8 images: one step of rounding.
TOLERANCES = {"fp32": (1e-4, 0.0), "fp16": (1e-2, 5e-3), "uint8": (1.0, 0.0)}


class ExportCheckError(DreamPoseError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in the export extra
        raise DreamPoseError("ONNX export needs the 'onnx' package: pip install 'dreampose-rt[export]'") from e
    return onnx


# --------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw C-order bytes of a CPU copy of ``t`` (dtype as is)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def state_dict_hash(state: Mapping[str, torch.Tensor]) -> str:
    """blake2b over (name, dtype, shape, bytes) of every tensor, in name order: the 'weights hash'."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def onnx_graph_hash(model) -> str:
    """blake2b of the graph's structure: opsets, I/O, nodes, and initializer names/dtypes/shapes (not values)."""
    h = hashlib.blake2b(digest_size=16)
    for opset in model.opset_import:
        h.update(f"opset|{opset.domain}|{opset.version}|".encode())
    g = model.graph
    for vi in (*g.input, *g.output):
        h.update(vi.SerializeToString(deterministic=True))
    for node in g.node:
        h.update(node.SerializeToString(deterministic=True))
    for init in g.initializer:
        h.update(f"init|{init.name}|{init.data_type}|{tuple(init.dims)}|".encode())
    return h.hexdigest()


def onnx_weights_hash(model) -> str:
    """blake2b over the initializers' names and values (external data must be loaded)."""
    from onnx import numpy_helper

    h = hashlib.blake2b(digest_size=16)
    for init in sorted(model.graph.initializer, key=lambda i: i.name):
        h.update(f"{init.name}|{init.data_type}|{tuple(init.dims)}|".encode())
        h.update(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def cleanup_graph(model):
    """Constant folding, dead-node removal and a topological sort with onnx-graphsurgeon. Returns a new ModelProto.

    Folding evaluates constant sub-graphs (shape arithmetic, casts of constants) with ONNX Runtime. Tensors
    larger than 16 MB are left unfolded (they would only be copies of weights).
    """
    try:
        import onnx_graphsurgeon as gs
    except ImportError as e:
        raise DreamPoseError(
            "graph clean-up needs onnx-graphsurgeon: pip install onnx-graphsurgeon (or 'dreampose-rt[export]')"
        ) from e
    graph = gs.import_onnx(model)
    n_before = len(graph.nodes)
    graph.fold_constants(size_threshold=16 * 1024**2)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    logger.debug("graph clean-up: %d -> %d nodes", n_before, len(out.graph.node))
    return out


def initializer_bytes(model) -> int:
    """Total bytes of the initializers' data (inline or external)."""
    from onnx import numpy_helper

    total = 0
    for init in model.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        else:
            total += numpy_helper.to_array(init).nbytes
    return total


def save_onnx(model, path: PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; tensors go to ``<path>.data`` when external_data (None: past 2 GB).

    The graph and its data file are written into a temporary folder beside ``path`` and moved into place,
    data first, so a reader never pairs a new graph with old data.
    """
    onnx = _onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(
            model,
            str(tmp / path.name),
            save_as_external_data=external_data,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        if external_data:
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            (path.parent / data_name).unlink(missing_ok=True)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_onnx(path: PathLike, load_external_data: bool = True):
    """Load an ONNX file with its external data, or raise a DreamPoseError naming the file."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise DreamPoseError(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise DreamPoseError(f"{path}: not a readable ONNX file ({e})") from e


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer's warnings (shape checks in diffusers become constants; that is intended)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(
    wrapper: ExportWrapper,
    path: PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic_resolution: bool = False,
    external_data: bool | None = None,
    cleanup: bool = True,
):
    """Export ``wrapper`` to ONNX at ``path`` (cleaned up, atomically written). Returns the ModelProto.

    Traced with ``wrapper.sample_inputs()`` at the model's resolution; batch (and, with
    ``dynamic_resolution``, the spatial axes) are dynamic. The weights stay in the wrapper's dtype.
    """
    onnx = _onnx()
    if opset < 17:
        raise DreamPoseError(f"opset {opset} is too old: the export needs opset 17 or newer")
    inputs = wrapper.sample_inputs()
    args = tuple(inputs[n] for n in wrapper.input_names)
    with tempfile.TemporaryDirectory(prefix="dreampose-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                wrapper,
                args,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=list(wrapper.input_names),
                output_names=list(wrapper.output_names),
                dynamic_axes=wrapper.dynamic_axes(dynamic_resolution),
                do_constant_folding=True,
            )
        model = onnx.load(str(raw), load_external_data=True)
    if cleanup:
        model = cleanup_graph(model)
    model.doc_string = f"dreampose-rt {wrapper.name} ({wrapper.precision})"
    save_onnx(model, path, external_data)
    logger.info("exported %s (%s, opset %d) to %s", wrapper.name, wrapper.precision, opset, path)
    return model


# --------------------------------------------------------------------------------------------------
# The check against PyTorch
# --------------------------------------------------------------------------------------------------
@dataclass
class CheckReport:
    """Result of ``check_onnx``: per-output max |onnx - torch| and the bound it was held to."""

    network: str
    precision: str
    batch: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    bound: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.max_abs_diff[k] <= self.bound[k] for k in self.max_abs_diff)

    def to_dict(self) -> dict:
        return {
            "network": self.network,
            "precision": self.precision,
            "batch": self.batch,
            "max_abs_diff": self.max_abs_diff,
            "bound": self.bound,
            "passed": self.passed,
        }


def compare_outputs(
    network: str, precision: str, names: tuple[str, ...], got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]
) -> CheckReport:
    """Max |got - ref| per output, with the bound from ``TOLERANCES`` for the output's dtype."""
    batch = 0
    report = CheckReport(network, precision, batch)
    for name in names:
        r, g = ref[name], got[name]
        if tuple(r.shape) != tuple(g.shape):
            raise ExportCheckError(f"{network}: output {name!r} has shape {tuple(g.shape)}, PyTorch gives {tuple(r.shape)}")
        kind = "uint8" if r.dtype == torch.uint8 else precision
        atol, rtol = TOLERANCES[kind]
        r64, g64 = r.double(), g.double()
        report.max_abs_diff[name] = float((r64 - g64).abs().max()) if r.numel() else 0.0
        report.bound[name] = atol + rtol * (float(r64.abs().max()) if r.numel() else 0.0)
        report.batch = int(r.shape[0])
    return report


def check_onnx(
    wrapper: ExportWrapper,
    path: PathLike,
    batch: int | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Run the ONNX file in ONNX Runtime (CPU) and the wrapper in PyTorch on the same inputs; compare.

    Inputs come from ``wrapper.sample_inputs(batch, seed)``. fp32: max abs diff <= 1e-4; fp16 and uint8:
    see ``TOLERANCES``. Raises ``ExportCheckError`` with the numbers when a bound is exceeded.
    """
    from .engine import OrtEngine

    inputs = wrapper.sample_inputs(batch, seed)
    engine = OrtEngine(path, providers=["CPUExecutionProvider"])
    engine.load()
    got = engine.infer(inputs)
    ref = dict(zip(wrapper.output_names, wrapper.reference(**inputs)))
    report = compare_outputs(wrapper.name, wrapper.precision, wrapper.output_names, got, ref)
    msg = ", ".join(f"{k}: {report.max_abs_diff[k]:.3g} (bound {report.bound[k]:.3g})" for k in report.max_abs_diff)
    logger.info("check %s %s vs PyTorch, batch %d: max abs diff %s", wrapper.name, wrapper.precision, report.batch, msg)
    if raise_on_failure and not report.passed:
        raise ExportCheckError(f"{path}: ONNX Runtime disagrees with PyTorch: {msg}")
    return report
