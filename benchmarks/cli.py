"""``python -m benchmarks``: the benchmark suite from the command line, run from a checkout.

    python -m benchmarks --device cuda --model sd15 --frames 4            # the paper's settings, every backend
    python -m benchmarks --device cpu --model tiny --frames 2 --steps 4   # a quick look on a laptop
    python -m benchmarks --backends baseline,torch,onnxruntime --build-engines

Prints the markdown table and writes <out-dir>/bench_<device>_<model>_<date>.{json,md,png}. The other
benchmarks run as their own modules (``python -m benchmarks.bench_unet``, ``.bench_fused_step``,
``.bench_scheduler``, ``.scheduler_warmup``). Errors in the settings print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from dreampose.settings import PRECISIONS, QUALITY_PRESETS, SCHEDULER_NAMES

from .suite import RUNTIME_BACKENDS, VARIANTS

logger = logging.getLogger(__name__)


def _backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    return list(VARIANTS) if names == ["all"] else names


def cmd_bench(args: argparse.Namespace) -> int:
    from dreampose.settings import SamplingSettings

    from .bench_scheduler import RESULTS
    from .report import markdown, write_outputs
    from .suite import BenchSettings, model_config, run_suite

    sampling = SamplingSettings.for_model(model_config(args.model), quality=args.quality, scheduler=args.scheduler,
                                          steps=args.steps, seed=args.seed)
    settings = BenchSettings(
        device=args.device, model=args.model, frames=args.frames, frames_per_batch=args.frames_per_batch,
        sampling=sampling, model_seed=args.model_seed, baseline_steps=args.baseline_steps,
        baseline_frames=args.baseline_frames, backends=args.backends,
        precision=args.precision, repeats=args.repeats, warmup=args.warmup,
        breakdown_rounds=args.breakdown_rounds, engines=args.engines,
        build_engines=args.build_engines, cache_dir=args.cache_dir, compile_mode=args.compile_mode,
        channels_last=args.channels_last,
        peak_tflops=args.peak_tflops, micro=not args.no_micro, micro_rounds=args.micro_rounds,
    )  # fmt: skip
    result = run_suite(settings)
    paths = write_outputs(result, args.out_dir or RESULTS)
    sys.stdout.write(markdown(result) + "\n")
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The suite's command line."""
    from dreampose_rt.cli import ArgumentParser, add_common_options

    p = ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_common_options(p, top_level=True)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--model", default="tiny",
                   help="tiny (the test configuration), sd15 (SD 1.5-size networks, random weights, 640 x 512: "
                        "for a GPU) or a model folder (default: tiny)")  # fmt: skip
    p.add_argument("--frames", type=int, default=4, help="frames T of the batched render (default: 4)")
    p.add_argument("--frames-per-batch", type=int, default=None,
                   help="frames per UNet call in the batched render (default: T; engines: at most their max)")
    p.add_argument("--quality", default="exact", choices=tuple(QUALITY_PRESETS),
                   help="the runtime backends' quality preset (scheduler, steps, caching; docs/quality.md; default: exact)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the runtime backends (default: the preset's)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                   help="scheduler of the runtime backends (the baseline always runs diffusers' PNDM)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="PNDM steps of the baseline (default: --steps; the original release: 100)")
    p.add_argument("--baseline-frames", type=int, default=None,
                   help="frames of the baseline's batched render (default: --frames). It renders one frame at a "
                   "time, so its s/frame does not depend on this; fewer saves minutes on a GPU")
    p.add_argument("--backends", type=_backends, default=list(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}, or all (default: all)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="runtime backends' precision (default: fp16 on CUDA, fp32 on the CPU; engines: theirs)")
    p.add_argument("--repeats", type=int, default=3, help="measured interleaved rounds (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not measured (default: 1)")
    p.add_argument("--breakdown-rounds", type=int, default=1,
                   help="instrumented rounds for the phase breakdown, after the timed ones (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the tiny / sd15 models' random weights (default: 0)")
    p.add_argument("--engines", default=None, help=f"engine folder for {' / '.join(RUNTIME_BACKENDS[2:])}")
    p.add_argument("--build-engines", action="store_true",
                   help="build (or reuse) onnxruntime engines for the model in --cache-dir when --engines is not given")
    p.add_argument("--cache-dir", default=None, help="where built engines are kept (default: a folder in the temp dir)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled backend")
    p.add_argument("--channels-last", action="store_true",
                   help="torch / compiled backends: the UNet in channels_last (NHWC) memory format")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense fp16/bf16 peak for MFU (default: from a table by GPU name)")
    p.add_argument("--no-micro", action="store_true", help="skip the microbenchmarks")
    p.add_argument("--micro-rounds", type=int, default=10, help="rounds of each microbenchmark (default: 10)")
    p.add_argument("--out-dir", default=None, help="folder for the JSON, markdown and PNG (default: benchmarks/results)")
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``: the exit code."""
    from dreampose_rt.cli import run_command

    return run_command(build_parser(), argv, prog="benchmarks")
