"""The Runtime: every backend available here renders the reference pipeline's frames (fp32)."""

import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dreampose.settings import SamplingSettings
from dreampose.utils import DreamPoseError
from dreampose_rt.backends import availability_report
from dreampose_rt.runtime import Runtime

STEPS = 4

# Tolerance, fp32: the runtime's C++ scheduler agrees with diffusers' to ~1e-6 relative and engine or
# compiled kernels with eager PyTorch to ~1e-5; after VAE decoding that moves a pixel across a uint8
# rounding boundary now and then. So: at most 2 levels of 255 anywhere, and almost everywhere equal.
MAX_LEVELS = 2
MAX_MEAN = 0.05


def _close(a, b):
    d = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape
    assert d.max() <= MAX_LEVELS and d.mean() <= MAX_MEAN, f"max {d.max()} mean {d.mean():.4f}"


@pytest.fixture(scope="module")
def torch_rt(tiny_model_dir):
    return Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cpu")


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpmpp"])
def test_torch_backend_matches_the_reference(torch_rt, reference, subject_image, pose_seq, scheduler):
    out = torch_rt.render(pose_seq[:3], image=subject_image, steps=reference.steps,
                          scheduler=scheduler, noise="per-frame")
    _close(out, reference[scheduler])


def test_channels_last_torch_backend_matches_the_reference(tiny_model_dir, reference, subject_image, pose_seq):
    rt = Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cpu", channels_last=True)
    assert "channels_last" in rt.backend.describe()
    conv = rt.model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, scheduler="pndm", noise="per-frame")
    _close(out, reference["pndm"])


def test_onnxruntime_backend_matches_the_reference(tiny_model_dir, ort_engines, reference, subject_image, pose_seq):
    rt = Runtime.from_pretrained(tiny_model_dir, backend="onnxruntime", engines=ort_engines)
    assert rt.backend.name == "onnxruntime" and rt.dtype == torch.float32
    out = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, noise="per-frame", frames_per_batch=1)
    _close(out, reference["pndm"])
    # auto picks the engines when they are given
    assert Runtime.from_pretrained(tiny_model_dir, engines=ort_engines).backend.name == "onnxruntime"


def test_engines_of_another_model_are_refused(tmp_path, tiny_model, ort_engines):
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.unet.conv_out.bias.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DreamPoseError, match="rebuild"):
        Runtime.from_pretrained(tmp_path / "other", backend="onnxruntime", engines=ort_engines)
    from dreampose.model import DreamPoseModel

    DreamPoseModel.tiny(seed=0, height=96, width=72).save_pretrained(tmp_path / "big")
    with pytest.raises(DreamPoseError, match="built for 64 x 48"):
        Runtime.from_pretrained(tmp_path / "big", backend="onnxruntime", engines=ort_engines)
    with pytest.raises(DreamPoseError, match="not an engine folder"):
        Runtime.from_pretrained(tmp_path / "other", backend="onnxruntime", engines=tmp_path)


@pytest.mark.slow
def test_compiled_backend_matches_the_reference(tiny_model_dir, reference, subject_image, pose_seq):
    """torch.compile on the CPU (inductor's C++ backend): tens of seconds to compile on 2 cores."""
    rt = Runtime.from_pretrained(tiny_model_dir, backend="compiled", device="cpu")
    out = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, noise="per-frame")
    _close(out, reference["pndm"])


