"""Training subcommands of ``dreampose-rt`` (registered by dreampose_rt.cli as a plugin):

    train          stage 1 on a UBC-layout folder or SynthFashion (one device, or many under accelerate launch)
    finetune       stage 2 on one subject (UNet + adapter, then the VAE decoder) -> a model folder, or with
                   --lora-rank R a subject folder of LoRA weights (animate --subject)
    synth-data     write SynthFashion in the UBC layout
    prepare-data   videos (mp4) + DensePose outputs -> the UBC layout

Every option of ``train`` and ``finetune`` has a config field; ``--config FILE`` starts from a saved
config (a run's config.json) and the options given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from ..utils import DreamPoseError
from .config import LR_SCHEDULES, MIXED_PRECISIONS, PIXEL_LOSSES, FinetuneConfig, Stage1Config

logger = logging.getLogger(__name__)


def _overlay(cls: type, base: Any, values: dict[str, Any]) -> Any:
    """``base`` (a config dataclass) with the non-None ``values`` replaced; keys 'optim.lr' reach nested configs."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if value is None:
            continue
        if "." in key:
            sub, name = key.split(".", 1)
            nested.setdefault(sub, {})[name] = value
        else:
            top[key] = value
    for sub, fields in nested.items():
        top[sub] = dataclasses.replace(getattr(base, sub), **fields)
    return dataclasses.replace(base, **top)


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", dest="run.seed", type=int, help="seed of the data order, noise and augmentation")
    g.add_argument("--mixed-precision", dest="run.mixed_precision", choices=MIXED_PRECISIONS,
                   help="training precision of the trained networks' compute")
    g.add_argument("--gradient-checkpointing", dest="run.gradient_checkpointing", action="store_const", const=True,
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--checkpoint-every", dest="run.checkpoint_every", type=int,
                   help="optimizer steps between checkpoints (0: only at the end)")
    g.add_argument("--keep-checkpoints", dest="run.keep_checkpoints", type=int, help="newest checkpoints kept (0: all)")
    g.add_argument("--log-every", dest="run.log_every", type=int, help="optimizer steps between log lines")
    g.add_argument("--resume", nargs="?", const="latest", help="resume: the newest checkpoint, or the one given")
    g.add_argument("--config", help="a saved config (JSON, a run's config.json) to start from")


def _optim_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--weight-decay", dest="optim.weight_decay", type=float, help="AdamW weight decay")
    g.add_argument("--grad-clip", dest="optim.grad_clip", type=float, help="max gradient norm (0: off)")
    g.add_argument("--lr-schedule", dest="optim.schedule", choices=LR_SCHEDULES, help="learning-rate schedule")
    g.add_argument("--warmup-steps", dest="optim.warmup_steps", type=int, help="linear warm-up steps of the schedule")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _add_defaults(p: argparse.ArgumentParser, config_cls: type) -> None:
    """Append "(default: X)" to the help of every option that sets a field of ``config_cls`` (nested
    fields by their dotted dest, e.g. optim.lr), from the dataclass's own defaults."""
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
            if dataclasses.is_dataclass(f.default):
                for sub in dataclasses.fields(f.default):
                    defaults[f"{f.name}.{sub.name}"] = getattr(f.default, sub.name)
    for action in p._actions:
        key = {"lr": "optim.lr"}.get(action.dest, action.dest)
        if key in defaults and action.help and "default:" not in action.help:
            value = defaults[key]
            shown = "off" if value is False else ("none" if value in ("", ()) else value)
            action.help += f" (default: {shown})".replace("%", "%%")


def _values(args: argparse.Namespace, skip: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in skip}


_SKIP = ("func", "command", "debug", "quiet", "resume", "config")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import Stage1Config, load_config
    from .stage1 import train_stage1

    base = load_config(Stage1Config, args.config) if args.config else Stage1Config()
    values = _values(args, _SKIP)
    values["optim.lr"] = values.pop("lr")
    if args.quiet:
        values["run.progress"] = False
    cfg = _overlay(Stage1Config, base, values)
    result = train_stage1(cfg, resume=args.resume)
    logger.info("stage 1 done (steps %d -> %d): model folder %s", result.start_step, result.end_step, result.model_dir)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig, load_config
    from .stage2 import finetune

    values = _values(args, _SKIP)
    values["images"] = tuple(args.images) if args.images else None
    values["poses"] = tuple(args.poses) if args.poses else None
    if args.quiet:
        values["run.progress"] = False
    if args.config:
        cfg = _overlay(FinetuneConfig, load_config(FinetuneConfig, args.config), values)
    else:
        if not args.images:
            raise DreamPoseError("finetune: give at least one --image")
        cfg = _overlay(FinetuneConfig, FinetuneConfig(images=values["images"]), values)
    result = finetune(cfg, resume=args.resume is not None)
    logger.info("%s: %s", "subject folder" if cfg.lora_rank else "finetuned model folder", result.model_dir)
    return 0


