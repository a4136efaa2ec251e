"""Export: wrappers, ONNX graphs vs PyTorch in ONNX Runtime, the ORT engine, refit maps, build-engine.

One fp32 build of the tiny model per session (export_fixtures.built_engines); everything else is small.
"""

from __future__ import annotations

import json

import pytest
import torch

from export_fixtures import (  # noqa: F401  (pytest fixtures)
    built_engines,
    export_model,
    export_model_dir,
    perturb,
    subject_model,
    subject_model_dir,
)

from dreampose.utils import DreamPoseError
from dreampose_rt.export import (
    EngineError,
    EngineManifest,
    EngineMismatchError,
    ExportCheckError,
    OrtEngine,
    RefitError,
    ShapeSpec,
    WeightMap,
    build_engines,
    build_weight_map,
    check_onnx,
    export_onnx,
    load_engines,
    make_wrapper,
    refit_onnx,
    state_dict_hash,
)
from dreampose_rt.export.networks import CLIPPreprocess
from dreampose_rt.export.onnx_export import load_onnx, save_onnx


def _diff(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    d = (got.double() - ref.double()).abs()
    print(f"{name}: max abs diff {d.max().item():.3g}, mean {d.mean().item():.3g}")
    return d.max().item()


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(64, 48), (80, 64), (48, 96)])
def test_clip_preprocess_matrices_match_interpolate(export_model, hw):
    """The matrix form of the antialiased bicubic resize + crop equals DreamPoseModel.clip_preprocess."""
    from dreampose.model import CLIP_MEAN, CLIP_STD

    h, w = hw
    pre = CLIPPreprocess(h, w, export_model.clip_image_size, CLIP_MEAN, CLIP_STD)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert _diff("clip preprocess", pre(x), export_model.clip_preprocess(x)) < 1e-5


def test_wrappers_compute_what_the_model_computes(export_model):
    m = export_model
    g = torch.Generator().manual_seed(0)
    h, w = m.latent_size
    with torch.no_grad():
        unet = make_wrapper("unet", m)
        inp = unet.sample_inputs(batch=6)
        ref = m.predict_noise(inp["latents"], inp["pose_window"], inp["timestep"], inp["encoder_hidden_states"])
        assert _diff("unet wrapper", unet(*inp.values()), ref) == 0.0

        vae = make_wrapper("vae_decoder", m)
        z = torch.randn(2, 4, h, w, generator=g)
        image = m.decode(z)
        assert _diff("vae wrapper", vae(z), image) < 1e-6
        u8 = make_wrapper("vae_decoder_u8", m)(z)
        assert u8.shape == (2, m.config.height, m.config.width, 3) and u8.dtype == torch.uint8
        want = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        assert (u8.int() - want.int()).abs().max() <= 1

        cond_enc = make_wrapper("cond_encoder", m)
        x = torch.rand(1, 3, m.config.height, m.config.width, generator=g) * 2 - 1
        cond, null = cond_enc(x)
        assert _diff("cond", cond, m.encode_image(x)) < 1e-5
        assert _diff("null", null, m.encode_null_image(1)) < 1e-6


