"""The evaluation harness (dreampose.evaluation, ``dreampose-rt evaluate``) on the tiny random model."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from dreampose.evaluation import (METRICS, evaluate, load_feature_extractor, median_background, set_metrics, strip_image,
                                  video_clips, write_report)
from dreampose.outputs import MARKER
from dreampose.settings import EvalProtocol, SamplingSettings
from dreampose.utils import DreamPoseError

FAST = EvalProtocol(videos=2, n_frames=8, stride=3)
DDIM2 = SamplingSettings(scheduler="ddim", steps=2)


def test_protocol_targets():
    assert EvalProtocol().targets(16) == [2, 4, 6, 8, 10, 12, 14]
    assert EvalProtocol(first_target=0, stride=1, max_targets=3).targets(16) == [1, 2, 3]  # never the subject frame
    with pytest.raises(DreamPoseError, match="no target"):
        EvalProtocol(first_target=5).targets(4)
    with pytest.raises(DreamPoseError, match="videos must be"):
        EvalProtocol(videos=0)


def test_evaluate_reports_per_video_and_overall(tiny_model, tmp_path):
    report = evaluate(tiny_model, FAST, sampling=DDIM2, model_name="tiny", keep_outputs=True)
    assert [v.name for v in report.videos] == ["synth_00000", "synth_00001"]
    v = report.videos[0]
    assert v.targets == [2, 5] and v.outputs.shape == (2, 64, 48, 3) and v.outputs.dtype == np.uint8
    for scores in (v.model, v.repeat):
        assert set(scores) == set(METRICS) and all(len(x) == 2 for x in scores.values())
    assert {"fg_l1", "fg_psnr", "colour_error"} <= set(METRICS)
    assert v.repeat["fg_l1"][0] > 0 and v.repeat["colour_error"][0] >= 0  # the still copy's figure is misplaced
    assert min(v.gt_iou) > 0.9  # the segmentation's ceiling on the ground truth itself
    o = report.overall()
    assert o["frames"] == 4
    assert o["model"]["iou"] == pytest.approx(np.mean([x for r in report.videos for x in r.model["iou"]]))

    strip = strip_image(report, FAST, 64, 48, n_videos=2, n_frames=2)
    assert strip.shape == (2 + 8 * 66, 2 + 2 * 50, 3)
    out = write_report(report, tmp_path / "eval", strip)
    data = json.loads((out / "metrics.json").read_text())
    assert data["sampling"]["steps"] == 2 and data["sampling"]["scheduler"] == "ddim"
    assert data["protocol"]["videos"] == 2 and data["overall"]["frames"] == 4 and len(data["videos"]) == 2
    md = (out / "metrics.md").read_text()
    assert "| synth_00001 | 2 |" in md and "**overall**" in md
    # FID / FVD need local extractors: without them the report says so
    assert data["overall"]["fid"] == {"model": None, "repeat": None, "note": "not computed (give --fid-model)"}
    assert data["overall"]["fvd"]["note"] == "not computed (give --fvd-model)"
    assert "- FID: not computed (give --fid-model)" in md and "- FVD: not computed (give --fvd-model)" in md
    assert (out / "strip.png").stat().st_size > 0


def test_evaluate_is_deterministic(tiny_model):
    p = EvalProtocol(videos=1, n_frames=6, stride=2, max_targets=1)
    a, b = (evaluate(tiny_model, p, sampling=DDIM2).videos[0].model for _ in range(2))
    assert a == b


def test_median_background_ignores_the_figure():
    images = np.zeros((3, 4, 4, 3), np.uint8) + 100
    sil = np.zeros((3, 4, 4), bool)
    images[0, 0, 0] = 255
    sil[0, 0, 0] = True
    sil[:, 3, 3] = True  # figure in every frame: takes the median background colour
    images[:, 3, 3] = 0
    np.testing.assert_allclose(median_background(images, sil), 100 / 255, atol=1e-6)


def test_evaluate_cli(tiny_model, tmp_path, capsys):
    from dreampose_rt.cli import main

    tiny_model.save_pretrained(tmp_path / "m")
    rc = main(["evaluate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"), "--videos", "1",
               "--frames", "6", "--max-targets", "2", "--scheduler", "dpmpp", "--steps", "2", "--quiet"])
    assert rc == 0
    assert "**overall**" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "e").iterdir()} == {MARKER, "metrics.json", "metrics.md", "strip.png"}


# --------------------------------------------------------------------------------------------------
# FID / FVD through tiny random TorchScript extractors (the real ones are local Inception / I3D files)
# --------------------------------------------------------------------------------------------------
class TinyInception(nn.Module):
    """(N, 3, 299, 299) in [-1, 1] -> (N, 64): checks the harness's input convention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected (N, 3, 299, 299)")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("expected [-1, 1]")
        return self.pool(torch.tanh(self.conv(x))).flatten(1)


