"""Frame metrics of the evaluation protocol: L1, PSNR, SSIM, foreground segmentation and IoU."""

import numpy as np
import pytest

from dreampose.data.figure import render_backdrop
from dreampose.data.synth import synth_video
from dreampose.metrics import foreground_iou, foreground_mask, iou, l1, psnr, ssim


@pytest.fixture(scope="module")
def video():
    return synth_video(1000, 3, 6, 64, 48)


def test_identical_frames_score_perfectly(video):
    x = video.images
    assert np.allclose(l1(x, x), 0)
    assert np.all(psnr(x, x) > 90)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-9)


def test_metrics_order_a_small_and_a_large_error(video):
    x = video.images.astype(np.float32) / 255
    rng = np.random.default_rng(0)
    small = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1)
    large = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    assert np.all(l1(small, x) < l1(large, x))
    assert np.all(psnr(small, x) > psnr(large, x) + 10)
    assert np.all(ssim(small, x) > ssim(large, x) + 0.2)
    assert psnr(small[0], x[0]).shape == (1,)  # one frame -> one number


def test_segmenting_the_ground_truth_recovers_the_silhouette(video):
    bg = render_backdrop(video.appearance, 64, 48)
    ious = foreground_iou(video.images, video.silhouette, bg)
    assert ious.shape == (6,) and ious.min() > 0.9, ious


def test_segmentation_ignores_a_global_colour_shift(video):
    bg = render_backdrop(video.appearance, 64, 48)
    shifted = np.clip(video.images.astype(np.float32) / 255 + np.array([0.1, -0.08, 0.05]), 0, 1)
    assert foreground_iou(shifted, video.silhouette, bg).min() > 0.85
    # the plain background (no figure) segments as empty; a wrong background does not fit
    assert not foreground_mask(bg, bg).any()
    assert foreground_iou(video.images, video.silhouette, 1.0 - bg, row_background=False).mean() < 0.5


def test_row_background_accepts_a_background_without_its_structure(video):
    bg = render_backdrop(video.appearance, 64, 48)
    frames = video.images.astype(np.float32) / 255
    band = frames.copy()
    band[:, 50:][~video.silhouette[:, 50:]] = [0.2, 0.6, 0.3]  # a floor the backdrop does not have
    assert foreground_iou(band, video.silhouette, bg).min() > 0.85
    assert foreground_iou(band, video.silhouette, bg, row_background=False).mean() < 0.8
    # a figure drawn in the wrong place is still wrong
    moved = np.roll(video.images, 12, axis=2)
    assert foreground_iou(moved, video.silhouette, bg).mean() < 0.5


def test_iou_edge_cases():
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    b[1, :2] = True
    np.testing.assert_allclose(iou(a, b), [1.0, 0.0])  # both empty -> 1; disjoint -> 0
    np.testing.assert_allclose(iou(b[1], b[1]), [1.0])