def test_profiles_axes_and_shapes(export_model):
    m = export_model
    h, w = m.latent_size
    unet = make_wrapper("unet", m)
    spec = ShapeSpec(min_frames=1, opt_frames=2, max_frames=4, height=m.config.height, width=m.config.width)
    prof = unet.shape_profile(spec)
    assert prof["latents"] == ((3, 4, h, w), (6, 4, h, w), (12, 4, h, w))
    assert prof["pose_window"][2] == (12, 10, h, w)
    assert prof["timestep"] == ((3,), (6,), (12,))
    assert prof["encoder_hidden_states"][0] == (3, 17, 32)
    assert unet.dynamic_axes() == {n: {0: "batch"} for n in ("latents", "pose_window", "timestep", "encoder_hidden_states", "eps")}
    assert unet.dynamic_axes(True)["latents"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert unet.input_dtypes()["timestep"] == torch.float32

    dyn = ShapeSpec(max_frames=2, opt_frames=2, height=64, width=48, dynamic_resolution=True, min_resolution=32, max_resolution=128)
    lo, opt, hi = unet.shape_profile(dyn)["latents"]
    assert lo == (3, 4, 8, 8) and opt == (6, 4, 16, 12) and hi == (6, 4, 32, 32)

    vae = make_wrapper("vae_decoder", m)
    assert vae.shape_profile(spec)["latents"] == ((1, 4, h, w), (2, 4, h, w), (4, 4, h, w))
    cond = make_wrapper("cond_encoder", m)
    assert cond.shape_profile(spec)["image"] == ((1, 3, 64, 48),) * 3
    assert cond.dynamic_axes(True)["image"] == {0: "batch"}  # the CLIP resize is baked in
    with pytest.raises(DreamPoseError, match="frames"):
        ShapeSpec(min_frames=2, opt_frames=1, max_frames=4)
    with pytest.raises(DreamPoseError, match="precision"):
        make_wrapper("unet", m, "int8")


# --------------------------------------------------------------------------------------------------
# ONNX graphs vs PyTorch (the session build)
# --------------------------------------------------------------------------------------------------
def test_build_checked_every_network(built_engines):
    out, manifest = built_engines
    assert set(manifest.networks) == {"cond_encoder", "unet", "vae_decoder"}
    for name, rec in manifest.networks.items():
        assert rec.onnx_action == "built" and rec.check["passed"], name
        assert max(rec.check["max_abs_diff"].values()) <= 1e-4
        meta = json.loads((out / rec.metadata).read_text())
        assert meta["precision"] == "fp32" and meta["backend"] == "onnxruntime" and meta["graph_hash"]
        model = load_onnx(out / rec.onnx, load_external_data=False)
        assert model.opset_import[0].version >= 17
        assert [i.name for i in model.graph.input] == rec.inputs
    assert manifest.max_frames == 3
    assert EngineManifest.load(out) == manifest  # what was written reads back the same


@pytest.mark.parametrize("name,batch", [("unet", 9), ("vae_decoder", 3), ("cond_encoder", 2)])
def test_onnx_matches_pytorch(built_engines, export_model, name, batch):
    """fp32: max abs diff <= 1e-4 at a batch other than the traced one (2 frames)."""
    out, _ = built_engines
    wrapper = make_wrapper(name, export_model)
    engine = OrtEngine(out / f"{name}.onnx", providers=["CPUExecutionProvider"])
    engine.load()
    inputs = wrapper.sample_inputs(batch=batch, seed=5)
    got = engine.infer(inputs)
    for out_name, ref in zip(wrapper.output_names, wrapper.reference(**inputs)):
        assert got[out_name].shape == ref.shape
        assert _diff(f"{name}.{out_name}", got[out_name], ref) <= 1e-4


def test_denoising_steps_through_ort_match_pytorch(built_engines, export_model):
    """Conditioning encoder -> 3 guided DDIM steps (branch-major batch) -> VAE decoder: ORT vs PyTorch."""
    from diffusers import DDIMScheduler

    out, _ = built_engines
    m = export_model
    engines = load_engines(out, providers=["CPUExecutionProvider"])
    frames, (h, w) = 2, m.latent_size
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, m.config.height, m.config.width, generator=g) * 2 - 1
    pose = torch.rand(frames, 10, h, w, generator=g) * 2 - 1
    latents0 = torch.randn(frames, 4, h, w, generator=g)
    s_image, s_pose = 8.0, 3.0

    def run(encode, denoise, decode):
        sched = DDIMScheduler.from_config(m.scheduler_config)
        sched.set_timesteps(3)
        cond, null = encode(image)
        hidden = torch.cat([null.expand(frames, -1, -1), cond.expand(frames, -1, -1), cond.expand(frames, -1, -1)])
        poses = torch.cat([torch.zeros_like(pose), pose, torch.zeros_like(pose)])
        x = latents0.clone()
        for t in sched.timesteps:
            eps = denoise(torch.cat([x] * 3), poses, torch.full((3 * frames,), float(t)), hidden)
            e_null, e_full, e_img = eps.chunk(3)
            guided = e_null + s_image * (e_img - e_null) + s_pose * (e_full - e_img)
            x = sched.step(guided, t, x).prev_sample
        return x, decode(x)

    with torch.no_grad():
        ref_lat, ref_img = run(
            lambda im: (m.encode_image(im), m.encode_null_image(1)),
            lambda *a: m.predict_noise(*a),
            m.decode,
        )

    def ort_encode(im):
        o = engines["cond_encoder"].infer({"image": im})
        return o["cond"].clone(), o["null"].clone()

    def ort_denoise(lat, pw, t, hid):
        return engines["unet"].infer({"latents": lat, "pose_window": pw, "timestep": t,
                                      "encoder_hidden_states": hid.contiguous()})["eps"].clone()

    ort_lat, ort_img = run(ort_encode, ort_denoise, lambda z: engines["vae_decoder"].infer({"latents": z})["image"].clone())
    assert _diff("latents after 3 steps", ort_lat, ref_lat) <= 1e-4
    assert _diff("decoded frames", ort_img, ref_img) <= 1e-4


