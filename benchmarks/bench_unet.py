"""One UNet call in each precision and memory layout, interleaved: where a frame's time goes.

    python -m benchmarks.bench_unet [--model sd15] [--batches 3 24]
        [--variants fp16,fp16-cl,bf16-cl] [--rounds 10] [--compile MODE]

At the paper's settings the UNet is ~99% of a frame's FLOPs (101 calls of 3 samples each), so its call
time decides the frame time. For each variant and batch (3 samples = one frame; 3F = F frames per call):

- the call is what the runtime's torch backend runs per step: ``cat(latents, pose window)`` then the
  UNet; variants named ``-cl`` convert that input to channels_last and run a channels_last copy of the
  UNet (cuDNN's NHWC convolutions on tensor cores need no layout transposes); ``-cudnnbench`` sets
  ``torch.backends.cudnn.benchmark`` while the call is warmed up and captured (but PyTorch caches cuDNN
  plans by shape and layout, not by that flag: after a variant of the same dtype and layout has run,
  the cached plans are reused and nothing is benchmarked; on the H100 run it made no difference, so
  it is not among the defaults); ``-flash``, ``-efficient``, ``-cudnnattn`` or ``-math`` pins the
  attention kernel of ``scaled_dot_product_attention`` (diffusers' attention processor calls it; with none
  pinned PyTorch picks, and a pinned kernel that cannot take the shapes fails the variant, reported under
  ``rejected``); ``--compile MODE`` adds ``compiled-<first variant>``:
  ``torch.compile(unet, mode=MODE)``, MODE ``default`` or ``max-autotune-no-cudagraphs`` (modes that
  capture CUDA graphs themselves cannot be captured again);
- on CUDA, each call is captured in a CUDA graph and replayed (as the runtime replays its steps), timed
  with CUDA events over ``--replays`` back-to-back replays; the first variant is also timed eagerly
  (``<name>-eager``: Python launches every kernel), which shows the launch overhead the graph removes;
- ``ms_per_call`` (median over interleaved rounds), ``tflops`` (FLOPs counted by torch's FLOP counter
  / time), ``mfu`` against the device's dense fp16 peak, and ``rel_err_vs_fp32``: ||out - ref|| / ||ref||
  against the fp32 NCHW call on the same inputs (run with TF32 off), checked before timing: a variant over its dtype's
  tolerance is not timed and is listed under ``rejected`` with its error (a fast wrong variant is no result).

Results: benchmarks/results/bench_unet_<device>_<model>_<date>.json. On the CPU it runs too (no graphs;
useful for the tiny model's plumbing only).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dreampose.settings import PRECISIONS, torch_dtype
from dreampose_rt.graphs import capture as capture_graph

from .measure import count_flops, device_info, device_peak_tflops, meta_copy, slug, today, versions

logger = logging.getLogger(__name__)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: torch.compile modes that use CUDA graphs themselves (a graph inside a capture fails)
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
#: relative error vs the fp32 call that a variant of each dtype must stay under (random weights, 16 blocks deep)
REL_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


#: attention kernels a variant may pin (torch.nn.attention.SDPBackend); none pinned: PyTorch's own choice
ATTENTION = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnnattn": "CUDNN_ATTENTION",
             "math": "MATH"}  # fmt: skip
VARIANT_FORMAT = "'<fp32|fp16|bf16>[-cl][-cudnnbench][-flash|-efficient|-cudnnattn|-math]'"


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant name: '<dtype>[-cl][-cudnnbench][-<attention kernel>]'."""

    name: str
    dtype: torch.dtype
    channels_last: bool
    cudnn_benchmark: bool
    attention: str | None = None  # a key of ATTENTION

    @classmethod
    def parse(cls, name: str) -> "VariantSpec":
        parts = name.split("-")
        flags = parts[1:]
        attention = [p for p in flags if p in ATTENTION]
        if (parts[0] not in PRECISIONS or any(p not in ("cl", "cudnnbench", *ATTENTION) for p in flags)
                or len(attention) > 1 or len(set(flags)) != len(flags)):
            raise ValueError(f"unknown variant {name!r}: {VARIANT_FORMAT}")
        return cls(name, torch_dtype(parts[0]), "cl" in flags, "cudnnbench" in flags, attention[0] if attention else None)

    def attention_context(self):
        """A context that pins the variant's attention kernel (a no-op context when it pins none)."""
        import contextlib

        if self.attention is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, ATTENTION[self.attention]))


