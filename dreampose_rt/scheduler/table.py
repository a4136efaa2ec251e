"""The per-step coefficient table of a scheduler run, and the pure-PyTorch step that applies it.

Every step of PNDM (PLMS and its Runge-Kutta warm-up), DDIM (eta = 0) and DPM-Solver++ (orders 1
and 2) is linear in a few buffers. For a run (a scheduler configuration plus ``n`` inference
steps) the table is a float32 tensor of shape ``(num_steps, NUM_COLUMNS)``: row ``k`` holds
everything step ``k`` needs, so a kernel applies it from device memory with no host logic, and a
whole denoising loop can be captured in one CUDA graph (the step index is the only thing that
changes; the kernel reads ``table[k]``).

Buffers (all ``numel`` = the sample's number of elements, contiguous)
---------------------------------------------------------------------
- ``x``: the current sample (input; fp32 or fp16).
- ``m``: the model output for this step (input; same dtype as ``x``). With three-branch guidance the
  UNet output ``(3F, C, H, W)`` is combined first, per element:
  ``m = e00 + s_I * (eI0 - e00) + s_p * (eIP - eI0)`` where rows ``[0:F]`` are e00 (null image,
  null pose), ``[F:2F]`` eIP (image + pose), ``[2F:3F]`` eI0 (image, null pose); ``s_I, s_p`` per frame.
  With guidance caching (:mod:`dreampose.guidance`) a *refresh* step combines the same way and also
  writes the fp32 cache ``(2, F, C, H, W)``: ``[0]`` = d_I = eI0 - e00, ``[1]`` = d_P = eIP - eI0; a
  *cached* step gets eIP alone (``F`` rows) and ``m = eIP + (s_I - 1) * d_I + (s_p - 1) * d_P``.
- ``H[0..MAX_HISTORY-1]``: history ring, fp32, ``(MAX_HISTORY or fewer, numel)``: past ``q`` values.
- ``S``: saved sample, fp32 (PNDM keeps the sample of the first evaluation of a step).
- ``A``: accumulator, fp32 (PNDM's Runge-Kutta sum of slopes).
- ``out``: the next sample (output; dtype of ``x``). It may alias ``x``.

Row ``k`` (columns by index; names in :data:`COLUMNS`)
-------------------------------------------------------
====  ============  ==============================================================================
col   name          meaning
====  ============  ==============================================================================
0     timestep      the timestep to evaluate the model at for step k (an integer stored as float)
1     qx            q = qx * x + qm * m   (the converted output kept in the history: eps for PNDM,
2     qm                                   the x0 prediction for DDIM and DPM-Solver++)
3     ox            out = ox*x + om*m + oq*q + os*S + oh0*H[0] + oh1*H[1] + oh2*H[2] + oa*A
4     om
5     oq
6     os
7-9   oh0..oh2      weights of the history slots (physical slot indices, not "steps ago")
10    oa
11    akeep         A <- akeep * A + am * m   (when akeep == 0: A <- am * m, A is not read)
12    am
13    write_slot    after the update, H[write_slot] <- q; -1: q is not kept
14    save_sample   1: after the update, S <- x; 0: S unchanged
====  ============  ==============================================================================

Rules a kernel must follow
--------------------------
1. A term whose coefficient is exactly 0 is skipped: its buffer is not read (buffers start
   uninitialised; ``0 * NaN`` would poison the result). ``write_slot``, ``save_sample`` and the
   ``A`` update happen after every read of the same element (the update is element-wise, so
   in-place updates are safe).
2. Arithmetic is fp32: fp16 inputs are converted on load and the output rounded on store. The
   history, ``S`` and ``A`` buffers are fp32.
3. Evaluation order (what the C++ data plane and :func:`table_step_ref` do):
   ``q = (0 + qx*x) + qm*m``, then ``out`` accumulates its terms left to right as written above.
4. Buffer needs of a run: :class:`TableInfo` (``num_history_slots`` slots ``0..n-1``, whether
   ``S`` / ``A`` are used). Nothing is carried across runs: allocate (or just reuse) per run.

The layout is defined here only; the C++ core publishes its column names and the extension is
refused at load time if they differ from :data:`COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreampose.guidance import combine_cached, combine_guidance

COLUMNS: tuple[str, ...] = (
    "timestep", "qx", "qm", "ox", "om", "oq", "os", "oh0", "oh1", "oh2",
    "oa", "akeep", "am", "write_slot", "save_sample",
)  # fmt: skip
TIMESTEP, QX, QM, OX, OM, OQ, OS, OH0, OH1, OH2, OA, AKEEP, AM, WRITE_SLOT, SAVE_SAMPLE = range(len(COLUMNS))
OH = (OH0, OH1, OH2)
NUM_COLUMNS = len(COLUMNS)
MAX_HISTORY = 3


@dataclass(frozen=True)
class TableInfo:
    """What a run's table needs besides x and m."""

    num_history_slots: int
    uses_saved_sample: bool
    uses_accumulator: bool

    @staticmethod
    def of(table: torch.Tensor) -> "TableInfo":
        """Derive the buffer needs from a table ``(num_steps, NUM_COLUMNS)``."""
        t = table.detach().to("cpu", torch.float32)
        slots = int(t[:, WRITE_SLOT].max().item()) + 1 if t.shape[0] else 0
        return TableInfo(
            num_history_slots=max(slots, 0),
            uses_saved_sample=bool((t[:, SAVE_SAMPLE] != 0).any() or (t[:, OS] != 0).any()),
            uses_accumulator=bool((t[:, OA] != 0).any() or (t[:, AM] != 0).any()),
        )


