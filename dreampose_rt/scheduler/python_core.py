"""The pure-Python scheduler core: the same control plane as csrc/scheduler/schedule.cpp, line for line.

The production fallback, not a test oracle: ``implementation="python"`` (and ``"auto"`` when the
extension ``dreampose_rt._C`` is missing or refused) builds every run's plan here and applies it with
:func:`~dreampose_rt.scheduler.table.table_step_ref`. The tests also use it to cross-check the C++ core
(the two must give the same timesteps and the same coefficient table, bit for bit).

Scalar arithmetic that diffusers does on fp32 tensors is done on ``numpy.float32`` scalars; per-buffer
weights are combined in float64 and rounded to fp32 once, as in C++.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import SchedulerConfig
from .table import AKEEP, AM, MAX_HISTORY, NUM_COLUMNS, OA, OH, OM, OQ, OS, OX, QM, QX, SAVE_SAMPLE, TIMESTEP, WRITE_SLOT

F = np.float32


def _flog(x: np.float32) -> np.float32:
    return F(math.log(float(x)))


def _fexp(x: np.float32) -> np.float32:
    return F(math.exp(float(x)))


def _fsqrt(x: np.float32) -> np.float32:
    return np.sqrt(F(x), dtype=np.float32)


def _np_linspace(start: float, stop: float, num: int) -> list[float]:
    div = num - 1
    delta = stop - start
    if div > 0:
        step = delta / div
        y = [((i / div) * delta if step == 0.0 else i * step) + start for i in range(num)]
        y[-1] = stop
        return y
    return [i * delta + start for i in range(num)]


def _np_arange(start: float, stop: float, step: float) -> list[float]:
    n = max(int(math.ceil((stop - start) / step)), 0)
    if n == 0:
        return []
    if n == 1:
        return [start]
    delta = (start + step) - start
    return [start] + [start + i * delta for i in range(1, n)]


def _round(v: float) -> int:
    return int(round(v))  # Python's round is half-to-even, like numpy's


def _torch_linspace_f32(start: float, end: float, T: int) -> np.ndarray:
    """torch.linspace(start, end, T, dtype=float32), bit for bit (see schedule.cpp)."""
    if T == 1:
        return np.array([start], dtype=np.float32)
    s, e = F(start), F(end)
    step = float(F(F(e - s) / F(T - 1)))
    return np.array(
        [float(s) + step * i if i < T // 2 else float(e) - step * (T - 1 - i) for i in range(T)], dtype=np.float32
    )


def betas(cfg: SchedulerConfig) -> np.ndarray:
    """fp32 betas ``(num_train_timesteps,)``, as diffusers builds them."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return _torch_linspace_f32(cfg.beta_start, cfg.beta_end, T)
    if cfg.beta_schedule == "scaled_linear":
        r = _torch_linspace_f32(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), T)
        return r * r

    def alpha_bar(t: float) -> float:
        c = math.cos((t + 0.008) / 1.008 * math.pi / 2)
        return c * c

    return np.array([min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """fp32 cumulative products of (1 - beta), accumulated in float64 like torch's CPU cumprod."""
    a = (F(1.0) - betas(cfg)).astype(np.float64)
    return np.cumprod(a).astype(np.float32)


def timesteps(cfg: SchedulerConfig, n: int) -> list[int]:
    """The timesteps of diffusers' ``set_timesteps(n)`` for ``cfg.scheduler``."""
    T = cfg.num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {n!r}")
    if cfg.scheduler == "dpmpp":
        last = T
        if cfg.timestep_spacing == "linspace":
            v = _np_linspace(0.0, float(last - 1), n + 1)
            return [_round(v[i]) for i in range(n, 0, -1)]
        if cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            return [i * ratio + cfg.steps_offset for i in range(n, 0, -1)]
        return [_round(v) - 1 for v in _np_arange(float(last), 0.0, -(T / n))]
    if cfg.timestep_spacing == "linspace":
        asc = [_round(v) for v in _np_linspace(0.0, float(T - 1), n)]
    elif cfg.timestep_spacing == "leading":
        asc = [i * (T // n) + cfg.steps_offset for i in range(n)]
    else:
        asc = [_round(v) - 1 for v in reversed(_np_arange(float(T), 0.0, -(T / n)))]
    if cfg.scheduler == "ddim":
        return asc[::-1]
    m = len(asc)
    if cfg.skip_prk_steps:
        fwd = asc[:-1] + asc[-2:-1] + asc[-1:]
        return fwd[::-1]
    if m < 4:
        raise ValueError(
            f"PNDM with the Runge-Kutta warm-up (skip_prk_steps=False) needs num_inference_steps >= 4, got {n}"
        )
    half = T // n // 2
    a = []
    for k in range(4):
        a += [asc[m - 4 + k], asc[m - 4 + k] + half]
    prk = [a[6]]
    for k in range(5, 0, -1):
        prk += [a[k], a[k]]
    prk.append(a[0])
    return prk + asc[: m - 3][::-1]


@dataclass
class PythonPlan:
    """A run built in Python: the same content as the extension's ``SchedulerPlan``."""

    timesteps: list[int]
    table: torch.Tensor  # (num_steps, NUM_COLUMNS) float32
    num_history_slots: int
    uses_saved_sample: bool
    uses_accumulator: bool


def _alpha(ac: np.ndarray, t: int, what: str) -> np.float32:
    if not 0 <= t < len(ac):
        raise ValueError(f"{what} {t} is outside [0, {len(ac) - 1}]")
    return F(ac[t])


def _pndm_transfer(cfg, ac, final_alpha, t, prev_t) -> tuple[float, float]:
    a_t = _alpha(ac, t, "timestep")
    a_prev = _alpha(ac, prev_t, "previous timestep") if prev_t >= 0 else final_alpha
    b_t = F(F(1.0) - a_t)
    b_prev = F(F(1.0) - a_prev)
    sample_coeff = _fsqrt(F(a_prev / a_t))
    denom = F(F(a_t * _fsqrt(b_prev)) + _fsqrt(F(F(a_t * b_t) * a_prev)))
    c_e = float(F(a_prev - a_t)) / float(denom)
    c_x, c_m = float(sample_coeff), -c_e
    if cfg.prediction_type == "v_prediction":
        c_x += -c_e * float(_fsqrt(b_t))
        c_m = -c_e * float(_fsqrt(a_t))
    return c_x, c_m


def _pndm_rows(cfg, n, ac, ts) -> list[list[float]]:
    final_alpha = F(1.0) if cfg.set_alpha_to_one else F(ac[0])
    T = cfg.num_train_timesteps
    ratio = T // n
    num_prk = 0 if cfg.skip_prk_steps else 12
    past: list[int] = []
    free = [0, 1, 2]
    rows = []
    for c, t in enumerate(ts):
        row = [0.0] * NUM_COLUMNS
        row[TIMESTEP], row[QM], row[WRITE_SLOT] = float(t), 1.0, -1.0
        w_q, w_a, w_h = 0.0, 0.0, [0.0] * MAX_HISTORY
        from_saved = False
        if c < num_prk:
            prev_t = t - (0 if c % 2 else T // n // 2)
            t = ts[c // 4 * 4]
            if c % 4 == 0:
                w_q, row[AKEEP], row[AM], row[SAVE_SAMPLE] = 1.0, 0.0, float(F(1.0 / 6.0)), 1.0
                slot = free.pop(0)
                row[WRITE_SLOT] = float(slot)
                past.append(slot)
            elif c % 4 in (1, 2):
                w_q, from_saved, row[AKEEP], row[AM] = 1.0, True, 1.0, float(F(1.0 / 3.0))
            else:
                w_a, w_q, from_saved = 1.0, 1.0 / 6.0, True
        else:
            prev_t = t - ratio
            appended = c != 1
            if not appended:
                prev_t, t = t, t + ratio
            hist = list(past)
            length = len(hist) + (1 if appended else 0)
            if length == 1 and c == 0:
                w_q, row[SAVE_SAMPLE] = 1.0, 1.0
            elif length == 1 and c == 1:
                w_q, from_saved = 0.5, True
                w_h[hist[-1]] = 0.5
            elif length == 2:
                w_q = 1.5
                w_h[hist[-1]] = -0.5
            elif length == 3:
                w_q = 23.0 / 12.0
                w_h[hist[-1]], w_h[hist[-2]] = -16.0 / 12.0, 5.0 / 12.0
            else:
                w_q = 55.0 / 24.0
                w_h[hist[-1]], w_h[hist[-2]], w_h[hist[-3]] = -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0
            if appended:
                slot = past.pop(0) if len(past) == MAX_HISTORY else free.pop(0)
                row[WRITE_SLOT] = float(slot)
                past.append(slot)
        c_x, c_m = _pndm_transfer(cfg, ac, final_alpha, t, prev_t)
        row[OS if from_saved else OX] = float(F(c_x))
        row[OQ] = float(F(c_m * w_q))
        for j in range(MAX_HISTORY):
            row[OH[j]] = float(F(c_m * w_h[j]))
        row[OA] = float(F(c_m * w_a))
        rows.append(row)
    return rows


def _ddim_rows(cfg, n, ac, ts) -> list[list[float]]:
    final_alpha = F(1.0) if cfg.set_alpha_to_one else F(ac[0])
    ratio = cfg.num_train_timesteps // n
    rows = []
    for t in ts:
        row = [0.0] * NUM_COLUMNS
        row[TIMESTEP], row[WRITE_SLOT] = float(t), -1.0
        prev_t = t - ratio
        a_t = _alpha(ac, t, "timestep")
        a_prev = _alpha(ac, prev_t, "previous timestep") if prev_t >= 0 else final_alpha
        b_t = F(F(1.0) - a_t)
        sa, sb = _fsqrt(a_t), _fsqrt(b_t)
        direction = _fsqrt(F(F(1.0) - a_prev))
        if cfg.prediction_type == "epsilon":
            row[QX] = float(F(1.0 / float(sa)))
            row[QM] = float(F(-float(sb) / float(sa)))
            row[OM] = float(direction)
        else:
            row[QX], row[QM] = float(sa), -float(sb)
            row[OM] = float(F(float(direction) * float(sa)))
            row[OX] = float(F(float(direction) * float(sb)))
        row[OQ] = float(_fsqrt(a_prev))
        rows.append(row)
    return rows


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    alpha = F(F(1.0) / _fsqrt(F(F(sigma * sigma) + F(1.0))))
    sig = F(sigma * alpha)
    lam = F(np.inf) if sig == 0 else F(_flog(alpha) - _flog(sig))
    return alpha, sig, lam


def _dpmpp_rows(cfg, ac, ts) -> list[list[float]]:
    n = len(ts)
    for i in range(1, n):
        if ts[i] >= ts[i - 1]:
            raise ValueError(
                f"num_inference_steps={n} with timestep_spacing gives the repeated timestep {ts[i]}; "
                "DPM-Solver++ needs strictly decreasing timesteps"
            )
    sigmas = []
    for t in ts:
        a = _alpha(ac, t, "timestep")
        sigmas.append(_fsqrt(F(F(F(1.0) - a) / a)))
    a0 = F(ac[0])
    sigmas.append(F(0.0) if cfg.final_sigmas_type == "zero" else _fsqrt(F(F(F(1.0) - a0) / a0)))
    rows = []
    for i in range(n):
        row = [0.0] * NUM_COLUMNS
        row[TIMESTEP], row[WRITE_SLOT] = float(ts[i]), -1.0
        last = i == n - 1
        lower_order_final = last and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        a_s, s_s, l_s = _alpha_sigma(sigmas[i])
        a_t, s_t, l_t = _alpha_sigma(sigmas[i + 1])
        if cfg.prediction_type == "epsilon":
            row[QX] = float(F(1.0 / float(a_s)))
            row[QM] = float(F(-float(s_s) / float(a_s)))
        else:
            row[QX], row[QM] = float(a_s), -float(s_s)
        h = F(l_t - l_s)
        em1 = F(-1.0) if s_t == 0 else F(_fexp(F(-h)) - F(1.0))
        a_coef = F(a_t * em1)
        row[OX] = 0.0 if s_t == 0 else float(F(s_t / s_s))
        if cfg.solver_order == 1 or i == 0 or lower_order_final:
            row[OQ] = -float(a_coef)
        else:
            _, _, l_s1 = _alpha_sigma(sigmas[i - 1])
            h0 = F(l_s - l_s1)
            inv_r0 = F(F(1.0) / F(h0 / h))
            if cfg.solver_type == "midpoint":
                w_d1 = -float(F(F(0.5) * a_coef))
            else:
                w_d1 = float(F(a_t * F(F(em1 / h) + F(1.0))))
            row[OQ] = float(F(-float(a_coef) + w_d1 * float(inv_r0)))
            row[OH[0]] = float(F(-w_d1 * float(inv_r0)))
        if cfg.solver_order == 2:
            row[WRITE_SLOT] = 0.0
        rows.append(row)
    return rows


def make_plan(cfg: SchedulerConfig, n: int) -> PythonPlan:
    """Timesteps and coefficient table of a run of ``n`` steps."""
    ts = timesteps(cfg, n)
    ac = alphas_cumprod(cfg)
    if cfg.scheduler == "pndm":
        rows = _pndm_rows(cfg, n, ac, ts)
    elif cfg.scheduler == "ddim":
        rows = _ddim_rows(cfg, n, ac, ts)
    else:
        rows = _dpmpp_rows(cfg, ac, ts)
    if rows:
        rows[-1][WRITE_SLOT], rows[-1][SAVE_SAMPLE], rows[-1][AKEEP], rows[-1][AM] = -1.0, 0.0, 0.0, 0.0
    table = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), NUM_COLUMNS)
    return PythonPlan(
        timesteps=ts,
        table=table,
        num_history_slots=max([int(r[WRITE_SLOT]) + 1 for r in rows] + [0]),
        uses_saved_sample=any(r[SAVE_SAMPLE] != 0 or r[OS] != 0 for r in rows),
        uses_accumulator=any(r[OA] != 0 or r[AM] != 0 for r in rows),
    )
