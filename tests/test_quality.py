"""Fewer UNet evaluations per frame: the caching policies, the quality presets, and that every path (the
reference pipeline, the runtime's C++ data plane, the ONNX Runtime backend) renders them alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreampose.flops import unet_work
from dreampose.pipeline import DreamPosePipeline
from dreampose.settings import QUALITY_PRESETS, FeatureCache, GuidanceCache, SamplingSettings, call_plan
from dreampose.utils import DreamPoseError

STEPS = 6  # PNDM: 7 UNet calls


def _close(a: np.ndarray, b: np.ndarray, max_levels: int = 2, max_mean: float = 0.05) -> None:
    d = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape and d.max() <= max_levels and d.mean() <= max_mean, (d.max(), d.mean())


# --------------------------------------------------------------------------------------------------
# Policies and presets
# --------------------------------------------------------------------------------------------------
def test_guidance_refresh_plans():
    assert GuidanceCache().refresh(5) == [True] * 5 and not GuidanceCache().enabled
    assert GuidanceCache(every=3, first=1).refresh(7) == [True, False, False, True, False, False, True]
    assert GuidanceCache(every=3, first=2).refresh(7) == [True, True, False, True, False, False, True]
    assert GuidanceCache(every=1, until=0.5).refresh(6) == [True, True, True, False, False, False]
    for bad in (dict(every=0), dict(first=0), dict(until=0.0), dict(until=1.5), dict(every=2.5)):
        with pytest.raises(DreamPoseError, match="guidance_cache"):
            GuidanceCache(**bad)


def test_call_plans_keep_the_deep_features_complete():
    """Call 0 is a full refresh; a shallow refresh only follows a full refresh (its deep features exist for
    all three branches); without caching every call is a full refresh."""
    assert call_plan(GuidanceCache(), FeatureCache(), 4) == [(True, True)] * 4
    for g, f in ((GuidanceCache(every=3), FeatureCache(every=2)), (GuidanceCache(every=2, first=3), FeatureCache(every=3)),
                 (GuidanceCache(every=1, until=0.4), FeatureCache(every=2))):
        plan = call_plan(g, f, 30)
        assert plan[0] == (True, True)
        last_full_refresh = True
        for refresh, full in plan:
            if refresh and not full:
                assert last_full_refresh
            if full:
                last_full_refresh = refresh
        assert [r for r, _ in plan] == g.refresh(30)
        assert all(full for (_, full), wanted in zip(plan, f.full(30)) if wanted)


def test_presets_resolve_and_overrides_are_named_custom(tiny_model):
    c = tiny_model.config
    exact = SamplingSettings.for_model(c, quality="exact")
    assert exact == SamplingSettings.for_model(c) and exact.quality == "exact" and not exact.caching
    assert (exact.scheduler, exact.steps) == ("pndm", c.num_inference_steps)
    for name, preset in QUALITY_PRESETS.items():
        s = SamplingSettings.for_model(c, quality=name)
        assert s.quality == name and all(getattr(s, k) == v for k, v in preset.items())
    fast = SamplingSettings.for_model(c, quality="fast", steps=QUALITY_PRESETS["fast"]["steps"] + 3)
    assert fast.quality == "custom" and fast.guidance_cache == QUALITY_PRESETS["fast"]["guidance_cache"]
    assert SamplingSettings.for_model(c, quality="fast", seed=4).quality == "fast"  # not a preset's value
    assert SamplingSettings.from_dict(json.loads(json.dumps(fast.to_dict()))) == fast
    with pytest.raises(DreamPoseError, match="unknown quality 'turbo'"):
        SamplingSettings.for_model(c, quality="turbo")


def test_the_presets_meet_their_work_targets_on_the_sd15_model():
    """UNet work per frame as a fraction of the exact run, in FLOPs counted on the SD 1.5-size UNet: balanced
    at most 0.45, fast at most 0.08 (the issue's targets; docs/quality.md has the measured quality)."""
    from dreampose.model import DreamPoseModel

    sd15 = DreamPoseModel.sd15_random()
    exact = unet_work(sd15, SamplingSettings.for_model(sd15.config, quality="exact"))
    assert exact["samples"] == 303 and exact["fraction_of_exact"]["flops"] == 1.0
    balanced = unet_work(sd15, SamplingSettings.for_model(sd15.config, quality="balanced"))
    fast = unet_work(sd15, SamplingSettings.for_model(sd15.config, quality="fast"))
    assert balanced["fraction_of_exact"]["flops"] <= 0.45
    assert fast["fraction_of_exact"]["flops"] <= 0.08


# --------------------------------------------------------------------------------------------------
# The reference pipeline and the runtime
# --------------------------------------------------------------------------------------------------
REFRESH_ALWAYS = GuidanceCache(every=2, first=100)  # caching machinery on, every call a refresh


@pytest.fixture(scope="module")
def cpu_rt(tiny_model_dir):
    from dreampose_rt.runtime import Runtime

    return Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cpu")


def test_a_refresh_on_every_step_is_the_exact_run(tiny_model, cpu_rt, subject_image, pose_seq):
    exact = SamplingSettings(steps=STEPS, noise="per-frame")
    cached = exact.replace(guidance_cache=REFRESH_ALWAYS)
    assert cached.guidance_cache.enabled
    pipe = DreamPosePipeline(tiny_model)
    assert np.array_equal(pipe(subject_image, pose_seq[:3], settings=exact, progress=False),
                          pipe(subject_image, pose_seq[:3], settings=cached, progress=False))
    assert np.array_equal(cpu_rt.render(pose_seq[:3], subject_image, settings=exact, frames_per_batch=3),
                          cpu_rt.render(pose_seq[:3], subject_image, settings=cached, frames_per_batch=3))


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpmpp"])
@pytest.mark.parametrize("caching", ["guidance", "features", "both"])
def test_the_runtime_renders_caching_like_the_reference(tiny_model, cpu_rt, subject_image, pose_seq, scheduler, caching):
    g = GuidanceCache(every=3, first=2) if caching != "features" else GuidanceCache()
    f = FeatureCache(every=2) if caching != "guidance" else FeatureCache()
    s = SamplingSettings(scheduler=scheduler, steps=STEPS, noise="per-frame", guidance_cache=g, feature_cache=f)
    ref = DreamPosePipeline(tiny_model)(subject_image, pose_seq[:3], settings=s, frames_per_batch=3, progress=False)
    exact = DreamPosePipeline(tiny_model)(subject_image, pose_seq[:3], settings=s.replace(
        guidance_cache=GuidanceCache(), feature_cache=FeatureCache()), frames_per_batch=3, progress=False)
    assert not np.array_equal(ref, exact)  # caching changed the frames: the comparison below means something
    _close(cpu_rt.render(pose_seq[:3], subject_image, settings=s, frames_per_batch=3), ref)
    _close(cpu_rt.render(pose_seq[:3], subject_image, settings=s, frames_per_batch=1), ref)  # F = 1 batches


def test_presets_are_stable_across_runs_and_resumes(tmp_path, cpu_rt, subject_image, pose_seq):
    import dreampose_rt.animate as animate
    from dreampose.video import frame_name, read_png

    for quality in ("balanced", "fast"):
        s = SamplingSettings.for_model(cpu_rt.config, quality=quality, noise="per-frame")
        if s.steps > 20:
            s = s.replace(steps=20, quality=quality)  # the preset's caching, fewer steps for the test's time
        once = cpu_rt.render(pose_seq[:3], subject_image, settings=s)
        assert np.array_equal(once, cpu_rt.render(pose_seq[:3], subject_image, settings=s))
        out = tmp_path / quality
        real = animate.write_png

        def interrupt_after_one(frame, path):
            real(frame, path)
            raise KeyboardInterrupt

        animate.write_png = interrupt_after_one
        try:
            with pytest.raises(KeyboardInterrupt):
                animate.render_to_file(cpu_rt, out, pose_seq[:3], subject_image, s, progress=False)
        finally:
            animate.write_png = real
        other = s.replace(quality="exact", guidance_cache=GuidanceCache(), feature_cache=FeatureCache())
        with pytest.raises(DreamPoseError, match="holds frames of another render"):  # never mixes presets
            animate.render_to_file(cpu_rt, out, pose_seq[:3], subject_image, other, progress=False)
        report = animate.render_to_file(cpu_rt, out, pose_seq[:3], subject_image, s, progress=False)
        assert report.resumed == 1 and report.rendered == 2
        assert all(np.array_equal(read_png(out / frame_name(i)), once[i]) for i in range(3))


def test_backends_say_which_caching_they_run():
    from dreampose_rt.backends import TensorRTBackend

    deep = SamplingSettings(feature_cache=FeatureCache(every=2), quality="custom")
    guide = SamplingSettings(guidance_cache=GuidanceCache(every=2), quality="custom")
    rt_stub = object.__new__(TensorRTBackend)
    assert not rt_stub.caching_availability(guide) and "profile starts at three" in rt_stub.caching_availability(guide).reason
    assert not rt_stub.caching_availability(deep)


def test_onnxruntime_engines_run_guidance_caching_but_refuse_deep_features(tmp_path, tiny_model_dir, ort_engines,
                                                                          cpu_rt, subject_image, pose_seq):
    from dreampose_rt.runtime import Runtime

    rt = Runtime.from_pretrained(tiny_model_dir, backend="onnxruntime", engines=ort_engines)
    s = SamplingSettings(steps=STEPS, noise="per-frame", guidance_cache=GuidanceCache(every=3, first=2))
    _close(rt.render(pose_seq[:3], subject_image, settings=s, frames_per_batch=3),
           cpu_rt.render(pose_seq[:3], subject_image, settings=s, frames_per_batch=3))
    with pytest.raises(DreamPoseError, match="cannot render --quality custom: deep-feature caching needs"):
        rt.render(pose_seq[:2], subject_image, settings=s.replace(feature_cache=FeatureCache(every=2)))
    import dreampose_rt.animate as animate

    out = tmp_path / "o.gif"  # refused before anything is written: no work folder, no lock
    with pytest.raises(DreamPoseError, match="deep-feature caching needs"):
        animate.render_to_file(rt, out, pose_seq[:2], subject_image, s.replace(feature_cache=FeatureCache(every=2)),
                               progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
def test_animate_and_evaluate_take_a_quality(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from dreampose_rt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["animate", "--quality", "fast", "--frames", "0:2", "--out", "f.gif", "--quiet"]) == 0
    assert main(["animate", "--fast", "--quality", "exact", "--out", "x.gif", "--quiet"]) == 2
    assert "--fast is --quality fast" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_model_dir), "--out", "e", "--videos", "1", "--frames", "8",
                 "--max-targets", "2", "--quality", "fast", "--compare-to", "exact", "--steps", "3", "--quiet"]) == 0
    data = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert data["sampling"]["quality"] == "custom" and data["sampling"]["guidance_cache"]["every"] > 1
    cmp = data["comparison"]
    assert cmp["reference"]["quality"] == "exact" and cmp["reference"]["steps"] == 100
    assert 0 < cmp["psnr_to_reference"] < 99 and 0 < cmp["ssim_to_reference"] <= 1
    assert set(cmp["temporal_change"]) == {"candidate", "reference", "ratio"}
    assert "Against the reference (exact: pndm 100 steps)" in (tmp_path / "e" / "metrics.md").read_text()


