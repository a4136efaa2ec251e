"""Frame metrics of the evaluation protocol: L1, PSNR, SSIM, the foreground IoU of a rendered figure, and
the figure's appearance (L1, PSNR and mean colour error inside the ground truth's silhouette).

Every function takes frames as float arrays in [0, 1] (convert uint8 with ``to_unit``), shape (H, W, 3)
for one frame or (T, H, W, 3) for several, and returns one number per frame.

Foreground segmentation of a rendered frame (:func:`foreground_mask`): a pixel is figure when it is far
(Euclidean RGB distance in [0, 1] units above ``threshold``, 0.2 by default) from BOTH background models:

1. the sequence's known background image, after removing the frame's global colour offset from it (the
   per-channel median of frame - background over the whole frame: robust, because the background covers
   most of a fashion frame);
2. (``row_background=True``, the default) the frame's own per-row median colour: the dominant colour of
   each row, which is background because the figure is narrower than half of every row. This accepts a
   generated background that kept the backdrop's colours but lost its structure (a floor line, panels)
   as background, without accepting a misplaced figure.

The mask is then cleaned with a 3 x 3 majority vote. ``row_background=False`` gives the strict variant
(the known background only), which the evaluation reports beside it as ``iou_strict``. The threshold is 0.2 rather than tighter because a generated
frame's background comes back through the model's VAE, whose reconstruction of even a ground-truth frame
differs from it by 0.1 - 0.2 in places. On 16 held-out SynthFashion videos the segmentation of the ground
truth itself scores an IoU of 0.943 against the exact silhouette (strict variant: 0.969). The same segmentation applied to the ground-truth frames
themselves gives the upper bound the harness reports beside the model.

Set-level metrics (FID, FVD): :func:`feature_statistics` (mean and covariance of a set of feature
vectors) and :func:`frechet_distance` (the Fréchet distance between the two Gaussians), in float64.
The feature extractors (Inception-v3, I3D) are local files; ``dreampose.evaluation`` applies them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FG_THRESHOLD = 0.2
SSIM_WINDOW = 7  # Gaussian window, sigma 1.5 (Wang et al. 2004 use 11 at 256 px; 7 suits 64 px frames)
SSIM_SIGMA = 1.5


def to_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [0, 1]; float frames are returned as float32 unchanged."""
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return frames.astype(np.float32, copy=False)


def _batched(x: np.ndarray) -> np.ndarray:
    return x[None] if x.ndim == 3 else x


def l1(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean absolute error per frame: (T, H, W, 3) x 2 in [0, 1] -> (T,)."""
    p, t = _batched(to_unit(pred)), _batched(to_unit(target))
    return np.abs(p - t).mean(axis=(1, 2, 3))


def psnr(pred: np.ndarray, target: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """PSNR in dB per frame (peak 1): (T, H, W, 3) x 2 -> (T,)."""
    p, t = _batched(to_unit(pred)), _batched(to_unit(target))
    mse = np.square(p - t).mean(axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, eps))


def ssim(pred: np.ndarray, target: np.ndarray, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Structural similarity per frame (Wang et al. 2004): Gaussian window, C1 = (0.01)^2, C2 = (0.03)^2,
    computed per channel on the valid region and averaged. (T, H, W, 3) x 2 in [0, 1] -> (T,)."""
    p = torch.from_numpy(_batched(to_unit(pred))).permute(0, 3, 1, 2).double()
    t = torch.from_numpy(_batched(to_unit(target))).permute(0, 3, 1, 2).double()
    c = p.shape[1]
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, k, groups=c)

    mu_p, mu_t = blur(p), blur(t)
    s_pp = blur(p * p) - mu_p**2
    s_tt = blur(t * t) - mu_t**2
    s_pt = blur(p * t) - mu_p * mu_t
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_p * mu_t + c1) * (2 * s_pt + c2)) / ((mu_p**2 + mu_t**2 + c1) * (s_pp + s_tt + c2))
    return m.mean(dim=(1, 2, 3)).numpy()


