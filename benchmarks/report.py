"""The suite's outputs: the JSON record, a markdown table and a PNG bar chart (drawn with Pillow).

Pillow draws the chart because it is already a dependency of the project: ``python -m benchmarks`` then
works in a plain install, with no plotting stack to pull in for a dozen rectangles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dreampose.utils import atomic_file

from .measure import slug

logger = logging.getLogger(__name__)

MODE_LABELS = {"one_frame": "one frame", "batched": "batched"}
_COLOURS = {"one_frame": (70, 110, 190), "batched": (235, 140, 50)}


def output_stem(result: dict[str, Any]) -> str:
    """``bench_<device>_<model>[_<quality>][_channels-last]_<date>``: e.g. bench_nvidia-h100-80gb-hbm3_sd15_2026-11-27,
    bench_nvidia-h200_sd15_balanced_2026-12-03 (the quality when it is not the exact preset)."""
    dev = result["device"]
    device = "cpu" if dev["type"] == "cpu" else slug(dev["name"])
    quality = _sampling(result["settings"]).get("quality", "exact")
    quality = f"_{slug(quality)}" if quality != "exact" else ""
    layout = "_channels-last" if result["settings"].get("channels_last") else ""
    return f"bench_{device}_{slug(result['model']['name'])}{quality}{layout}_{result['date'][:10]}"


def _sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings of a record: ``settings.sampling`` (schema 2), or flat in ``settings`` (schema 1)."""
    return settings.get("sampling") or settings


