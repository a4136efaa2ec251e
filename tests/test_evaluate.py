"""The evaluation harness (dreampose_rt.evaluate, ``dreampose-rt evaluate``) on the tiny random model."""

import json

import numpy as np
import pytest

from dreampose.utils import DreamPoseError
from dreampose_rt.evaluate import Protocol, evaluate, median_background, strip_image, write_report

FAST = Protocol(videos=2, n_frames=8, stride=3, scheduler="ddim", steps=2)


def test_protocol_targets():
    assert Protocol().targets(16) == [2, 4, 6, 8, 10, 12, 14]
    assert Protocol(first_target=0, stride=1, max_targets=3).targets(16) == [1, 2, 3]  # never the subject frame
    with pytest.raises(DreamPoseError, match="no target"):
        Protocol(first_target=5).targets(4)
    with pytest.raises(DreamPoseError, match="scheduler"):
        Protocol(scheduler="euler")


def test_evaluate_reports_per_video_and_overall(tiny_model, tmp_path):
    report = evaluate(tiny_model, FAST, "tiny", keep_outputs=True)
    assert [v.name for v in report.videos] == ["synth_00000", "synth_00001"]
    v = report.videos[0]
    assert v.targets == [2, 5] and v.outputs.shape == (2, 64, 48, 3) and v.outputs.dtype == np.uint8
    for scores in (v.model, v.repeat):
        assert set(scores) == {"l1", "psnr", "ssim", "iou", "iou_strict"} and all(len(x) == 2 for x in scores.values())
    assert min(v.gt_iou) > 0.9  # the segmentation's ceiling on the ground truth itself
    o = report.overall()
    assert o["frames"] == 4
    assert o["model"]["iou"] == pytest.approx(np.mean([x for r in report.videos for x in r.model["iou"]]))

    strip = strip_image(report, FAST, 64, 48, n_videos=2, n_frames=2)
    assert strip.shape == (2 + 8 * 66, 2 + 2 * 50, 3)
    out = write_report(report, tmp_path / "eval", strip)
    data = json.loads((out / "metrics.json").read_text())
    assert data["protocol"]["steps"] == 2 and data["overall"]["frames"] == 4 and len(data["videos"]) == 2
    md = (out / "metrics.md").read_text()
    assert "| synth_00001 | 2 |" in md and "**overall**" in md
    assert (out / "strip.png").stat().st_size > 0


def test_evaluate_is_deterministic(tiny_model):
    p = Protocol(videos=1, n_frames=6, stride=2, max_targets=1, scheduler="ddim", steps=2)
    a, b = (evaluate(tiny_model, p).videos[0].model for _ in range(2))
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
    assert {p.name for p in (tmp_path / "e").iterdir()} == {"metrics.json", "metrics.md", "strip.png"}
