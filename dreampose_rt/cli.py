"""The ``dreampose-rt`` command line.

Subcommands: ``animate`` (render a subject along a pose sequence; with no arguments, the embedded demo),
``import-release`` (the original release's .pth checkpoints -> a model folder), and the ones other
modules register (``build-engine``). Errors in the user's input print one line and exit with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from dreampose.utils import DreamPoseError

logger = logging.getLogger("dreampose_rt")

EXIT_USAGE = 2
EXIT_INTERNAL = 1


def parse_frames(spec: str, n_frames: int) -> list[int]:
    """'A:B' (half-open, either side optional) or 'A' -> frame indices, checked against ``n_frames``."""
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else n_frames
        else:
            start = int(spec)
            stop = start + 1
    except ValueError:
        raise DreamPoseError(f"--frames {spec!r}: expected A:B, A: , :B or a single index") from None
    if not (0 <= start < stop <= n_frames):
        raise DreamPoseError(f"--frames {spec!r} is out of range for {n_frames} poses (valid: 0 <= A < B <= {n_frames})")
    return list(range(start, stop))


def cmd_animate(args: argparse.Namespace) -> int:
    from dreampose.poses import load_poses
    from dreampose.video import output_kind

    from .animate import RenderSettings, render_to_file
    from .demo import demo_poses
    from .runtime import Runtime

    if (args.image is None) != (args.poses is None):
        raise DreamPoseError("--image and --poses go together (give both, or neither for the demo)")
    output_kind(args.out)  # reject an unsupported output before any work
    if args.image is not None and not Path(args.image).is_file():
        raise DreamPoseError(f"{args.image}: image not found")
    poses = load_poses(args.poses) if args.poses is not None else None
    if args.model is None:
        logger.info("no --model: using the embedded demo model (64 x 48, trained on SynthFashion; see docs/quality.md)")
    rt = Runtime.from_pretrained(args.model, backend=args.backend, device=args.device, precision=args.precision,
                                 engines=args.engines)
    c = rt.config
    if poses is None:
        poses = demo_poses(height=c.height, width=c.width)
        logger.info("no --image/--poses: rendering the embedded demo (%d frames)", len(poses))
    frames = parse_frames(args.frames, len(poses)) if args.frames else None
    from .runtime import FAST

    scheduler = args.scheduler or (FAST["scheduler"] if args.fast else "pndm")
    steps = args.steps if args.steps is not None else (FAST["steps"] if args.fast else None)
    settings = RenderSettings(
        steps=steps, scheduler=scheduler, s_image=args.s_image, s_pose=args.s_pose, seed=args.seed,
        noise=args.noise, frames_per_batch=args.frames_per_batch,
    )
    report = render_to_file(rt, args.out, poses, args.image, settings, frames=frames, fps=args.fps,
                            progress=not args.quiet, restart=args.restart)
    logger.info(
        "wrote %s: %d frames of %d x %d; %d rendered in %.1f s (%.2f s per frame), %d resumed; backend %s",
        report.out, report.frames, c.width, c.height, report.rendered, report.seconds, report.seconds_per_frame,
        report.resumed, report.backend,
    )
    return 0


def cmd_import_release(args: argparse.Namespace) -> int:
    from dreampose.convert import import_release
    from dreampose.model import DreamPoseModel

    base = DreamPoseModel.from_stable_diffusion(args.sd, args.clip, height=args.height, width=args.width)
    import_release(base, args.unet, args.adapter, args.out, vae=args.vae)
    logger.info("wrote model folder %s", args.out)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreampose-rt", description="DreamPose: animate a photo along DensePose frames.")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("animate", help="render a subject image along a pose sequence (no arguments: the demo)")
    _common(p)
    p.add_argument("--image", help="subject image (PNG/JPEG)")
    p.add_argument("--poses", help="poses: folder of frame_<n>_densepose.npy, .npy/.npz (T, 2, H, W), or IUV images")
    p.add_argument("--out", default="demo.mp4", help="output: .mp4, .gif, or a folder for PNGs (default: demo.mp4)")
    p.add_argument("--model", help="DreamPose model folder (default: the embedded demo model)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 100)")
    p.add_argument("--scheduler", default=None, choices=["pndm", "ddim", "dpmpp"], help="default: pndm (the paper's)")
    p.add_argument("--fast", action="store_true",
                   help="fast mode: DPM-Solver++ with 15 steps (within 2%% of 100 PNDM steps; docs/quality.md)")
    p.add_argument("--s-image", type=float, default=None, help="image guidance scale (default: the model's)")
    p.add_argument("--s-pose", type=float, default=None, help="pose guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="shared", choices=["shared", "per-frame"], help="one noise for all frames, or one per frame")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--frames", help="frames to render, A:B (half-open)")
    p.add_argument("--restart", action="store_true",
                   help="discard the frames an interrupted render with other settings left in <OUT>.work")
    p.add_argument("--frames-per-batch", type=int, default=None,
                   help="frames per UNet call (batch 3 x F; default: 1 on the CPU, from free memory on a GPU)")
    p.add_argument("--backend", default="auto", help="auto, torch, compiled, onnxruntime or tensorrt")
    p.add_argument("--engines", help="engine folder from `dreampose-rt build-engine` (onnxruntime / tensorrt)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 on CUDA, fp32 on the CPU, the engines' own with --engines")
    p.set_defaults(func=cmd_animate)

    p = sub.add_parser("import-release", help="convert the original release's .pth checkpoints into a model folder")
    _common(p)
    p.add_argument("--unet", required=True, help="the release's UNet state dict (.pth)")
    p.add_argument("--adapter", required=True, help="the release's adapter state dict (.pth)")
    p.add_argument("--vae", help="a finetuned VAE (or VAE decoder) state dict (.pth), optional")
    p.add_argument("--sd", required=True, help="local Stable Diffusion 1.x folder (diffusers layout)")
    p.add_argument("--clip", required=True, help="local CLIP vision folder (transformers layout)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--width", type=int, default=512)
    p.set_defaults(func=cmd_import_release)

    for register in _plugin_parsers():
        register(sub)
    for p in sub.choices.values():  # plugins get --debug / --quiet too
        if "--debug" not in p._option_string_actions:
            _common(p)
    return parser


# Modules that register subcommands: each exposes ``add_parser(subparsers)`` and sets ``func``.
PLUGIN_MODULES = (
    "dreampose_rt.export.cli",  # build-engine
    "dreampose.training.cli",  # train, finetune, data preparation
    "dreampose_rt.evaluate",  # evaluate
    "dreampose_rt.benchmarks.cli",  # bench
)


def _plugin_parsers() -> list[Callable]:
    """The ``add_parser`` functions of the plugin modules that import on this machine."""
    import importlib

    registers = []
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            missing = e.name or ""
            if missing.split(".")[0] in ("dreampose", "dreampose_rt") and not name.startswith(missing):
                raise  # a bug in the project's own code: never hide it
            logger.debug("%s unavailable: %s", name, e)  # an optional dependency (onnx, ...) is missing
            continue
        registers.append(module.add_parser)
    return registers


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dreampose-rt: %(message)s" if not debug else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("dreampose", "dreampose_rt"):
        logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dreampose-rt``. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug, args.quiet)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dreampose-rt: interrupted", file=sys.stderr)
        return 130
    except (DreamPoseError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        msg = str(e) if isinstance(e, DreamPoseError) else f"{e.strerror or e}: {e.filename}"
        print(f"dreampose-rt: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug, not bad input: still one line, with the way to see more
        if args.debug:
            raise
        print(f"dreampose-rt: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