def _g(x: float) -> str:
    return f"{x:.3g}"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown: settings, the main table, the breakdown, unavailable backends, microbenchmarks."""
    s, dev, v = result["settings"], result["device"], result["versions"]
    lines = [
        f"# dreampose-rt benchmark: {result['model']['name']} ({result['model']['height']} x {result['model']['width']}) "
        f"on {dev['name']}",
        "",
        f"{result['date']}; {s['frames']} frames, {_sampling(s)['steps']} {_sampling(s)['scheduler']} steps "
        f"(baseline: {s['baseline_steps'] or _sampling(s)['steps']} PNDM steps"
        + (f", {s['baseline_frames']} of the frames in its batched mode" if s.get("baseline_frames") else "")
        + f"), {s['repeats']} interleaved rounds after {s['warmup']} "
        f"warm-up; timing: {result['timing']}; torch {v['torch']}"
        + (f", CUDA {v['cuda']}" if v.get("cuda") else "") + f", diffusers {v['diffusers']}"
        + (f", commit {v['git_commit'][:10]}" if v.get("git_commit") else ""),
        "",
        "| variant | precision | s/frame, one frame (median / p95) | s/frame, batched (median / p95) | F | frames/s "
        "| speedup one / batched | peak memory | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in result["variants"].items():
        one, bat = r["one_frame"], r["batched"]
        speed = (f"{one['speedup_vs_baseline']:.2f}x / {bat['speedup_vs_baseline']:.2f}x"
                 if "speedup_vs_baseline" in one else "-")  # fmt: skip
        mfu = f"{100 * bat['mfu']:.1f}%" if "mfu" in bat else "-"
        lines.append(
            f"| {name} | {r['precision']} | {_g(one['seconds_per_frame']['median'])} / {_g(one['seconds_per_frame']['p95'])} "
            f"| {_g(bat['seconds_per_frame']['median'])} / {_g(bat['seconds_per_frame']['p95'])} | {bat['frames_per_batch']} "
            f"| {_g(bat['frames_per_second'])} | {speed} | {_bytes(max(one['peak_memory_bytes'], bat['peak_memory_bytes']))} "
            f"| {_g(bat['achieved_tflops'])} | {mfu} |"
        )  # fmt: skip
    lines += [
        "",
        "Breakdown of one frame (ms per frame; UNet and update also per call / step"
        + ("; from the instrumented rounds, which launch every kernel from Python: the timed rounds above "
           "replay CUDA graphs, so their UNet calls and updates are faster than these)"
           if dev["type"] == "cuda" else ")") + ":",
        "",
        "| variant | encode | UNet | UNet per call | guidance + update per step | decode | other | UNet TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["variants"].items():
        one = r["one_frame"]
        b = one["breakdown_per_frame"]
        lines.append(
            f"| {name} | {_g(1e3 * b['encode_s'])} | {_g(1e3 * b['unet_s'])} | {_g(one['unet_ms_per_call'])} "
            f"| {_g(one['guidance_update_ms_per_step'])} | {_g(1e3 * b['decode_s'])} | {_g(1e3 * b['other_s'])} "
            f"| {_g(one['unet_achieved_tflops'])} |"
        )  # fmt: skip
    f = result["flops"]
    lines += [
        "",
        f"FLOPs (torch.utils.flop_counter, meta copy): UNet {f['unet_per_sample'] / 1e9:.4g} GFLOP per sample, "
        f"VAE decode {f['vae_decode_per_frame'] / 1e9:.4g} GFLOP per frame, conditioning "
        f"{f['encode_per_subject'] / 1e9:.4g} GFLOP per subject. Peak: "
        + (f"{result['peak_tflops']:g} TFLOP/s ({result['peak_tflops_source']})." if result["peak_tflops"]
           else f"none ({result['peak_tflops_source']}).")
        + f" Memory: {result['memory_note']}.",
    ]  # fmt: skip
    if result["unavailable"]:
        lines += ["", "Not measured:", ""] + [f"- {k}: {why}" for k, why in result["unavailable"].items()]
    micro = result.get("micro") or {}
    if micro:
        lines += ["", "Microbenchmarks:", ""]
        sched = micro.get("scheduler_step")
        if sched:
            us = sched["median_us_per_step"]
            lines.append(
                f"- scheduler step, {tuple(sched['shape'])} on the CPU: diffusers {us['diffusers_step']:.1f} us, "
                f"ours {us['ours_step']:.1f} us ({sched['speedup_vs_diffusers_step']['ours_step']:.1f}x), "
                f"fused guidance + step {us['ours_fused_combine_step']:.1f} us "
                f"({sched['speedup_vs_diffusers_step']['ours_fused_vs_diffusers_combine_then_step']:.1f}x vs combine "
                "then diffusers step)"
            )  # fmt: skip
        fused = micro.get("fused_step")
        if fused:
            if "skipped" in fused:
                lines.append(f"- fused guidance + update: skipped ({fused['skipped']})")
            else:
                lines.append(
                    f"- fused guidance + update (Triton), one frame: {fused['kernel_us']:.2f} us per step "
                    # records before 2026-11-26's second GPU run timed kernel_us with do_bench, launch included
                    + ("(L2 cold, no launch; " if "kernel_us_do_bench" in fused
                       else "(do_bench, Python launch included; ")
                    + f"{fused['achieved_GBps']:.0f} GB/s), "
                    f"{fused['graph_loop_us_per_step']:.2f} us per step in the captured loop; eager combine + "
                    f"diffusers step {fused['eager_diffusers_us_per_step']:.1f} us "
                    f"({fused['speedup_eager_over_graph_loop']:.0f}x the captured loop)"
                )  # fmt: skip
        unet = micro.get("unet_call")
        if unet:
            parts = [f"{k} {ms:.3g} ms" + (f" ({unet['speedup_vs_torch'][k]:.2f}x torch)" if "speedup_vs_torch" in unet else "")
                     for k, ms in unet["median_ms_per_call"].items()]  # fmt: skip
            lines.append(f"- one UNet call at batch {unet['batch']}: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def bar_chart(result: dict[str, Any], path: str | Path) -> None:
    """A PNG of seconds per frame per variant: one bar at one frame, one batched (median, p95 whisker)."""
    from PIL import Image, ImageDraw

    variants = result["variants"]
    left, right, top, row, bar = 150, 140, 70, 64, 22
    width = 1000
    height = top + row * len(variants) + 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    title, small = _font(18), _font(13)
    m = result["model"]
    d.text((12, 10), f"dreampose-rt benchmark: {m['name']} {m['height']}x{m['width']} on {result['device']['name']}",
           fill="black", font=title)
    s = result["settings"]
    d.text((12, 36), f"seconds per frame (median, whisker p95); {_sampling(s)['steps']} {_sampling(s)['scheduler']} steps, "
           f"{s['frames']} frames batched; {result['date'][:10]}", fill=(80, 80, 80), font=small)  # fmt: skip
    vmax = max(r[mode]["seconds_per_frame"]["p95"] for r in variants.values() for mode in MODE_LABELS)
    scale = (width - left - right) / vmax
    for i, (name, r) in enumerate(variants.items()):
        y0 = top + i * row
        d.text((12, y0 + row // 2 - 8), name, fill="black", font=small)
        for j, mode in enumerate(MODE_LABELS):
            sp = r[mode]["seconds_per_frame"]
            y = y0 + 6 + j * (bar + 4)
            x1 = left + max(1, round(sp["median"] * scale))
            d.rectangle([left, y, x1, y + bar], fill=_COLOURS[mode])
            xp = left + round(sp["p95"] * scale)
            d.line([x1, y + bar // 2, xp, y + bar // 2], fill="black", width=1)
            d.line([xp, y + 4, xp, y + bar - 4], fill="black", width=1)
            d.text((max(x1, xp) + 6, y + 4), f"{sp['median']:.3g} s", fill="black", font=small)
    d.line([left, top - 4, left, top + row * len(variants)], fill="black")
    ly = height - 30
    for j, mode in enumerate(MODE_LABELS):
        x = left + j * 160
        d.rectangle([x, ly, x + 14, ly + 14], fill=_COLOURS[mode])
        d.text((x + 20, ly), MODE_LABELS[mode], fill="black", font=small)
    img.save(path)


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    stem = output_stem(result)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    # each file under a temporary name first, then renamed: a killed run leaves no half-written record
    for key, write in (("json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")),
                       ("markdown", lambda p: p.write_text(markdown(result), encoding="utf-8")),
                       ("png", lambda p: bar_chart(result, p))):
        with atomic_file(paths[key]) as tmp:
            write(tmp)
    for kind, p in paths.items():
        logger.info("bench: wrote %s", p)
    return paths