def test_check_detects_a_wrong_graph(built_engines, export_model, tmp_path):
    """check_onnx must fail when the graph's weights are not the model's."""
    out, _ = built_engines
    wrapper = make_wrapper("vae_decoder", export_model)
    model = load_onnx(out / "vae_decoder.onnx")
    wmap = WeightMap.load(out / "vae_decoder.weightmap.json")
    state = {k: v.clone() for k, v in wrapper.state_dict().items()}
    state["decoder.conv_out.weight"] += 0.05
    refit_onnx(model, wmap, state)
    save_onnx(model, tmp_path / "bad.onnx")
    with pytest.raises(ExportCheckError, match="disagrees"):
        check_onnx(wrapper, tmp_path / "bad.onnx")


def test_fp16_export(export_model, tmp_path):
    m = export_model.copy()
    wrapper = make_wrapper("unet", m, "fp16")
    path = tmp_path / "unet16.onnx"
    export_onnx(wrapper, path)
    engine = OrtEngine(path, providers=["CPUExecutionProvider"])
    engine.load()
    assert engine.input_dtypes == {"latents": torch.float16, "pose_window": torch.float16, "timestep": torch.float32,
                                   "encoder_hidden_states": torch.float16}
    assert engine.output_dtypes == {"eps": torch.float16}
    report = check_onnx(wrapper, path, batch=3)
    print(report.to_dict())
    assert report.passed and report.max_abs_diff["eps"] < 1e-2


def test_external_data(export_model, tmp_path, monkeypatch):
    from dreampose_rt.export import onnx_export

    wrapper = make_wrapper("vae_decoder", export_model)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)  # "past 2 GB" for a 1 MB model
    path = tmp_path / "vae.onnx"
    export_onnx(wrapper, path)
    data = tmp_path / "vae.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    assert check_onnx(wrapper, path).passed
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 2 * 1024**3)
    save_onnx(load_onnx(path), path)  # back to one file: the stale data file goes
    assert not data.exists() and check_onnx(wrapper, path).passed


