"""``build_engines``: model folder -> checked ONNX graphs -> engines, reusing what did not change.

For each network (cond_encoder, unet, vae_decoder) the engine folder holds::

    <net>.onnx [+ <net>.onnx.data]   the cleaned-up graph (external data past 2 GB)
    <net>.onnx.json                  its metadata (EngineMetadata, backend 'onnxruntime'): export key,
                                     graph and weight hashes, the ONNX Runtime vs PyTorch check
    <net>.weightmap.json             engine weight -> PyTorch parameter (refit.py)
    <net>.plan, <net>.plan.json      TensorRT only: the engine and its metadata
    (the manifest)                   what was built: backend, precision, shapes, file per network
                                     (dreampose_rt.export.manifest.EngineManifest, written last)
    timing-cache-<trt>-sm<cc>.bin    TensorRT only: the builder's timing cache, shared by the networks

Reuse: the *export key* hashes the network's architecture config, the resolution, the precision, the
opset and the exporter versions; the *weights hash* hashes the weights. Same key and weights: reuse.
Same key, new weights: refit (the ONNX initializers through the weight map; the TensorRT engine through
its Refitter when it was built refittable) -- this is what ``refit_from`` (a subject's finetuned model
folder) is for. A different key: export and build again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dreampose.outputs import check_output_dir, claim_output_dir
from dreampose.utils import DreamPoseError, PathLike

from .engine import Engine, OrtEngine
from .manifest import ENGINE_BACKENDS, ENGINE_PRECISIONS, NETWORKS, EngineManifest, NetworkRecord, ShapeSpec
from .metadata import EngineMetadata, check_metadata, current_device, import_tensorrt, metadata_path
from .networks import ExportWrapper, make_wrapper
from .onnx_export import (
    DEFAULT_OPSET,
    check_onnx,
    export_onnx,
    load_onnx,
    onnx_graph_hash,
    save_onnx,
    state_dict_hash,
)
from .refit import WeightMap, build_weight_map, refit_onnx, weight_map_path

logger = logging.getLogger(__name__)

REFITTABLE = ("unet", "vae_decoder")
EXPORT_FORMAT = 1  # bump when the wrappers or the export change what a graph contains


@dataclass
class BuildOptions:
    """Everything ``build_engines`` takes besides the folders (see its docstring)."""

    backend: str = "onnxruntime"
    precision: str = "fp32"
    max_frames: int = 4
    opt_frames: int | None = None
    dynamic_resolution: bool = False
    opset: int = DEFAULT_OPSET
    vae_output: str = "float"
    check: bool = True
    optimization_level: int = 3
    workspace_bytes: int | None = None
    networks: Sequence[str] = NETWORKS

    def validate(self) -> None:
        if self.backend not in ENGINE_BACKENDS:
            raise DreamPoseError(f"unsupported backend {self.backend!r}: choose one of {', '.join(ENGINE_BACKENDS)}")
        if self.precision not in ENGINE_PRECISIONS:
            raise DreamPoseError(f"unsupported precision {self.precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
        if self.max_frames < 1:
            raise DreamPoseError(f"--max-frames must be >= 1, got {self.max_frames}")
        unknown = [n for n in self.networks if n not in NETWORKS]
        if unknown:
            raise DreamPoseError(f"unknown network(s) {unknown}: choose from {', '.join(NETWORKS)}")
        if self.vae_output not in ("float", "uint8"):
            raise DreamPoseError(f"vae output must be 'float' or 'uint8', got {self.vae_output!r}")
        if not 0 <= self.optimization_level <= 5:
            raise DreamPoseError(f"builder optimization level must be 0..5, got {self.optimization_level}")


def _clean_config(config: Any) -> dict:
    """A network config as plain JSON, without bookkeeping keys that change between saves."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"transformers_version", "dtype", "torch_dtype", "architectures", "id2label", "label2id"}
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in drop}


def export_key(name: str, model, options: BuildOptions) -> str:
    """Hash of what decides the graph of network ``name``: architecture configs, resolution, settings."""
    parts: dict[str, Any] = {
        "network": name,
        "format": EXPORT_FORMAT,
        "precision": options.precision,
        "opset": options.opset,
        "dynamic_resolution": options.dynamic_resolution and name != "cond_encoder",
        "torch": torch.__version__,
        "dreampose": model.config.to_dict(),
    }
    if name == "unet":
        parts["unet"] = _clean_config(model.unet.config)
    elif name == "vae_decoder":
        parts["vae"] = _clean_config(model.vae.config)
        parts["vae_output"] = options.vae_output
    else:
        parts["vae"] = _clean_config(model.vae.config)
        parts["clip"] = _clean_config(model.image_encoder.config)
        parts["adapter"] = vars(model.adapter.config)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _wrapper(name: str, model, options: BuildOptions) -> ExportWrapper:
    kwargs = {"output": options.vae_output} if name == "vae_decoder" else {}
    return make_wrapper(name, model, options.precision, **kwargs)


