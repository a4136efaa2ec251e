"""The ``build-engine`` subcommand: thin argument parsing around ``build_engines``.

``dreampose_rt.cli`` calls :func:`add_parser` to register it (this module imports no torch, so that
``dreampose-rt --help`` stays fast); :func:`run` imports the export code when the command runs. A
DreamPoseError from the build reaches the command line's handler: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging

from .manifest import ENGINE_BACKENDS, ENGINE_PRECISIONS, NETWORKS

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Build the engines as ``args`` says; returns 0. DreamPoseErrors propagate to the CLI's handler."""
    from .build import build_engines

    manifest = build_engines(
        args.model,
        args.out,
        backend=args.backend,
        precision=args.precision,
        max_frames=args.max_frames,
        refit_from=args.refit_from,
        subject=args.subject,
        opt_frames=args.opt_frames,
        dynamic_resolution=args.dynamic_resolution,
        opset=args.opset,
        vae_output=args.vae_output,
        check=not args.no_check,
        optimization_level=args.optimization_level,
        workspace_bytes=None if args.workspace_gb is None else int(args.workspace_gb * 1024**3),
        networks=tuple(args.networks),
    )
    for name, rec in manifest.networks.items():
        logger.info("%s: %s (onnx %s, engine %s)", name, rec.engine, rec.onnx_action, rec.engine_action)
    logger.info("engines in %s (%s, %s), %.1f s", args.out, manifest.backend, manifest.precision, manifest.seconds)
    return 0


def add_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``build-engine`` on ``subparsers`` with ``func=run``."""
    p = subparsers.add_parser(
        "build-engine",
        help="export a DreamPose model folder to checked ONNX graphs and ONNX Runtime / TensorRT engines",
        description=(
            "Export the conditioning encoder, the UNet and the VAE decoder to ONNX, check each against PyTorch "
            "in ONNX Runtime, and (with --backend tensorrt) build TensorRT engines. Artifacts whose inputs did "
            "not change are reused; new weights of the same architecture are refitted."
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="DreamPose model folder (save_pretrained layout)")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR", help="engine folder to create or update")
    p.add_argument("--backend", default="onnxruntime", choices=ENGINE_BACKENDS,
                   help="the runtime backend the engines are for (default: onnxruntime)")
    p.add_argument("--precision", default="fp32", choices=ENGINE_PRECISIONS,
                   help="precision of the engines (default: fp32)")
    p.add_argument("--max-frames", type=int, default=4, metavar="N", help="frames per engine call (UNet batch 3N; default 4)")
    p.add_argument("--opt-frames", type=int, default=None, metavar="N", help="frames the profile is tuned for (default: max)")
    p.add_argument("--refit-from", default=None, metavar="SUBJECT_DIR",
                   help="a subject's finetuned model folder: refit its weights into the engines")
    p.add_argument("--subject", default=None, metavar="SUBJECT_DIR",
                   help="a LoRA subject folder of --model (finetune --lora-rank): the merged weights go into the "
                        "engines (refitted where the base model's engines exist)")
    p.add_argument("--dynamic-resolution", action="store_true", help="dynamic height/width in UNet and VAE decoder profiles")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--vae-output", choices=("float", "uint8"), default="float",
                   help="VAE decoder output: float image in [-1, 1] (N,3,H,W) or uint8 (N,H,W,3)")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS, help="networks to build (default: all)")
    p.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT workspace limit in GiB (default: no limit)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch check (not recommended)")
    p.set_defaults(func=run)