@dataclass
class StepState:
    """The fp32 state buffers of a run. ``history``: ``(num_history_slots, *shape)`` or None;
    ``saved_sample`` and ``accumulator``: ``shape`` or None."""

    history: torch.Tensor | None
    saved_sample: torch.Tensor | None
    accumulator: torch.Tensor | None

    @staticmethod
    def allocate(info: TableInfo, shape: torch.Size | tuple[int, ...], device: torch.device | str) -> "StepState":
        """Uninitialised buffers for a sample of ``shape`` (the table never reads before writing)."""
        kw = dict(dtype=torch.float32, device=device)
        return StepState(
            history=torch.empty((info.num_history_slots, *shape), **kw) if info.num_history_slots else None,
            saved_sample=torch.empty(shape, **kw) if info.uses_saved_sample else None,
            accumulator=torch.empty(shape, **kw) if info.uses_accumulator else None,
        )


def guidance_combine_ref(
    model_output: torch.Tensor, scale_image: float | torch.Tensor, scale_pose: float | torch.Tensor
) -> torch.Tensor:
    """Three-branch guidance in plain PyTorch (fp32 arithmetic, result in the input dtype).

    model_output: ``(3F, C, H, W)`` branch-major (e00, eIP, eI0 blocks of F rows).
    scale_image, scale_pose: floats or ``(F,)`` tensors (one per frame).
    Returns ``(F, C, H, W)``: ``e00 + s_I * (eI0 - e00) + s_p * (eIP - eI0)``.
    """
    if model_output.shape[0] % 3:
        raise ValueError(f"model_output has {model_output.shape[0]} rows; expected 3F (three guidance branches)")
    f = model_output.shape[0] // 3
    return combine_guidance(model_output, f, scale_image, scale_pose).to(model_output.dtype)


def guidance_cached_ref(
    model_output: torch.Tensor,
    cache: torch.Tensor,
    scale_image: float | torch.Tensor,
    scale_pose: float | torch.Tensor,
) -> torch.Tensor:
    """The guided output of a cached step in plain PyTorch (fp32 arithmetic, result in the input dtype, as
    :func:`guidance_combine_ref` rounds it).

    model_output: ``(F, C, H, W)``: eIP alone (the image-and-pose branch).
    cache: ``(2, F, C, H, W)`` float32 from the last refresh step: ``[0]`` = eI0 - e00, ``[1]`` = eIP - eI0
        (:func:`dreampose.guidance.guidance_differences`).
    scale_image, scale_pose: floats or ``(F,)`` tensors (one per frame).
    Returns ``(F, C, H, W)``: ``eIP + (s_I - 1) * d_I + (s_p - 1) * d_P``
    (:func:`dreampose.guidance.combine_cached`).
    """
    return combine_cached(model_output, cache, scale_image, scale_pose).to(model_output.dtype)


def table_step_ref(
    row: torch.Tensor | list[float],
    model_output: torch.Tensor,
    sample: torch.Tensor,
    state: StepState,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply one table row in plain PyTorch, following the rules of this module.

    row: ``(NUM_COLUMNS,)`` (a tensor or a list of floats).
    model_output, sample: same shape and dtype (already guided: see :func:`guidance_combine_ref`).
    state: the run's :class:`StepState` (updated in place).
    Returns the next sample, dtype of ``sample`` (written into ``out`` if given).
    """
    r = row.tolist() if isinstance(row, torch.Tensor) else row
    x = sample.float()
    m = model_output.float()
    q = torch.zeros_like(x)
    if r[QX] != 0.0:
        q = q + r[QX] * x
    if r[QM] != 0.0:
        q = q + r[QM] * m
    o = torch.zeros_like(x)
    terms = [(r[OX], lambda: x), (r[OM], lambda: m), (r[OQ], lambda: q), (r[OS], lambda: state.saved_sample)]
    terms += [(r[OH[j]], (lambda j=j: state.history[j])) for j in range(MAX_HISTORY)]
    terms += [(r[OA], lambda: state.accumulator)]
    for coef, buf in terms:
        if coef != 0.0:
            o = o + coef * buf()
    slot = int(r[WRITE_SLOT])
    if slot >= 0:
        state.history[slot].copy_(q)
    if r[SAVE_SAMPLE] != 0.0:
        state.saved_sample.copy_(x)
    if state.accumulator is not None and (r[AKEEP] != 0.0 or r[AM] != 0.0 or r[OA] != 0.0):
        if r[AKEEP] == 0.0:
            state.accumulator.copy_(r[AM] * m)
        else:
            state.accumulator.copy_(r[AKEEP] * state.accumulator + r[AM] * m)
    if out is None:
        return o.to(sample.dtype)
    return out.copy_(o)