def foreground_mask(frames: np.ndarray, background: np.ndarray, threshold: float = FG_THRESHOLD,
                    row_background: bool = True) -> np.ndarray:
    """Segment frames into figure (True) and background (False) (see the module docstring).

    Args:
        frames: (T, H, W, 3) or (H, W, 3), uint8 or float in [0, 1].
        background: (H, W, 3) the sequence's background image (uint8 or float in [0, 1]).
        threshold: Euclidean RGB distance (in [0, 1] units) above which a pixel is figure.
        row_background: also treat pixels close to their row's median colour as background.
    Returns:
        bool (T, H, W) (or (H, W) for one frame).
    """
    single = frames.ndim == 3
    f = _batched(to_unit(frames))
    bg = to_unit(background)[None]
    diff = f - bg  # (T, H, W, 3)
    offset = np.median(diff.reshape(diff.shape[0], -1, 3), axis=1)[:, None, None, :]  # global colour shift
    far = np.sqrt(np.square(diff - offset).sum(axis=-1)) > threshold  # (T, H, W)
    if row_background:
        row = np.median(f, axis=2, keepdims=True)  # (T, H, 1, 3) each row's dominant colour
        far &= np.sqrt(np.square(f - row).sum(axis=-1)) > threshold
    raw = torch.from_numpy(far.astype(np.float32))[:, None]
    votes = F.avg_pool2d(F.pad(raw, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3 x 3 majority
    mask = (votes[:, 0] > 0.5).numpy()
    return mask[0] if single else mask


def iou(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Intersection over union per frame of bool masks (T, H, W) x 2 -> (T,); 1.0 when both are empty."""
    m, t = (mask[None], target[None]) if mask.ndim == 2 else (mask, target)
    inter = np.logical_and(m, t).sum(axis=(1, 2))
    union = np.logical_or(m, t).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def foreground_iou(frames: np.ndarray, silhouettes: np.ndarray, background: np.ndarray,
                   threshold: float = FG_THRESHOLD, row_background: bool = True) -> np.ndarray:
    """IoU of the segmented figure of each frame against the ground-truth silhouette: (T, H, W, 3),
    bool (T, H, W), background (H, W, 3) -> (T,)."""
    return iou(foreground_mask(frames, background, threshold, row_background), silhouettes)


def _masked(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, t = _batched(to_unit(pred)), _batched(to_unit(target))
    m = (mask[None] if mask.ndim == 2 else mask).astype(np.float32)[..., None]  # (T, H, W, 1)
    if m.shape[:3] != p.shape[:3]:
        raise ValueError(f"mask {mask.shape} does not fit frames {pred.shape}")
    return p, t, m


def foreground_l1(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean absolute error inside the figure: frames (T, H, W, 3) x 2, bool mask (T, H, W) (the ground
    truth's silhouette) -> (T,); 0 for an empty mask."""
    p, t, m = _masked(pred, target, mask)
    n = m.sum(axis=(1, 2, 3)) * 3
    return (np.abs(p - t) * m).sum(axis=(1, 2, 3)) / np.maximum(n, 1)


def foreground_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """PSNR in dB (peak 1) inside the figure: as :func:`foreground_l1` -> (T,); an empty mask scores as an
    exact match (100 dB), as it does for L1 (0)."""
    p, t, m = _masked(pred, target, mask)
    mse = (np.square(p - t) * m).sum(axis=(1, 2, 3)) / np.maximum(m.sum(axis=(1, 2, 3)) * 3, 1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, eps))


def colour_error(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The figure's mean colour error: the Euclidean RGB distance (in [0, 1] units) between the mean colour
    of the frame and of the target inside the mask (T, H, W) -> (T,). A figure in the right place with
    the wrong garment colours scores high here and well on IoU."""
    p, t, m = _masked(pred, target, mask)
    n = np.maximum(m.sum(axis=(1, 2)), 1)  # (T, 1)
    return np.sqrt(np.square((p * m).sum(axis=(1, 2)) / n - (t * m).sum(axis=(1, 2)) / n).sum(axis=-1))


# --------------------------------------------------------------------------------------------------
# Set-level: Fréchet distance between feature Gaussians (FID, FVD)
# --------------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) (ddof 1, like ``np.cov``), float64, of features (N, D), N >= 2."""
    f = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features (N, D) with N >= 2, got {tuple(f.shape)}")
    mu = f.mean(dim=0)
    x = f - mu
    sigma = x.T @ x / (f.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (D, D) via eigh; tiny negative eigenvalues -> 0."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (means (D,), covariances (D, D)):

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)),

    in float64. tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), tiny negative eigenvalues (rounding) clamped to 0:
    no scipy, no complex parts, and exact for singular covariances (fewer samples than dimensions).
    The result is clamped at 0 (it can round to a tiny negative number for identical sets).
    """
    m1, m2 = (torch.as_tensor(m).detach().to("cpu", torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).detach().to("cpu", torch.float64) for s in (sigma1, sigma2))
    d = m1.shape[0]
    if m2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes {tuple(m1.shape)}, {tuple(s1.shape)}, {tuple(m2.shape)}, "
                         f"{tuple(s2.shape)} do not match")
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    ev = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = ev.clamp(min=0).sqrt().sum()
    diff = m1 - m2
    value = float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)
    if value < -1e-6 * max(1.0, float(torch.trace(s1) + torch.trace(s2))):
        logger.warning("frechet_distance: %.3g < 0 beyond rounding (covariances not PSD?); clamped to 0", value)
    return max(value, 0.0)