class TinyI3D(nn.Module):
    """(N, 3, T, 224, 224) in [-1, 1] -> (N, 400)."""

    def __init__(self, clip: int) -> None:
        super().__init__()
        self.clip = clip
        self.conv = nn.Conv3d(3, 8, (2, 16, 16), stride=(1, 16, 16))
        self.pool = nn.AdaptiveAvgPool3d((1, 2, 2))
        self.fc = nn.Linear(32, 400)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[2] != self.clip or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("expected (N, 3, T, 224, 224)")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("expected [-1, 1]")
        return self.fc(self.pool(torch.tanh(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    """TorchScript files of the two tiny extractors (FVD clips of 2 targets)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("extractors")
    torch.jit.save(torch.jit.script(TinyInception().eval()), d / "inception.pt")
    torch.jit.save(torch.jit.script(TinyI3D(2).eval()), d / "i3d.pt")
    return d / "inception.pt", d / "i3d.pt"


def _videos(n: int = 2, t: int = 4, seed: int = 0) -> list[np.ndarray]:
    from dreampose.data.synth import synth_video

    return [synth_video(1000 + seed, k, t, 64, 48).images for k in range(n)]


def test_video_clips_are_consecutive_and_drop_the_remainder():
    v = np.arange(5)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert [c[:, 0, 0, 0].tolist() for c in video_clips(v, 2)] == [[0, 1], [2, 3]]
    assert video_clips(v, 6) == []


def test_set_metrics_of_the_ground_truth_against_itself_are_zero(extractors):
    fid_m, fvd_m = (load_feature_extractor(p) for p in extractors)
    gt = _videos()
    same = set_metrics(gt, gt, fid_model=fid_m, fvd_model=fvd_m, fvd_clip=2)
    assert same["fid"]["model"] == pytest.approx(0, abs=1e-6) and same["fid"]["samples"] == 8
    assert same["fvd"]["model"] == pytest.approx(0, abs=1e-6) and same["fvd"]["samples"] == 4
    assert same["fid"]["feature_dim"] == 64 and same["fvd"]["feature_dim"] == 400

    other = _videos(seed=1)
    still = [np.repeat(v[:1], len(v), axis=0) for v in gt]
    diff = set_metrics(other, gt, still, fid_model=fid_m, fvd_model=fvd_m, fvd_clip=2)
    for m in ("fid", "fvd"):
        assert np.isfinite(diff[m]["model"]) and diff[m]["model"] > 1e-6 and diff[m]["repeat"] > 1e-6


def test_set_metrics_say_why_they_were_not_computed(extractors):
    fid_m, fvd_m = (load_feature_extractor(p) for p in extractors)
    gt = _videos(n=1, t=2)
    out = set_metrics(gt, gt, fid_model=fid_m, fvd_model=fvd_m, fvd_clip=16)
    assert out["fid"]["model"] == pytest.approx(0, abs=1e-6)
    assert out["fvd"]["model"] is None and "0 clips of 16 targets" in out["fvd"]["note"]
    assert set_metrics(gt, gt)["fid"]["note"] == "not computed (give --fid-model)"


def test_load_feature_extractor_reads_torch_export_and_rejects_bad_files(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # exportable
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "inception.pt2")
    loaded = load_feature_extractor(tmp_path / "inception.pt2")
    torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(DreamPoseError, match="not found"):
        load_feature_extractor(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(DreamPoseError, match="TorchScript"):
        load_feature_extractor(tmp_path / "junk.pt")


def test_evaluate_cli_reports_fid_and_fvd(tiny_model, tmp_path, extractors, capsys):
    from dreampose_rt.cli import main

    tiny_model.save_pretrained(tmp_path / "m")
    rc = main(["evaluate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e"), "--videos", "1",
               "--frames", "10", "--max-targets", "4", "--scheduler", "ddim", "--steps", "2", "--quiet",
               "--fid-model", str(extractors[0]), "--fvd-model", str(extractors[1]), "--fvd-clip", "2"])
    assert rc == 0
    md = capsys.readouterr().out
    assert "- FID (overall): " in md and "- FVD (overall): " in md
    data = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert data["protocol"]["fvd_clip"] == 2
    fid, fvd = data["overall"]["fid"], data["overall"]["fvd"]
    assert fid["samples"] == 4 and fvd["samples"] == 2 and fvd["clip"] == 2
    for e in (fid, fvd):
        assert np.isfinite(e["model"]) and e["model"] >= 0 and np.isfinite(e["repeat"]) and e["repeat"] >= 0
    assert all("fid" not in v["model"] for v in data["videos"])  # set-level: overall only
