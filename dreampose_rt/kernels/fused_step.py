"""Fused three-branch guidance + scheduler step (PNDM / DDIM / DPM-Solver++) in one Triton kernel.

After each UNet call on ``3F`` samples the runtime turns the output into the next latents. Eager
PyTorch needs ~10 kernels and several passes over memory; this op reads every buffer once and writes
every buffer once:

    m   = e00 + s_I * (eI0 - e00) + s_p * (eIP - eI0)                 (dreampose/guidance.py)
    q   = qx * x + qm * m
    out = ox*x + om*m + oq*q + os*S + oh0*H[0] + oh1*H[1] + oh2*H[2] + oa*A
    H[write_slot] <- q;  S <- x (save_sample);  A <- akeep*A + am*m

Guidance caching (:mod:`dreampose.guidance`): with ``guidance_cache`` (fp32 ``(2, F, C, H, W)``) a
*refresh* step (``3F`` rows, as above) also writes ``d_I = eI0 - e00`` and ``d_P = eIP - eI0`` to the
cache in the same pass, and a *cached* step gets ``F`` rows (eIP alone) and reads them instead:

    m   = eIP + (s_I - 1) * d_I + (s_p - 1) * d_P                       (combine_cached)

with the coefficients of row ``k`` of the run's coefficient table (layout and rules:
:mod:`dreampose_rt.scheduler.table`, read here through its column constants). The table, the step
index ``k`` and the guidance scales are read from device memory, so a whole denoising loop can be
captured in one CUDA graph and replayed with other scales (update the scale tensors in place).

File layout (as mamba's Triton ops): kernel -> launcher -> public function (:func:`guided_step`)
-> :func:`guided_step_ref` (plain PyTorch, same signature). The runtime drives it through
:class:`dreampose_rt.fused_sampler.FusedSampler` (the table, state buffers and step counter of a run).

Layouts: every tensor is 4-D ``(rows, C, H, W)``; each row (frame, branch or history slot) must be
one dense block of ``C*H*W`` elements, and all tensors must share the order of the elements inside
a row (their C/H/W strides). Contiguous NCHW and ``torch.channels_last`` both qualify, as does any
stride between rows (e.g. the frames of a larger buffer). The kernel walks each row in memory order.

Device-side errors: a kernel cannot raise without a host synchronisation. A step index outside the
table, or a row that needs a buffer that was not given (a history slot ``>= num_slots``, ``S`` or
``A``), writes NaN to ``out`` and leaves the state unchanged, so the failure is loud downstream.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from dreampose.guidance import NUM_BRANCHES, combine_cached, combine_guidance, guidance_differences

from ..scheduler.table import (
    AKEEP,
    AM,
    MAX_HISTORY,
    NUM_COLUMNS,
    OA,
    OH0,
    OM,
    OQ,
    OS,
    OX,
    QM,
    QX,
    SAVE_SAMPLE,
    WRITE_SLOT,
    StepState,
    table_step_ref,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The table layout as compile-time constants (Triton only reads globals that are constexpr).
_NUM_COLUMNS = tl.constexpr(NUM_COLUMNS)
_QX, _QM = tl.constexpr(QX), tl.constexpr(QM)
_OX, _OM, _OQ, _OS, _OH0, _OA = (tl.constexpr(c) for c in (OX, OM, OQ, OS, OH0, OA))
_AKEEP, _AM = tl.constexpr(AKEEP), tl.constexpr(AM)
_WRITE_SLOT, _SAVE_SAMPLE = tl.constexpr(WRITE_SLOT), tl.constexpr(SAVE_SAMPLE)
_MAX_HISTORY = tl.constexpr(MAX_HISTORY)


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["step_value", "num_steps"])
def _guided_step_kernel(
    out_ptr, x_ptr, e_ptr, h_ptr, s_ptr, a_ptr, c_ptr,  # sample-sized buffers (see the launcher)
    table_ptr, step_ptr, si_ptr, sp_ptr,  # run parameters in device memory
    step_value, si_value, sp_value,  # the same as host scalars (STEP_FROM_PTR / SCALES_FROM_PTR False)
    num_steps, num_frames, frame_numel, num_slots,
    stride_out_f, stride_x_f, stride_e_f, stride_h_slot, stride_h_f, stride_s_f, stride_a_f,
    stride_c_half, stride_c_f, stride_scale,
    STEP_FROM_PTR: tl.constexpr, SCALES_FROM_PTR: tl.constexpr,
    HAS_HISTORY: tl.constexpr, HAS_SAVED: tl.constexpr, HAS_ACC: tl.constexpr,
    HAS_CACHE: tl.constexpr, CACHED: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(frame_numel, BLOCK), num_frames)``: program (i, f) updates elements
    ``[i*BLOCK, (i+1)*BLOCK)`` (memory order) of frame f in every buffer.

    HAS_CACHE: ``c_ptr`` is the guidance cache (``[0]`` d_I, ``[1]`` d_P, ``stride_c_half`` apart);
    CACHED (with HAS_CACHE): ``e_ptr`` holds eIP alone (F rows) and the cache is read, else the three
    branches are read and, with HAS_CACHE, the cache written (a refresh)."""
    # (Element masks combine with scalar conditions through tl.where: `tensor & scalar` is not
    # supported by the CPU interpreter of Triton 3.9.)
    pid = tl.program_id(0)
    f = tl.program_id(1).to(tl.int64)

    # -- row k of the table (scalars, shared by every program) ----------------------------------
    if STEP_FROM_PTR:
        k = tl.load(step_ptr).to(tl.int32)
    else:
        k = step_value
    valid = (k >= 0) & (k < num_steps)
    row = table_ptr + tl.where(valid, k, 0).to(tl.int64) * _NUM_COLUMNS
    qx = tl.load(row + _QX)
    qm = tl.load(row + _QM)
    ox = tl.load(row + _OX)
    om = tl.load(row + _OM)
    oq = tl.load(row + _OQ)
    os_ = tl.load(row + _OS)
    oa = tl.load(row + _OA)
    akeep = tl.load(row + _AKEEP)
    am = tl.load(row + _AM)
    write_slot = tl.load(row + _WRITE_SLOT).to(tl.int32)
    save = tl.load(row + _SAVE_SAMPLE) != 0.0
    # A row that needs a buffer the caller did not give poisons the output (see the module docstring).
    bad = (not valid) | (write_slot >= num_slots)
    bad = bad | ((os_ != 0.0) | save) & (not HAS_SAVED)
    bad = bad | ((oa != 0.0) | (am != 0.0)) & (not HAS_ACC)
    for j in tl.static_range(_MAX_HISTORY):
        bad = bad | ((tl.load(row + _OH0 + j) != 0.0) & (j >= num_slots))

    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < frame_numel
    keep = tl.where(bad, False, mask)  # state writes

    # -- reads: x, the three branches (or eIP and the cache), then the state terms the row uses ----
    x = tl.load(x_ptr + f * stride_x_f + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CACHE:
        c_base = c_ptr + f * stride_c_f + offs
    if CACHED:
        eip = tl.load(e_ptr + f * stride_e_f + offs, mask=mask, other=0.0).to(tl.float32)
        d_i = tl.load(c_base, mask=mask, other=0.0)
        d_p = tl.load(c_base + stride_c_half, mask=mask, other=0.0)
    else:
        e00 = tl.load(e_ptr + f * stride_e_f + offs, mask=mask, other=0.0).to(tl.float32)
        eip = tl.load(e_ptr + (f + num_frames) * stride_e_f + offs, mask=mask, other=0.0).to(tl.float32)
        ei0 = tl.load(e_ptr + (f + 2 * num_frames) * stride_e_f + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALES_FROM_PTR:
        s_i = tl.load(si_ptr + f * stride_scale)
        s_p = tl.load(sp_ptr + f * stride_scale)
    else:
        s_i = si_value
        s_p = sp_value
    if CACHED:  # in the order of combine_cached
        m = eip + (s_i - 1.0) * d_i + (s_p - 1.0) * d_p
    else:  # in the order of combine_guidance
        m = e00 + s_i * (ei0 - e00) + s_p * (eip - ei0)

    # q = (0 + qx*x) + qm*m; out accumulates left to right; zero coefficients skip their term
    q = tl.where(qx != 0.0, qx * x, 0.0)
    q = tl.where(qm != 0.0, q + qm * m, q)
    o = tl.where(ox != 0.0, ox * x, 0.0)
    o = tl.where(om != 0.0, o + om * m, o)
    o = tl.where(oq != 0.0, o + oq * q, o)
    if HAS_SAVED:
        s_base = s_ptr + f * stride_s_f + offs
        saved = tl.load(s_base, mask=tl.where(os_ != 0.0, mask, False), other=0.0)
        o = tl.where(os_ != 0.0, o + os_ * saved, o)
    if HAS_HISTORY:
        h_base = h_ptr + f * stride_h_f + offs
        for j in tl.static_range(_MAX_HISTORY):
            oh = tl.load(row + _OH0 + j)
            use = (oh != 0.0) & (j < num_slots)
            h = tl.load(h_base + j * stride_h_slot, mask=tl.where(use, mask, False), other=0.0)
            o = tl.where(use, o + oh * h, o)
    if HAS_ACC:
        a_base = a_ptr + f * stride_a_f + offs
        acc = tl.load(a_base, mask=tl.where((oa != 0.0) | (akeep != 0.0), mask, False), other=0.0)
        o = tl.where(oa != 0.0, o + oa * acc, o)

    # -- writes: state (after every read of these elements), then out -----------------------------
    if HAS_CACHE and not CACHED:  # a refresh keeps the differences (guidance_differences)
        tl.store(c_base, ei0 - e00, mask=keep)
        tl.store(c_base + stride_c_half, eip - ei0, mask=keep)
    if HAS_HISTORY:
        slot = tl.maximum(write_slot, 0).to(tl.int64)
        tl.store(h_base + slot * stride_h_slot, q, mask=tl.where(write_slot >= 0, keep, False))
    if HAS_SAVED:
        tl.store(s_base, x, mask=tl.where(save, keep, False))
    if HAS_ACC:
        new_acc = tl.where(akeep == 0.0, am * m, akeep * acc + am * m)
        tl.store(a_base, new_acc, mask=tl.where((akeep != 0.0) | (am != 0.0) | (oa != 0.0), keep, False))
    o = tl.where(bad, float("nan"), o)
    tl.store(out_ptr + f * stride_out_f + offs, _round_to(o, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. bfloat16 is rounded by hand (what the GPU's cvt.rn
    does) because the CPU interpreter truncates: one code path, the one tested on the CPU."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, 0x7FC0, bits)  # NaN stays a (quiet) NaN
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


# ------------------------------------------------------------------------------------------------
# Launcher: checks, strides, grid
# ------------------------------------------------------------------------------------------------
def _row_layout(t: torch.Tensor, lead: int) -> tuple[int, ...]:
    """Strides of the dims after ``lead`` whose size is > 1 (the order of the elements in a row)."""
    return tuple(st for sz, st in zip(t.shape[lead:], t.stride()[lead:]) if sz > 1)


def _row_is_dense(t: torch.Tensor, lead: int) -> bool:
    """Do the dims after ``lead`` address one dense block (in any order of the dims)?"""
    expected = 1
    for size, stride in sorted(zip(t.shape[lead:], t.stride()[lead:]), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _rows_overlap(sizes: Sequence[int], strides: Sequence[int], row_numel: int) -> bool:
    """Would rows indexed by (sizes, strides), each ``row_numel`` dense elements, share memory?"""
    if row_numel == 0 or 0 in sizes:
        return False
    extent = row_numel
    for size, stride in sorted(zip(sizes, strides), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` that ``t`` can touch."""
    start = t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return start, start + (last + 1) * t.element_size()


def _check_buffer(
    name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
    layout: tuple[int, ...], lead: int,
) -> None:  # fmt: skip
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; latents are on {device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}; expected {dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    if not _row_is_dense(t, lead) or _row_layout(t, lead) != layout:
        raise ValueError(
            f"{name} has strides {t.stride()}: its C, H, W must use the same dense element order as "
            f"latents (strides {layout} for the dims of size > 1; contiguous NCHW and channels_last are "
            f"supported when every buffer uses the same one)"
        )


def _scale_arg(name: str, s: float | torch.Tensor, frames: int, device: torch.device) -> tuple[torch.Tensor | None, float, int]:
    """(tensor or None, host value, stride) for a guidance scale."""
    if isinstance(s, torch.Tensor):
        if s.device != device:
            raise ValueError(f"{name} is on {s.device}; latents are on {device}")
        if s.dtype != torch.float32:
            raise ValueError(f"{name} has dtype {s.dtype}; expected torch.float32")
        if s.numel() not in (1, frames) or s.dim() > 1:
            raise ValueError(f"{name} has shape {tuple(s.shape)}; expected a scalar, (1,) or ({frames},)")
        return s, 0.0, 0 if s.numel() == 1 else s.stride(0)
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"{name} must be a float or a float32 tensor, got {type(s).__name__}")
    return None, float(s), 0


def _pick_block(frame_numel: int, frames: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): on a GPU, about two programs per SM at least, 256..1024 elements each;
    in the interpreter (CPU) one block per row when possible (its cost is per program)."""
    if device.type != "cuda":
        return min(triton.next_power_of_2(max(frame_numel, 16)), 4096), 4
    block = triton.next_power_of_2(max(triton.cdiv(frame_numel * frames, 2 * _sm_count(device.index)), 1))
    block = max(256, min(1024, block))
    return block, block // 256  # 8 elements per thread: 16-byte accesses for 16-bit dtypes


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def _guided_step_fwd(
    unet_out: torch.Tensor,
    latents: torch.Tensor,
    table: torch.Tensor,
    step: int | torch.Tensor,
    scale_image: float | torch.Tensor,
    scale_pose: float | torch.Tensor,
    state: StepState,
    out: torch.Tensor | None,
    guidance_cache: torch.Tensor | None,
) -> torch.Tensor:
    """Check every argument (ValueError naming it), allocate ``out`` if needed, launch."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a 4-D tensor (F, C, H, W), got {shape}")
    device, dtype = latents.device, latents.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"latents has dtype {dtype}; supported: float32, float16, bfloat16")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"latents is on {device}: the Triton kernel runs on CUDA (on the CPU only with TRITON_INTERPRET=1 "
            f"set before triton is imported); use guided_step_ref there"
        )
    frames, c, h, w = latents.shape
    sample_shape = (frames, c, h, w)
    row_numel = c * h * w
    if not _row_is_dense(latents, 1):
        raise ValueError(f"latents has strides {latents.stride()}: each frame must be one dense block")
    if _rows_overlap((frames,), (latents.stride(0),), row_numel):
        raise ValueError(f"latents has strides {latents.stride()}: its frames overlap")
    layout = _row_layout(latents, 1)

    if not isinstance(unet_out, torch.Tensor):
        raise ValueError(f"unet_out must be a torch.Tensor, got {type(unet_out).__name__}")
    # F rows (F > 0): a cached step, eIP alone; else the three branches
    cached = unet_out.dim() == 4 and unet_out.shape[0] == frames > 0
    if cached and guidance_cache is None:
        raise ValueError(
            f"guidance_cache is required: unet_out has shape {tuple(unet_out.shape)}, the {frames} rows of latents "
            f"(a cached step: e(I,P) alone); without a cache it holds the three branches, expected "
            f"{(NUM_BRANCHES * frames, c, h, w)}"
        )
    rows = frames if cached else NUM_BRANCHES * frames
    _check_buffer("unet_out", unet_out, (rows, c, h, w), dtype, device, layout, 1)
    if guidance_cache is not None:
        _check_buffer("guidance_cache", guidance_cache, (2,) + sample_shape, torch.float32, device, layout, 2)
        if _rows_overlap(guidance_cache.shape[:2], guidance_cache.stride()[:2], row_numel):
            raise ValueError(f"guidance_cache has strides {guidance_cache.stride()}: its halves or frames overlap")

    if not isinstance(table, torch.Tensor):
        raise ValueError(f"table must be a torch.Tensor, got {type(table).__name__}")
    if table.device != device:
        raise ValueError(f"table is on {table.device}; latents are on {device}")
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != NUM_COLUMNS or table.shape[0] < 1:
        raise ValueError(f"table must be float32 (num_steps, {NUM_COLUMNS}), got {table.dtype} {tuple(table.shape)}")
    if table.stride() != (NUM_COLUMNS, 1):
        raise ValueError(f"table must be contiguous, got strides {table.stride()}")
    num_steps = table.shape[0]

    if isinstance(step, torch.Tensor):
        if step.device != device:
            raise ValueError(f"step is on {step.device}; latents are on {device}")
        if step.dtype not in (torch.int32, torch.int64) or step.numel() != 1:
            raise ValueError(f"step must be a 1-element int32/int64 tensor, got {step.dtype} {tuple(step.shape)}")
        step_tensor, step_value = step, 0
    elif isinstance(step, int) and not isinstance(step, bool):
        if not 0 <= step < num_steps:
            raise ValueError(f"step {step} is outside the table's {num_steps} steps")
        step_tensor, step_value = None, step
    else:
        raise ValueError(f"step must be an int or a 1-element int32 tensor, got {type(step).__name__}")

    si_tensor, si_value, si_stride = _scale_arg("scale_image", scale_image, frames, device)
    sp_tensor, sp_value, sp_stride = _scale_arg("scale_pose", scale_pose, frames, device)
    if (si_tensor is None) != (sp_tensor is None):
        raise ValueError("scale_image and scale_pose must both be tensors or both be floats")
    if si_tensor is not None and (si_stride != sp_stride or si_tensor.numel() != sp_tensor.numel()):
        raise ValueError(
            f"scale_image {tuple(si_tensor.shape)} and scale_pose {tuple(sp_tensor.shape)} must have the same "
            f"shape and strides"
        )

    if not isinstance(state, StepState):
        raise ValueError(f"state must be a StepState, got {type(state).__name__}")
    hist, saved, acc = state.history, state.saved_sample, state.accumulator
    num_slots = 0
    if hist is not None:
        num_slots = hist.shape[0] if hist.dim() == 5 else -1
        if not 1 <= num_slots <= MAX_HISTORY:
            raise ValueError(f"state.history has shape {tuple(hist.shape)}; expected (1..{MAX_HISTORY}, F, C, H, W)")
        _check_buffer("state.history", hist, (num_slots,) + sample_shape, torch.float32, device, layout, 2)
        if _rows_overlap(hist.shape[:2], hist.stride()[:2], row_numel):
            raise ValueError(f"state.history has strides {hist.stride()}: its slots or frames overlap")
    for name, buf in (("state.saved_sample", saved), ("state.accumulator", acc)):
        if buf is not None:
            _check_buffer(name, buf, sample_shape, torch.float32, device, layout, 1)
            if _rows_overlap((frames,), (buf.stride(0),), row_numel):
                raise ValueError(f"{name} has strides {buf.stride()}: its frames overlap")

    if out is None:
        out = torch.empty_like(latents)
    else:
        _check_buffer("out", out, sample_shape, dtype, device, layout, 1)
        if _rows_overlap((frames,), (out.stride(0),), row_numel):
            raise ValueError(f"out has strides {out.stride()}: its frames overlap")
        o0, o1 = _span(out)
        same_as_latents = out.data_ptr() == latents.data_ptr() and out.stride() == latents.stride()
        others = [("unet_out", unet_out), ("state.history", hist), ("state.saved_sample", saved)]
        others += [("state.accumulator", acc)] + ([] if same_as_latents else [("latents", latents)])
        for name, t in others:
            if t is not None and t.numel():
                t0, t1 = _span(t)
                if o0 < t1 and t0 < o1:
                    raise ValueError(f"out overlaps {name} (only out=latents, exactly, may alias)")
    if guidance_cache is not None and guidance_cache.numel():
        c0, c1 = _span(guidance_cache)
        others = [("out", out), ("latents", latents), ("unet_out", unet_out), ("state.history", hist)]
        others += [("state.saved_sample", saved), ("state.accumulator", acc)]
        for name, t in others:
            if t is not None and t.numel():
                t0, t1 = _span(t)
                if c0 < t1 and t0 < c1:
                    raise ValueError(f"guidance_cache overlaps {name} (it must be a buffer of its own)")
    if frames == 0 or row_numel == 0:
        return out

    block, num_warps = _pick_block(row_numel, frames, device)
    grid = (triton.cdiv(row_numel, block), frames)
    dummy = out  # stands in for absent buffers; never dereferenced (constexpr flags)
    cache = guidance_cache
    args = (
        out, latents, unet_out,
        hist if hist is not None else dummy, saved if saved is not None else dummy,
        acc if acc is not None else dummy, cache if cache is not None else dummy,
        table, step_tensor if step_tensor is not None else table,
        si_tensor if si_tensor is not None else table, sp_tensor if sp_tensor is not None else table,
        step_value, si_value, sp_value,
        num_steps, frames, row_numel, num_slots,
        out.stride(0), latents.stride(0), unet_out.stride(0),
        hist.stride(0) if hist is not None else 0, hist.stride(1) if hist is not None else 0,
        saved.stride(0) if saved is not None else 0, acc.stride(0) if acc is not None else 0,
        cache.stride(0) if cache is not None else 0, cache.stride(1) if cache is not None else 0, si_stride,
    )  # fmt: skip
    flags = dict(
        STEP_FROM_PTR=step_tensor is not None, SCALES_FROM_PTR=si_tensor is not None,
        HAS_HISTORY=hist is not None, HAS_SAVED=saved is not None, HAS_ACC=acc is not None,
        HAS_CACHE=cache is not None, CACHED=cached,
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    if device.type == "cuda":
        with torch.cuda.device(device):
            _guided_step_kernel[grid](*args, **flags)
    else:
        _guided_step_kernel[grid](*args, **flags)
    return out


def _interpreting() -> bool:
    """Was the kernel built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton was imported)?"""
    return not isinstance(_guided_step_kernel, triton.runtime.JITFunction)


# ------------------------------------------------------------------------------------------------
# Public function and reference
# ------------------------------------------------------------------------------------------------
def guided_step(
    unet_out: torch.Tensor,
    latents: torch.Tensor,
    table: torch.Tensor,
    step: int | torch.Tensor,
    scale_image: float | torch.Tensor,
    scale_pose: float | torch.Tensor,
    state: StepState,
    out: torch.Tensor | None = None,
    guidance_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual-guidance combine and scheduler step ``k`` in one pass (Triton).

    Args:
        unet_out: ``(3F, C, H, W)`` UNet output, branch-major (``[0:F]`` e00, ``[F:2F]`` eIP,
            ``[2F:3F]`` eI0), same dtype as ``latents`` (float32, float16 or bfloat16); or, for a cached
            step (``guidance_cache`` required), ``(F, C, H, W)``: eIP alone.
        latents: ``(F, C, H, W)`` current sample x.
        table: ``(num_steps, NUM_COLUMNS)`` float32 coefficient table of the run, on the device.
        step: the step index k: a Python int, or a 1-element int32/int64 device tensor (read by the
            kernel: no host synchronisation; an index outside the table writes NaN to ``out``).
        scale_image, scale_pose: s_I, s_p: floats, or float32 device tensors of shape ``()``/``(1,)``
            (one pair for all frames) or ``(F,)`` (one per frame); both floats or both tensors.
        state: the run's fp32 buffers: ``history`` ``(slots, F, C, H, W)``, ``saved_sample`` and
            ``accumulator`` ``(F, C, H, W)`` or None as :class:`TableInfo` says; updated in place.
        out: ``(F, C, H, W)`` in the dtype of ``latents``; may be ``latents`` itself. Given, the call
            allocates nothing and never synchronises (capturable in a CUDA graph).
        guidance_cache: ``(2, F, C, H, W)`` float32 (:mod:`dreampose.guidance`), the element order of
            ``latents`` in each of its ``2F`` rows, a buffer of its own: ``[0]`` = d_I = eI0 - e00,
            ``[1]`` = d_P = eIP - eI0. With a ``3F``-row ``unet_out`` (a refresh) the kernel writes it in
            the same pass (``out`` as without a cache); with an ``F``-row one (a cached step) it reads it:
            ``m = eIP + (s_I - 1) * d_I + (s_p - 1) * d_P``. A step index outside the table leaves it
            unchanged, like the state.

    Returns:
        ``out``: ``(F, C, H, W)`` the next sample, dtype of ``latents``. Arithmetic is fp32.
    """
    return _guided_step_fwd(unet_out, latents, table, step, scale_image, scale_pose, state, out, guidance_cache)


def guided_step_ref(
    unet_out: torch.Tensor,
    latents: torch.Tensor,
    table: torch.Tensor,
    step: int | torch.Tensor,
    scale_image: float | torch.Tensor,
    scale_pose: float | torch.Tensor,
    state: StepState,
    out: torch.Tensor | None = None,
    guidance_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference of :func:`guided_step` (same signature and shapes):
    :func:`dreampose.guidance.combine_guidance` (fp32, not rounded; with ``guidance_cache``, a refresh,
    also ``guidance_cache.copy_(guidance_differences(unet_out, F))``), or for an ``F``-row ``unet_out``
    :func:`dreampose.guidance.combine_cached` with ``guidance_cache``, then
    :func:`dreampose_rt.scheduler.table.table_step_ref` with ``table[step]``. Synchronises (reads
    ``step`` and the row on the host); raises on a step outside the table instead of writing NaN.

    Shapes: unet_out ``(3F, C, H, W)`` (or ``(F, C, H, W)``: a cached step), latents ``(F, C, H, W)``,
    table ``(num_steps, NUM_COLUMNS)``, scales float / ``()`` / ``(1,)`` / ``(F,)``, state as in
    :func:`guided_step`, out ``(F, C, H, W)``, guidance_cache ``(2, F, C, H, W)`` float32.
    Returns the next sample ``(F, C, H, W)`` in the dtype of ``latents``.
    """
    frames = latents.shape[0]
    k = int(step.reshape(()).item()) if isinstance(step, torch.Tensor) else int(step)
    if not 0 <= k < table.shape[0]:
        raise ValueError(f"step {k} is outside the table's {table.shape[0]} steps")
    cached = unet_out.shape[0] == frames > 0
    if cached and guidance_cache is None:
        raise ValueError(
            f"guidance_cache is required: unet_out has shape {tuple(unet_out.shape)}, the {frames} rows of latents "
            f"(a cached step: e(I,P) alone)"
        )

    def as_scale(s: float | torch.Tensor) -> float | torch.Tensor:
        return s.reshape(()) if isinstance(s, torch.Tensor) and s.numel() == 1 else s

    if cached:
        m = combine_cached(unet_out, guidance_cache, as_scale(scale_image), as_scale(scale_pose))
    else:
        m = combine_guidance(unet_out, frames, as_scale(scale_image), as_scale(scale_pose))
        if guidance_cache is not None:
            guidance_cache.copy_(guidance_differences(unet_out, frames))
    return table_step_ref(table[k].cpu(), m, latents, state, out=out)


__all__ = ["SUPPORTED_DTYPES", "guided_step", "guided_step_ref"]
