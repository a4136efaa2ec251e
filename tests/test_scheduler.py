"""The scheduler against diffusers (the oracle), C++ against Python, the table against the loop.

"Relative error" below is ||a - b||_2 / ||b||_2 over the whole final sample.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch

from dreampose.guidance import combine_cached, combine_guidance, guidance_differences
from dreampose_rt.scheduler import (
    COLUMNS,
    NUM_COLUMNS,
    SchedulerConfig,
    StepState,
    create_scheduler,
    guidance_combine_ref,
    native_core,
    table_step_ref,
)
from dreampose_rt.scheduler import python_core, schedulers as sched_mod
from dreampose_rt.scheduler.table import WRITE_SLOT, TableInfo

HAVE_CPP = native_core() is not None
BUILT = ["cpp", "python"]  # the implementations "auto" resolves to
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_PNDM = dict(SD, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)
DIFFUSERS = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp": diffusers.DPMSolverMultistepScheduler,
}
SHAPE = (1, 4, 80, 64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm()).item()
    print(f"max abs diff {(a - b).abs().max().item():.3e}, relative L2 {err:.3e}")
    return err


def _testing_hooks():
    """dreampose_rt._C_testing: the tests' hooks into the C++ core (built beside _C by setup.py)."""
    try:
        return importlib.import_module("dreampose_rt._C_testing")
    except ImportError as exc:
        pytest.fail(f"dreampose_rt._C_testing did not load ({exc}): `pip install --no-build-isolation -e .`")


def need(implementation: str) -> None:
    if implementation == "cpp" and not HAVE_CPP:
        pytest.fail("the extension dreampose_rt._C did not load: " + sched_mod.native_core_availability().reason)


def diffusers_scheduler(name: str, options: dict):
    opts = dict(options)
    if name == "ddim":
        opts.setdefault("clip_sample", False)
    return DIFFUSERS[name](**opts)


