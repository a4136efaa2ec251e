"""``python -m dreampose_rt.info``: what this installation can run, section by section.

Each section is a title and rows of (name, value); other backends add a section function to
:data:`SECTIONS`.
"""

from __future__ import annotations

import platform
import sys
from typing import Callable

Row = tuple[str, str]
Section = tuple[str, list[Row]]


def _versions() -> Section:
    import torch

    rows: list[Row] = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    try:
        import diffusers

        rows.append(("diffusers", diffusers.__version__))
    except ImportError as exc:
        rows.append(("diffusers", f"not installed ({exc})"))
    return "versions", rows


def _extension() -> Section:
    from . import _ext

    avail = _ext.extension_availability()
    if not avail:
        return "native extension dreampose_rt._C", [("status", f"not loaded: {avail.reason}")]
    mod = _ext.load_extension()
    return "native extension dreampose_rt._C", [
        ("status", "loaded"),
        ("file", getattr(mod, "__file__", "?")),
        ("build flags", getattr(mod, "build_flags", "?") or "(none)"),
        ("compiler", getattr(mod, "compiler", "?")),
        ("pybind11", getattr(mod, "pybind11_version", "?")),
        ("built against torch", getattr(mod, "torch_version", "?")),
        ("C++ standard", str(getattr(mod, "cplusplus", "?"))),
    ]


def _scheduler() -> Section:
    from .scheduler import native_core_availability

    avail = native_core_availability()
    status = avail.reason if avail else f"pure-Python fallback ({avail.reason})"
    return "scheduler (pndm, ddim, dpmpp)", [("implementation", status)]


def _kernels() -> Section:
    from .kernels import kernel_availability

    return "fused guidance + scheduler step (Triton)", [("status", kernel_availability().describe())]


def _backends() -> Section:
    """Each runtime backend on the default device: available or why not, and whether ``--backend auto``
    takes it (the same answers the dispatch uses; engine backends are asked as if an engine folder were
    given, since they need one from build-engine)."""
    import torch

    from .backends import availability_report, select_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "fp16" if device.type == "cuda" else "fp32"
    engines = "<engine folder>"
    rows: list[Row] = []
    for name, (avail, auto) in availability_report(device, precision, engines).items():
        if avail and not auto:
            rows.append((name, f"available when asked for by name; {auto.reason}"))
        else:
            rows.append((name, avail.describe()))
    rows.append(("auto picks", f"{select_backend('auto', device, precision, None).name} "
                               f"({select_backend('auto', device, precision, engines).name} with --engines)"))
    return f"runtime backends on {device.type} ({precision})", rows


def _onnx() -> Section:
    rows: list[Row] = []
    for name in ("onnx", "onnxruntime", "onnx_graphsurgeon", "tensorrt"):
        try:
            mod = __import__(name)
            rows.append((name, getattr(mod, "__version__", "installed")))
        except ImportError as exc:
            rows.append((name, f"not installed ({exc})"))
    try:
        import onnxruntime

        rows.append(("onnxruntime providers", ", ".join(onnxruntime.get_available_providers())))
    except ImportError:
        pass
    return "export", rows


SECTIONS: list[Callable[[], Section]] = [_versions, _extension, _scheduler, _kernels, _backends, _onnx]


def collect() -> list[Section]:
    """Every section; a section that fails reports its error instead of stopping the report."""
    out: list[Section] = []
    for fn in SECTIONS:
        try:
            out.append(fn())
        except Exception as exc:  # a broken backend must not hide the others
            out.append((fn.__name__.strip("_"), [("error", f"{type(exc).__name__}: {exc}")]))
    return out


def format_report(sections: list[Section]) -> str:
    lines = []
    for title, rows in sections:
        lines.append(title)
        width = max((len(k) for k, _ in rows), default=0)
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m dreampose_rt.info``: print the report (or, with --json, the same as JSON)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m dreampose_rt.info",
        description="What this installation can run: versions, the native extension, the scheduler, the Triton "
                    "kernels, each runtime backend (available or why not, and what --backend auto picks), export.",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="the report as JSON (section -> {name: value})")
    args = parser.parse_args(argv)
    sections = collect()
    if args.json:
        sys.stdout.write(json.dumps({title: dict(rows) for title, rows in sections}, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
