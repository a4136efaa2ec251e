"""The ``dreampose-rt`` command line.

Subcommands: ``animate`` (render a subject along a pose sequence; with no arguments, the embedded demo),
``evaluate`` (the evaluation protocol of dreampose.evaluation), ``import-release`` (the original release's
.pth checkpoints -> a model folder), and the ones other modules register: ``build-engine``
(dreampose_rt.export.cli) and ``train``, ``finetune``, ``synth-data``, ``prepare-data``
(dreampose.training.cli).

Building the parser imports no torch (``dreampose-rt --help`` answers at once): each subcommand registers
its options from a light module and imports its heavy code only when it runs. Errors in the user's input
print one line and exit with code 2; exit 1 is an internal error; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from dreampose.settings import NOISE_MODES, PRECISIONS, QUALITY_PRESETS, SCHEDULER_NAMES, EvalProtocol, check_int
from dreampose.utils import DreamPoseError

logger = logging.getLogger("dreampose_rt")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: OSErrors that are the user's input or machine (a missing or read-only file, a full disk), not our bugs
MACHINE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                            errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENAMETOOLONG, errno.EXDEV, errno.ELOOP,
                            errno.EMFILE, errno.ENFILE, errno.EFBIG, errno.EIO})
QUALITY_HELP = ("exact: the paper's sampler (PNDM, the model's 100 steps, no caching); balanced and fast: fewer "
                "UNet evaluations (guidance and deep-feature caching, fewer steps) at a measured cost in quality, "
                "docs/quality.md (default: exact)")


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


# --------------------------------------------------------------------------------------------------
# animate
# --------------------------------------------------------------------------------------------------
def cmd_animate(args: argparse.Namespace) -> int:
    from dreampose.pipeline import check_frames_per_batch
    from dreampose.poses import load_poses
    from dreampose.settings import SamplingSettings
    from dreampose.video import check_fps

    from .animate import check_outputs, render_to_file
    from .demo import DEMO_MODEL_DIR, demo_poses, runtime_subject
    from .runtime import Runtime, resolve_device

    # every setting first: nothing is loaded or written before they all pass
    if (args.image is None) != (args.poses is None):
        raise DreamPoseError("--image and --poses go together (give both, or neither for the demo)")
    check_fps(args.fps, args.out)  # also rejects an unsupported output type
    if args.image is not None:
        image = Path(args.image)
        if image.is_dir():
            raise DreamPoseError(f"{image}: is a folder; --image takes one image file (PNG or JPEG)")
        if not image.is_file():
            raise DreamPoseError(f"{image}: image not found")
    if args.fast and args.quality not in (None, "fast"):
        raise DreamPoseError(f"--fast is --quality fast; it does not go with --quality {args.quality}")
    sampling = {
        "quality": "fast" if args.fast else args.quality, "scheduler": args.scheduler, "steps": args.steps,
        "s_image": args.s_image, "s_pose": args.s_pose, "seed": args.seed, "noise": args.noise,
    }
    SamplingSettings.for_model(None, **sampling)  # the values checked; the model's defaults come later
    if args.frames_per_batch is not None:
        check_frames_per_batch(args.frames_per_batch)
    if args.ray is None:
        resolve_device(args.device)
    elif args.device != "auto":
        raise DreamPoseError("--device does not go with --ray: each actor renders on its own GPU, or on CPUs")
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    if args.subject is not None:
        from dreampose.lora import SubjectInfo

        SubjectInfo.load(args.subject)  # a subject folder (whether it fits the model is checked at load)
    inputs = [args.image, args.poses, args.model or DEMO_MODEL_DIR, args.engines, args.subject]
    check_outputs(args.out, inputs)
    poses = load_poses(args.poses) if args.poses is not None else None
    if poses is not None and args.frames:
        parse_frames(args.frames, len(poses))
    if args.ray is not None:
        return _animate_on_ray(args, sampling)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    rt = Runtime.from_pretrained(args.model, backend=args.backend, device=args.device, precision=args.precision,
                                 engines=args.engines, subject=runtime_subject(args.model, args.image, args.subject))
    if args.model is None:
        logger.info("no --model: using the embedded demo model (64 x 48, trained on SynthFashion; see docs/quality.md)%s",
                    ", with the demo subject's LoRA" if rt.subject is not None and args.subject is None else "")
    elif rt.subject is not None:
        logger.info("subject %s merged into %s", rt.subject, args.model)
    c = rt.config
    if poses is None:
        poses = demo_poses(height=c.height, width=c.width)
        logger.info("no --image/--poses: rendering the embedded demo (%d frames)", len(poses))
    frames = parse_frames(args.frames, len(poses)) if args.frames else None
    settings = SamplingSettings.for_model(c, **sampling)
    report = render_to_file(rt, args.out, poses, args.image, settings, frames=frames,
                            frames_per_batch=args.frames_per_batch, fps=args.fps, progress=not args.quiet,
                            restart=args.restart, inputs=inputs)
    if report.rendered:
        logger.info("wrote %s: %d frames of %d x %d (H x W); %d rendered in %.1f s (%.2f s per frame), %d resumed; "
                    "backend %s", report.out, report.frames, c.height, c.width, report.rendered, report.seconds,
                    report.seconds_per_frame, report.resumed, report.backend)
    else:
        logger.info("wrote %s: %d frames of %d x %d (H x W), all from the earlier run's work folder; backend %s",
                    report.out, report.frames, c.height, c.width, report.backend)
    return EXIT_OK


def _animate_on_ray(args: argparse.Namespace, sampling: dict) -> int:
    """``animate --ray``: the one video on a Ray cluster (dreampose_rt.distributed), same work folder."""
    from .distributed import render_video

    job = {"image": args.image, "poses": args.poses, "out": args.out, "model": args.model, "subject": args.subject,
           "backend": args.backend, "precision": args.precision, "engines": args.engines, "fps": args.fps,
           "frames": args.frames, "frames_per_batch": args.frames_per_batch, "restart": args.restart,
           **{k: v for k, v in sampling.items() if v is not None}}
    address = None if args.ray == "local" else args.ray
    r = render_video({k: v for k, v in job.items() if v is not None}, address, actors=args.actors,
                     threads=args.threads, progress=not args.quiet)
    logger.info("wrote %s: %d frames; %d rendered on the cluster, %d resumed", r.out, r.frames, r.rendered, r.resumed)
    return EXIT_OK


def cmd_render_jobs(args: argparse.Namespace) -> int:
    from .distributed import read_jobs, render_jobs, summary_table

    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    if args.actors is not None:
        check_int("--actors", args.actors, 1)
    jobs = read_jobs(args.jobs)
    address = None if args.ray in (None, "local") else args.ray
    state = Path(args.jobs).with_name(Path(args.jobs).name + ".done.json")
    results = render_jobs(jobs, address, actors=args.actors, threads=args.threads, progress=not args.quiet,
                          state=state)
    sys.stdout.write(summary_table(results) + "\n")
    failed = [r for r in results if r.status == "failed"]
    logger.info("%d job(s): %d done, %d skipped (finished earlier), %d failed", len(results),
                sum(r.status == "done" for r in results), sum(r.status == "skipped" for r in results), len(failed))
    return EXIT_USAGE if failed else EXIT_OK


def _add_render_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render-jobs", help="render many videos on a Ray cluster (one JSON object per line)",
                       description="Render many videos on a Ray cluster: JOBS is a JSON Lines file, one job per line "
                                   "with image, poses, out, model and any animate setting (quality, steps, seed, "
                                   "fps, frames, ...). Jobs are independent: one with bad input fails alone, with its "
                                   "reason in the closing table; the exit code is 2 if any failed. A rerun skips "
                                   "finished jobs (JOBS.done.json) and resumes partial ones. docs/distributed.md.")
    p.add_argument("jobs", help="the jobs file (JSON Lines)")
    p.add_argument("--ray", nargs="?", const="local", default="local", metavar="ADDRESS",
                   help="a Ray cluster's address (default: a local cluster of this machine's GPUs, or its CPUs)")
    p.add_argument("--actors", type=int, default=None, help="render actors (default: one per GPU, or per CPU group)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per actor (default: 1 on machines of up to 4 CPUs, else 4)")
    p.set_defaults(func=cmd_render_jobs)


def _add_animate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("animate", help="render a subject image along a pose sequence (no arguments: the demo)",
                       description="Render a subject image along a pose sequence, one video frame per pose. With no "
                                   "--image/--poses/--model: the embedded demo. Resumable: frames go to <OUT>.work/ "
                                   "as they finish; the same command after a crash renders only what is missing.")
    p.add_argument("--image", help="subject image (PNG/JPEG)")
    p.add_argument("--poses", help="poses: folder of frame_<n>_densepose.npy, .npy/.npz (T, 2, H, W), or IUV images")
    p.add_argument("--out", default="demo.mp4", help="output: .mp4, .gif, or a folder for PNGs (default: demo.mp4)")
    p.add_argument("--model", help="DreamPose model folder (default: the embedded demo model)")
    p.add_argument("--subject", help="a LoRA subject folder of the model (`dreampose-rt finetune --lora-rank R`), "
                                     "merged into its weights at load")
    p.add_argument("--quality", default=None, choices=tuple(QUALITY_PRESETS), help=QUALITY_HELP)
    p.add_argument("--fast", action="store_true", help="the same as --quality fast")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's; exact: the model's, 100)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES, help="default: the preset's (exact: pndm, the paper's)")
    p.add_argument("--s-image", type=float, default=None, help="image guidance scale (default: the model's)")
    p.add_argument("--s-pose", type=float, default=None, help="pose guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same frames (default: 0)")
    p.add_argument("--noise", default="shared", choices=NOISE_MODES,
                   help="one noise for all frames (the paper's, steadier video) or one per frame (default: shared)")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of an .mp4 or .gif (default: 8)")
    p.add_argument("--frames", help="frames to render, A:B (half-open), A:, :B or A (default: all)")
    p.add_argument("--restart", action="store_true",
                   help="discard the frames an interrupted render with other settings left in <OUT>.work")
    p.add_argument("--frames-per-batch", type=int, default=None,
                   help="frames per UNet call (batch 3 x F; default: 1 on the CPU, from free memory on a GPU)")
    p.add_argument("--backend", default="auto", help="auto, torch, compiled, onnxruntime or tensorrt (default: auto)")
    p.add_argument("--engines", help="engine folder from `dreampose-rt build-engine` (onnxruntime / tensorrt)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: fp16 on CUDA, fp32 on the CPU, the engines' own with --engines")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (of each actor with --ray; default: torch's, every core; with --ray see render-jobs)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="render on a Ray cluster: ADDRESS, or a local one of this machine's GPUs or CPUs (docs/distributed.md)")
    p.add_argument("--actors", type=int, default=None, help="with --ray: render actors (default: one per GPU, or per CPU group)")
    p.set_defaults(func=cmd_animate)


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from dreampose.evaluation import evaluate, load_feature_extractor, strip_image, write_report
    from dreampose.model import DreamPoseModel
    from dreampose.outputs import check_output_dir
    from dreampose.settings import SamplingSettings

    from .demo import DEMO_MODEL_DIR, demo_model
    from .runtime import resolve_device

    protocol = EvalProtocol(data=args.data, seed=args.test_seed, videos=args.videos, n_frames=args.frames,
                            stride=args.stride, max_targets=args.max_targets, fvd_clip=args.fvd_clip)
    given = {"quality": args.quality, "scheduler": args.scheduler, "steps": args.steps, "s_image": args.s_image,
             "s_pose": args.s_pose}
    if args.quality == "exact" and args.steps is None:
        given["steps"] = 100  # the protocol's
    SamplingSettings.for_model(None, **given)  # checked before the model is loaded
    if args.compare_to is not None and args.compare_to == args.quality and args.scheduler is None and args.steps is None:
        raise DreamPoseError(f"--compare-to {args.compare_to} is the render itself; compare another --quality with it")
    device = resolve_device(args.device)
    inputs = [args.model or DEMO_MODEL_DIR, None if args.data == "synth" else args.data, args.lpips, args.fid_model,
              args.fvd_model]
    check_output_dir(args.out, "evaluate", inputs)
    if args.model is None:
        model, name = demo_model(), "demo"
    else:
        model, name = DreamPoseModel.from_pretrained(args.model), str(args.model)
    model = model.to(device).eval()
    sampling = SamplingSettings.for_model(model.config, **given)
    lpips = None
    if args.lpips:
        from dreampose.training.stage2 import load_perceptual_loss

        lpips = load_perceptual_loss(args.lpips, model.device)
    fid_model = load_feature_extractor(args.fid_model, model.device, "FID model") if args.fid_model else None
    fvd_model = load_feature_extractor(args.fvd_model, model.device, "FVD model") if args.fvd_model else None
    report = evaluate(model, protocol, sampling=sampling, model_name=name, lpips=lpips, keep_outputs=True,
                      progress=not args.quiet, fid_model=fid_model, fvd_model=fvd_model)
    if args.compare_to is not None:
        from dreampose.evaluation import compare_reports

        reference = SamplingSettings.for_model(model.config, quality=args.compare_to, s_image=args.s_image,
                                               s_pose=args.s_pose)
        if args.compare_to == "exact":
            reference = reference.replace(steps=100)
        logger.info("evaluate: the reference render (%s, %s %d steps)", args.compare_to, reference.scheduler,
                    reference.steps)
        ref_report = evaluate(model, protocol, sampling=reference, model_name=name, keep_outputs=True,
                              progress=not args.quiet)
        report.comparison = compare_reports(report, ref_report)
    strip = strip_image(report, protocol, model.config.height, model.config.width)
    out = write_report(report, args.out, strip, inputs=inputs)
    sys.stdout.write(report.markdown())
    o = report.overall()
    logger.info("wrote %s: IoU %.3f (repeat-subject %.3f, ceiling %.3f)", out, o["model"]["iou"], o["repeat"]["iou"],
                o["gt_iou"])
    return EXIT_OK


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    d = EvalProtocol()
    p = sub.add_parser(
        "evaluate", help="render a test set and report L1, PSNR, SSIM, foreground IoU (LPIPS, FID, FVD with local weights)",
        description="Render a test set with the reference pipeline and score it: L1, PSNR, SSIM and foreground IoU "
                    "per frame (LPIPS, FID and FVD when their networks are given as local files), against two "
                    "references (the subject repeated; the ground truth's own segmentation). Writes metrics.json, "
                    "metrics.md and strip.png. The protocol: docs/quality.md.",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--data", default="synth", help="'synth' (SynthFashion held out) or a UBC-layout folder (default: synth)")
    p.add_argument("--out", required=True, help="output folder: metrics.json, metrics.md, strip.png")
    p.add_argument("--videos", type=int, default=d.videos, help=f"test videos (default: {d.videos})")
    p.add_argument("--frames", type=int, default=d.n_frames,
                   help=f"frames per video (SynthFashion; UBC: at most) (default: {d.n_frames})")
    p.add_argument("--test-seed", type=int, default=d.seed,
                   help=f"SynthFashion seed of the test set (default: {d.seed}, held out from training)")
    p.add_argument("--stride", type=int, default=d.stride, help=f"every STRIDE-th frame is a target (default: {d.stride})")
    p.add_argument("--max-targets", type=int, default=d.max_targets,
                   help=f"at most this many targets per video (default: {d.max_targets})")
    p.add_argument("--quality", default="exact", choices=tuple(QUALITY_PRESETS), help=QUALITY_HELP)
    p.add_argument("--compare-to", default=None, choices=tuple(QUALITY_PRESETS),
                   help="also render with this preset and report PSNR / SSIM to its frames, both renders' SSIM and "
                        "IoU to the ground truth, their frame-to-frame change and time (e.g. --quality balanced "
                        "--compare-to exact: the cost of the preset on your model and data)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None, help="default: the preset's (exact: pndm)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's; exact: 100, the protocol's)")
    p.add_argument("--s-image", type=float, default=None, help="image guidance scale (default: the model's)")
    p.add_argument("--s-pose", type=float, default=None, help="pose guidance scale (default: the model's)")
    p.add_argument("--lpips", default=None, help="a local exported LPIPS module (.pt2 or TorchScript)")
    p.add_argument("--fid-model", default=None,
                   help="FID: a local Inception-v3 pool3 extractor (.pt2 or TorchScript), "
                        "(N, 3, 299, 299) in [-1, 1] -> (N, 2048); see docs/quality.md")
    p.add_argument("--fvd-model", default=None,
                   help="FVD: a local I3D extractor (.pt2 or TorchScript), (N, 3, T, 224, 224) in [-1, 1] -> (N, 400)")
    p.add_argument("--fvd-clip", type=int, default=d.fvd_clip,
                   help=f"FVD clip length in targets (consecutive, non-overlapping; default: {d.fvd_clip})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------------------------------
# import-release
# --------------------------------------------------------------------------------------------------
def cmd_import_release(args: argparse.Namespace) -> int:
    from dreampose.convert import import_release, load_state_dict_file
    from dreampose.model import DreamPoseModel
    from dreampose.outputs import check_output_dir

    check_output_dir(args.out, "import-release", [args.unet, args.adapter, args.vae, args.sd, args.clip])
    # the checkpoints first: a bad file fails before minutes of loading Stable Diffusion
    unet, adapter = (load_state_dict_file(args.unet), args.unet), (load_state_dict_file(args.adapter), args.adapter)
    vae = (load_state_dict_file(args.vae), args.vae) if args.vae else None
    base = DreamPoseModel.from_stable_diffusion(args.sd, args.clip, height=args.height, width=args.width)
    import_release(base, unet, adapter, args.out, vae=vae)
    logger.info("wrote model folder %s", args.out)
    return EXIT_OK


def _add_import_release(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-release", help="convert the original release's .pth checkpoints into a model folder",
                       description="Convert the original DreamPose release's .pth checkpoints (the 14-channel UNet and "
                                   "the adapter) into a model folder, with the VAE, CLIP and scheduler of local "
                                   "Stable Diffusion 1.x and CLIP folders. Nothing is downloaded.")
    p.add_argument("--unet", required=True, help="the release's UNet state dict (.pth)")
    p.add_argument("--adapter", required=True, help="the release's adapter state dict (.pth)")
    p.add_argument("--vae", help="a finetuned VAE (or VAE decoder) state dict (.pth), optional")
    p.add_argument("--sd", required=True, help="local Stable Diffusion 1.x folder (diffusers layout)")
    p.add_argument("--clip", required=True, help="local CLIP vision folder (transformers layout)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--height", type=int, default=640, help="image height of the model (default: 640, the paper's)")
    p.add_argument("--width", type=int, default=512, help="image width of the model (default: 512, the paper's)")
    p.set_defaults(func=cmd_import_release)


# --------------------------------------------------------------------------------------------------
# The parser and main
# --------------------------------------------------------------------------------------------------
class UsageError(DreamPoseError):
    """A command line that does not parse (unknown option, missing value, invalid choice); ``prog`` is
    the command it is for (e.g. "dreampose-rt animate")."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad command line raises UsageError (printed as one line naming
    the command and the option, exit 2) instead of printing the usage block. Subparsers inherit it."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, message)


