"""The fused guidance + scheduler-step Triton kernel against its PyTorch reference and diffusers.

On a machine without CUDA the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py before triton is imported); on a CUDA machine the same tests run the compiled kernel on the
GPU (marker ``gpu``) and the CPU cases skip.
Sizes are tiny on purpose: the interpreter costs per program and per element.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import diffusers
import pytest
import torch

from dreampose.guidance import combine_guidance, guidance_differences
from dreampose_rt.kernels import guided_step, guided_step_ref, kernel_availability
from dreampose_rt.fused_sampler import FusedSampler
from dreampose_rt.kernels import fused_step
from dreampose_rt.scheduler import StepState, TableInfo, create_scheduler
from dreampose_rt.scheduler.table import (
    NUM_COLUMNS,
    OH0,
    OM,
    OS,
    OX,
    QM,
    WRITE_SLOT,
)

#: the CPU cases launch the kernel through Triton's interpreter, which conftest.py turns on only where
#: there is no CUDA (on a GPU machine the cuda cases run the compiled kernel instead)
needs_interpreter = pytest.mark.skipif(
    not fused_step._interpreting(),
    reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1), off on a CUDA machine: the cuda cases "
    "run the compiled kernel",
)
DEVICES = [pytest.param("cpu", id="cpu", marks=needs_interpreter),
           pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# name -> (scheduler, options, inference steps): every buffer combination of the table
CASES = {
    "pndm-prk": ("pndm", {}, 4),  # Runge-Kutta warm-up: 3 history slots, saved sample, accumulator
    "pndm-plms": ("pndm", dict(SD, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True), 6),
    "ddim": ("ddim", SD, 4),  # no state at all
    "dpmpp": ("dpmpp", SD, 5),  # one history slot
}


def check_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|got - want| <= tol * (|want| + max|want|): relative per element, with a floor for values near 0."""
    g, w = got.detach().float().cpu(), want.detach().float().cpu()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    diff = (g - w).abs()
    tol = TOL[dtype]
    scale = w.abs().max().clamp_min(1e-6)
    print(f"{what} [{dtype}]: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, "
          f"max |want| {scale.item():.3e}, tol {tol:.0e}")  # fmt: skip
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    assert bool((diff <= tol * (w.abs() + scale)).all()), f"{what}: outside the {dtype} tolerance"


def plan(case: str, device: str) -> torch.Tensor:
    name, opts, n = CASES[case]
    s = create_scheduler(name, opts)
    s.set_timesteps(n)
    return s.coefficient_table().to(device)


def nan_state(info: TableInfo, shape, device, memory_format=torch.contiguous_format) -> StepState:
    """Buffers filled with NaN: reading any element before the table wrote it poisons the result."""
    kw = dict(dtype=torch.float32, device=device, memory_format=memory_format)
    f, c, h, w = shape
    slots = info.num_history_slots
    st = StepState(
        history=torch.empty((slots * f, c, h, w), **kw).view(slots, f, c, h, w) if slots else None,
        saved_sample=torch.empty(shape, **kw) if info.uses_saved_sample else None,
        accumulator=torch.empty(shape, **kw) if info.uses_accumulator else None,
    )
    for buf in (st.history, st.saved_sample, st.accumulator):
        if buf is not None:
            buf.fill_(float("nan"))
    return st


def clone_state(st: StepState) -> StepState:
    return StepState(*(b.clone() if b is not None else None for b in (st.history, st.saved_sample, st.accumulator)))


def check_state(got: StepState, want: StepState, dtype: torch.dtype, what: str) -> None:
    for name in ("history", "saved_sample", "accumulator"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None)
        if a is not None:
            written = ~torch.isnan(b)  # slots the run has not written yet stay NaN in both
            assert torch.equal(written, ~torch.isnan(a)), f"{what}: {name} written in different places"
            check_close(a[written], b[written], dtype, f"{what} {name}")


