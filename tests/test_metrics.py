"""Metrics of the evaluation protocol: L1, PSNR, SSIM, foreground segmentation and IoU; the Fréchet distance."""

import numpy as np
import pytest

from dreampose.data.figure import render_backdrop
from dreampose.data.synth import synth_video
from dreampose.metrics import (colour_error, feature_statistics, foreground_iou, foreground_l1, foreground_mask,
                               foreground_psnr, frechet_distance, iou, l1, psnr, ssim)


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


def test_figure_metrics_see_only_the_figure(video):
    """A background change leaves the figure's metrics alone; a garment recoloured inside the silhouette moves
    them (colour error = the distance between the mean colours), though the figure stays where it was."""
    x = video.images.astype(np.float32) / 255
    sil = video.silhouette
    other_bg = np.where(sil[..., None], x, 1 - x)
    assert np.allclose(foreground_l1(other_bg, x, sil), 0) and np.all(foreground_psnr(other_bg, x, sil) > 90)
    assert np.allclose(colour_error(other_bg, x, sil), 0) and np.all(l1(other_bg, x) > 0.05)
    shift = np.array([0.1, -0.05, 0.0], np.float32)
    recoloured = np.where(sil[..., None], np.clip(x + shift, 0, 1), x)
    exact = np.where(sil[..., None], x + shift, x)
    np.testing.assert_allclose(colour_error(exact, x, sil), np.linalg.norm(shift), rtol=1e-4)  # float32 sums
    assert np.all(colour_error(recoloured, x, sil) > 0.05) and np.all(foreground_l1(recoloured, x, sil) > 0.02)
    assert colour_error(x[0], x[0], sil[0]).shape == (1,)
    with pytest.raises(ValueError, match="does not fit"):
        colour_error(x, x, sil[:, :10])


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


# --------------------------------------------------------------------------------------------------
# Fréchet distance (FID, FVD)
# --------------------------------------------------------------------------------------------------
def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_feature_statistics_match_numpy():
    f = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = feature_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (6,) and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), atol=1e-12)
    with pytest.raises(ValueError):
        feature_statistics(f[:1])


def test_frechet_distance_of_identical_sets_is_zero():
    f = np.random.default_rng(1).normal(size=(20, 64))  # N < D: a singular covariance
    mu, sigma = feature_statistics(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians():
    # closed form for commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.eye(3), mu2, np.eye(3)) == pytest.approx(5.0, rel=1e-12)  # means only


def test_frechet_distance_non_commuting_2d_closed_form():
    # 2 x 2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.7], [-0.7, 3.0]])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_symmetric_and_non_negative():
    rng = np.random.default_rng(2)
    for d in (1, 5, 40):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
        assert ab >= 0 and ab == pytest.approx(ba, rel=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert ab == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