def test_unavailable_and_unknown_backends_say_why(tiny_model_dir):
    report = availability_report(torch.device("cpu"), "fp32")
    assert report["torch"][0].ok and not report["tensorrt"][0].ok and report["tensorrt"][0].reason
    # the compiled backend runs on the CPU when asked for, but auto does not take it there; info says the same
    assert report["compiled"][0].ok and not report["compiled"][1].ok and "auto does not pick" in report["compiled"][1].reason
    from dreampose_rt import info

    rows = dict(dict(info.collect())["runtime backends on cpu (fp32)"]) if not torch.cuda.is_available() else None
    if rows is not None:
        assert rows["compiled"].startswith("available when asked for by name; auto does not pick")
        assert rows["auto picks"].startswith("torch")
    with pytest.raises(DreamPoseError, match="backend 'tensorrt' is not available: .*tensorrt"):
        Runtime.from_pretrained(tiny_model_dir, backend="tensorrt", device="cpu")
    with pytest.raises(DreamPoseError, match="unknown backend 'fast'"):
        Runtime.from_pretrained(tiny_model_dir, backend="fast")
    with pytest.raises(DreamPoseError, match="needs an engine folder"):
        Runtime.from_pretrained(tiny_model_dir, backend="onnxruntime")
    with pytest.raises(DreamPoseError, match="fp16 needs a CUDA device"):
        Runtime.from_pretrained(tiny_model_dir, precision="fp16", device="cpu")


def test_stream_render_and_the_conditioning_cache(torch_rt, subject_image, pose_seq, monkeypatch):
    calls = []
    encode = torch_rt.backend.encode_subject
    monkeypatch.setattr(torch_rt.backend, "encode_subject", lambda p: (calls.append(1), encode(p))[1])
    torch_rt._cache.clear()
    streamed = list(torch_rt.stream(pose_seq[:3], image=subject_image, steps=2, frames=[2, 0]))
    assert [i for i, _ in streamed] == [2, 0]
    rendered = torch_rt.render(pose_seq[:3], image=subject_image, steps=2, frames=[2, 0])
    assert np.array_equal(rendered, np.stack([f for _, f in streamed]))
    assert len(calls) == 1  # the subject was encoded once for both renders
    assert torch_rt.auto_frames_per_batch() == 1  # CPU


def test_frame_batching_in_the_runtime(torch_rt, subject_image, pose_seq):
    one = torch_rt.render(pose_seq[:4], image=subject_image, steps=STEPS, frames_per_batch=1)
    four = torch_rt.render(pose_seq[:4], image=subject_image, steps=STEPS, frames_per_batch=4)
    _close(one, four)


def test_demo_runtime_needs_no_image():
    rt = Runtime.from_pretrained(backend="torch")
    from dreampose_rt.demo import demo_poses

    out = rt.render(demo_poses(2, rt.config.height, rt.config.width), steps=1)
    assert out.shape == (2, rt.config.height, rt.config.width, 3)


def test_bad_render_arguments(torch_rt, subject_image, pose_seq):
    with pytest.raises(DreamPoseError, match="image is required"):
        torch_rt.render(pose_seq, steps=1)
    with pytest.raises(DreamPoseError, match="out of range"):
        torch_rt.render(pose_seq, image=subject_image, steps=1, frames=[99])
    with pytest.raises(DreamPoseError, match="unknown scheduler"):
        torch_rt.render(pose_seq, image=subject_image, scheduler="lms")