def run_both(table, x, outs, scale_image, scale_pose, info, memory_format=torch.contiguous_format, inplace=False):
    """Every step of the table through the kernel and the reference; compares out and the state."""
    dtype = x.dtype
    st_k = nan_state(info, x.shape, x.device, memory_format)
    st_r = clone_state(st_k)
    xk, xr = x.clone(memory_format=memory_format), x.clone()
    for k in range(table.shape[0]):
        e = outs[k]
        want = guided_step_ref(e, xr, table, k, scale_image, scale_pose, st_r)
        got = guided_step(e.contiguous(memory_format=memory_format), xk, table, k, scale_image, scale_pose, st_k,
                          out=xk if inplace else None)  # fmt: skip
        if inplace:
            assert got.data_ptr() == xk.data_ptr()
        check_close(got, want, dtype, f"step {k} out")
        check_state(st_k, st_r, dtype, f"step {k}")
        xk, xr = got, want
    return xk, xr


def random_inputs(shape, steps, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    outs = [torch.randn((3 * shape[0],) + shape[1:], generator=g).to(device=device, dtype=dtype) for _ in range(steps)]
    return x, outs


# ------------------------------------------------------------------------------------------------
# Kernel vs reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [(5, 3), (7, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("frames", [1, 3, 7])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, dtype, frames, hw, device):
    table = plan(case, device)
    info = TableInfo.of(table)
    shape = (frames, 4) + hw
    x, outs = random_inputs(shape, table.shape[0], dtype, device)
    run_both(table, x, outs, 7.5, 2.0, info)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_several_blocks_per_frame_with_a_tail(dtype, device, monkeypatch):
    """60 elements per frame in blocks of 16: three full blocks and a tail of 12."""
    monkeypatch.setattr(fused_step, "_pick_block", lambda n, f, d: (16, 1))
    table = plan("pndm-prk", device)
    x, outs = random_inputs((2, 4, 5, 3), table.shape[0], dtype, device)
    run_both(table, x, outs, 5.0, 1.5, TableInfo.of(table))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["pndm-prk", "dpmpp"])
