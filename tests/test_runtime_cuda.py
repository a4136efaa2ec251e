"""The Runtime on a CUDA GPU: every loop the runtime has there renders the reference pipeline's frames.

On CUDA the runtime takes paths that a CPU machine never runs: the fused Triton guidance + update
(``data_plane='triton'``), one CUDA graph replayed for every step (UNet + update, the timestep read from
the sampler's device counter), graphs recaptured when the frame batch changes shape, and fp16 networks.
The reference is the fp32 pipeline on the CPU. These tests skip, with the reason, without a GPU.
"""

import numpy as np
import pytest
import torch

from dreampose_rt.runtime import Runtime

pytestmark = pytest.mark.gpu

STEPS = 4  # renders not compared with the reference (those use reference.steps)
# fp32 with TF32 off (below): the GPU's convolutions and matmuls agree with the CPU's to ~1e-6 relative,
# so after decoding a pixel moves across a uint8 rounding boundary now and then, as in test_runtime.py.
MAX_LEVELS = 2
MAX_MEAN = 0.05


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a.astype(int) - b.astype(int))
    return int(d.max()), float(d.mean())


def _close(a: np.ndarray, b: np.ndarray) -> None:
    top, mean = _diff(a, b)
    assert top <= MAX_LEVELS and mean <= MAX_MEAN, f"max {top} mean {mean:.4f}"


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) would differ from the fp32 CPU reference by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cuda_rt(tiny_model_dir):
    return Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cuda", precision="fp32")


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpmpp"])
def test_graph_loop_matches_the_reference(cuda_rt, reference, subject_image, pose_seq, scheduler):
    """The default CUDA path: the Triton data plane with every step replayed from one CUDA graph."""
    assert cuda_rt.data_plane() == "triton" and cuda_rt._use_cuda_graph()
    out = cuda_rt.render(pose_seq[:3], image=subject_image, steps=reference.steps,
                         scheduler=scheduler, noise="per-frame")
    _close(out, reference[scheduler])


def test_graphs_are_recaptured_for_each_batch_shape(cuda_rt, reference, subject_image, pose_seq):
    """Batches of 2 then 1 frames: two captures of two shapes, and a render after that one reuses nothing stale."""
    kw = dict(image=subject_image, steps=reference.steps, scheduler="pndm", noise="per-frame", frames_per_batch=2)
    out = cuda_rt.render(pose_seq[:3], **kw)
    _close(out, reference["pndm"])
    again = cuda_rt.render(pose_seq[:3], **kw)
    assert np.array_equal(out, again)


def test_eager_triton_loop_matches_the_graph_loop(tiny_model_dir, cuda_rt, reference, subject_image, pose_seq):
    """Without graphs (a phase timer attached, or cuda_graph off) the same kernels run step by step."""
    rt = Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cuda", precision="fp32")
    rt.cuda_graph = False
    assert rt.data_plane() == "triton" and not rt._use_cuda_graph()
    eager = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, scheduler="dpmpp", noise="per-frame")
    graph = cuda_rt.render(pose_seq[:3], image=subject_image, steps=reference.steps,
                           scheduler="dpmpp", noise="per-frame")
    _close(eager, reference["dpmpp"])
    top, _ = _diff(eager, graph)
    assert top <= 1, f"graph replay and eager steps differ by {top} levels"


def test_channels_last_on_cuda_matches_the_reference(tiny_model_dir, reference, subject_image, pose_seq):
    """channels_last UNet (cuDNN NHWC convolutions) inside the captured graph loop."""
    rt = Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cuda", precision="fp32", channels_last=True)
    assert rt._use_cuda_graph() and "channels_last" in rt.backend.describe()
    conv = rt.model.unet.conv_in.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, scheduler="pndm", noise="per-frame")
    _close(out, reference["pndm"])


def test_scheduler_data_plane_on_cuda_matches_the_reference(tiny_model_dir, reference, subject_image, pose_seq):
    """data_plane='scheduler': the scheduler's table-driven PyTorch step on device tensors."""
    rt = Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cuda", precision="fp32",
                                 data_plane="scheduler")
    out = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, scheduler="pndm", noise="per-frame")
    _close(out, reference["pndm"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_render_stays_near_fp32(tiny_model_dir, reference, subject_image, pose_seq, precision):
    """fp16 / bf16 networks (the CUDA default is fp16): finite, and near the fp32 frames. The bound is
    loose on purpose (half precision through a random model's 4 steps and the VAE); a swapped branch, a
    wrong scale or an unwritten output lands tens of levels away."""
    rt = Runtime.from_pretrained(tiny_model_dir, backend="torch", device="cuda", precision=precision)
    out = rt.render(pose_seq[:3], image=subject_image, steps=reference.steps, scheduler="pndm", noise="per-frame")
    top, mean = _diff(out, reference["pndm"])
    limit = 3.0 if precision == "fp16" else 6.0
    assert mean <= limit, f"{precision}: mean {mean:.3f} levels from fp32 (max {top})"


def test_repeated_graph_renders_do_not_grow_memory(cuda_rt, subject_image, pose_seq):
    """A render's graphs and their memory pools go away with it, and nothing per render stays behind.
    (Seen on an H100: +35 MB per render while each render warmed up on a new stream, for which PyTorch
    keeps a cuBLAS workspace.)"""
    cuda_rt.render(pose_seq[:2], image=subject_image, steps=STEPS, scheduler="pndm")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        cuda_rt.render(pose_seq[:2], image=subject_image, steps=STEPS, scheduler="pndm")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 << 20


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp"])
def test_caching_graphs_match_the_reference_pipeline(tiny_model, cuda_rt, subject_image, pose_seq, scheduler):
    """Guidance and deep-feature caching on CUDA: up to four kinds of step (3F or F samples, whole or
    shallow UNet), each a graph, all from one memory pool, replayed in the plan's order; the frames are
    the CPU reference pipeline's with the same caching, and caching did change them."""
    from dreampose.pipeline import DreamPosePipeline
    from dreampose.settings import FeatureCache, GuidanceCache, SamplingSettings

    s = SamplingSettings(scheduler=scheduler, steps=8, noise="per-frame",
                         guidance_cache=GuidanceCache(every=3, first=2), feature_cache=FeatureCache(every=2))
    assert len(set(s.call_plan(8))) >= 3
    ref = DreamPosePipeline(tiny_model)(subject_image, pose_seq[:3], settings=s, frames_per_batch=3, progress=False)
    exact = DreamPosePipeline(tiny_model)(subject_image, pose_seq[:3], settings=s.replace(
        guidance_cache=GuidanceCache(), feature_cache=FeatureCache()), frames_per_batch=3, progress=False)
    assert not np.array_equal(ref, exact)
    assert cuda_rt._use_cuda_graph()
    _close(cuda_rt.render(pose_seq[:3], subject_image, settings=s, frames_per_batch=3), ref)