# --------------------------------------------------------------------------------------------------
# The ORT engine
# --------------------------------------------------------------------------------------------------
def test_ort_engine_buffers_and_feed_errors(built_engines, export_model):
    out, _ = built_engines
    engine = OrtEngine(out / "vae_decoder.onnx", providers=["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="not loaded"):
        engine.infer({})
    engine.load()
    h, w = export_model.latent_size
    shapes = engine.allocate_buffers({"latents": (2, 4, h, w)})
    assert shapes == {"latents": (2, 4, h, w)}
    z = torch.randn(2, 4, h, w)
    first = engine.infer({"latents": z})["image"]
    ref = first.clone()
    second = engine.infer({"latents": z * 0.5})["image"]
    assert second.data_ptr() == first.data_ptr()  # outputs live in engine-owned buffers
    assert not torch.equal(second, ref)
    assert engine.shapes["image"] == (2, 3, export_model.config.height, export_model.config.width)
    third = engine.infer({"latents": z[:1]})["image"]  # a new shape re-allocates
    assert third.shape[0] == 1
    with pytest.raises(EngineError, match="missing"):
        engine.infer({"x": z})
    with pytest.raises(EngineError, match="float32"):
        engine.infer({"latents": z.half()})
    with pytest.raises(EngineError, match="graph takes"):
        engine.allocate_buffers({"latents": (2, 4, h + 1, w)})
    with pytest.raises(EngineError, match="not found"):
        OrtEngine(out / "nope.onnx").load()


def test_load_engines_checks_weights(built_engines, export_model):
    out, _ = built_engines
    good = state_dict_hash(make_wrapper("unet", export_model).state_dict())
    engines = load_engines(out, weights_hashes={"unet": good}, providers=["CPUExecutionProvider"])
    assert set(engines) == {"cond_encoder", "unet", "vae_decoder"}
    with pytest.raises(EngineMismatchError, match="rebuild"):
        load_engines(out, weights_hashes={"unet": "0" * 32})


def test_the_manifest_owns_the_checks(built_engines, export_model, tmp_path, monkeypatch):
    """EngineManifest: load, the checks against a model and a backend, the weights it expects."""
    import dataclasses
    import shutil

    out, manifest = built_engines
    manifest.check(out, export_model, "onnxruntime", "fp32")
    manifest.check(out, export_model, "onnxruntime")  # precision None: theirs
    with pytest.raises(DreamPoseError, match="built for 'onnxruntime', not 'tensorrt'"):
        manifest.check(out, export_model, "tensorrt")
    with pytest.raises(DreamPoseError, match="built in fp32 but fp16 was asked for"):
        manifest.check(out, export_model, "onnxruntime", "fp16")
    other = dataclasses.replace(manifest, shape_spec=dataclasses.replace(manifest.shape_spec, height=32))
    with pytest.raises(DreamPoseError, match="built for 32 x 48 but the model renders 64 x 48"):
        other.check(out, export_model, "onnxruntime")
    partial = dataclasses.replace(manifest, networks={"unet": manifest.networks["unet"]})
    with pytest.raises(DreamPoseError, match="cond_encoder, vae_decoder are missing"):
        partial.check(out, export_model, "onnxruntime")
    manifest.check_frames(out, 9)  # ONNX graphs: a dynamic batch axis
    trt = dataclasses.replace(manifest, backend="tensorrt", versions={**manifest.versions, "tensorrt": "0.0.1"})
    trt.check_frames(out, 3)
    with pytest.raises(DreamPoseError, match="frames_per_batch 4 is more than the engines .* take \\(3\\)"):
        trt.check_frames(out, 4)  # a TensorRT profile ends at max_frames
    from dreampose_rt.export import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "_backend_version", lambda backend: "10.9.0")
    with pytest.raises(DreamPoseError, match="built with TensorRT 0.0.1, this is TensorRT 10.9.0"):
        trt.check(out, export_model, "tensorrt")
    monkeypatch.undo()
    expected = manifest.expected_weights(export_model)
    assert expected["unet"] == state_dict_hash(make_wrapper("unet", export_model).state_dict())
    assert expected == {n: json.loads((out / r.metadata).read_text())["weights_hash"] for n, r in manifest.networks.items()}
    # folders that are not engine folders, and manifests this version cannot read
    with pytest.raises(DreamPoseError, match="engine folder not found"):
        EngineManifest.load(tmp_path / "missing")
    with pytest.raises(DreamPoseError, match="not an engine folder"):
        EngineManifest.load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = json.loads(EngineManifest.path(copy).read_text())
    EngineManifest.path(copy).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(DreamPoseError, match="newer than this dreampose-rt reads"):
        EngineManifest.load(copy)
    EngineManifest.path(copy).write_text(json.dumps({k: v for k, v in data.items() if k != "shape_spec"}))
    with pytest.raises(DreamPoseError, match="not a manifest this dreampose-rt can read"):
        EngineManifest.load(copy)
    # a backend asked for by auto or by name is unavailable for a folder of another backend's engines
    from dreampose_rt.backends import OnnxRuntimeBackend

    assert OnnxRuntimeBackend.folder_availability(out)
    EngineManifest.path(copy).write_text(json.dumps({**data, "backend": "tensorrt"}))
    avail = OnnxRuntimeBackend.folder_availability(copy)
    assert not avail and "holds tensorrt engines" in avail.reason


# --------------------------------------------------------------------------------------------------
# Weight map and refit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_weight_map_binds_every_parameter(built_engines, export_model, name):
    out, _ = built_engines
    wmap = WeightMap.load(out / f"{name}.weightmap.json")
    state = make_wrapper(name, export_model).state_dict()
    used = state if name == "unet" else {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    bound = {b.param for b in wmap.bindings.values()}
    assert bound == set(used), sorted(set(used) ^ bound)[:5]
    assert not wmap.ambiguous
    transforms = {b.transform for b in wmap.bindings.values()}
    assert transforms == {"identity", "transpose"}  # Linear weights become transposed MatMul initializers
    reshaped = [b for b in wmap.bindings.values() if tuple(state[b.param].shape) != b.shape and b.transform == "identity"]
    assert reshaped  # GroupNorm scales appear as (C, 1, 1)


def test_refit_onnx_gives_the_subjects_outputs(built_engines, subject_model, export_model, tmp_path):
    out, _ = built_engines
    wrapper = make_wrapper("unet", subject_model)
    model = load_onnx(out / "unet.onnx")
    wmap = WeightMap.load(out / "unet.weightmap.json")
    n = refit_onnx(model, wmap, wrapper.state_dict())
    assert n == len(wmap.bindings)
    save_onnx(model, tmp_path / "unet_subject.onnx")
    report = check_onnx(wrapper, tmp_path / "unet_subject.onnx", batch=3)
    assert report.max_abs_diff["eps"] <= 1e-4
    stale = check_onnx(wrapper, out / "unet.onnx", batch=3, raise_on_failure=False)
    assert stale.max_abs_diff["eps"] > 1e-2  # the subject really differs: the check above is meaningful


def test_weight_map_ties_are_refused_when_they_split(tmp_path):
    """Freshly initialised: equal norm scales tie; a refit that makes them differ must be refused."""
    from dreampose.model import DreamPoseModel

    m = DreamPoseModel.tiny(seed=0)
    wrapper = make_wrapper("vae_decoder", m)
    model = export_onnx(wrapper, tmp_path / "vae.onnx")
    wmap = build_weight_map(model, wrapper.state_dict())
    assert wmap.ambiguous
    engine_name, params = next(iter(wmap.ambiguous.items()))
    state = {k: v.clone() for k, v in wrapper.state_dict().items()}
    refit_onnx(model, wmap, state)  # same values: fine
    state[params[1]] += 1.0
    with pytest.raises(RefitError, match="rebuild"):
        refit_onnx(model, wmap, state)
    wmap.save(tmp_path / "map.json")
    assert WeightMap.load(tmp_path / "map.json").to_dict() == wmap.to_dict()


# --------------------------------------------------------------------------------------------------
# build_engines and the command line
# --------------------------------------------------------------------------------------------------
def test_build_reuses_and_refits(export_model_dir, subject_model_dir, subject_model, export_model, tmp_path):
    out = tmp_path / "eng"
    nets = ("unet", "vae_decoder")
    first = build_engines(export_model_dir, out, max_frames=2, networks=nets)
    assert {r.onnx_action for r in first.networks.values()} == {"built"}
    mtime = (out / "unet.onnx").stat().st_mtime_ns
    graph_hash = json.loads((out / "unet.onnx.json").read_text())["graph_hash"]
    again = build_engines(export_model_dir, out, max_frames=2, networks=nets)
    assert {r.onnx_action for r in again.networks.values()} == {"reused"}
    assert (out / "unet.onnx").stat().st_mtime_ns == mtime

    refit = build_engines(export_model_dir, out, max_frames=2, networks=nets, refit_from=subject_model_dir)
    assert {r.onnx_action for r in refit.networks.values()} == {"refit"}
    assert all(r.check["passed"] for r in refit.networks.values())
    meta = json.loads((out / "unet.onnx.json").read_text())
    assert meta["weights_hash"] == state_dict_hash(make_wrapper("unet", subject_model).state_dict())
    assert meta["graph_hash"] == graph_hash  # same graph, new weights
    engine = OrtEngine(out / "unet.onnx", providers=["CPUExecutionProvider"])
    engine.load()
    inputs = make_wrapper("unet", subject_model).sample_inputs(batch=3)
    with torch.no_grad():
        ref = subject_model.predict_noise(inputs["latents"], inputs["pose_window"], inputs["timestep"], inputs["encoder_hidden_states"])
    assert _diff("refitted unet", engine.infer(inputs)["eps"], ref) <= 1e-4

    back = build_engines(export_model_dir, out, max_frames=2, networks=nets)  # base weights again: refit back
    assert {r.onnx_action for r in back.networks.values()} == {"refit"}

    other = build_engines(export_model_dir, out, max_frames=2, networks=("unet",), opset=18)  # new key: export
    assert other.networks["unet"].onnx_action == "built"


def _cli(argv: list[str]) -> int:
    from dreampose_rt.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_build_engine(export_model_dir, tmp_path):
    out = tmp_path / "cli"
    assert _cli(["build-engine", "--model", str(export_model_dir), "--out", str(out), "--max-frames", "1",
                 "--networks", "vae_decoder", "--vae-output", "uint8"]) == 0
    manifest = EngineManifest.load(out)
    assert manifest.networks["vae_decoder"].outputs == ["image_u8"]
    assert manifest.networks["vae_decoder"].check["passed"]
    assert set(manifest.versions) == {"dreampose_rt", "torch", "onnxruntime"}


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--model", "{missing}"], "not found"),
        (["--model", "{empty}"], "not a DreamPose model folder"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--backend", "openvino"], "invalid choice: 'openvino'"),
        (["--max-frames", "0"], "max-frames"),
    ],
)
def test_cli_fails_cleanly(export_model_dir, tmp_path, extra, match):
    (tmp_path / "empty").mkdir()
    argv = ["build-engine", "--model", str(export_model_dir), "--out", str(tmp_path / "o")]
    argv += [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in extra]
    with pytest.raises(DreamPoseError, match=match):
        _cli(argv)
    assert not EngineManifest.exists(tmp_path / "o")


def test_cli_tensorrt_missing_is_a_clean_error(export_model_dir, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the missing-TensorRT error cannot happen")
    with pytest.raises(DreamPoseError, match="TensorRT"):
        _cli(["build-engine", "--model", str(export_model_dir), "--out", str(tmp_path / "o"), "--backend", "tensorrt"])
    assert not (tmp_path / "o").exists()  # failed before exporting anything