def random_run(n: int, shape=SHAPE, seed: int = 0, rows: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    # PNDM runs n + 1 (PLMS) or n + 9 (Runge-Kutta warm-up) steps: a few spare outputs
    outs = [torch.randn((shape[0] * rows,) + tuple(shape[1:]), generator=g) for _ in range(n + 10)]
    return x, outs


def run_diffusers(name, options, n, x, outs):
    d = diffusers_scheduler(name, options)
    d.set_timesteps(n)
    for i, t in enumerate(d.timesteps):
        x = d.step(outs[i], t, x).prev_sample
    return x, d.timesteps.tolist()


def run_ours(name, options, n, x, outs, implementation):
    s = create_scheduler(name, options, implementation=implementation)
    s.set_timesteps(n)
    for i, t in enumerate(s.timesteps):
        x = s.step(outs[i], t, x).prev_sample
    return x, s


# ------------------------------------------------------------------------------------------------
# Timesteps
# ------------------------------------------------------------------------------------------------
TIMESTEP_CASES = [
    (name, spacing, offset, skip)
    for name in ("pndm", "ddim", "dpmpp")
    for spacing in ("leading", "trailing", "linspace")
    for offset in (0, 1)
    for skip in ((True, False) if name == "pndm" else (True,))
]


@pytest.mark.parametrize("name,spacing,offset,skip", TIMESTEP_CASES)
def test_timesteps_identical_to_diffusers_for_1_to_1000_steps(name, spacing, offset, skip):
    opts = dict(timestep_spacing=spacing, steps_offset=offset)
    if name == "pndm":
        opts["skip_prk_steps"] = skip
    d = diffusers_scheduler(name, opts)
    cfg = SchedulerConfig.create(name, opts)
    cpp = native_core()
    ncfg = sched_mod._native_config(cpp, cfg) if cpp is not None else None
    for n in range(1, 1001):
        try:
            d.set_timesteps(n)
            want = d.timesteps.tolist()
        except ValueError:  # diffusers refuses PNDM's Runge-Kutta warm-up with n < 4 (as we do)
            want = None
        try:
            got_py = python_core.timesteps(cfg, n)
        except ValueError:
            got_py = None
        assert got_py == want, (n, got_py[:8] if got_py else got_py, want[:8] if want else want)
        if cpp is not None:
            try:
                got_cpp = cpp.scheduler_timesteps(ncfg, n)
            except ValueError:
                got_cpp = None
            assert got_cpp == want, n


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("name", ["pndm", "ddim", "dpmpp"])
def test_set_timesteps_gives_diffusers_timesteps(implementation, name):
    need(implementation)
    opts = SD_PNDM if name == "pndm" else SD
    s = create_scheduler(name, opts, implementation=implementation)
    d = diffusers_scheduler(name, opts)
    for n in (1, 2, 3, 7, 20, 25, 50, 100, 250):
        s.set_timesteps(n)
        d.set_timesteps(n)
        assert s.timesteps.dtype == torch.int64
        assert s.timesteps.tolist() == d.timesteps.tolist()
        assert s.coefficient_table().shape == (len(d.timesteps), NUM_COLUMNS)


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bit_identical(implementation, schedule):
    need(implementation)
    s = create_scheduler("ddim", beta_schedule=schedule, implementation=implementation)
    d = diffusers.DDIMScheduler(beta_schedule=schedule)
    assert torch.equal(s.alphas_cumprod, d.alphas_cumprod)


# ------------------------------------------------------------------------------------------------
# Full runs against diffusers
# ------------------------------------------------------------------------------------------------
RUN_CASES = {
    "pndm-plms-100": ("pndm", SD_PNDM, 100),
    "pndm-plms-100-v": ("pndm", dict(SD_PNDM, prediction_type="v_prediction"), 100),
    "pndm-prk-100": ("pndm", dict(SD_PNDM, skip_prk_steps=False), 100),
    "pndm-plms-7-trailing": ("pndm", dict(SD_PNDM, timestep_spacing="trailing"), 7),
    "pndm-plms-1": ("pndm", SD_PNDM, 1),
    "ddim-50": ("ddim", dict(SD, steps_offset=1, set_alpha_to_one=False), 50),
    "ddim-50-v": ("ddim", dict(SD, prediction_type="v_prediction"), 50),
    "ddim-20-linspace": ("ddim", dict(SD, timestep_spacing="linspace"), 20),
    "dpmpp-25": ("dpmpp", SD, 25),
    "dpmpp-25-v": ("dpmpp", dict(SD, prediction_type="v_prediction"), 25),
    "dpmpp-10-lower-order-final": ("dpmpp", SD, 10),
    "dpmpp-8-sigma-min-no-lof": ("dpmpp", dict(SD, final_sigmas_type="sigma_min", lower_order_final=False), 8),
    "dpmpp-20-heun-trailing": ("dpmpp", dict(SD, solver_type="heun", timestep_spacing="trailing"), 20),
    "dpmpp-15-order1-leading": ("dpmpp", dict(SD, solver_order=1, timestep_spacing="leading", steps_offset=1), 15),
}


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_full_run_matches_diffusers(implementation, case):
    need(implementation)
    name, opts, n = RUN_CASES[case]
    x, outs = random_run(n)
    want, ts = run_diffusers(name, opts, n, x, outs)
    got, s = run_ours(name, opts, n, x, outs, implementation)
    assert s.timesteps.tolist() == ts
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel(got, want) <= 1e-6


@pytest.mark.skipif(not HAVE_CPP, reason="compares the two implementations; the extension did not load")
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_cpp_and_python_agree(case):
    name, opts, n = RUN_CASES[case]
    a = create_scheduler(name, opts, implementation="cpp")
    b = create_scheduler(name, opts, implementation="python")
    a.set_timesteps(n)
    b.set_timesteps(n)
    assert a.timesteps.tolist() == b.timesteps.tolist()
    assert torch.equal(a.coefficient_table(), b.coefficient_table())  # the same plan, bit for bit
    x, outs = random_run(n, shape=(2, 4, 24, 20), seed=1)
    ya, yb = x, x
    for i, t in enumerate(a.timesteps):
        ya = a.step(outs[i], t, ya).prev_sample
        yb = b.step(outs[i], t, yb).prev_sample
    assert rel(ya, yb) <= 1e-6


# ------------------------------------------------------------------------------------------------
# The coefficient table
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("case", ["pndm-plms-100", "pndm-prk-100", "ddim-50", "dpmpp-25", "dpmpp-10-lower-order-final"])
def test_table_driven_step_reproduces_the_loop(implementation, case):
    """Only the table row and the buffers: no scheduler object in the loop. The state buffers start
    as NaN, so reading a slot before it is written (or a zero-weight term) would poison the result."""
    need(implementation)
    name, opts, n = RUN_CASES[case]
    s = create_scheduler(name, opts, implementation=implementation)
    s.set_timesteps(n)
    table = s.coefficient_table()
    info = TableInfo.of(table)
    assert info == s.table_info
    x, outs = random_run(n, shape=(1, 4, 16, 12), seed=2)
    state = StepState.allocate(info, x.shape, "cpu")
    for buf in (state.history, state.saved_sample, state.accumulator):
        if buf is not None:
            buf.fill_(float("nan"))
    y = x
    for k in range(table.shape[0]):
        y = table_step_ref(table[k], outs[k], y, state)
    assert torch.isfinite(y).all()
    want, _ = run_diffusers(name, opts, n, x, outs)
    assert rel(y, want) <= 1e-6
    loop = x
    for k, t in enumerate(s.timesteps):
        loop = s.step(outs[k], t, loop).prev_sample
    assert rel(y, loop) <= 1e-6
    assert torch.equal(table[:, 0].long(), s.timesteps)


def test_table_layout_is_shared_with_cpp():
    if not HAVE_CPP:
        pytest.fail("the extension did not load: " + sched_mod.native_core_availability().reason)
    assert tuple(native_core().scheduler_table_columns()) == COLUMNS
    assert NUM_COLUMNS == len(COLUMNS) == 15


def test_table_marks_pndm_buffers():
    s = create_scheduler("pndm", SD_PNDM, implementation="python")
    s.set_timesteps(10)
    t = s.coefficient_table()
    info = s.table_info
    assert info.num_history_slots == 3 and info.uses_saved_sample and not info.uses_accumulator
    assert t[0, COLUMNS.index("save_sample")] == 1 and t[1, COLUMNS.index("os")] != 0  # PLMS step 1 restarts from S
    assert (t[-1, COLUMNS.index("write_slot")] == -1).item()
    prk = create_scheduler("pndm", dict(SD_PNDM, skip_prk_steps=False), implementation="python")
    prk.set_timesteps(10)
    assert prk.table_info.uses_accumulator
    ddim = create_scheduler("ddim", SD, implementation="python")
    ddim.set_timesteps(10)
    assert ddim.table_info == TableInfo(0, False, False)


# ------------------------------------------------------------------------------------------------
# Guidance + step fused
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("name,frames,per_frame", [("pndm", 1, False), ("pndm", 3, True), ("dpmpp", 2, False), ("ddim", 3, True)])
def test_fused_guidance_equals_combine_then_step(implementation, name, frames, per_frame):
    need(implementation)
    n = 12
    opts = SD_PNDM if name == "pndm" else SD
    shape = (frames, 4, 20, 16)
    x, outs = random_run(n, shape=shape, seed=3, rows=3)
    s_i = torch.linspace(1.5, 7.5, frames) if per_frame else 7.5
    s_p = torch.linspace(0.5, 3.0, frames) if per_frame else 2.0
    fused = create_scheduler(name, opts, implementation=implementation)
    plain = create_scheduler(name, opts, implementation=implementation)
    fused.set_timesteps(n)
    plain.set_timesteps(n)
    a = b = x
    for k, t in enumerate(fused.timesteps):
        a = fused.step_guided(outs[k], t, a, s_i, s_p).prev_sample
        b = plain.step(guidance_combine_ref(outs[k], s_i, s_p), t, b).prev_sample
    assert rel(a, b) <= 1e-6


def test_guidance_combine_ref_is_the_projects_formula():
    f = 2
    e = torch.randn(3 * f, 4, 3, 3)
    e00, eip, ei0 = e[:f], e[f : 2 * f], e[2 * f :]
    want = e00 + 5.0 * (ei0 - e00) + 1.5 * (eip - ei0)
    assert torch.allclose(guidance_combine_ref(e, 5.0, 1.5), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Guidance caching: refresh steps keep d_I and d_P, cached steps get e(I,P) alone (dreampose.guidance)
# ------------------------------------------------------------------------------------------------
CACHE_CASES = {
    "pndm-plms": ("pndm", SD_PNDM, 12),  # steps 0-1 save the sample (the general path), then the fast path
    "pndm-prk": ("pndm", dict(SD_PNDM, skip_prk_steps=False), 5),  # Runge-Kutta rows: accumulator, general path
    "ddim": ("ddim", SD, 10),
    "dpmpp": ("dpmpp", SD, 10),
}
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
CACHE_TOL = {torch.float32: 1e-6, torch.float16: 5e-3}  # relative L2, as the runs above
# 3 frames of 4 x 12 x 10 = 480 elements: frames end inside the data plane's 512-element blocks
CACHE_SHAPE = (3, 4, 12, 10)
CACHE_SCALES = {
    "float": (7.5, 2.0),  # the bound C++ fast path
    "per-frame": (torch.tensor([7.5, 3.0, 1.25]), torch.tensor([2.0, 0.5, 4.0])),  # the checked path
}


def cached_run(name, opts, n, dtype, implementation, every, scales, shape=CACHE_SHAPE, seed=21, num_threads=0):
    """A run of step_guided with a guidance cache that refreshes on every ``every``-th step (k % every == 0:
    the three branches) and gets e(I,P) alone (rows [F, 2F)) on the others; ``every=None``: no cache.
    Returns (the final sample, the cache, the run's full model outputs, the scheduler's timesteps)."""
    s = create_scheduler(name, opts, implementation=implementation, num_threads=num_threads)
    s.set_timesteps(n)
    ts = s.timesteps.tolist()
    f = shape[0]
    x, outs = random_run(len(ts), shape=shape, seed=seed, rows=3)
    x, outs = x.to(dtype), [o.to(dtype) for o in outs]
    cache = torch.full((2, *shape), float("nan")) if every else None
    y = x.clone()
    for k, t in enumerate(ts):
        refresh = every is None or k % every == 0
        e = outs[k] if refresh else outs[k][f : 2 * f]
        out = y if k % 2 else None  # in place and into a new tensor
        kw = {"guidance_cache": cache} if cache is not None else {}
        y = s.step_guided(e, t, y, *scales, out=out, **kw).prev_sample
        assert y.dtype == dtype
    return y, cache, outs, ts


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("scales", list(CACHE_SCALES))
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cache_refreshed_every_step_is_the_run_without_a_cache(case, dtype, scales, implementation):
    """A refresh step combines exactly as a step without a cache (same bits) and keeps the differences of
    its output: guidance_differences of the last step's model output, bit for bit."""
    need(implementation)
    name, opts, n = CACHE_CASES[case]
    dt = CACHE_DTYPES[dtype]
    want, _, _, _ = cached_run(name, opts, n, dt, implementation, None, CACHE_SCALES[scales])
    got, cache, outs, ts = cached_run(name, opts, n, dt, implementation, 1, CACHE_SCALES[scales])
    assert torch.equal(got, want)
    assert torch.equal(cache, guidance_differences(outs[len(ts) - 1], CACHE_SHAPE[0]))


def reference_cached_loop(name, opts, n, dtype, every, scales, shape=CACHE_SHAPE, seed=21):
    """The same run in plain PyTorch: dreampose.guidance's combine_guidance on refresh steps, combine_cached
    with the differences kept at the last refresh on the others, then diffusers' step, in fp32 (an fp16
    run's sample is rounded to fp16 after every step, as the fp16 run keeps it)."""
    d = diffusers_scheduler(name, opts)
    d.set_timesteps(n)
    f = shape[0]
    x, outs = random_run(len(d.timesteps), shape=shape, seed=seed, rows=3)
    x, outs = x.to(dtype).float(), [o.to(dtype) for o in outs]
    kept = None
    for k, t in enumerate(d.timesteps):
        if k % every == 0:
            eps = combine_guidance(outs[k], f, *scales)
            kept = guidance_differences(outs[k], f)
        else:
            eps = combine_cached(outs[k][f : 2 * f], kept, *scales)
        x = d.step(eps, t, x).prev_sample
        if dtype != torch.float32:
            x = x.to(dtype).float()
    return x, kept, d.timesteps.tolist()


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("scales", list(CACHE_SCALES))
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cached_run_matches_the_reference_loop(case, dtype, scales, implementation):
    """A refresh every 3rd step, e(I,P) alone on the others: the run ends where dreampose.guidance's
    formulas and diffusers' step end, within the dtype's tolerance."""
    need(implementation)
    name, opts, n = CACHE_CASES[case]
    dt = CACHE_DTYPES[dtype]
    got, cache, _, ts = cached_run(name, opts, n, dt, implementation, 3, CACHE_SCALES[scales])
    want, kept, want_ts = reference_cached_loop(name, opts, n, dt, 3, CACHE_SCALES[scales])
    assert ts == want_ts
    assert torch.equal(cache, kept)  # the differences of the last refresh, exactly
    assert rel(got.float(), want) <= CACHE_TOL[dt]


@pytest.mark.skipif(not HAVE_CPP, reason="compares the two implementations; the extension did not load")
@pytest.mark.parametrize("scales", list(CACHE_SCALES))
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cached_runs_of_cpp_and_python_agree(case, dtype, scales):
    """(fp16: Python rounds the guided output to fp16, the C++ data plane keeps it in fp32.)"""
    name, opts, n = CACHE_CASES[case]
    dt = CACHE_DTYPES[dtype]
    shape = (2, 4, 24, 20)
    sc = CACHE_SCALES[scales] if scales == "float" else tuple(s[:2] for s in CACHE_SCALES[scales])
    a, ca, _, _ = cached_run(name, opts, n, dt, "cpp", 3, sc, shape=shape)
    b, cb, _, _ = cached_run(name, opts, n, dt, "python", 3, sc, shape=shape)
    assert torch.equal(ca, cb)
    assert rel(a.float(), b.float()) <= CACHE_TOL[dt]


@pytest.mark.skipif(not HAVE_CPP, reason="the threads of the C++ data plane; the extension did not load")
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("case", ["pndm-plms", "pndm-prk", "dpmpp"])
def test_cached_steps_on_two_threads_equal_one(case, dtype):
    """Refresh and cached steps split over threads (frames ending inside blocks and chunks) give the bits of
    one thread, the cache included."""
    name, opts, n = CACHE_CASES[case]
    dt = CACHE_DTYPES[dtype]
    shape = (3, 4, 41, 67)
    scales = (torch.tensor([7.5, 3.0, 1.25]), torch.tensor([2.0, 0.5, 4.0]))
    a, ca, _, _ = cached_run(name, opts, n, dt, "cpp", 3, scales, shape=shape, num_threads=1)
    b, cb, _, _ = cached_run(name, opts, n, dt, "cpp", 3, scales, shape=shape, num_threads=2)
    assert torch.equal(a, b) and torch.equal(ca, cb)


def _cache_error_cases(x: torch.Tensor, e3: torch.Tensor):
    """(model_output, guidance_cache, out, message) of bad cached or refresh steps on sample x (2, 4, 8, 8)."""
    e1 = e3[2:4]
    c = torch.empty(2, *x.shape)
    return [
        (e1, None, None, r"guidance_cache is required: model_output has shape \(2, 4, 8, 8\), the sample's 2 rows "
                         r"\(a cached step: e\(I,P\) alone\); without a cache it holds the three branches, expected "
                         r"\(6, 4, 8, 8\)"),
        (e1, c.half(), None, "guidance_cache must be torch.float32, got torch.float16"),
        (e3, c.double(), None, "guidance_cache must be torch.float32, got torch.float64"),
        (e1, torch.empty(2, 2, 4, 8, 9), None,
         r"guidance_cache has shape \(2, 2, 4, 8, 9\), expected \(2, 2, 4, 8, 8\) \(d_I and d_P"),
        (e3, torch.empty(2 * x.numel()), None, r"guidance_cache has shape \(1024,\), expected \(2, 2, 4, 8, 8\)"),
        (e1, torch.empty(2, 2, 4, 8, 8, device="meta"), None, "guidance_cache .*meta"),
        (e1, torch.empty(2, 2, 4, 8, 8).transpose(3, 4), None, r"guidance_cache must be contiguous"),
        (e1, np.zeros((2, 2, 4, 8, 8), np.float32), None, "guidance_cache must be a torch tensor, got numpy.ndarray"),
        (e3, c, c[0], "guidance_cache overlaps out"),
        (e1, torch.cat([e1.float(), e1.float()]).view(2, *x.shape), None, None),  # fine: a buffer of its own
    ]


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("bound", [False, True], ids=["first-step", "bound"])
def test_guidance_cache_errors_name_it(implementation, bound):
    """Wrong dtype, shape, device, layout or type of the cache, a cache sharing memory with another tensor, and
    a cached step without a cache: ValueError naming guidance_cache, on the checked path (a run's first step)
    and on the C++ fast path (a bound run); nothing is stepped."""
    need(implementation)
    s = create_scheduler("ddim", SD, implementation=implementation)  # no state: steps can be repeated
    s.set_timesteps(5)
    t0 = s.timesteps.tolist()[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e3 = torch.randn(6, 4, 8, 8, generator=g)
    if bound:
        s.step_guided(e3, t0, x, 7.5, 2.0, guidance_cache=torch.empty(2, *x.shape))
        s.set_timesteps(5)
        assert implementation == "python" or s._bound is not None
    for model_output, cache, out, match in _cache_error_cases(x, e3):
        if match is None:
            s.step_guided(model_output, t0, x, 7.5, 2.0, guidance_cache=cache)
            s.set_timesteps(5)
            continue
        with pytest.raises(ValueError, match=match):
            s.step_guided(model_output, t0, x, 7.5, 2.0, out=out, guidance_cache=cache)
        assert s.step_index == 0
    big = torch.zeros(3, *x.shape)
    with pytest.raises(ValueError, match="guidance_cache overlaps sample"):
        s.step_guided(e3, t0, big[1], 7.5, 2.0, guidance_cache=big[:2])  # the sample is the cache's d_P


@pytest.mark.skipif(not HAVE_CPP, reason="checks the C++ binding's own argument checks")
def test_bound_step_takes_the_cache_only_on_guided_steps():
    s = create_scheduler("pndm", SD_PNDM, implementation="cpp")
    s.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, m, m3 = (torch.randn(rows, 4, 6, 5, generator=g) for rows in (3, 3, 9))
    cache = torch.empty(2, *x.shape)
    s.step(m, s.timesteps.tolist()[0], x)  # binds for (3, 4, 6, 5) float32
    b = s._bound
    with pytest.raises(ValueError, match="guidance_cache is given but the step is not guided"):
        b.step(1, x, m, None, None, None, cache)
    with pytest.raises(ValueError, match=r"guidance_cache is required: model_output has shape \(3, 4, 6, 5\)"):
        b.step(1, x, m, None, 7.5, 2.0)
    with pytest.raises(ValueError, match="guidance_cache overlaps the scheduler's history"):
        b.step(1, x, m3, None, 7.5, 2.0, s._state.history[:2])
    assert b.step(1, x, m3, None, 7.5, 2.0, cache) is not None  # a refresh
    assert torch.equal(cache, guidance_differences(m3, 3))
    assert b.step(1, x, m, None, 7.5, 2.0, cache) is not None  # a cached step
    assert b.step(1, x.double(), m, None, 7.5, 2.0, cache) is None  # unlike the binding: the checked path


@pytest.mark.gpu
def test_cached_steps_on_cuda_use_the_torch_path():
    """CUDA tensors step through the PyTorch formulas (guidance_differences, guidance_cached_ref)."""
    scales = CACHE_SCALES["float"]
    want, kept, _, _ = cached_run("dpmpp", SD, 10, torch.float32, "cpp" if HAVE_CPP else "python", 3, scales)
    s = create_scheduler("dpmpp", SD)
    s.set_timesteps(10, device="cuda")
    f = CACHE_SHAPE[0]
    x, outs = random_run(len(s.timesteps), shape=CACHE_SHAPE, seed=21, rows=3)
    cache = torch.empty((2, *CACHE_SHAPE), device="cuda")
    y = x.cuda()
    for k, t in enumerate(s.timesteps.tolist()):
        e = outs[k].cuda() if k % 3 == 0 else outs[k][f : 2 * f].cuda()
        y = s.step_guided(e, t, y, *scales, guidance_cache=cache).prev_sample
    assert y.device.type == "cuda"
    assert rel(y.cpu(), want) <= 1e-5
    assert torch.allclose(cache.cpu(), kept, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# fp16
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("name", ["pndm", "ddim", "dpmpp"])
def test_fp16_inputs(implementation, name):
    """fp16 in, fp16 out, fp32 arithmetic: a run on fp16 tensors stays within fp16 rounding of fp32."""
    need(implementation)
    n = 20
    opts = SD_PNDM if name == "pndm" else SD
    x, outs = random_run(n, shape=(2, 4, 16, 12), seed=4, rows=3)
    x = x.half().float()
    outs = [o.half() for o in outs]
    s16 = create_scheduler(name, opts, implementation=implementation)
    s32 = create_scheduler(name, opts, implementation=implementation)
    s16.set_timesteps(n)
    s32.set_timesteps(n)
    a, b = x.half(), x
    for k, t in enumerate(s16.timesteps):
        a = s16.step_guided(outs[k], t, a, 6.0, 2.5).prev_sample
        assert a.dtype == torch.float16
        b = s32.step_guided(outs[k].float(), t, b, 6.0, 2.5).prev_sample
        b = b.half().float()  # round like the fp16 run, so only the arithmetic differs
    assert rel(a.float(), b) <= 5e-3


def test_half_conversions_are_exact():
    if not HAVE_CPP:
        pytest.fail("the extension did not load: " + sched_mod.native_core_availability().reason)
    T = _testing_hooks()
    h = torch.from_numpy(np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16))
    f = torch.empty(65536)
    T.convert_half_to_float(h, f)
    want = h.numpy().astype(np.float32)
    assert np.array_equal(f.numpy().view(np.uint32), want.view(np.uint32))
    finite = want[np.isfinite(want)]
    up = np.nextafter(finite, np.float32(np.inf))
    mid = ((finite.astype(np.float64) + up) / 2).astype(np.float32)  # ties: round to even
    vals = np.concatenate([finite, up, mid, np.float32([np.inf, -np.inf, 65519.0, 65520.0, 1e-8, -3e-8])])
    out = torch.empty(len(vals), dtype=torch.float16)
    T.convert_float_to_half(torch.from_numpy(vals), out)
    with np.errstate(over="ignore"):  # numpy's own cast warns where it rounds to inf
        want16 = vals.astype(np.float16)
    assert np.array_equal(out.numpy().view(np.uint16), want16.view(np.uint16))
    assert T.float_to_half(1.0) == 0x3C00 and T.half_to_float(0x3C00) == 1.0
    with pytest.raises(ValueError, match=r"dst has 3 elements, expected 65536 \(one per element of src\)"):
        T.convert_half_to_float(h, torch.empty(3))
    with pytest.raises(ValueError, match="src must be torch.float16, got torch.float32"):
        T.convert_half_to_float(f, f)
    with pytest.raises(ValueError, match="src must be a torch tensor, got numpy.ndarray"):
        T.convert_float_to_half(vals, out)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_config_from_model_folder_and_save_reload(tmp_path):
    src = "/work/shared/configs/sd15/scheduler_config.json"
    model = tmp_path / "model" / "scheduler"
    model.mkdir(parents=True)
    with open(src) as fh:
        data = json.load(fh)
    (model / "scheduler_config.json").write_text(json.dumps(data))
    a = create_scheduler("pndm", tmp_path / "model")
    assert a.config.skip_prk_steps and a.config.steps_offset == 1 and a.config.beta_schedule == "scaled_linear"
    path = a.save_config(tmp_path)
    b = create_scheduler("pndm", path)
    assert b.config == a.config
    with pytest.raises(dataclasses_frozen_error()):
        a.config.steps_offset = 3  # type: ignore[misc]
    x, outs = random_run(10)
    ya, _ = run_ours("pndm", a.config, 10, x, outs, "auto")
    yb, _ = run_ours("pndm", b.config, 10, x, outs, "auto")
    assert torch.equal(ya, yb)
    # diffusers reads the saved file back to the same schedule
    d = diffusers.PNDMScheduler.from_config(json.loads(open(path).read()))
    d.set_timesteps(10)
    b.set_timesteps(10)
    assert d.timesteps.tolist() == b.timesteps.tolist()
    # a DDIM from the PNDM config keeps the file's options (like diffusers' from_config)
    ddim = create_scheduler("ddim", tmp_path / "model")
    assert ddim.config.set_alpha_to_one is False and ddim.config.scheduler == "ddim"


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_scheduler_defaults_follow_diffusers():
    assert create_scheduler("ddim").config.set_alpha_to_one is True
    assert create_scheduler("pndm").config.set_alpha_to_one is False
    assert create_scheduler("dpmpp").config.timestep_spacing == "linspace"
    assert create_scheduler("dpm++").config.scheduler == "dpmpp"
    s = create_scheduler("pndm")
    x = torch.randn(1, 4, 8, 8)
    assert s.scale_model_input(x, 10) is x and s.init_noise_sigma == 1.0 and s.order == 1


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_scheduler("euler"), "euler"),
        (lambda: create_scheduler("pndm", foo=1), "foo"),
        (lambda: create_scheduler("pndm", timestep_spacing="sideways"), "sideways"),
        (lambda: create_scheduler("ddim", clip_sample=True), "clip_sample"),
        (lambda: create_scheduler("dpmpp", thresholding=True), "thresholding"),
        (lambda: create_scheduler("dpmpp", algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (lambda: create_scheduler("dpmpp", solver_order=3), "solver_order"),
        (lambda: create_scheduler("pndm", implementation="cuda"), "cuda"),
        (lambda: create_scheduler("pndm").set_timesteps(0), "num_inference_steps"),
        (lambda: create_scheduler("pndm").set_timesteps(1001), "1001"),
        (lambda: create_scheduler("pndm", skip_prk_steps=False).set_timesteps(3), ">= 4"),
        (lambda: create_scheduler("dpmpp").set_timesteps(1000), "repeated timestep"),
    ],
)
def test_errors_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("implementation", BUILT)
def test_step_errors(implementation):
    need(implementation)
    s = create_scheduler("pndm", SD_PNDM, implementation=implementation)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="before set_timesteps"):
        s.step(x, 981, x)
    s.set_timesteps(10)
    t0 = int(s.timesteps[0])
    with pytest.raises(ValueError, match="timestep 5 is not in the schedule"):
        s.step(x, 5, x)
    with pytest.raises(ValueError, match=f"timestep {int(s.timesteps[3])} is out of order"):
        s.step(x, int(s.timesteps[3]), x)
    with pytest.raises(ValueError, match=r"model_output shape \(2, 4, 8, 9\)"):
        s.step(torch.randn(2, 4, 8, 9), t0, x)
    with pytest.raises(ValueError, match="dtype torch.float16 differs"):
        s.step(x.half(), t0, x)
    with pytest.raises(ValueError, match=r"expected \(6, 4, 8, 8\)"):
        s.step_guided(x, t0, x, 7.5, 2.0)
    with pytest.raises(ValueError, match="guidance_scale_pose has 3 values"):
        s.step_guided(torch.randn(6, 4, 8, 8), t0, x, 7.5, torch.ones(3))
    s.step(x, torch.tensor(t0), x)  # a 0-d tensor timestep is fine; the run advances
    assert s.step_index == 1
    with pytest.raises(ValueError, match="differs from the run"):
        s.step(torch.randn(1, 4, 8, 8), int(s.timesteps[1]), torch.randn(1, 4, 8, 8))


@pytest.mark.skipif(not HAVE_CPP, reason="checks the C++ binding's own argument checks")
def test_bind_checks_each_tensor_and_names_it():
    """scheduler_bind checks the sample and the state tensors in C++ (dtype, CPU, contiguity, element
    counts against the plan's needs); each error names the tensor."""
    C = native_core()
    s = create_scheduler("pndm", SD_PNDM, implementation="cpp")  # PLMS: 3 history slots and a saved sample
    s.set_timesteps(10)
    x = torch.randn(2, 4, 10, 12)
    n = x.numel()
    ok = dict(sample=x, frames=2, history=torch.empty(3, *x.shape), saved_sample=torch.empty_like(x), accumulator=None)

    def bind(**changes):
        return C.scheduler_bind(s._plan, **{**ok, **changes})

    assert isinstance(bind(), C.SchedulerBoundStep)
    cases = [
        (dict(history=torch.empty(1000)),
         rf"history has 1000 elements, expected 3 x {n} \(num_history_slots x sample numel\)"),
        (dict(history=torch.empty(2, *x.shape)), rf"history has {2 * n} elements, expected 3 x {n}"),
        (dict(history=torch.empty(3, *x.shape, dtype=torch.float64)),
         "history must be torch.float32, got torch.float64"),
        (dict(history=torch.empty(*x.shape, 3).movedim(-1, 0)), r"history must be contiguous \(call .contiguous\(\)\)"),
        (dict(history=torch.empty(3, *x.shape, device="meta")), "history must be a CPU tensor, got one on meta"),
        (dict(history=None), "history is required"),
        (dict(history=np.zeros((3, n), np.float32)), "history must be a torch tensor, got numpy.ndarray"),
        (dict(saved_sample=torch.empty(n + 1)),
         rf"saved_sample has {n + 1} elements, expected {n} \(one per sample element\)"),
        (dict(saved_sample=x.half()), "saved_sample must be torch.float32, got torch.float16"),
        (dict(accumulator=torch.empty_like(x)),
         r"accumulator is given but the plan does not use an accumulator \(pass None\)"),
        (dict(sample=x.double()), "sample must be torch.float32 or torch.float16, got torch.float64"),
        (dict(sample=x.to("meta")), "sample must be a CPU tensor, got one on meta"),
        (dict(sample=x.transpose(2, 3)), "sample must be contiguous"),
        (dict(sample=torch.tensor(1.0)), "sample must have a frame dimension"),
        (dict(frames=7), "sample has 960 elements, not divisible into frames=7"),
    ]
    for changes, match in cases:
        with pytest.raises(ValueError, match=match):
            bind(**changes)
    prk = create_scheduler("pndm", dict(SD_PNDM, skip_prk_steps=False), implementation="cpp")
    prk.set_timesteps(10)
    with pytest.raises(ValueError, match=r"accumulator is required: the plan uses an accumulator \(960 \(one per"):
        C.scheduler_bind(prk._plan, **ok)


@pytest.mark.skipif(not HAVE_CPP, reason="checks the C++ binding's own argument checks")
def test_bound_step_returns_none_for_tensors_unlike_the_binding_and_checks_the_scales():
    """SchedulerBoundStep.step: a sample, model_output or out that does not match the binding gives None
    (DiffusionScheduler then takes its checked path); the guidance scales and the step index are checked,
    naming the argument."""
    s = create_scheduler("ddim", SD, implementation="cpp")  # no state buffers: steps can be repeated
    s.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, m, m3 = (torch.randn(rows, 4, 6, 5, generator=g) for rows in (3, 3, 9))
    s.step(m, s.timesteps.tolist()[0], x)  # binds for (3, 4, 6, 5) float32
    b = s._bound
    unlike = [
        (x.double(), m.double()),
        (x, m.half()),
        (x[:2], m[:2]),
        (x.to("meta"), m),
        (torch.randn(3, 4, 5, 6).transpose(2, 3), m),  # same shape, not contiguous
        (x, m3),  # 3F rows without guidance scales
    ]
    for sample, model_output in unlike:
        assert b.step(1, sample, model_output) is None
    assert b.step(1, x, m, torch.empty(3, 4, 6, 6)) is None  # out of another shape
    assert b.step(1, x, m3, None, 7.5, 2.0) is not None
    # the same scale given as a float, an int, one value or one per frame: the same bits
    want = b.step(1, x, m3, None, 7.0, 2.0).clone()
    for si, sp in [(7, 2), (torch.tensor([7.0]), 2.0), (torch.full((3,), 7.0), torch.full((3,), 2.0))]:
        assert torch.equal(b.step(1, sample=x, model_output=m3, scale_image=si, scale_pose=sp), want)
    cases = [
        (dict(scale_image=torch.ones(3, dtype=torch.float64), scale_pose=2.0),
         "scale_image must be torch.float32, got torch.float64"),
        (dict(scale_image=7.5, scale_pose=torch.ones(6)[::2]), "scale_pose must be contiguous"),
        (dict(scale_image=torch.ones(2), scale_pose=2.0),
         r"scale_image has 2 elements, expected 1 or 3 \(one per frame\)"),
        (dict(scale_image=torch.ones(3, device="meta"), scale_pose=2.0),
         "scale_image must be a CPU tensor, got one on meta"),
        (dict(scale_image=7.5, scale_pose="2"), "scale_pose must be a float or a CPU float32 tensor, got str"),
        (dict(scale_image=7.5), "scale_image and scale_pose must be given together"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            b.step(1, sample=x, model_output=m3, **kwargs)
    with pytest.raises(ValueError, match="step index 9 is outside the schedule of 5 steps"):
        b.step(9, x, m)


@pytest.mark.skipif(not HAVE_CPP, reason="checks what the extension exposes")
def test_one_entry_per_op_and_the_test_hooks_live_in_their_own_module():
    C = native_core()
    hooks = ("convert_half_to_float", "convert_float_to_half", "half_to_float", "float_to_half")
    hooks += ("_parallel_selftest", "_pool_workers")
    T = _testing_hooks()
    for name in hooks:
        assert not hasattr(C, name), name
        assert hasattr(T, name), name
    assert not hasattr(C.SchedulerPlan, "step")
    assert [n for n in dir(C.SchedulerBoundStep) if not n.startswith("_")] == ["set_plan", "step"]


@pytest.mark.parametrize("implementation", BUILT)
@pytest.mark.parametrize("shape", [(), (0, 4, 8, 8)])
def test_0d_and_empty_samples_take_the_pytorch_table_step(implementation, shape):
    """A 0-d or empty sample (nothing for the C++ data plane) is stepped by table_step_ref with the run's
    coefficients: the C++ implementation gives the Python one's bits."""
    need(implementation)
    n = 6
    results = []
    for impl in (implementation, "python"):
        s = create_scheduler("pndm", SD_PNDM, implementation=impl)
        s.set_timesteps(n)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(shape, generator=g)
        for t in s.timesteps.tolist():
            x = s.step(torch.randn(shape, generator=g), t, x).prev_sample
        assert x.shape == shape and s.step_index == len(s.timesteps)
        results.append(x)
    assert torch.equal(results[0], results[1])


# ------------------------------------------------------------------------------------------------
# Without the extension
# ------------------------------------------------------------------------------------------------
def test_missing_extension_warns_once_and_falls_back(monkeypatch, caplog):
    from dreampose_rt import _ext

    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "ImportError: simulated")
    monkeypatch.setattr(sched_mod, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger="dreampose_rt.scheduler.schedulers"):
        a = create_scheduler("pndm", SD_PNDM)
        b = create_scheduler("dpmpp", SD)
    assert a.implementation == b.implementation == "python"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="simulated"):
        create_scheduler("pndm", implementation="cpp")


def test_missing_extension_in_a_fresh_process():
    code = r"""
import logging, sys, io
sys.modules["dreampose_rt._C"] = None  # any import of the extension now fails
stream = io.StringIO()
logging.basicConfig(stream=stream, level=logging.WARNING)
import torch
from dreampose_rt.scheduler import create_scheduler
s = create_scheduler("pndm", skip_prk_steps=True)
s2 = create_scheduler("ddim")
s.set_timesteps(5)
x = torch.randn(1, 4, 8, 8)
for t in s.timesteps:
    x = s.step(torch.randn(1, 4, 8, 8), t, x).prev_sample
print(s.implementation, s2.implementation, stream.getvalue().count("WARNING"), bool(torch.isfinite(x).all()))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "python", "1", "True"]


def test_info_reports_the_extension(capsys):
    from dreampose_rt import info

    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert "extension" in text and "torch" in text
    if HAVE_CPP:
        assert "loaded" in text and "-O3" in text and "pybind11" in text
        assert "built against torch" in text and torch.__version__.split("+")[0] in text


@pytest.mark.skipif(not HAVE_CPP, reason="checks the loader's refusal of a mismatched build; no extension here")
def test_extension_built_for_another_torch_is_refused_with_the_reason():
    script = (
        "import torch; torch.__version__ = '0.0.1'\n"
        "from dreampose_rt import _ext\n"
        "assert _ext.load_extension() is None and not _ext.extension_availability()\n"
        "print(_ext.extension_availability().reason)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "built against torch" in proc.stdout and "0.0.1" in proc.stdout and "--no-build-isolation" in proc.stdout


# ------------------------------------------------------------------------------------------------
# CUDA (the runtime may step on the device through the PyTorch path)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_tensors_use_the_torch_path():
    n = 20
    x, outs = random_run(n, shape=(1, 4, 16, 16), seed=5)
    want, _ = run_diffusers("dpmpp", SD, n, x, outs)
    s = create_scheduler("dpmpp", SD)
    s.set_timesteps(n, device="cuda")
    y = x.cuda()
    for k, t in enumerate(s.timesteps):
        y = s.step(outs[k].cuda(), t, y).prev_sample
    assert y.device.type == "cuda"
    assert rel(y.cpu(), want) <= 1e-5


def test_step_guided_in_place_takes_the_fast_path_and_equals_a_new_tensor(monkeypatch):
    """The runtime steps in place (out=sample): that must stay on the checked-once fast path."""
    from dreampose_rt.scheduler import create_scheduler

    if create_scheduler("pndm", implementation="auto").implementation != "cpp":
        pytest.skip("the fast path is the C++ extension's; it is not built here")
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(6, 4, 5, 3, generator=g) for _ in range(8)]
    x0 = torch.randn(2, 4, 5, 3, generator=g)
    ref, fast = create_scheduler("pndm", implementation="cpp"), create_scheduler("pndm", implementation="cpp")
    ref.set_timesteps(7)
    fast.set_timesteps(7)
    checks = []
    real = fast._check_pair
    monkeypatch.setattr(fast, "_check_pair", lambda *a: (checks.append(1), real(*a))[1])
    a, b = x0.clone(), x0.clone()
    for m, t in zip(outs, ref.timesteps.tolist()):
        a = ref.step_guided(m, t, a, 8.0, 3.0).prev_sample
        fast.step_guided(m, t, b, 8.0, 3.0, out=b)
    assert torch.equal(a, b)
    assert len(checks) == 1  # only the run's first step is checked in full


@pytest.mark.parametrize("implementation", BUILT)
def test_runs_after_runs_reuse_the_state_and_equal_fresh_runs(implementation):
    """set_timesteps keeps the previous run's buffers for a run of the same shape (they are never read
    before written): consecutive runs, of other lengths and shapes, equal runs of fresh schedulers."""
    need(implementation)
    opts = dict(SD_PNDM, skip_prk_steps=False)  # PRK rows: saved sample and accumulator too
    s = create_scheduler("pndm", opts, implementation=implementation)
    plan = [(6, (2, 4, 12, 10), 1), (9, (2, 4, 12, 10), 2), (5, (1, 4, 8, 8), 3), (6, (2, 4, 12, 10), 4)]
    for n, shape, seed in plan:
        x, outs = random_run(n, shape=shape, seed=seed)
        want, _ = run_ours("pndm", opts, n, x.clone(), outs, implementation)
        s.set_timesteps(n)
        y = x.clone()
        for i, t in enumerate(s.timesteps.tolist()):
            s.step(outs[i], t, y, out=y)
        assert torch.equal(y, want), (n, shape)


def test_a_run_that_switches_dtype_rebinds_the_fast_path():
    """fp32 and fp16 steps in one run (the state is fp32 either way): each step is bound for its dtype."""
    if not HAVE_CPP:
        pytest.skip("compares the C++ fast path with Python; the extension did not load")
    n = 8
    x, outs = random_run(n, shape=(2, 4, 6, 5), seed=9, rows=3)
    ys = []
    for implementation in ("cpp", "python"):
        s = create_scheduler("pndm", SD_PNDM, implementation=implementation)
        s.set_timesteps(n)
        y = x.clone()
        for i, t in enumerate(s.timesteps.tolist()):
            half = i % 3 == 2
            m = outs[i].half() if half else outs[i]
            y = y.half() if half else y.float()
            if i % 2 and not half:  # (fp16 guidance differs by design: Python rounds the guided output to fp16)
                y = s.step_guided(m, t, y, 6.0, 1.5).prev_sample
            else:
                y = s.step(m[: y.shape[0]], t, y).prev_sample
            assert y.dtype == (torch.float16 if half else torch.float32)
        ys.append(y.float())
    assert rel(ys[0], ys[1]) <= 1e-6


def test_step_recycles_an_output_only_when_nothing_can_see_it():
    """step() without out= may write a new output into an earlier output that is dead (only the scheduler
    holds it); anything that can still see the old one keeps it from being reused."""
    import weakref

    if not HAVE_CPP:
        pytest.skip("recycling is the C++ binding's; the extension did not load")
    s = create_scheduler("pndm", SD_PNDM, implementation="cpp")
    s.set_timesteps(60)
    ts = iter(s.timesteps.tolist())
    x, outs = random_run(60, shape=(1, 4, 8, 8), seed=11)
    e = outs[0]

    def step():
        return s.step(e, next(ts), x).prev_sample

    step()
    y = step()
    dead = id(y)
    del y
    assert id(step()) == dead  # dead: reused (and the temporary just returned is dead again)

    keepers = {
        "attribute": lambda t: setattr(t, "tag", 1),
        "weakref": lambda t: weakref.ref(t),
        "view": lambda t: t[0],
        "storage": lambda t: t.untyped_storage(),
        "numpy": lambda t: t.numpy(),
        "requires_grad": lambda t: t.requires_grad_(),
    }
    for name, keep in keepers.items():
        for _ in range(2):  # flush both slots
            step()
        y = step()
        held = keep(y)
        old = id(y)
        del y
        z1, z2 = step(), step()
        assert old not in (id(z1), id(z2)), name
        del held, z1, z2


def lockstep(opts: dict, n: int, shape: tuple, seed: int):
    """PNDM runs of the C++ and the Python implementation side by side on the same random inputs, with diffusers'
    loop (``x = step(eps, t, x).prev_sample``); yields (step, cpp scheduler, its sample, python scheduler,
    its sample) after each step."""
    x, outs = random_run(n, shape=shape, seed=seed)
    a, b = create_scheduler("pndm", opts, implementation="cpp"), create_scheduler("pndm", opts, implementation="python")
    a.set_timesteps(n)
    b.set_timesteps(n)
    ya = yb = x
    for i, t in enumerate(a.timesteps.tolist()):
        ya = a.step(outs[i], t, ya).prev_sample
        yb = b.step(outs[i], t, yb).prev_sample
        yield i, a, ya, b, yb


def test_outputs_that_are_kept_are_never_overwritten():
    """The diffusers loop keeping every step's output: each kept tensor still holds its step's values."""
    if not HAVE_CPP:
        pytest.skip("recycling is the C++ binding's; the extension did not load")
    kept, ref = [], []
    for _, _, ya, _, yb in lockstep(SD_PNDM, 12, shape=(1, 4, 8, 8), seed=12):
        kept.append(ya)
        ref.append(yb.clone())
    assert len({id(k) for k in kept}) == len(kept)
    for k, r in zip(kept, ref):
        assert rel(k, r) <= 1e-6


def test_state_buffers_follow_the_table_after_every_step():
    """The C++ paths (fast and general) leave the history, saved sample and accumulator as the Python
    twin does after every step of PNDM with its Runge-Kutta warm-up (the row that reads A updates it too)."""
    if not HAVE_CPP:
        pytest.skip("compares the C++ state with Python's; the extension did not load")
    opts = dict(SD_PNDM, skip_prk_steps=False)
    for i, a, _, b, _ in lockstep(opts, 6, shape=(2, 4, 6, 5), seed=13):
        for name in ("history", "saved_sample", "accumulator"):
            sa, sb = getattr(a._state, name), getattr(b._state, name)
            if name == "history":  # only the slots written so far hold data
                slots = b.coefficient_table()[: i + 1, WRITE_SLOT].tolist()
                written = {int(w) for w in slots if w >= 0}
                sa, sb = sa[sorted(written)], sb[sorted(written)]
            assert torch.allclose(sa, sb, rtol=1e-6, atol=1e-6), (i, name)


def test_torch_release_of_version_strings():
    from dreampose_rt._ext import torch_release

    assert torch_release("2.6.0a0+git1234abc") == "2.6.0"
    assert torch_release("2.7.0.dev20250101+cpu") == "2.7.0"
    assert torch_release("2.13.0+cu126") == torch_release("2.13.0") == "2.13.0"