def test_a_killed_render_resumes_to_the_same_bytes(tmp_path, tiny_model_dir, subject_image, pose_seq):
    """Kill `dreampose-rt animate` midway, run it again: the video equals an uninterrupted run's."""
    from PIL import Image

    Image.fromarray(subject_image).save(tmp_path / "s.png")
    poses = np.concatenate([pose_seq] * 4)  # 24 frames: far more than can finish between two polls
    np.save(tmp_path / "p.npy", poses)
    cmd = [sys.executable, "-m", "dreampose_rt.cli", "animate", "--image", str(tmp_path / "s.png"),
           "--poses", str(tmp_path / "p.npy"), "--model", str(tiny_model_dir), "--steps", "8", "--quiet",
           "--noise", "per-frame", "--device", "cpu"]
    out = tmp_path / "resumed.mp4"
    work = tmp_path / "resumed.mp4.work"
    proc = subprocess.Popen(cmd + ["--out", str(out)], start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(work.glob("frame_*.png"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(work.glob("frame_*.png")))
    assert 2 <= done_before < len(poses), "the render must be killed midway for this test to mean anything"
    assert not out.exists()
    assert subprocess.run(cmd + ["--out", str(out)]).returncode == 0
    assert not work.exists()
    fresh = tmp_path / "fresh.mp4"
    assert subprocess.run(cmd + ["--out", str(fresh)]).returncode == 0
    assert out.read_bytes() == fresh.read_bytes()


def test_a_work_folder_of_another_render_is_kept_unless_restart(tmp_path, torch_rt, subject_image, pose_seq):
    from dreampose.video import frame_name, read_png, write_png
    from dreampose_rt.animate import render_to_file, work_folder

    out = tmp_path / "pngs"
    work = work_folder(out)
    work.mkdir()
    (work / "settings.json").write_text('{"seed": 99}')
    write_png(np.zeros((64, 48, 3), np.uint8), work / frame_name(0))  # a frame of another render
    with pytest.raises(DreamPoseError, match=r"holds frames of another render \(.*seed.*\).*--restart"):
        render_to_file(torch_rt, out, pose_seq[:2], subject_image, SamplingSettings.for_model(torch_rt.config, steps=2),
                       progress=False)
    assert (work / frame_name(0)).is_file()  # nothing was thrown away
    report = render_to_file(torch_rt, out, pose_seq[:2], subject_image, SamplingSettings.for_model(torch_rt.config, steps=2),
                            progress=False, restart=True)
    assert report.rendered == 2 and report.resumed == 0 and not work.exists()
    expected = torch_rt.render(pose_seq[:2], image=subject_image, steps=2)
    assert np.array_equal(read_png(out / frame_name(0)), expected[0])


def test_defaults_and_explicit_values_are_the_same_render(tmp_path, torch_rt, subject_image, pose_seq):
    """Resuming with --s-image 8 after a run that used the default 8 resumes; it is the same render."""
    import dreampose_rt.animate as animate
    from dreampose.video import frame_name
    from dreampose_rt.animate import render_to_file, work_folder

    out = tmp_path / "o.gif"
    with pytest.raises(KeyboardInterrupt):  # interrupt the first render after its first frame
        real = animate.write_png

        def interrupt_after_one(frame, path):
            real(frame, path)
            raise KeyboardInterrupt

        animate.write_png = interrupt_after_one
        try:
            render_to_file(torch_rt, out, pose_seq[:3], subject_image, SamplingSettings.for_model(torch_rt.config, steps=2),
                           progress=False)
        finally:
            animate.write_png = real
    assert (work_folder(out) / frame_name(0)).is_file()
    c = torch_rt.config
    explicit = SamplingSettings(scheduler="pndm", steps=2, s_image=c.s_image, s_pose=c.s_pose, seed=0, noise="shared")
    report = render_to_file(torch_rt, out, pose_seq[:3], subject_image, explicit, progress=False)
    assert report.resumed == 1 and report.rendered == 2


def test_two_renders_of_one_output_exclude_each_other(tmp_path):
    from dreampose_rt.animate import _exclusive

    out = tmp_path / "o.mp4"
    with _exclusive(out):
        with pytest.raises(DreamPoseError, match="another render is writing"):
            with _exclusive(out):
                pass
    with _exclusive(out):  # released
        pass
    assert not (tmp_path / "o.mp4.lock").exists()


def test_the_lock_file_is_never_a_users_file(tmp_path):
    """A file at <OUT>.lock the project did not write is refused and kept; a lock a killed render left is
    taken over."""
    from dreampose_rt.animate import _LOCK_TAG, _exclusive

    users = tmp_path / "Pipfile.lock"
    users.write_text("{}")
    with pytest.raises(DreamPoseError, match="Pipfile.lock exists and was not written by dreampose-rt"):
        with _exclusive(tmp_path / "Pipfile"):
            pass
    assert users.read_text() == "{}"
    leftover = tmp_path / "o.mp4.lock"
    leftover.write_text(f"{_LOCK_TAG}\npid 1\n")
    with _exclusive(tmp_path / "o.mp4"):
        assert leftover.exists()
    assert not leftover.exists()
