"""TensorRT side: metadata and its checks, export keys (here); engine build / run / refit (marked tensorrt)."""

from __future__ import annotations

import time

import pytest
import torch

from export_fixtures import export_model, export_model_dir, subject_model  # noqa: F401

from dreampose_rt.export import EngineMetadata, EngineMismatchError, check_metadata, export_key, make_wrapper
from dreampose_rt.export.build import BuildOptions
from dreampose_rt.export.metadata import metadata_path


def _meta(**overrides) -> EngineMetadata:
    fields = dict(
        network="unet", backend="tensorrt", backend_version="10.13.0.35", precision="fp16",
        device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", export_key="k" * 32,
        graph_hash="g" * 32, weights_hash="w" * 32, profiles={"latents": [[3, 4, 80, 64], [12, 4, 80, 64], [12, 4, 80, 64]]},
        shape_spec={"max_frames": 4}, refittable=True, inputs=["latents"], outputs=["eps"],
    )
    fields.update(overrides)
    return EngineMetadata(**fields)


H100 = {"backend_version": "10.13.0.35", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_metadata_round_trip(tmp_path):
    meta = _meta()
    path = metadata_path(tmp_path / "unet.plan")
    assert path.name == "unet.plan.json"
    meta.save(path)
    loaded = EngineMetadata.load(path)
    assert loaded.to_dict() == meta.to_dict() and loaded.created
    with pytest.raises(EngineMismatchError, match="rebuild"):
        EngineMetadata.load(tmp_path / "other.plan.json")


@pytest.mark.parametrize(
    "device,kwargs,match",
    [
        ({**H100, "backend_version": "10.9.0.34"}, {}, "TensorRT 10.9"),
        ({**H100, "device_name": "NVIDIA L4", "compute_capability": "8.9"}, {}, "compute capability"),
        (H100, {"weights_hash": "x" * 32}, "weights differ"),
        (H100, {"graph_hash": "x" * 32}, "ONNX graph differ"),
        (H100, {"export_key": "x" * 32}, "architecture"),
    ],
)
def test_metadata_mismatch_says_rebuild(device, kwargs, match):
    with pytest.raises(EngineMismatchError, match=match) as err:
        check_metadata(_meta(), "unet.plan", device=device, **kwargs)
    assert "rebuild" in str(err.value)


def test_metadata_match_passes():
    check_metadata(_meta(), "unet.plan", device=H100, weights_hash="w" * 32, graph_hash="g" * 32)
    # Same architecture, another board (H100 PCIe vs SXM): the plan runs.
    check_metadata(_meta(), "unet.plan", device={**H100, "device_name": "NVIDIA H100 PCIe"})
    # ONNX graphs are portable: no device check for the onnxruntime backend.
    check_metadata(_meta(backend="onnxruntime", device_name="cpu", compute_capability=None), "unet.onnx", device=H100)


def test_export_key_tracks_what_changes_the_graph(export_model, export_model_dir):
    from dreampose.model import DreamPoseModel

    opts = BuildOptions()
    key = export_key("unet", export_model, opts)
    assert export_key("unet", DreamPoseModel.from_pretrained(export_model_dir), opts) == key  # save/load stable
    assert export_key("unet", export_model, BuildOptions(precision="fp16")) != key
    assert export_key("unet", export_model, BuildOptions(opset=18)) != key
    assert export_key("unet", export_model, BuildOptions(dynamic_resolution=True)) != key
    assert export_key("unet", export_model, BuildOptions(max_frames=8)) == key  # profiles are not in the graph
    other = DreamPoseModel.tiny(seed=0, height=80, width=64)
    assert export_key("unet", other, opts) != key
    assert export_key("vae_decoder", export_model, BuildOptions(vae_output="uint8")) != export_key("vae_decoder", export_model, opts)


# --------------------------------------------------------------------------------------------------
# Executing TensorRT: skipped with the reason where `import tensorrt` fails or there is no GPU.
# --------------------------------------------------------------------------------------------------
def _require_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT's Python package is not installed (`import tensorrt` failed)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none here")
    return trt


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_build_run_refit(export_model_dir, export_model, subject_model, tmp_path, precision):
    _require_tensorrt()
    from dreampose_rt.export import build_engines, load_engines

    out = tmp_path / precision
    t0 = time.perf_counter()
    manifest = build_engines(export_model_dir, out, backend="tensorrt", precision=precision, max_frames=2,
                             networks=("unet", "vae_decoder"))
    build_s = time.perf_counter() - t0
    assert {r.engine_action for r in manifest.networks.values()} == {"built"}
    assert (out / "unet.plan.json").is_file() and list(out.glob("timing-cache-*.bin"))
    engines = load_engines(out)
    unet = engines["unet"]
    wrapper = make_wrapper("unet", export_model.copy().cuda(), precision)
    lo, opt, hi = unet.profile_shapes("latents")
    assert lo[0] == 3 and hi[0] == 6
    inputs = {k: v.cuda() for k, v in wrapper.sample_inputs(batch=6).items()}
    got = unet.infer(inputs)["eps"].float()
    ref = wrapper.reference(**inputs)[0].float()
    tol = 1e-3 if precision == "fp32" else 3e-2  # TF32 / fp16 kernels
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())

    # refit with the subject's weights instead of a rebuild
    subject_dir = tmp_path / "subject"
    subject_model.save_pretrained(subject_dir)
    t0 = time.perf_counter()
    refit = build_engines(export_model_dir, out, backend="tensorrt", precision=precision, max_frames=2,
                          networks=("unet", "vae_decoder"), refit_from=subject_dir)
    refit_s = time.perf_counter() - t0
    print(f"TensorRT {precision}: build {build_s:.1f} s, refit {refit_s:.1f} s")
    assert {r.engine_action for r in refit.networks.values()} == {"refit"}
    sub = make_wrapper("unet", subject_model.copy().cuda(), precision)
    unet = load_engines(out)["unet"]
    got = unet.infer(inputs)["eps"].float()
    ref = sub.reference(**inputs)[0].float()
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.tensorrt
def test_tensorrt_cuda_graph_replay(export_model_dir, tmp_path):
    _require_tensorrt()
    from dreampose_rt.export import build_engines
    from dreampose_rt.export.tensorrt_engine import TensorRTEngine

    out = tmp_path / "g"
    build_engines(export_model_dir, out, backend="tensorrt", precision="fp16", max_frames=1, networks=("vae_decoder",))
    plain, graphed = TensorRTEngine(out / "vae_decoder.plan"), TensorRTEngine(out / "vae_decoder.plan", cuda_graph=True)
    plain.load()
    graphed.load()
    z = torch.randn(1, *plain.profile_shapes("latents")[0][1:], device="cuda", dtype=torch.float16)
    want = plain.infer({"latents": z})["image"].clone()
    for _ in range(3):  # warm-up, capture, replay
        got = graphed.infer({"latents": z})["image"]
    torch.cuda.synchronize()
    assert graphed._graph is not None and torch.equal(got, want)
