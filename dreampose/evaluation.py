"""The evaluation harness (``dreampose-rt evaluate``): render a test set, score it, show it.

The protocol (pinned; :class:`dreampose.settings.EvalProtocol` holds it and every report records it,
with the sampling settings):

- Test set: SynthFashion held out (seed ``TEST_SEED`` = 1000: subjects and motions that the demo model
  never saw; it trains on seed 0 and picks its guidance on seed 2), ``videos`` x ``n_frames`` frames; or
  a folder in the UBC layout (the first ``videos`` videos in name order).
- Frames: the subject image is frame ``subject_frame`` (0) of each video; the targets are frames
  ``first_target, first_target + stride, ...`` (default 2, 4, ..., 14; at most ``max_targets``); the pose
  windows see the whole sequence.
- Resolution: the model's. SynthFashion renders at it; a UBC folder's frames are resized like the
  pipeline's image loading (bicubic, antialiased), its poses bilinearly.
- Colour range: outputs and ground truth are uint8; metrics read them as float in [0, 1].
- Sampling: a :class:`dreampose.settings.SamplingSettings` (by default PNDM 100 steps, the model's
  guidance, seed 0, one shared noise for all frames as in the paper), all targets of a video in one batch.
- Metrics (dreampose.metrics), per frame then averaged per video; "overall" is the mean over all frames:
  L1, PSNR (dB, peak 1), SSIM (Gaussian 7 x 7, sigma 1.5), foreground IoU against the ground-truth
  silhouette (SynthFashion: the exact one; UBC: where the DensePose U or V is > 0), segmenting each frame
  by its distance to the video's background image (SynthFashion: the exact backdrop; UBC: the per-pixel
  median of the ground-truth frames over the times the pixel is background) and to its own rows' median
  colours (dreampose.metrics.foreground_mask); ``iou_strict`` uses the background image alone. Beside the model, every
  video reports two references: ``repeat`` (the subject image repeated: a baseline that ignores the
  pose) and ``gt`` (the segmentation of the ground truth itself: the IoU's ceiling).
- LPIPS when a local exported LPIPS module is given (``--lpips``, see docs/training.md for exporting it).
- FID and FVD (set-level, overall only; :func:`set_metrics`) when their feature extractors are given as
  local files (``--fid-model``, ``--fvd-model``: TorchScript or torch.export .pt2, loaded like LPIPS):
  FID: all rendered frames vs all ground-truth target frames, each resized to 299 x 299 (bilinear,
  antialiased, aspect ratio not kept, like pytorch-fid), colour range [-1, 1], through an Inception-v3
  pool3 extractor (N, 3, 299, 299) -> (N, 2048). FVD: each video's target sequence cut into consecutive
  non-overlapping clips of ``fvd_clip`` (16) targets (the remainder dropped; a video with fewer targets
  gives no clip and is logged), frames resized to 224 x 224 (bilinear, antialiased), [-1, 1], through an
  I3D extractor (N, 3, T, 224, 224) -> (N, 400) logits (the original FVD's features; any (N, D) works).
  Both are the Fréchet distance of the two feature Gaussians (dreampose.metrics.frechet_distance), for
  the model and for the repeat-subject reference. Without the files, or with fewer than 2 samples, the
  report says why they were not computed. FID/FVD on a few hundred frames or clips are biased upwards
  and only comparable at equal sample counts (the report records them).

Outputs (``out_dir``): ``metrics.json`` (protocol, per video, overall, timing), ``metrics.md`` (a table)
and ``strip.png`` (rows: subject, target pose, ground truth, output; for a few frames of the first videos).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import (colour_error, feature_statistics, foreground_iou, foreground_l1, foreground_psnr, frechet_distance,
                      l1, psnr, ssim, to_unit)
from .model import DreamPoseModel
from .pipeline import DreamPosePipeline
from .outputs import claim_output_dir
from .settings import TEST_SEED, EvalProtocol, SamplingSettings
from .utils import DreamPoseError, PathLike, atomic_file, load_frozen_module, write_json

logger = logging.getLogger(__name__)

__all__ = ["TEST_SEED", "EvalProtocol", "EvalReport", "evaluate", "set_metrics", "strip_image", "test_videos",
           "write_report"]
METRICS = ("l1", "psnr", "ssim", "iou", "iou_strict", "fg_l1", "fg_psnr", "colour_error")
SET_METRICS = ("fid", "fvd")
FID_SIZE = 299  # Inception-v3 input
FVD_SIZE = 224  # I3D input
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Protocol and test videos
# --------------------------------------------------------------------------------------------------
@dataclass
class TestVideo:
    """One test video at the model's resolution: images uint8 (T, H, W, 3), uv float32 (T, 2, H, W),
    silhouette bool (T, H, W), background float32 (H, W, 3) in [0, 1]."""

    name: str
    images: np.ndarray
    uv: np.ndarray
    silhouette: np.ndarray
    background: np.ndarray


def synth_test_videos(protocol: EvalProtocol, height: int, width: int) -> list[TestVideo]:
    """The held-out SynthFashion videos of the protocol."""
    from dreampose.data.figure import render_backdrop
    from dreampose.data.synth import synth_video, video_name

    out = []
    for k in range(protocol.videos):
        v = synth_video(protocol.seed, k, protocol.n_frames, height, width)
        out.append(TestVideo(video_name(k), v.images, v.uv, v.silhouette, render_backdrop(v.appearance, height, width)))
    return out


def ubc_test_videos(protocol: EvalProtocol, height: int, width: int) -> list[TestVideo]:
    """The first ``protocol.videos`` videos of a UBC-layout folder, resized to height x width."""
    from dreampose.data.dataset import UBCFolder, to_pixels

    folder = UBCFolder(protocol.data)
    out = []
    for v in range(min(protocol.videos, len(folder))):
        t = min(folder.frame_counts[v], protocol.n_frames) if protocol.n_frames else folder.frame_counts[v]
        images = np.stack([
            np.round((to_pixels(folder.frame(v, k), (height, width)).permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
            for k in range(t)
        ])
        uv = torch.from_numpy(np.stack([folder.pose(v, k) for k in range(t)]))
        uv = F.interpolate(uv, size=(height, width), mode="bilinear", align_corners=False).numpy()
        sil = (uv > 0).any(axis=1)
        out.append(TestVideo(folder.names[v], images, uv, sil, median_background(images, sil)))
    return out


def median_background(images: np.ndarray, silhouette: np.ndarray) -> np.ndarray:
    """Background estimate (H, W, 3) in [0, 1]: per pixel, the median over the frames where it is not figure;
    pixels that are figure in every frame take the median background colour."""
    x = to_unit(images).copy()
    x[silhouette] = np.nan
    bg = np.nanmedian(x, axis=0) if (~silhouette).any(axis=0).all() else _fill(x)
    return bg.astype(np.float32)


def _fill(x: np.ndarray) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        bg = np.nanmedian(x, axis=0)
    fallback = np.nanmedian(bg.reshape(-1, 3), axis=0)
    return np.where(np.isnan(bg), fallback[None, None], bg)


def test_videos(protocol: EvalProtocol, height: int, width: int) -> list[TestVideo]:
    if protocol.data == "synth":
        return synth_test_videos(protocol, height, width)
    if not Path(protocol.data).is_dir():
        raise DreamPoseError(f"{protocol.data}: test folder not found (give 'synth' or a UBC-layout folder)")
    return ubc_test_videos(protocol, height, width)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def score_frames(frames: np.ndarray, video: TestVideo, targets: Sequence[int],
                 lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Per-frame metrics of frames (F, H, W, 3) uint8 against the video's target frames -> {metric: [F floats]}."""
    gt = video.images[list(targets)]
    figure = video.silhouette[list(targets)]
    out = {
        "l1": l1(frames, gt).tolist(),
        "psnr": psnr(frames, gt).tolist(),
        "ssim": ssim(frames, gt).tolist(),
        "iou": foreground_iou(frames, figure, video.background).tolist(),
        "iou_strict": foreground_iou(frames, figure, video.background, row_background=False).tolist(),
        "fg_l1": foreground_l1(frames, gt, figure).tolist(),
        "fg_psnr": foreground_psnr(frames, gt, figure).tolist(),
        "colour_error": colour_error(frames, gt, figure).tolist(),
    }
    if lpips is not None:
        def px(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(to_unit(a)).permute(0, 3, 1, 2) * 2 - 1

        with torch.no_grad():
            out["lpips"] = lpips(px(frames), px(gt)).reshape(len(targets)).float().tolist()
    return out


def load_feature_extractor(path: PathLike, device: torch.device | str = "cpu", what: str = "feature extractor"
                           ) -> FeatureExtractor:
    """A local feature extractor (FID: Inception-v3, FVD: I3D; see docs/quality.md for exporting them):
    a ``torch.export`` program (.pt2) or a TorchScript file, frozen (dreampose.utils.load_frozen_module)."""
    module = load_frozen_module(path, device, what)
    logger.info("loaded %s %s", what, path)
    return module


def _device_of(fn: FeatureExtractor) -> torch.device:
    params = getattr(fn, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return p.device if p is not None else torch.device("cpu")


def _extract(fn: FeatureExtractor, batches: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """Run ``fn`` on each input batch (on its device) -> features float64 (N, D) on the CPU."""
    device = _device_of(fn)
    feats = []
    with torch.no_grad():
        for x in batches:
            y = fn(x.to(device))
            if isinstance(y, (tuple, list)):
                y = y[0]
            feats.append(y.reshape(x.shape[0], -1).to("cpu", torch.float64))
    out = torch.cat(feats)
    if not torch.isfinite(out).all():
        raise DreamPoseError(f"the {what} returned non-finite features")
    return out


def fid_inputs(frames: np.ndarray, batch: int = 16) -> list[torch.Tensor]:
    """Frames (N, H, W, 3) uint8 (or float in [0, 1]) -> batches (<= batch, 3, 299, 299) float32 in [-1, 1]:
    bilinear, antialiased, resized to the square (the aspect ratio is not kept, like pytorch-fid)."""
    out = []
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(to_unit(frames[i : i + batch])).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.clamp(0, 1) * 2 - 1)
    return out


def video_clips(frames: np.ndarray, clip: int) -> list[np.ndarray]:
    """A video's frames (T, H, W, 3) -> its consecutive non-overlapping clips of ``clip`` frames
    (the remainder is dropped; none when T < clip)."""
    return [frames[i : i + clip] for i in range(0, len(frames) - clip + 1, clip)]


def fvd_inputs(clips: Sequence[np.ndarray], batch: int = 4) -> list[torch.Tensor]:
    """Clips (T, H, W, 3) uint8 -> batches (<= batch, 3, T, 224, 224) float32 in [-1, 1] (bilinear, antialiased)."""
    out = []
    for i in range(0, len(clips), batch):
        xs = []
        for c in clips[i : i + batch]:
            x = torch.from_numpy(to_unit(c)).permute(0, 3, 1, 2)  # (T, 3, H, W)
            x = F.interpolate(x, size=(FVD_SIZE, FVD_SIZE), mode="bilinear", align_corners=False, antialias=True)
            xs.append(x.clamp(0, 1).permute(1, 0, 2, 3) * 2 - 1)  # (3, T, 224, 224)
        out.append(torch.stack(xs))
    return out


SetMetric = dict[str, Union[float, int, str, None]]


def not_computed(metric: str, why: str | None = None) -> SetMetric:
    """The entry of a set-level metric that was not computed."""
    flag = {"fid": "--fid-model", "fvd": "--fvd-model"}[metric]
    return {"model": None, "repeat": None, "note": f"not computed ({why or f'give {flag}'})"}


def _frechet(feats: dict[str, torch.Tensor]) -> tuple[float, float]:
    real = feature_statistics(feats["gt"])
    return (frechet_distance(*feature_statistics(feats["model"]), *real),
            frechet_distance(*feature_statistics(feats["repeat"]), *real))


def set_metrics(
    model: Sequence[np.ndarray],
    gt: Sequence[np.ndarray],
    repeat: Sequence[np.ndarray] | None = None,
    fid_model: FeatureExtractor | None = None,
    fvd_model: FeatureExtractor | None = None,
    fvd_clip: int = 16,
) -> dict[str, SetMetric]:
    """FID and FVD of rendered videos against the ground truth (and of the repeat-subject reference).

    Args:
        model, gt, repeat: per video, frames (F_v, H, W, 3) uint8, the same F_v for the three (the target
            frames in order). ``repeat`` defaults to ``gt`` (then its entries are ~0).
        fid_model: (N, 3, 299, 299) in [-1, 1] -> (N, 2048) (any (N, D)); None: FID not computed.
        fvd_model: (N, 3, T, 224, 224) in [-1, 1] -> (N, 400) (any (N, D)); None: FVD not computed.
        fvd_clip: FVD clip length T (consecutive targets; a video with fewer targets gives no clip).
    Returns:
        {"fid": {...}, "fvd": {...}}: each {"model", "repeat", "samples", "note"} (samples: frames or clips
        per side), or :func:`not_computed`'s entry.
    """
    sets = {"model": list(model), "gt": list(gt), "repeat": list(gt if repeat is None else repeat)}
    if not (len(sets["model"]) == len(sets["gt"]) == len(sets["repeat"])):
        raise DreamPoseError("set_metrics: model, gt and repeat need the same videos")
    out: dict[str, SetMetric] = {"fid": not_computed("fid"), "fvd": not_computed("fvd")}
    if fid_model is not None:
        frames = {k: np.concatenate(v) for k, v in sets.items()}
        n = len(frames["gt"])
        if n < 2:
            out["fid"] = not_computed("fid", f"{n} frame{'s' * (n != 1)}: the covariance needs at least 2")
        else:
            feats = {k: _extract(fid_model, fid_inputs(v), "FID model") for k, v in frames.items()}
            fid, fid_repeat = _frechet(feats)
            out["fid"] = {"model": fid, "repeat": fid_repeat, "samples": n, "feature_dim": feats["gt"].shape[1],
                          "note": f"{n} vs {n} frames at {FID_SIZE} px; biased at small N: compare at equal N only"}
            logger.info("FID %.3f (repeat-subject %.3f) on %d frames, %d features", fid, fid_repeat, n,
                        feats["gt"].shape[1])
    if fvd_model is not None:
        short = [k for k, v in enumerate(sets["gt"]) if len(v) < fvd_clip]
        if short:
            logger.warning("FVD: %d of %d videos have fewer than %d targets and give no clip", len(short),
                           len(sets["gt"]), fvd_clip)
        clips = {k: [c for v in vids for c in video_clips(v, fvd_clip)] for k, vids in sets.items()}
        n = len(clips["gt"])
        if n < 2:
            out["fvd"] = not_computed("fvd", f"{n} clip{'s' * (n != 1)} of {fvd_clip} targets: the covariance needs at least 2; "
                                      "render more targets per video or lower --fvd-clip")
        else:
            feats = {k: _extract(fvd_model, fvd_inputs(v), "FVD model") for k, v in clips.items()}
            fvd, fvd_repeat = _frechet(feats)
            out["fvd"] = {"model": fvd, "repeat": fvd_repeat, "samples": n, "clip": fvd_clip,
                          "feature_dim": feats["gt"].shape[1],
                          "note": f"{n} vs {n} clips of {fvd_clip} targets at {FVD_SIZE} px; biased at small N: "
                                  "compare at equal N only"}
            logger.info("FVD %.3f (repeat-subject %.3f) on %d clips of %d frames", fvd, fvd_repeat, n, fvd_clip)
    return out


def _mean(d: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in d.items()}


@dataclass
class VideoResult:
    """Per-frame scores of one video: model, the repeat-subject baseline and the ground-truth ceiling (IoU)."""

    name: str
    targets: list[int]
    model: dict[str, list[float]]
    repeat: dict[str, list[float]]
    gt_iou: list[float]
    seconds: float
    outputs: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {"name": self.name, "targets": self.targets, "model": _mean(self.model), "repeat": _mean(self.repeat),
                "gt_iou": float(np.mean(self.gt_iou)), "seconds": self.seconds,
                "seconds_per_frame": self.seconds / len(self.targets)}


@dataclass
class EvalReport:
    """The result of :func:`evaluate`: the protocol, per-video results, and overall means over all frames."""

    protocol: EvalProtocol
    sampling: SamplingSettings
    model_name: str
    videos: list[VideoResult]
    set_level: dict[str, SetMetric] = field(default_factory=lambda: {m: not_computed(m) for m in SET_METRICS})
    comparison: dict | None = None  # compare_reports(self, a reference report): set by `evaluate --compare-to`

    def overall(self) -> dict:
        def pool(get: Callable[[VideoResult], list[float]]) -> float:
            return float(np.mean([x for v in self.videos for x in get(v)]))

        keys = list(self.videos[0].model)
        n = sum(len(v.targets) for v in self.videos)
        secs = sum(v.seconds for v in self.videos)
        return {
            "frames": n,
            "model": {k: pool(lambda v, k=k: v.model[k]) for k in keys},
            "repeat": {k: pool(lambda v, k=k: v.repeat[k]) for k in keys},
            "gt_iou": pool(lambda v: v.gt_iou),
            "seconds_per_frame": secs / n,
            **self.set_level,
        }

    def to_dict(self) -> dict:
        out = {"model": self.model_name, "protocol": self.protocol.to_dict(), "sampling": self.sampling.to_dict(),
               "overall": self.overall(), "videos": [v.summary() for v in self.videos]}
        if self.comparison is not None:
            out["comparison"] = self.comparison
        return out

    def markdown(self) -> str:
        keys = list(self.videos[0].model)
        head = "| video | frames | " + " | ".join(keys) + " | IoU repeat-subject | IoU ceiling (gt) | s/frame |"
        sep = "|" + "---|" * (len(keys) + 5)
        fmt = {"l1": "{:.4f}", "psnr": "{:.2f}", "ssim": "{:.3f}", "iou": "{:.3f}", "iou_strict": "{:.3f}", "lpips": "{:.3f}",
               "fg_l1": "{:.4f}", "fg_psnr": "{:.2f}", "colour_error": "{:.4f}"}

        def row(name: str, n: int, m: dict, rep_iou: float, gt: float, spf: float) -> str:
            cells = [fmt.get(k, "{:.4f}").format(m[k]) for k in keys]
            return f"| {name} | {n} | " + " | ".join(cells) + f" | {rep_iou:.3f} | {gt:.3f} | {spf:.3f} |"

        lines = [head, sep]
        for v in self.videos:
            s = v.summary()
            lines.append(row(v.name, len(v.targets), s["model"], s["repeat"]["iou"], s["gt_iou"], s["seconds_per_frame"]))
        o = self.overall()
        lines.append(row("**overall**", o["frames"], o["model"], o["repeat"]["iou"], o["gt_iou"], o["seconds_per_frame"]))
        p, s = self.protocol, self.sampling
        guide = f"s_image {s.s_image:g}, s_pose {s.s_pose:g}"
        return (f"Model `{self.model_name}`; test set `{p.data}` (seed {p.seed}), {s.scheduler} {s.steps} steps, "
                f"{guide}, noise {s.noise} (seed {s.seed}); subject = frame {p.subject_frame}, targets "
                f"{p.first_target}::{p.stride}.\n\n"
                + "\n".join(lines) + "\n\n" + self.set_level_markdown()
                + (comparison_markdown(self.comparison) if self.comparison is not None else ""))

    def set_level_markdown(self) -> str:
        """The overall-only FID / FVD lines of the markdown report."""
        lines = []
        for m in SET_METRICS:
            e = self.set_level[m]
            if e["model"] is None:
                lines.append(f"- {m.upper()}: {e['note']}")
            else:
                lines.append(f"- {m.upper()} (overall): {e['model']:.3f} (repeat-subject {e['repeat']:.3f}); "
                             f"{e['note']}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def evaluate(
    model: DreamPoseModel,
    protocol: EvalProtocol = EvalProtocol(),
    *,
    sampling: SamplingSettings | None = None,
    model_name: str = "model",
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    keep_outputs: bool = False,
    progress: bool = False,
    fid_model: FeatureExtractor | None = None,
    fvd_model: FeatureExtractor | None = None,
) -> EvalReport:
    """Render the protocol's test set with ``model`` (the reference pipeline) and score it.

    ``sampling``: how to render (None: the protocol's: PNDM 100 steps, the model's guidance, seed 0, one
    shared noise).

    ``fid_model`` / ``fvd_model``: local feature extractors (:func:`load_feature_extractor`, conventions in
    :func:`set_metrics`); FID / FVD are reported overall only when given.
    Returns an EvalReport; with ``keep_outputs`` each VideoResult also holds the rendered frames
    (F, H, W, 3) uint8 (for the strip image and for comparing samplers).
    """
    c = model.config
    pipe = DreamPosePipeline(model)
    sampling = SamplingSettings.for_model(c, steps=100) if sampling is None else sampling
    results = []
    rendered: dict[str, list[np.ndarray]] = {"model": [], "gt": [], "repeat": []}
    for video in test_videos(protocol, c.height, c.width):
        targets = protocol.targets(len(video.images))
        subject = video.images[protocol.subject_frame]
        t0 = time.perf_counter()
        frames = pipe(subject, video.uv, settings=sampling, frames=targets, frames_per_batch=len(targets), progress=progress)
        seconds = time.perf_counter() - t0
        repeat = np.repeat(subject[None], len(targets), axis=0)
        gt = video.images[targets]
        res = VideoResult(
            name=video.name, targets=targets, model=score_frames(frames, video, targets, lpips),
            repeat=score_frames(repeat, video, targets, lpips),
            gt_iou=foreground_iou(gt, video.silhouette[targets], video.background).tolist(),
            seconds=seconds, outputs=frames if keep_outputs else None,
        )
        logger.info("evaluate %s: IoU %.3f (repeat-subject %.3f), SSIM %.3f, %.2f s/frame", video.name,
                    np.mean(res.model["iou"]), np.mean(res.repeat["iou"]), np.mean(res.model["ssim"]),
                    seconds / len(targets))
        results.append(res)
        if fid_model is not None or fvd_model is not None:
            rendered["model"].append(frames)
            rendered["gt"].append(gt)
            rendered["repeat"].append(repeat)
    level = set_metrics(rendered["model"], rendered["gt"], rendered["repeat"], fid_model, fvd_model,
                        protocol.fvd_clip)
    return EvalReport(protocol, sampling, model_name, results, level)


def temporal_change(frames: np.ndarray) -> float:
    """Mean absolute change between consecutive frames (F, H, W, 3) uint8, in [0, 1]: flicker raises it."""
    x = to_unit(frames)
    return float(np.abs(np.diff(x, axis=0)).mean()) if len(frames) > 1 else 0.0


def compare_reports(candidate: EvalReport, reference: EvalReport) -> dict:
    """How a render's settings compare with a reference's (usually the exact preset) on the same test set.

    Both reports need their outputs (``evaluate(..., keep_outputs=True)``). Per video and overall: PSNR and
    SSIM of the candidate's frames to the reference's, both renders' SSIM and IoU to the ground truth and
    their relative difference, the temporal change (mean absolute difference between consecutive targets:
    flicker shows as a larger change than the reference's), and seconds per frame.
    """
    if [v.name for v in candidate.videos] != [v.name for v in reference.videos]:
        raise DreamPoseError("compare_reports: the two reports are not of the same test videos")
    per_video, to_ref = [], {"psnr": [], "ssim": []}
    for c, r in zip(candidate.videos, reference.videos):
        if c.outputs is None or r.outputs is None:
            raise DreamPoseError("compare_reports needs evaluate(..., keep_outputs=True) for both reports")
        p = np.minimum(psnr(c.outputs, r.outputs), 99.0)  # identical frames: capped, not infinite
        s = ssim(c.outputs, r.outputs)
        to_ref["psnr"] += p.tolist()
        to_ref["ssim"] += s.tolist()
        per_video.append({"name": c.name, "psnr_to_reference": float(p.mean()), "ssim_to_reference": float(s.mean()),
                          "temporal_change": temporal_change(c.outputs),
                          "reference_temporal_change": temporal_change(r.outputs)})
    oc, orf = candidate.overall(), reference.overall()

    def rel(key: str) -> float:
        return oc["model"][key] / orf["model"][key] - 1.0

    tc = float(np.mean([v["temporal_change"] for v in per_video]))
    tr = float(np.mean([v["reference_temporal_change"] for v in per_video]))
    return {
        "reference": reference.sampling.to_dict(),
        "psnr_to_reference": float(np.mean(to_ref["psnr"])),
        "ssim_to_reference": float(np.mean(to_ref["ssim"])),
        "ssim_gt": {"candidate": oc["model"]["ssim"], "reference": orf["model"]["ssim"], "relative": rel("ssim")},
        "iou_gt": {"candidate": oc["model"]["iou"], "reference": orf["model"]["iou"], "relative": rel("iou")},
        "temporal_change": {"candidate": tc, "reference": tr, "ratio": tc / tr if tr else float("nan")},
        "seconds_per_frame": {"candidate": oc["seconds_per_frame"], "reference": orf["seconds_per_frame"]},
        "videos": per_video,
    }


def comparison_markdown(comparison: dict) -> str:
    """The markdown lines of :func:`compare_reports`' result."""
    r = comparison["reference"]
    return (
        f"\nAgainst the reference ({r['quality']}: {r['scheduler']} {r['steps']} steps): PSNR "
        f"{comparison['psnr_to_reference']:.2f} dB, SSIM {comparison['ssim_to_reference']:.4f} to its frames; "
        f"SSIM to the ground truth {comparison['ssim_gt']['candidate']:.4f} vs {comparison['ssim_gt']['reference']:.4f} "
        f"({comparison['ssim_gt']['relative']:+.2%}), IoU {comparison['iou_gt']['candidate']:.4f} vs "
        f"{comparison['iou_gt']['reference']:.4f} ({comparison['iou_gt']['relative']:+.2%}); frame-to-frame change "
        f"{comparison['temporal_change']['candidate']:.4f} vs {comparison['temporal_change']['reference']:.4f} "
        f"(x{comparison['temporal_change']['ratio']:.3f}); "
        f"{comparison['seconds_per_frame']['candidate']:.3f} vs {comparison['seconds_per_frame']['reference']:.3f} s/frame.\n"
    )


def pose_image(uv: np.ndarray) -> np.ndarray:
    """U, V (2, H, W) in [0, 1] -> a uint8 (H, W, 3) picture: R = U, G = V, B = figure, black background."""
    fig = (uv > 0).any(axis=0)
    rgb = np.stack([uv[0], uv[1], fig * 0.6], axis=-1)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def strip_image(report: EvalReport, protocol: EvalProtocol, height: int, width: int, n_videos: int = 2,
                n_frames: int = 4, pad: int = 2) -> np.ndarray:
    """A side-by-side strip uint8 (rows x H, cols x W, 3): for each of the first ``n_videos`` videos, four
    rows (subject, target pose, ground truth, output), ``n_frames`` target frames as columns."""
    videos = test_videos(dataclasses.replace(protocol, videos=min(n_videos, protocol.videos)), height, width)
    blocks = []
    for video, res in zip(videos, report.videos):
        if res.outputs is None:
            raise DreamPoseError("strip_image needs evaluate(..., keep_outputs=True)")
        cols = list(range(min(n_frames, len(res.targets))))
        rows = [
            [video.images[protocol.subject_frame]] * len(cols),
            [pose_image(video.uv[res.targets[i]]) for i in cols],
            [video.images[res.targets[i]] for i in cols],
            [res.outputs[i] for i in cols],
        ]
        blocks.extend(rows)
    return image_grid(blocks, height, width, pad)


def image_grid(rows: Sequence[Sequence[np.ndarray]], height: int, width: int, pad: int = 2) -> np.ndarray:
    """Frames uint8 (H, W, 3), row by row, on a white canvas with ``pad`` pixels between them:
    uint8 (rows x (H + pad) + pad, longest row x (W + pad) + pad, 3)."""
    h, w = height + pad, width + pad
    canvas = np.full((len(rows) * h + pad, max(len(r) for r in rows) * w + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[pad + r * h : pad + r * h + height, pad + c * w : pad + c * w + width] = img
    return canvas


def write_report(report: EvalReport, out_dir: PathLike, strip: np.ndarray | None = None,
                 inputs: Sequence[PathLike | None] = ()) -> Path:
    """Write metrics.json, metrics.md and (if given) strip.png into ``out_dir`` (new, empty, or an earlier
    evaluate output: see dreampose.outputs; never one of ``inputs``). Returns the folder."""
    from dreampose.video import write_png

    out = claim_output_dir(out_dir, "evaluate", inputs=inputs)
    write_json(out / "metrics.json", report.to_dict())
    with atomic_file(out / "metrics.md") as tmp:
        tmp.write_text(report.markdown())
    if strip is not None:
        write_png(strip, out / "strip.png")
    return out