def _load_model(folder: PathLike, what: str):
    from dreampose.model import DreamPoseModel

    folder = Path(folder)
    if not folder.is_dir():
        raise DreamPoseError(f"{folder}: {what} folder not found")
    try:
        return DreamPoseModel.from_pretrained(folder)
    except DreamPoseError:
        raise
    except (OSError, ValueError, KeyError) as e:  # diffusers / transformers / safetensors loading errors
        raise DreamPoseError(f"{folder}: cannot load the {what} ({type(e).__name__}: {e})") from e


def _shape_spec(model, options: BuildOptions) -> ShapeSpec:
    return ShapeSpec(
        min_frames=1,
        opt_frames=options.opt_frames or options.max_frames,
        max_frames=options.max_frames,
        height=model.config.height,
        width=model.config.width,
        dynamic_resolution=options.dynamic_resolution,
        min_resolution=min(256, model.config.height, model.config.width),
        max_resolution=max(1024, model.config.height, model.config.width),
    )


def _read_metadata(path: Path) -> EngineMetadata | None:
    if not path.is_file():
        return None
    try:
        return EngineMetadata.load(path)
    except DreamPoseError as e:
        logger.info("%s: unusable metadata (%s); building again", path, e)
        return None


def _ensure_onnx(
    wrapper: ExportWrapper, key: str, out: Path, spec: ShapeSpec, options: BuildOptions
) -> tuple[str, EngineMetadata, Any | None, WeightMap]:
    """Reuse, refit or export ``<net>.onnx``; check it against PyTorch when it changed.

    Returns (action, metadata, onnx ModelProto if loaded else None, weight map).
    """
    onnx_path = out / f"{wrapper.name.replace('_u8', '')}.onnx"
    meta_path, map_path = metadata_path(onnx_path), weight_map_path(out, onnx_path.stem)
    state = wrapper.state_dict()
    whash = state_dict_hash(state)
    meta = _read_metadata(meta_path)
    model = None
    fresh = meta is not None and meta.export_key == key and onnx_path.is_file() and map_path.is_file()
    if fresh and meta.weights_hash == whash:
        return "reused", meta, None, WeightMap.load(map_path)
    if fresh:
        action = "refit"
        wmap = WeightMap.load(map_path)
        model = load_onnx(onnx_path)
        count = refit_onnx(model, wmap, state)
        save_onnx(model, onnx_path)
        logger.info("%s: refitted %d ONNX initializers from the new weights", wrapper.name, count)
    else:
        action = "built"
        model = export_onnx(wrapper, onnx_path, options.opset, spec.dynamic_resolution and wrapper.name != "cond_encoder")
        wmap = build_weight_map(model, state)
        wmap.save(map_path)
    report = None
    if options.check:
        batch = wrapper.batch_range(spec)[0]  # one frame: also proves the batch axis is dynamic (traced at 2)
        report = check_onnx(wrapper, onnx_path, batch=batch).to_dict()
    device = current_device("onnxruntime")
    meta = EngineMetadata(
        network=onnx_path.stem,
        backend="onnxruntime",
        backend_version=device["backend_version"],
        precision=wrapper.precision,
        device_name=device["device_name"],
        compute_capability=device["compute_capability"],
        export_key=key,
        graph_hash=onnx_graph_hash(model),
        weights_hash=whash,
        profiles={n: [list(s) for s in p] for n, p in wrapper.shape_profile(spec).items()},
        shape_spec=spec.to_dict(),
        refittable=True,
        inputs=list(wrapper.input_names),
        outputs=list(wrapper.output_names),
        extra={"opset": options.opset, "check": report, "torch": torch.__version__},
    )
    meta.save(meta_path)
    return action, meta, model, wmap