def add_common_options(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """--debug and --quiet, accepted before and after the subcommand (a subcommand's copy does not
    overwrite what was given before it)."""
    default = False if top_level else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", default=default, help="no progress bar, warnings only")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (imports no torch)."""
    from dreampose.training import cli as training_cli

    from .export import cli as export_cli

    parser = ArgumentParser(prog="dreampose-rt", description="DreamPose: animate a photo along DensePose frames.")
    add_common_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_animate(sub)
    _add_evaluate(sub)
    _add_import_release(sub)
    _add_render_jobs(sub)
    export_cli.add_parser(sub)  # build-engine
    training_cli.add_parser(sub)  # train, finetune, synth-data, prepare-data
    for p in sub.choices.values():
        add_common_options(p)
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    """Log lines of dreampose and dreampose_rt to stderr: INFO (DEBUG with ``debug``, WARNING with ``quiet``)."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dreampose-rt: %(message)s" if not debug else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("dreampose", "dreampose_rt", "benchmarks"):
        logging.getLogger(name).setLevel(level)
    if quiet:  # the libraries' own bars and notices too (read when they are imported, which comes later)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        if "transformers" in sys.modules:
            import transformers

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        if "diffusers" in sys.modules:
            import diffusers

            diffusers.utils.logging.set_verbosity_error()
            diffusers.utils.logging.disable_progress_bar()


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str = "dreampose-rt") -> int:
    """Parse ``argv`` and run the chosen command's ``func(args)`` under the error contract: the user's
    input errors print one line and return EXIT_USAGE, our own bugs one line and EXIT_INTERNAL, with
    ``--debug`` re-raising instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # before parsing: a usage error shows its traceback too
    try:
        args = parser.parse_args(argv)
        debug, quiet = getattr(args, "debug", False), getattr(args, "quiet", False)
        setup_logging(debug, quiet)
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DreamPoseError, OSError) as e:
        if debug:
            raise
        if isinstance(e, OSError) and e.errno not in MACHINE_ERRNOS:
            print(f"{prog}: internal error: {type(e).__name__}: {_one_line(str(e))} (run with --debug for the "
                  "traceback)", file=sys.stderr)
            return EXIT_INTERNAL
        msg = str(e) if isinstance(e, DreamPoseError) else _os_message(e)
        print(f"{e.prog if isinstance(e, UsageError) else prog}: error: {_one_line(msg)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug, not bad input: still one line, with the way to see more
        if debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {_one_line(str(e))} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _os_message(e: OSError) -> str:
    """An OSError as the user needs it: what failed, on which file (e.g. "No space left on device: out.mp4")."""
    where = e.filename if e.filename is not None else ""
    where += f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{e.strerror or e}: {where}" if where else str(e.strerror or e)


def _one_line(message: str) -> str:
    """A message on one line: its lines joined (a library's multi-line message stays readable)."""
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dreampose-rt``. Returns the exit code."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