def _inputs(model, batch: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """fp32 inputs of one call: latents (B, 4, h, w), pose window (B, 2n, h, w), t (), ehs (B, N, D)."""
    h, w = model.latent_size
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, model.latent_channels, h, w, generator=g).to(device),
        "pose": torch.rand(batch, c.pose_window_channels, h, w, generator=g).mul(2).sub(1).to(device),
        "t": torch.tensor(500, device=device),
        "ehs": torch.randn(batch, model.adapter.config.clip_tokens, model.adapter.config.clip_dim,
                           generator=g).to(device),
    }  # fmt: skip


def _call(unet: torch.nn.Module, spec: VariantSpec, inp: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The step's UNet call in this variant's dtype and layout, on inputs cast once (outside the timing)."""
    lat, pose, ehs = (inp[k].to(spec.dtype) for k in ("latents", "pose", "ehs"))
    t = inp["t"]
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format

    @torch.no_grad()
    def run() -> torch.Tensor:
        x = torch.cat([lat, pose], dim=1).contiguous(memory_format=fmt)
        with spec.attention_context():  # (in a graph, the kernels chosen at capture replay)
            return unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]

    return run


def _graphed(fn: Callable[[], torch.Tensor], spec: VariantSpec) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm up on a side stream (algorithm choice, compilation), capture one call, return (replay, output).
    ``output`` is the graph's own output buffer: it is written by each replay, not by the capture."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    try:
        graph, out = capture_graph(fn, warmup=2)
    finally:
        torch.backends.cudnn.benchmark = saved
    return graph.replay, out


def _time_ms(fn: Callable[[], object], device: torch.device, replays: int) -> float:
    """Milliseconds per call of ``replays`` back-to-back calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays
    t0 = time.perf_counter()
    for _ in range(replays):
        fn()
    return (time.perf_counter() - t0) * 1e3 / replays


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def bench(model, variants: list[str], batches: list[int], device: torch.device, rounds: int = 10,
          replays: int = 5, compile_mode: str | None = None, seed: int = 0) -> dict:
    """Time one UNet call per (variant, batch), interleaved; returns the record (see the module docstring)."""
    specs = [VariantSpec.parse(v) for v in variants]
    if not specs:
        raise ValueError("no variants to time")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants named twice: {variants}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batches must be >= 1, got {batches}")
    if rounds < 1 or replays < 1:
        raise ValueError(f"rounds and replays must be >= 1, got {rounds} and {replays}")
    if compile_mode in GRAPH_COMPILE_MODES:
        raise ValueError(f"compile mode {compile_mode!r} captures CUDA graphs itself; use 'default' or "
                         "'max-autotune-no-cudagraphs' (each call is captured here already)")
    unet32 = copy.deepcopy(model.unet).to(device=device, dtype=torch.float32).eval()
    unets: dict[tuple[torch.dtype, bool], torch.nn.Module] = {}

    def unet_for(spec: VariantSpec) -> torch.nn.Module:
        key = (spec.dtype, spec.channels_last)
        if key not in unets:
            u = unet32 if spec.dtype == torch.float32 and not spec.channels_last else copy.deepcopy(unet32)
            unets[key] = u.to(dtype=spec.dtype, memory_format=torch.channels_last if spec.channels_last
                              else torch.contiguous_format)  # fmt: skip
        return unets[key]

    h, w = model.latent_size
    meta = meta_copy(model)
    flops_per_sample = count_flops(
        lambda: meta.predict_noise(torch.empty(1, model.latent_channels, h, w, device="meta"),
                             torch.empty(1, model.config.pose_window_channels, h, w, device="meta"),
                             torch.tensor(500, device="meta"),
                             torch.empty(1, model.adapter.config.clip_tokens, model.adapter.config.clip_dim,
                                         device="meta")))  # fmt: skip
    info = device_info(device)
    peak = device_peak_tflops(info["name"])[0] if device.type == "cuda" else None
    cuda = device.type == "cuda"

    timed: dict[str, Callable[[], object]] = {}
    rel: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for b in batches:
        inp = _inputs(model, b, device, seed + b)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
        try:
            with torch.no_grad():
                ref = unet32(torch.cat([inp["latents"], inp["pose"]], 1), inp["t"],
                             encoder_hidden_states=inp["ehs"], return_dict=False)[0]  # fmt: skip
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        entries = [(s.name, s, unet_for(s)) for s in specs]
        if compile_mode:
            s0 = specs[0]
            entries.append((f"compiled-{s0.name}", s0, torch.compile(unet_for(s0), mode=compile_mode, dynamic=False)))
        for name, spec, unet in entries:
            key = f"{name}@{b}"
            fn = _call(unet, spec, inp)
            t0 = time.perf_counter()
            try:
                if cuda:
                    replay, out = _graphed(fn, spec)
                    replay()  # a captured graph's output holds nothing until the graph first runs
                    torch.cuda.synchronize(device)
                    timed[key] = replay
                else:
                    out = fn()
                    timed[key] = fn
            except RuntimeError as e:  # e.g. a pinned attention kernel that does not take these shapes
                rejected[key] = f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                logger.error("bench_unet: %s: %s", key, rejected[key])
                continue
            logger.info("bench_unet: %s ready in %.1f s", key, time.perf_counter() - t0)
            rel[key] = _rel(out, ref)
            if not rel[key] <= REL_TOL[spec.dtype]:  # NaN fails too
                rejected[key] = (f"output differs from the fp32 call by {rel[key]:.2e} relative (tolerance "
                                 f"{REL_TOL[spec.dtype]:.0e}): not timed")
                logger.error("bench_unet: %s: %s", key, rejected[key])
                del timed[key]
                continue
            if cuda and name == specs[0].name:
                timed[f"{name}-eager@{b}"] = fn
                rel[f"{name}-eager@{b}"] = rel[key]
        del ref

    samples: dict[str, list[float]] = {k: [] for k in timed}
    for r in range(rounds + 1):  # round 0 warms up
        for k, fn in timed.items():
            ms = _time_ms(fn, device, replays)
            if r:
                samples[k].append(ms)
    results = {}
    for k, ms in samples.items():
        name, b = k.rsplit("@", 1)
        med = statistics.median(ms)
        tflops = flops_per_sample * int(b) / (med * 1e-3) / 1e12
        results[k] = {
            "variant": name, "batch": int(b), "frames": int(b) / 3, "ms_per_call": med,
            "ms_min": min(ms), "ms_max": max(ms), "tflops": tflops, "rel_err_vs_fp32": rel[k],
            **({"mfu": tflops / peak} if peak else {}),
            "ms_per_frame_100_steps": med * 101 / (int(b) / 3),
        }  # fmt: skip
    return {
        "benchmark": "unet_call",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": info,
        "versions": versions(),
        "flops_per_sample": flops_per_sample,
        "peak_tflops": peak,
        "reference": "fp32, NCHW, TF32 off",
        "rounds": rounds,
        "replays_per_sample": replays,
        "timing": "CUDA graph replays between CUDA events" if cuda else "time.perf_counter",
        "results": results,
        "rejected": rejected,
    }


def table(record: dict) -> str:
    lines = [f"{'variant':<28} {'batch':>5} {'ms/call':>9} {'TFLOP/s':>8} {'MFU':>6} {'rel err':>9} "
             f"{'s/frame@101':>12}"]
    for k, r in record["results"].items():
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        lines.append(f"{r['variant']:<28} {r['batch']:>5} {r['ms_per_call']:9.3f} {r['tflops']:8.1f} {mfu:>6} "
                     f"{r['rel_err_vs_fp32']:9.2e} {r['ms_per_frame_100_steps'] / 1e3:12.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="tiny, sd15 (random weights) or a model folder")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--batches", type=int, nargs="+", default=[3, 24], help="UNet batches (3 samples per frame)")
    p.add_argument("--variants", default="fp16,fp16-cl,bf16-cl",
                   help="comma-separated '<fp32|fp16|bf16>[-cl][-cudnnbench]'")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--replays", type=int, default=5, help="back-to-back calls per timed sample")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="also time torch.compile(mode=MODE) of the first variant (default or max-autotune-no-cudagraphs: "
                   "each call is captured in a graph already)")
    p.add_argument("--results", default=RESULTS, help="folder for the JSON record")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dreampose.utils import DreamPoseError, atomic_file
    from dreampose_rt.runtime import resolve_device

    from .suite import load_model

    try:
        device = resolve_device(args.device)
        variants = [v for v in args.variants.split(",") if v]
        for v in variants:
            VariantSpec.parse(v)
        model, _ = load_model(args.model, 0)
        record = bench(model, variants, args.batches, device, args.rounds, args.replays, args.compile)
    except (ValueError, DreamPoseError) as e:
        print(f"bench_unet: {e}", file=sys.stderr)
        return 2
    record["model"] = args.model
    print(table(record))
    compiled = "_compiled" if args.compile else ""
    name = f"bench_unet_{slug(record['device']['name'])}_{slug(args.model)}{compiled}_{today()}.json"
    path = os.path.join(args.results, name)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