def _ensure_tensorrt(
    wrapper: ExportWrapper,
    onnx_meta: EngineMetadata,
    onnx_model: Any | None,
    wmap: WeightMap,
    out: Path,
    spec: ShapeSpec,
    options: BuildOptions,
) -> tuple[str, EngineMetadata, dict[str, Any]]:
    """Reuse, refit or build ``<net>.plan`` from the (already checked) ONNX graph."""
    from onnx import numpy_helper

    from .tensorrt_engine import TensorRTEngine, TrtBuildOptions, build_engine

    name = onnx_meta.network
    plan = out / f"{name}.plan"
    device = current_device("tensorrt")
    refittable = name in REFITTABLE
    cc = (device["compute_capability"] or "").replace(".", "")
    trt_options = TrtBuildOptions(
        precision=options.precision,
        optimization_level=options.optimization_level,
        workspace_bytes=options.workspace_bytes,
        refittable=refittable,
        timing_cache=out / f"timing-cache-trt{device['backend_version']}-sm{cc}.bin",
    )
    profile = wrapper.shape_profile(spec)
    profiles = {n: [list(s) for s in p] for n, p in profile.items()}
    meta = _read_metadata(metadata_path(plan))
    same_build = (
        meta is not None
        and plan.is_file()
        and meta.backend_version == device["backend_version"]
        and meta.compute_capability == device["compute_capability"]
        and meta.graph_hash == onnx_meta.graph_hash
        and meta.export_key == onnx_meta.export_key
        and meta.profiles == profiles
        and meta.extra.get("build") == trt_options.to_dict()
    )
    timings: dict[str, Any] = {}
    if same_build and meta.weights_hash == onnx_meta.weights_hash:
        return "reused", meta, timings
    if same_build and meta.refittable:
        onnx_model = onnx_model if onnx_model is not None else load_onnx(out / f"{name}.onnx")
        constants = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer if i.name in set(wmap.constants)}
        engine = TensorRTEngine(plan)
        engine.load()
        timings["refit_s"] = engine.refit(wmap, wrapper.state_dict(), constants)
        engine.save()
        action = "refit"
    else:
        timings["build_s"] = build_engine(out / f"{name}.onnx", plan, profile, trt_options)
        action = "built"
    meta = EngineMetadata(
        network=name,
        backend="tensorrt",
        backend_version=device["backend_version"],
        precision=options.precision,
        device_name=device["device_name"],
        compute_capability=device["compute_capability"],
        export_key=onnx_meta.export_key,
        graph_hash=onnx_meta.graph_hash,
        weights_hash=onnx_meta.weights_hash,
        profiles=profiles,
        shape_spec=spec.to_dict(),
        refittable=refittable,
        inputs=list(wrapper.input_names),
        outputs=list(wrapper.output_names),
        extra={"build": trt_options.to_dict(), **timings},
    )
    meta.save(metadata_path(plan))
    return action, meta, timings