def cmd_synth_data(args: argparse.Namespace) -> int:
    from ..data.synth import SynthFashionConfig, write_synth_fashion

    cfg = SynthFashionConfig(seed=args.seed, n_videos=args.videos, n_frames=args.frames, height=args.height,
                             width=args.width, fps=args.fps)
    write_synth_fashion(args.out, cfg, iuv=args.iuv)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from ..data.dataset import UBCFolder
    from ..data.prepare import prepare_videos

    size = (args.height, args.width) if args.height or args.width else None
    if size is not None and not (args.height and args.width):
        raise DreamPoseError("give both --height and --width to resize")
    folders = prepare_videos(args.videos, args.out, poses=args.poses, size=size, every=args.every, max_frames=args.max_frames)
    if args.poses:
        UBCFolder(args.out)  # the result must load: checks every file
    logger.info("prepared %d video(s) in %s", len(folders), args.out)
    return 0


def _tidy_metavars(subparsers: argparse._SubParsersAction) -> None:
    """Options that set nested fields (dest 'optim.lr') show a plain metavar in --help."""
    for name in ("train", "finetune"):
        for action in subparsers.choices[name]._actions:
            if "." in action.dest and action.metavar is None and action.nargs != 0:
                action.metavar = action.dest.split(".", 1)[1].upper()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register train, finetune, synth-data and prepare-data."""
    p = subparsers.add_parser("train", help="stage 1: train the base model on a video dataset (accelerate launch for several GPUs)",
                              description="Stage 1: train the UNet and the adapter on a video dataset (VAE and CLIP "
                                          "frozen). Options not given come from --config, else the paper's "
                                          "settings. Resumable with --resume. See docs/training.md.")
    p.add_argument("--data", help="UBC-layout dataset folder, or 'synth' for SynthFashion on the fly")
    p.add_argument("--out", dest="output_dir", help="run folder (config, checkpoints, metrics, model/)")
    p.add_argument("--base", dest="base_model", help="model folder to start from, or 'tiny' (the tiny random model)")
    p.add_argument("--sd", dest="sd_dir", help="local Stable Diffusion 1.x folder: start a fresh model (with --clip)")
    p.add_argument("--clip", dest="clip_dir", help="local CLIP vision folder (with --sd)")
    p.add_argument("--height", type=int, help="training resolution (0: the base model's)")
    p.add_argument("--width", type=int, help="training resolution (0: the base model's)")
    p.add_argument("--lr", type=float, help="learning rate (paper: 5e-6)")
    p.add_argument("--batch-size", type=int, help="global batch per optimizer step (paper: 16)")
    p.add_argument("--micro-batch-size", type=int, help="samples per device per forward; the rest is accumulation")
    p.add_argument("--epochs", type=float, help="passes over the target frames (paper: 5)")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps (overrides --epochs; default: from --epochs)")
    p.add_argument("--window", choices=["real", "copies"], help="pose window: real neighbours, or the release's 5 copies")
    p.add_argument("--p-drop-pose", type=float, help="per-sample probability of a null pose")
    p.add_argument("--p-drop-image", type=float, help="per-sample probability of a null image")
    p.add_argument("--p-drop-both", type=float, help="per-sample probability of both null")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.9999; 0: off)")
    p.add_argument("--target-latents", choices=["sample", "mean"],
                   help="target latents: a draw from the VAE posterior (as SD trains) or its mean")
    p.add_argument("--num-workers", type=int, help="data loader worker processes")
    p.add_argument("--synth-videos", type=int, help="SynthFashion videos (--data synth)")
    p.add_argument("--synth-frames", type=int, help="frames per SynthFashion video (--data synth)")
    _optim_options(p)
    _run_options(p)
    _add_defaults(p, Stage1Config)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("finetune", help="stage 2: finetune on one subject (UNet + adapter, then the VAE decoder)",
                              description="Stage 2: specialise a model to one subject (UNet + adapter on the subject's "
                                          "images, then the VAE decoder alone) and write the finetuned model folder. "
                                          "Checkpoints go to --work-dir; --resume continues. See docs/training.md.")
    p.add_argument("--image", dest="images", action="append", help="subject image; repeat for several (front, back)")
    p.add_argument("--poses", dest="poses", action="append",
                   help="the pose of each image (.npy (2, H, W) or IUV image), in order; default <stem>_densepose.npy beside it")
    p.add_argument("--base", dest="base_model", help="model folder to finetune")
    p.add_argument("--out", dest="output_dir", help="the finetuned model folder")
    p.add_argument("--work-dir", help="checkpoints and logs (default: <out>.work)")
    p.add_argument("--batch-size", type=int, help="samples per optimizer step")
    p.add_argument("--unet-steps", type=int, help="paper: 500")
    p.add_argument("--unet-lr", type=float, help="paper: 1e-5")
    p.add_argument("--decoder-steps", type=int, help="paper: 1500")
    p.add_argument("--decoder-lr", type=float, help="paper: 5e-5")
    p.add_argument("--pixel-loss", choices=PIXEL_LOSSES, help="the decoder's pixel loss")
    p.add_argument("--lpips", help="a local TorchScript LPIPS module ((x, y) in [-1, 1] -> distance)")
    p.add_argument("--lpips-weight", type=float, help="weight of the LPIPS term in the decoder loss")
    p.add_argument("--decoder-crop", type=float, help="fraction of the image decoded per step (small crops)")
    p.add_argument("--lora-rank", type=int, help="LoRA of rank R instead of full finetuning: the output is a subject "
                                                 "folder of megabytes for animate --subject (0: full finetuning)")
    p.add_argument("--lora-alpha", type=float, help="the LoRA update's scale numerator (0: the rank, a scale of 1)")
    p.add_argument("--lora-targets", choices=("attention", "attention+conv"), help="the UNet layers LoRA adapts")
    p.add_argument("--lora-decoder", action="store_const", const=True,
                   help="with --lora-rank: also a LoRA of the VAE decoder (the decoder phase; without it, none)")
    p.add_argument("--max-scale", dest="augment.max_scale", type=float, help="largest zoom of the augmentation")
    p.add_argument("--max-shift", dest="augment.max_shift", type=float, help="largest extra shift (fraction of the size)")
    _optim_options(p)
    _run_options(p)
    _add_defaults(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    _tidy_metavars(subparsers)

    p = subparsers.add_parser("synth-data", help="write the SynthFashion dataset in the UBC layout",
                              description="Write SynthFashion, the procedural dataset with exact DensePose-like maps, "
                                          "in the UBC Fashion layout: <out>/synth_<k>/frame_<n>.png beside "
                                          "frame_<n>_densepose.npy. Deterministic for a seed.")
    p.add_argument("--out", required=True, help="dataset folder to write (new, empty, or an earlier synth-data output)")
    p.add_argument("--videos", type=int, default=16, help="videos (default: 16)")
    p.add_argument("--frames", type=int, default=32, help="frames per video (default: 32)")
    p.add_argument("--height", type=int, default=64, help="frame height in pixels (default: 64)")
    p.add_argument("--width", type=int, default=48, help="frame width in pixels (default: 48)")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of the motion (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0; the demo's test set is 1000)")
    p.add_argument("--iuv", action="store_true", help="also write the poses as IUV images")
    p.set_defaults(func=cmd_synth_data)

    p = subparsers.add_parser("prepare-data", help="videos + DensePose outputs -> the UBC training layout",
                              description="Write each video (and its DensePose outputs, produced elsewhere) as a "
                                          "UBC-layout folder: <out>/<video>/frame_<n>.png beside "
                                          "frame_<n>_densepose.npy. See docs/training.md.")
    p.add_argument("--videos", required=True, help="folder of .mp4 files (or one file)")
    p.add_argument("--poses", help="folder of DensePose outputs per video: <name>/ (.npy or IUV images) or <name>.npy")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--height", type=int, help="resize frames and poses to this height (with --width)")
    p.add_argument("--width", type=int, help="resize frames and poses to this width (with --height)")
    p.add_argument("--every", type=_positive_int, default=1, help="keep every N-th frame (default: 1)")
    p.add_argument("--max-frames", type=_positive_int, help="at most this many frames per video (default: all)")
    p.set_defaults(func=cmd_prepare_data)