def test_channels_last(case, dtype, device):
    table = plan(case, device)
    x, outs = random_inputs((3, 4, 5, 3), table.shape[0], dtype, device, seed=1)
    got, want = run_both(table, x, outs, 7.5, 2.0, TableInfo.of(table), memory_format=torch.channels_last)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_and_strided_frames(device):
    """out=latents in place; latents and out as frame-strided views of a larger buffer."""
    table = plan("pndm-plms", device)
    x, outs = random_inputs((3, 4, 5, 3), table.shape[0], torch.float16, device, seed=2)
    run_both(table, x, outs, 7.5, 2.0, TableInfo.of(table), inplace=True)
    big = torch.zeros((6, 4, 5, 3), dtype=torch.float16, device=device)
    xs = big[::2]
    xs.copy_(x)
    st = nan_state(TableInfo.of(table), x.shape, device)
    st_r = clone_state(st)
    got = guided_step(outs[0], xs, table, 0, 7.5, 2.0, st, out=xs)
    want = guided_step_ref(outs[0], x, table, 0, 7.5, 2.0, st_r)
    check_close(got, want, torch.float16, "strided frames")
    assert torch.equal(big[1::2], torch.zeros_like(big[1::2])), "wrote between the frames"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_per_frame_scales(dtype, device):
    """(F,) scales: each frame uses its own pair (checked against combining frame by frame)."""
    table = plan("dpmpp", device)
    frames = 4
    x, outs = random_inputs((frames, 4, 3, 5), table.shape[0], dtype, device, seed=3)
    s_i = torch.tensor([1.0, 3.0, 7.5, 12.0], device=device)
    s_p = torch.tensor([0.0, 1.0, 2.0, 4.5], device=device)
    run_both(table, x, outs, s_i, s_p, TableInfo.of(table))
    # frame f of the result depends on (s_i[f], s_p[f]) only
    info = TableInfo.of(table)
    st = nan_state(info, x.shape, device)
    got = guided_step(outs[0], x, table, 0, s_i, s_p, st)
    for f in range(frames):
        e_f = outs[0].unflatten(0, (3, frames))[:, f]  # (3, C, H, W): the frame's three branches
        st_f = nan_state(info, (1,) + x.shape[1:], device)
        want = guided_step_ref(e_f, x[f : f + 1], table, 0, float(s_i[f]), float(s_p[f]), st_f)
        check_close(got[f : f + 1], want, dtype, f"frame {f}")
    # a 0-d and a (1,) tensor mean one pair for the batch, like floats
    for a, b in ((torch.tensor(7.5, device=device), torch.tensor(2.0, device=device)),
                 (torch.tensor([7.5], device=device), torch.tensor([2.0], device=device))):  # fmt: skip
        want = guided_step(outs[0], x, table, 0, 7.5, 2.0, nan_state(info, x.shape, device))
        got = guided_step(outs[0], x, table, 0, a, b, nan_state(info, x.shape, device))
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_step_index_from_device_memory(device):
    """A device step counter gives the same run as Python ints; past the end the output is NaN and
    the state is left alone."""
    table = plan("pndm-prk", device)
    info = TableInfo.of(table)
    x, outs = random_inputs((2, 4, 5, 3), table.shape[0], torch.float32, device, seed=4)
    st_a, st_b = nan_state(info, x.shape, device), nan_state(info, x.shape, device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    xa, xb = x.clone(), x.clone()
    for k in range(table.shape[0]):
        xa = guided_step(outs[k], xa, table, k, 7.5, 2.0, st_a)
        xb = guided_step(outs[k], xb, table, counter, 7.5, 2.0, st_b)
        counter += 1
        assert torch.equal(xa, xb)
    before = clone_state(st_b)
    past = guided_step(outs[0], xb, table, counter, 7.5, 2.0, st_b)
    assert torch.isnan(past).all()
    for name in ("history", "saved_sample", "accumulator"):
        assert torch.equal(getattr(st_b, name).nan_to_num(7.0), getattr(before, name).nan_to_num(7.0))
    counter.fill_(-1)
    assert torch.isnan(guided_step(outs[0], xb, table, counter, 7.5, 2.0, st_b)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_row_needing_a_missing_buffer_poisons_the_output(device):
    """The kernel cannot raise: a row reading S or a history slot it was not given writes NaN."""
    x, outs = random_inputs((1, 4, 3, 3), 1, torch.float32, device)
    for col, value in ((OS, 0.5), (OH0 + 1, 0.5), (WRITE_SLOT, 1.0)):
        row = torch.zeros(NUM_COLUMNS)
        row[OX], row[OM], row[QM], row[WRITE_SLOT] = 1.0, 0.5, 1.0, 0.0
        row[col] = value
        table = row[None].to(device)
        st = StepState(torch.zeros((1, 1, 4, 3, 3), device=device), None, None)  # one slot, no S, no A
        out = guided_step(outs[0], x, table, 0, 1.0, 1.0, st)
        assert torch.isnan(out).all(), f"column {col}"
        assert torch.equal(st.history, torch.zeros_like(st.history))


# ------------------------------------------------------------------------------------------------
# Guidance caching: refresh steps write d_I and d_P in the same pass, cached steps read them
# ------------------------------------------------------------------------------------------------
def run_both_cached(table, x, outs, scale_image, scale_pose, info, every=3, memory_format=torch.contiguous_format):
    """Every step of the table through the kernel and the reference with a guidance cache: a refresh (the
    three branches) on every ``every``-th step, e(I,P) alone (rows [F, 2F)) on the others. Compares out, the
    state and the cache (which the kernel and the reference compute alike in fp32: the same bits)."""
    dtype, f = x.dtype, x.shape[0]
    st_k = nan_state(info, x.shape, x.device, memory_format)
    st_r = clone_state(st_k)
    cache_k = torch.full((2 * f,) + tuple(x.shape[1:]), float("nan"), device=x.device)
    cache_k = cache_k.contiguous(memory_format=memory_format).view((2,) + tuple(x.shape))
    cache_r = torch.full((2,) + tuple(x.shape), float("nan"), device=x.device)
    xk, xr = x.clone(memory_format=memory_format), x.clone()
    for k in range(table.shape[0]):
        e = outs[k] if k % every == 0 else outs[k][f : 2 * f]
        want = guided_step_ref(e, xr, table, k, scale_image, scale_pose, st_r, guidance_cache=cache_r)
        got = guided_step(e.contiguous(memory_format=memory_format), xk, table, k, scale_image, scale_pose, st_k,
                          guidance_cache=cache_k)  # fmt: skip
        check_close(got, want, dtype, f"step {k} ({'refresh' if k % every == 0 else 'cached'}) out")
        check_state(st_k, st_r, dtype, f"step {k}")
        assert torch.equal(cache_k.cpu(), cache_r.cpu()), f"step {k}: the guidance cache differs"
        xk, xr = got, want
    return xk, xr, cache_k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", ["float", "per-frame"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cached_steps_match_reference(case, dtype, scales, device):
    table = plan(case, device)
    x, outs = random_inputs((2, 4, 5, 3), table.shape[0], dtype, device, seed=8)
    if scales == "float":
        s_i, s_p = 7.5, 2.0
    else:
        s_i, s_p = torch.tensor([7.5, 3.0], device=device), torch.tensor([2.0, 0.5], device=device)
    run_both_cached(table, x, outs, s_i, s_p, TableInfo.of(table))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cached_steps_channels_last_and_several_blocks(dtype, device, monkeypatch):
    """The cache in channels_last like the other buffers, 60 elements per frame in blocks of 16 (a tail)."""
    monkeypatch.setattr(fused_step, "_pick_block", lambda n, f, d: (16, 1))
    table = plan("pndm-prk", device)
    x, outs = random_inputs((2, 4, 5, 3), table.shape[0], dtype, device, seed=9)
    run_both_cached(table, x, outs, 5.0, 1.5, TableInfo.of(table), every=2, memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_refresh_writes_the_cache_and_steps_as_without_one(dtype, device):
    """A refresh gives the bits of a step without a cache and leaves guidance_differences of its input in
    the cache; the cache may be a frame-strided view (its halves and frames apart)."""
    table = plan("dpmpp", device)
    info = TableInfo.of(table)
    frames = 3
    x, outs = random_inputs((frames, 4, 5, 3), 2, dtype, device, seed=10)
    big = torch.zeros((2, 2 * frames, 4, 5, 3), device=device)
    cache = big[:, ::2]  # frames of the cache 2 rows apart
    st_a, st_b = nan_state(info, x.shape, device), nan_state(info, x.shape, device)
    for k in range(2):
        want = guided_step(outs[k], x, table, k, 7.5, 2.0, st_a)
        got = guided_step(outs[k], x, table, k, 7.5, 2.0, st_b, guidance_cache=cache)
        assert torch.equal(got, want)
        assert torch.equal(cache.cpu(), guidance_differences(outs[k], frames).cpu())
    assert torch.equal(big[:, 1::2], torch.zeros_like(big[:, 1::2])), "wrote between the frames"


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_outside_the_table_leaves_the_cache_alone(device):
    table = plan("ddim", device)
    info = TableInfo.of(table)
    x, outs = random_inputs((2, 4, 3, 3), 1, torch.float32, device, seed=11)
    cache = torch.full((2, 2, 4, 3, 3), 5.0, device=device)
    past = torch.full((1,), table.shape[0], dtype=torch.int32, device=device)
    assert torch.isnan(guided_step(outs[0], x, table, past, 7.5, 2.0, nan_state(info, x.shape, device),
                                   guidance_cache=cache)).all()  # fmt: skip
    assert torch.isnan(guided_step(outs[0][2:4], x, table, past, 7.5, 2.0, nan_state(info, x.shape, device),
                                   guidance_cache=cache)).all()  # fmt: skip
    assert torch.equal(cache, torch.full_like(cache, 5.0))


def test_reference_needs_the_cache_for_a_cached_step():
    table = plan("ddim", "cpu")
    x, outs = random_inputs((2, 4, 3, 3), 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"guidance_cache is required: unet_out has shape \(2, 4, 3, 3\)"):
        guided_step_ref(outs[0][2:4], x, table, 0, 7.5, 2.0, StepState(None, None, None))


# ------------------------------------------------------------------------------------------------
# The runtime's sampler, and the end-to-end check against diffusers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_25_step_dpmpp_loop_ends_where_diffusers_ends(dtype, device):
    """The kernel driven by FusedSampler (device step counter) vs diffusers' DPMSolverMultistepScheduler
    (dpmsolver++, order 2) on the eagerly combined output, with seeded random model outputs. diffusers
    runs in fp32 on the same (dtype-rounded) inputs: the bar is the dtype's tolerance."""
    n, frames = 25, 2
    shape = (frames, 4, 5, 3)
    x, outs = random_inputs(shape, n, dtype, device, seed=5)
    s_i = torch.tensor([7.5, 5.0], device=device)
    s_p = torch.tensor([2.0, 3.0], device=device)

    ref = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(n)
    want = x.float()
    for i, t in enumerate(ref.timesteps):
        want = ref.step(combine_guidance(outs[i].float(), frames, s_i, s_p), t, want).prev_sample

    sched = create_scheduler("dpmpp", dict(SD, solver_order=2))
    sched.set_timesteps(n)
    sampler = FusedSampler.from_scheduler(sched, x, s_i, s_p)
    assert sampler.num_steps == n
    lat = x.clone()
    for i in range(n):
        assert int(sampler.timestep().item()) == int(ref.timesteps[i])
        sampler.step(outs[i], lat, out=lat)
    assert int(sampler.step_index.item()) == n
    rel = ((lat.double() - want.double()).norm() / want.double().norm()).item()
    print(f"relative L2 error vs diffusers: {rel:.3e}")
    check_close(lat, want, dtype, "25-step DPM-Solver++ final sample")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sampler_channels_last_reset_and_scales(device):
    table = plan("pndm-prk", device)
    x, outs = random_inputs((2, 4, 5, 3), table.shape[0], torch.float16, device, seed=6)
    xc = x.contiguous(memory_format=torch.channels_last)
    sampler = FusedSampler(table, xc, 7.5, 2.0)
    assert sampler.state.history.stride()[2:] == xc.stride()[1:]
    st_r = nan_state(sampler.info, x.shape, device)

    def run(scale_image, scale_pose):
        lat, ref = xc.clone(memory_format=torch.channels_last), x.clone()
        for k in range(sampler.num_steps):
            lat = sampler.step(outs[k].contiguous(memory_format=torch.channels_last), lat)
            ref = guided_step_ref(outs[k], ref, table, k, scale_image, scale_pose, st_r)
        return lat, ref

    got, want = run(7.5, 2.0)
    check_close(got, want, torch.float16, "first run")
    sampler.reset()
    sampler.set_scales(torch.tensor([3.0, 4.0], device=device), 1.0)
    got, want = run(torch.tensor([3.0, 4.0], device=device), 1.0)
    check_close(got, want, torch.float16, "second run, new scales")
    with pytest.raises(ValueError, match="scale_image has 3 values"):
        sampler.set_scales(torch.ones(3), 1.0)


@pytest.mark.gpu
def test_captured_cuda_graph_loop_replays_with_new_scales():
    """The whole loop captured once: replays match eager, and new scales need no recapture."""
    device = "cuda"
    table = plan("dpmpp", device)
    n = table.shape[0]
    x, outs = random_inputs((3, 4, 80, 64), n, torch.float16, device, seed=7)
    stacked = torch.stack(outs)
    sampler = FusedSampler(table, x, 7.5, 2.0)
    lat = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        for i in range(n):
            sampler.step(stacked[i], lat, out=lat)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler.reset()
        for i in range(n):
            sampler.step(stacked[i], lat, out=lat)

    def eager(s_i, s_p):
        st = nan_state(sampler.info, x.shape, device)
        y = x.clone()
        for i in range(n):
            y = guided_step_ref(outs[i], y, table, i, s_i, s_p, st)
        return y

    for s_i, s_p in ((7.5, 2.0), (3.0, 1.0)):
        sampler.set_scales(s_i, s_p)
        lat.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        check_close(lat, eager(s_i, s_p), torch.float16, f"graph replay s=({s_i}, {s_p})")


# ------------------------------------------------------------------------------------------------
# Launcher checks
# ------------------------------------------------------------------------------------------------
#: where the launcher's checks are tested: the CPU through the interpreter, else the GPU (the cases build
#: their tensors under ``with torch.device(KERNEL_DEVICE)``)
KERNEL_DEVICE = "cpu" if fused_step._interpreting() else "cuda"
on_kernel_device = pytest.mark.skipif(
    KERNEL_DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="the kernel is compiled (TRITON_INTERPRET is off) and there is no CUDA device to launch it on",
)


def _args(dtype=torch.float32):
    table = plan("pndm-prk", KERNEL_DEVICE)
    info = TableInfo.of(table)
    x, outs = random_inputs((2, 4, 5, 3), 1, dtype, KERNEL_DEVICE)
    return dict(unet_out=outs[0], latents=x, table=table, step=0, scale_image=7.5, scale_pose=2.0,
                state=nan_state(info, x.shape, KERNEL_DEVICE), out=None)  # fmt: skip


def _state_with(**kw):
    def make(a):
        st = a["state"]
        return StepState(**{**dict(history=st.history, saved_sample=st.saved_sample, accumulator=st.accumulator), **kw})

    return make


def _shifted_alias(a):
    """latents and out: frames [0:2] and [1:3] of one buffer (overlapping, not the same)."""
    big = torch.zeros((3,) + tuple(a["latents"].shape[1:]))
    big[:2] = a["latents"]
    return {"latents": big[:2], "out": big[1:]}


ERROR_CASES = {
    "unet_out dtype": (lambda a: {"unet_out": a["unet_out"].half()}, "unet_out has dtype torch.float16"),
    "unet_out rows": (lambda a: {"unet_out": a["unet_out"][:4]}, r"unet_out has shape \(4, 4, 5, 3\)"),
    "unet_out device": (lambda a: {"unet_out": a["unet_out"].to("meta")}, "unet_out is on meta"),
    "unet_out layout": (
        lambda a: {"unet_out": a["unet_out"].contiguous(memory_format=torch.channels_last)}, "unet_out has strides",
    ),
    "latents 3-D": (lambda a: {"latents": a["latents"][0]}, "latents must be a 4-D tensor"),
    "latents int": (lambda a: {"latents": a["latents"].int()}, "latents has dtype torch.int32"),
    "latents not dense": (lambda a: {"latents": torch.zeros(2, 4, 5, 6)[..., :3]}, "each frame must be one dense"),
    "table shape": (lambda a: {"table": a["table"][:, :10].contiguous()}, r"table must be float32 \(num_steps, 15\)"),
    "table dtype": (lambda a: {"table": a["table"].double()}, "table must be float32"),
    "step range": (lambda a: {"step": 99}, "step 99 is outside the table's 13 steps"),
    "step dtype": (lambda a: {"step": torch.zeros(1)}, "step must be a 1-element int32/int64 tensor"),
    "step type": (lambda a: {"step": 1.0}, "step must be an int"),
    "scale count": (lambda a: {"scale_image": torch.ones(3), "scale_pose": torch.ones(3)}, r"scale_image has shape \(3,\)"),
    "scale dtype": (lambda a: {"scale_image": torch.ones(2, dtype=torch.float64), "scale_pose": torch.ones(2)},
                    "scale_image has dtype torch.float64"),  # fmt: skip
    "scale mixed": (lambda a: {"scale_image": torch.ones(2)}, "both be tensors or both be floats"),
    "history dtype": (lambda a: {"state": _state_with(history=a["state"].history.half())(a)},
                      "state.history has dtype torch.float16"),  # fmt: skip
    "history slots": (lambda a: {"state": _state_with(history=torch.zeros(4, 2, 4, 5, 3))(a)}, "state.history has shape"),
    "history layout": (
        lambda a: {"state": _state_with(history=torch.empty(6, 4, 5, 3, memory_format=torch.channels_last).view(3, 2, 4, 5, 3))(a)},
        "state.history has strides",
    ),  # fmt: skip
    "saved shape": (lambda a: {"state": _state_with(saved_sample=torch.zeros(1, 4, 5, 3))(a)}, "state.saved_sample has shape"),
    "state type": (lambda a: {"state": None}, "state must be a StepState"),
    "out dtype": (lambda a: {"out": torch.empty(2, 4, 5, 3, dtype=torch.float16)}, "out has dtype torch.float16"),
    "out overlaps input": (lambda a: {"out": a["unet_out"][:2]}, "out overlaps unet_out"),
    "out overlaps latents": (lambda a: _shifted_alias(a), "out overlaps latents"),
    "cached without cache": (
        lambda a: {"unet_out": a["unet_out"][2:4]},
        r"guidance_cache is required: unet_out has shape \(2, 4, 5, 3\), the 2 rows of latents",
    ),
    "cache dtype": (lambda a: {"guidance_cache": torch.zeros(2, 2, 4, 5, 3, dtype=torch.float16)},
                    "guidance_cache has dtype torch.float16; expected torch.float32"),  # fmt: skip
    "cache shape": (lambda a: {"guidance_cache": torch.zeros(2, 4, 5, 3)}, r"guidance_cache has shape \(2, 4, 5, 3\)"),
    "cache device": (lambda a: {"guidance_cache": torch.zeros(2, 2, 4, 5, 3, device="meta")}, "guidance_cache is on meta"),
    "cache layout": (
        lambda a: {"guidance_cache": torch.empty(4, 4, 5, 3, memory_format=torch.channels_last).view(2, 2, 4, 5, 3)},
        "guidance_cache has strides",
    ),
    "cache halves overlap": (
        lambda a: {"guidance_cache": torch.zeros(2, 4, 5, 3)[None].expand(2, 2, 4, 5, 3)},
        "guidance_cache has strides .*: its halves or frames overlap",
    ),
    "cache overlaps out": (
        lambda a: (lambda c: {"guidance_cache": c, "out": c[0]})(torch.zeros(2, 2, 4, 5, 3)),
        "guidance_cache overlaps out",
    ),
    "cache overlaps state": (
        lambda a: {"guidance_cache": a["state"].history[:2]}, "guidance_cache overlaps state.history",
    ),
}


@on_kernel_device
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_launcher_errors_name_the_tensor(case):
    change, match = ERROR_CASES[case]
    a = _args()  # (seeded on the CPU, then moved: outside the default-device context)
    with torch.device(KERNEL_DEVICE):  # the tensors a case makes go where the kernel runs
        a.update(change(a))
    with pytest.raises(ValueError, match=match):
        guided_step(**a)


@on_kernel_device
def test_empty_batch_is_a_no_op():
    a = _args()
    table, info = a["table"], TableInfo.of(a["table"])
    x = torch.empty((0, 4, 5, 3), device=KERNEL_DEVICE)
    out = guided_step(torch.empty((0, 4, 5, 3), device=KERNEL_DEVICE), x, table, 0, 7.5, 2.0,
                      nan_state(info, x.shape, KERNEL_DEVICE))  # fmt: skip
    assert out.shape == (0, 4, 5, 3)


def test_bytes_moved_counts_the_buffers_a_row_uses():
    table = plan("dpmpp", "cpu")
    row = table[1].tolist()  # second-order step: reads H[0], writes H[0]
    n = 2 * 4 * 80 * 64
    assert row[OH0] != 0 and row[WRITE_SLOT] == 0
    from benchmarks.bench_fused_step import bytes_moved

    assert bytes_moved(row, 2, 4 * 80 * 64, torch.float16, 1) == 5 * n * 2 + 2 * n * 4


# ------------------------------------------------------------------------------------------------
# Without a GPU or the interpreter; compiled for a real GPU; info; benchmark fallback
# ------------------------------------------------------------------------------------------------
def _fresh_python(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def test_cpu_without_interpreter_says_why_and_refuses():
    res = _fresh_python(
        """
        import torch
        from dreampose_rt.kernels import kernel_availability, guided_step
        from dreampose_rt.scheduler import StepState
        a = kernel_availability()
        print("AVAILABLE", a.ok, a.reason)
        try:
            guided_step(torch.zeros(3, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1, 15), 0, 1.0, 1.0,
                        StepState(None, None, None))
        except ValueError as exc:
            print("REFUSED", exc)
        from dreampose_rt import info
        print(info.format_report(info.collect()))
        """,
        interpret=False,
    )
    assert res.returncode == 0, res.stderr
    assert "AVAILABLE False triton" in res.stdout and "no CUDA device" in res.stdout
    assert "REFUSED latents is on cpu: the Triton kernel runs on CUDA" in res.stdout
    assert "fused guidance + scheduler step (Triton)" in res.stdout and "unavailable: " in res.stdout


def test_info_reports_the_kernel():
    from dreampose_rt import info

    sections = dict(info.collect())
    rows = dict(sections["fused guidance + scheduler step (Triton)"])
    assert rows["status"] == kernel_availability().describe()
    assert ("interpreter" in rows["status"]) == fused_step._interpreting()


def test_kernel_compiles_for_sm90():
    """Ahead-of-time compilation for an H100 (no GPU needed): every dtype and flag combination (the
    guidance cache's refresh and cached forms too) lowers to PTX with 128-bit loads and stores (given the
    16-divisible strides Triton specialises on)."""
    res = _fresh_python(
        """
        import itertools, json, re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from dreampose_rt.kernels import fused_step
        k = fused_step._guided_step_kernel
        names = k.arg_names
        div = {"out_ptr", "x_ptr", "e_ptr", "h_ptr", "s_ptr", "a_ptr", "c_ptr", "frame_numel", "stride_out_f",
               "stride_x_f", "stride_e_f", "stride_h_slot", "stride_h_f", "stride_s_f", "stride_a_f",
               "stride_c_half", "stride_c_f"}
        report = {}
        # every flag on or off, and the guidance cache: refresh (written) and cached (read)
        variants = ((True,) * 5 + (False, False), (False,) * 7, (True,) * 5 + (True, False), (True,) * 7)
        for ty, flags in itertools.product(("fp32", "fp16", "bf16"), variants):
            consts = dict(zip(("STEP_FROM_PTR", "SCALES_FROM_PTR", "HAS_HISTORY", "HAS_SAVED", "HAS_ACC",
                               "HAS_CACHE", "CACHED"), flags))
            consts["BLOCK"] = 1024
            ptr = {"out_ptr": ty, "x_ptr": ty, "e_ptr": ty, "step_ptr": "i32"}
            sig = {}
            for n in names:
                if n in consts:
                    sig[n] = "constexpr"
                elif n.endswith("_ptr"):
                    sig[n] = "*" + ptr.get(n, "fp32")
                else:
                    sig[n] = "fp32" if n in ("si_value", "sp_value") else "i32"
            src = ASTSource(fn=k, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
            report[f"{ty}-{''.join('1' if v else '0' for v in flags)}"] = sorted(
                set(re.findall(r"(?:ld|st)\\.global\\.v4\\.b32", ptx)))
        print(json.dumps(report))
        """,
        interpret=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(report) == 12
    for key, ops in report.items():
        assert ops == ["ld.global.v4.b32", "st.global.v4.b32"], key


def test_benchmark_on_cpu_says_it_needs_cuda(tmp_path, capsys):
    from benchmarks import bench_fused_step

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run for real")
    assert bench_fused_step.main(["--results", str(tmp_path)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_benchmark_record_on_cuda():
    """bench_fused_step's record on a GPU (numbers only checked for sense: the benchmark suite measures)."""
    from benchmarks import bench_fused_step

    r = bench_fused_step.bench(1, "dpmpp", 6, torch.float16, rounds=1, copy_gbps=3000.0)
    assert r["cold_buffer_sets"] * r["bytes_moved"] >= 4 * torch.cuda.get_device_properties(0).L2_cache_size
    for key in ("kernel_us", "kernel_us_graph_l2_warm", "kernel_us_do_bench", "graph_loop_us_per_step",
                "eager_launch_us_per_step", "eager_diffusers_us_per_step", "achieved_GBps"):
        assert r[key] > 0 and math.isfinite(r[key]), key