def build_engines(
    model_dir: PathLike,
    out_dir: PathLike,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    max_frames: int = 4,
    refit_from: PathLike | None = None,
    subject: PathLike | None = None,
    **kwargs: Any,
) -> EngineManifest:
    """Export, check and build the engines of a DreamPose model folder into ``out_dir``. Returns the
    manifest it wrote (EngineManifest).

    Args:
        model_dir: a DreamPose model folder (``DreamPoseModel.save_pretrained``): the architecture, and the
            weights unless ``refit_from`` is given.
        out_dir: the engine folder (created; artifacts whose inputs did not change are reused).
        backend: 'onnxruntime' (the ONNX graphs are the engines) or 'tensorrt' (plans built from them).
        precision: 'fp32' or 'fp16'.
        max_frames: frames per call the engines are built for (UNet batch 3 x frames, VAE batch frames).
        refit_from: a subject's finetuned model folder with the same architecture: its weights go into
            the engines, by refit where engines of this architecture already exist.
        subject: a LoRA subject folder made for ``model_dir`` (dreampose.lora): the base weights with the
            subject merged go into the engines, by refit where the base model's engines already exist.
        **kwargs: further ``BuildOptions`` fields (opt_frames, dynamic_resolution, opset, vae_output,
            check, optimization_level, workspace_bytes, networks).

    Raises DreamPoseError for a missing or wrong model folder, an unsupported option, TensorRT missing,
    or an export that disagrees with PyTorch.
    """
    options = BuildOptions(backend=backend, precision=precision, max_frames=max_frames, **kwargs)
    options.validate()
    if options.backend == "tensorrt":
        import_tensorrt()  # fail before minutes of export, not after
        current_device("tensorrt")
    if refit_from is not None and subject is not None:
        raise DreamPoseError("give --refit-from (a finetuned model folder) or --subject (a LoRA subject folder), "
                             "not both")
    out = Path(out_dir)
    inputs = [model_dir, refit_from, subject]
    check_output_dir(out, "build-engine", inputs=inputs, legacy=EngineManifest.exists)
    t_all = time.perf_counter()
    model = _load_model(model_dir, "model")
    if subject is not None:  # the export keys depend on the architecture only: one model serves both
        from dreampose.lora import apply_subject, model_fingerprint

        apply_subject(model, subject, model_fingerprint(model_dir))
    weights_model = model
    if refit_from is not None:
        weights_model = _load_model(refit_from, "subject model")
        for name in options.networks:
            if export_key(name, weights_model, options) != export_key(name, model, options):
                raise DreamPoseError(
                    f"{refit_from}: the subject's {name} differs in architecture from {model_dir}'s; cannot refit"
                )
    spec = _shape_spec(model, options)
    claim_output_dir(out, "build-engine", inputs=inputs, legacy=EngineManifest.exists)
    records: dict[str, NetworkRecord] = {}
    for i, name in enumerate(options.networks, 1):
        t0 = time.perf_counter()
        logger.info("[%d/%d] %s: export / check (%s, %s)", i, len(options.networks), name, options.precision, options.backend)
        key = export_key(name, model, options)
        wrapper = _wrapper(name, weights_model, options)
        action, onnx_meta, onnx_model, wmap = _ensure_onnx(wrapper, key, out, spec, options)
        engine_file, engine_action, meta_file = f"{onnx_meta.network}.onnx", action, metadata_path(Path(f"{onnx_meta.network}.onnx")).name
        extra: dict[str, Any] = {}
        if options.backend == "tensorrt":
            logger.info("[%d/%d] %s: TensorRT engine", i, len(options.networks), name)
            engine_action, _, extra = _ensure_tensorrt(wrapper, onnx_meta, onnx_model, wmap, out, spec, options)
            engine_file = f"{onnx_meta.network}.plan"
            meta_file = metadata_path(Path(engine_file)).name
        records[name] = NetworkRecord(
            name=name,
            onnx=f"{onnx_meta.network}.onnx",
            onnx_action=action,
            engine=engine_file,
            engine_action=engine_action,
            metadata=meta_file,
            weight_map=weight_map_path(Path("."), onnx_meta.network).name,
            inputs=onnx_meta.inputs,
            outputs=onnx_meta.outputs,
            seconds=round(time.perf_counter() - t0, 3),
            check=onnx_meta.extra.get("check"),
            extra=extra,
        )
        logger.info("[%d/%d] %s: onnx %s, engine %s (%.1f s)", i, len(options.networks), name, action, engine_action,
                    records[name].seconds)
    manifest = EngineManifest(
        backend=options.backend,
        precision=options.precision,
        model_dir=str(Path(model_dir).resolve()),
        weights_from=str(Path(subject or refit_from or model_dir).resolve()),
        shape_spec=spec,
        networks=records,
        seconds=round(time.perf_counter() - t_all, 3),
        versions=_versions(options.backend),
    )
    manifest.save(out)
    return manifest


def _versions(backend: str) -> dict[str, str]:
    """What built the folder: dreampose-rt, torch and the engine backend."""
    import dreampose_rt

    versions = {"dreampose_rt": dreampose_rt.__version__, "torch": torch.__version__}
    versions[backend] = current_device(backend)["backend_version"]
    return versions


def load_engines(
    engine_dir: PathLike,
    manifest: EngineManifest | None = None,
    weights_hashes: dict[str, str] | None = None,
    providers: Sequence[str] | None = None,
    cuda_graph: bool = False,
) -> dict[str, Engine]:
    """Open the engines of an engine folder, each checked against its metadata (backend version, GPU,
    and the weights it holds).

    Args:
        engine_dir: a folder written by ``build_engines``.
        manifest: its manifest, already loaded (and checked against the model: EngineManifest.check);
            None: loaded here.
        weights_hashes: network -> expected weights hash (EngineManifest.expected_weights(model)); a
            mismatch raises EngineMismatchError ("rebuild"). None: not checked.
        providers: ONNX Runtime providers (onnxruntime backend).
        cuda_graph: replay CUDA graphs (tensorrt backend).

    Returns network name -> loaded Engine.
    """
    engine_dir = Path(engine_dir)
    manifest = manifest if manifest is not None else EngineManifest.load(engine_dir)
    engines: dict[str, Engine] = {}
    for name, rec in manifest.networks.items():
        path = engine_dir / rec.engine
        meta = EngineMetadata.load(engine_dir / rec.metadata)
        check_metadata(meta, str(path), weights_hash=(weights_hashes or {}).get(name))
        if meta.backend == "tensorrt":
            from .tensorrt_engine import TensorRTEngine

            engine: Engine = TensorRTEngine(path, cuda_graph=cuda_graph)
        else:
            engine = OrtEngine(path, providers=providers)
        engine.load()
        engines[name] = engine
    return engines