def test_the_compiled_backend_runs_deep_feature_caching(tiny_model_dir, cpu_rt, subject_image, pose_seq):
    """torch.compile of the two halves of deep-feature caching (dreampose.deep_cache.unet_full / unet_shallow)
    renders what the eager torch backend renders."""
    from dreampose_rt.runtime import Runtime

    rt = Runtime.from_pretrained(tiny_model_dir, backend="compiled", device="cpu")
    s = SamplingSettings(steps=3, noise="per-frame", feature_cache=FeatureCache(every=2),
                         guidance_cache=GuidanceCache(every=2))
    _close(rt.render(pose_seq[:2], subject_image, settings=s, frames_per_batch=2),
           cpu_rt.render(pose_seq[:2], subject_image, settings=s, frames_per_batch=2))


def test_the_pipeline_refuses_deep_features_where_the_unet_cannot_be_split(tiny_model, subject_image, pose_seq,
                                                                            monkeypatch):
    import dreampose.pipeline as pipeline

    monkeypatch.setattr(pipeline, "supports", lambda unet: "the UNet has no up_blocks (not diffusers' layout)")
    pipe = DreamPosePipeline(tiny_model)
    with pytest.raises(DreamPoseError, match="feature_cache: the UNet has no up_blocks"):
        pipe(subject_image, pose_seq[:1], settings=SamplingSettings(steps=2, feature_cache=FeatureCache(every=2)),
             progress=False)
    pipe(subject_image, pose_seq[:1], settings=SamplingSettings(steps=2), progress=False)  # no caching: renders
