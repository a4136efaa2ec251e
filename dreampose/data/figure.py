"""A procedural articulated 2-D figure with exact DensePose-like U, V maps.

Used by the embedded demo (a subject image and a walking pose sequence that need no downloads) and as
the core of the synthetic training data. A figure is a set of capsules (head, torso, upper and lower
arms and legs); for every pixel inside a part, U runs along the part's axis (0 at its first joint, 1 at
its second) and V across it (0 on one edge, 1 on the other); outside the figure both are 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Parts in drawing order (later parts occlude earlier ones): (name, joint a, joint b, radius key).
PARTS = (
    ("upper_arm_back", "shoulder_b", "elbow_b", "arm"),
    ("lower_arm_back", "elbow_b", "hand_b", "forearm"),
    ("upper_leg_back", "hip_b", "knee_b", "thigh"),
    ("lower_leg_back", "knee_b", "foot_b", "shin"),
    ("torso", "neck", "pelvis", "torso"),
    ("head", "head_top", "neck_top", "head"),
    ("upper_leg_front", "hip_f", "knee_f", "thigh"),
    ("lower_leg_front", "knee_f", "foot_f", "shin"),
    ("upper_arm_front", "shoulder_f", "elbow_f", "arm"),
    ("lower_arm_front", "elbow_f", "hand_f", "forearm"),
)
PART_INDEX = {name: i + 1 for i, (name, *_rest) in enumerate(PARTS)}  # 0 = background


@dataclass
class Appearance:
    """Colours (RGB in [0, 1]) and garment pattern of one subject."""

    skin: tuple[float, float, float] = (0.85, 0.68, 0.55)
    top: tuple[float, float, float] = (0.80, 0.20, 0.25)
    bottom: tuple[float, float, float] = (0.15, 0.20, 0.45)
    background: tuple[float, float, float] = (0.92, 0.92, 0.88)
    stripes: int = 4  # stripes across the top garment (0 = plain)
    sleeves: str = "short"  # "short" or "long"

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Appearance":
        def colour() -> tuple[float, float, float]:
            return tuple(float(c) for c in rng.uniform(0.05, 0.95, 3))  # type: ignore[return-value]

        return cls(
            skin=tuple(float(c) for c in np.array([0.9, 0.7, 0.55]) * rng.uniform(0.45, 1.05)),  # type: ignore[arg-type]
            top=colour(),
            bottom=colour(),
            background=tuple(float(c) for c in rng.uniform(0.5, 1.0, 3)),  # type: ignore[arg-type]
            stripes=int(rng.integers(0, 7)),
            sleeves=str(rng.choice(["short", "long"])),
        )


@dataclass
class Pose:
    """Joint angles (radians) and placement of the figure; zero angles = standing straight, arms down."""

    x: float = 0.5  # horizontal centre of the pelvis, fraction of the width
    scale: float = 1.0
    lean: float = 0.0
    shoulder_f: float = 0.0
    shoulder_b: float = 0.0
    elbow_f: float = 0.0
    elbow_b: float = 0.0
    hip_f: float = 0.0
    hip_b: float = 0.0
    knee_f: float = 0.0
    knee_b: float = 0.0
    facing: float = 1.0  # +1 facing right, -1 facing left (mirrors the limbs)
    extra: dict = field(default_factory=dict)


def walk_cycle(n_frames: int, steps_per_cycle: float = 16.0, phase: float = 0.0, drift: float = 0.0) -> list[Pose]:
    """A smooth walking-in-place sequence: legs and arms swing in opposition, knees and elbows bend."""
    poses = []
    for k in range(n_frames):
        a = 2 * math.pi * (k / steps_per_cycle) + phase
        s = math.sin(a)
        poses.append(
            Pose(
                x=0.5 + drift * (k / max(n_frames - 1, 1) - 0.5),
                lean=0.05 * math.sin(2 * a),
                shoulder_f=-0.55 * s,
                shoulder_b=0.55 * s,
                elbow_f=0.35 + 0.25 * max(0.0, -s),
                elbow_b=0.35 + 0.25 * max(0.0, s),
                hip_f=0.45 * s,
                hip_b=-0.45 * s,
                knee_f=-0.5 * max(0.0, -math.cos(a)),
                knee_b=-0.5 * max(0.0, math.cos(a)),
            )
        )
    return poses


def _joints(pose: Pose, height: int, width: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Joint positions in pixels (x, y) and part radii for a pose."""
    unit = 0.16 * height * pose.scale  # length of one limb segment
    radii = {"head": 0.3 * unit, "torso": 0.38 * unit, "arm": 0.16 * unit, "forearm": 0.13 * unit,
             "thigh": 0.22 * unit, "shin": 0.17 * unit}
    pelvis = np.array([pose.x * width, 0.54 * height])

    def step(p: np.ndarray, angle: float, length: float) -> np.ndarray:
        # angle 0 points straight down; positive swings toward the facing direction.
        return p + length * np.array([math.sin(angle) * pose.facing, math.cos(angle)])

    neck = step(pelvis, math.pi + pose.lean, 1.5 * unit)
    j = {"pelvis": pelvis, "neck": neck}
    j["neck_top"] = step(neck, math.pi + pose.lean, 0.4 * unit)
    j["head_top"] = step(j["neck_top"], math.pi + pose.lean, 0.35 * unit)
    for side in ("f", "b"):
        off = 0.06 * unit * (1 if side == "f" else -1)
        j[f"shoulder_{side}"] = step(neck, math.pi + pose.lean, -0.1 * unit) + np.array([off, 0])
        sh = getattr(pose, f"shoulder_{side}")
        j[f"elbow_{side}"] = step(j[f"shoulder_{side}"], sh, 0.75 * unit)
        j[f"hand_{side}"] = step(j[f"elbow_{side}"], sh + getattr(pose, f"elbow_{side}"), 0.7 * unit)
        j[f"hip_{side}"] = pelvis + np.array([off, 0])
        hp = getattr(pose, f"hip_{side}")
        j[f"knee_{side}"] = step(j[f"hip_{side}"], hp, 0.95 * unit)
        j[f"foot_{side}"] = step(j[f"knee_{side}"], hp + getattr(pose, f"knee_{side}"), 0.9 * unit)
    return j, radii


def render_figure(
    pose: Pose, height: int, width: int, appearance: Appearance | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one frame.

    Returns:
        image: uint8 (H, W, 3), the dressed figure on its background;
        uv: float32 (2, H, W), U and V in [0, 1] inside the figure, 0 outside;
        parts: uint8 (H, W), the part index (PART_INDEX) of each pixel, 0 for background.
    """
    app = appearance or Appearance()
    joints, radii = _joints(pose, height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    px, py = xx + 0.5, yy + 0.5
    uv = np.zeros((2, height, width), np.float32)
    parts = np.zeros((height, width), np.uint8)
    for name, ja, jb, rk in PARTS:
        a, b, r = joints[ja], joints[jb], radii[rk]
        d = b - a
        length2 = float(d @ d) + 1e-9
        t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1]) / length2, 0.0, 1.0)
        cx, cy = a[0] + t * d[0], a[1] + t * d[1]
        dist2 = (px - cx) ** 2 + (py - cy) ** 2
        inside = dist2 < r * r
        across = ((px - a[0]) * d[1] - (py - a[1]) * d[0]) / math.sqrt(length2)  # signed distance to the axis
        v = np.clip(0.5 + 0.5 * across / r, 0.0, 1.0)
        uv[0][inside] = np.maximum(t[inside], 1e-3)
        uv[1][inside] = np.maximum(v[inside], 1e-3)
        parts[inside] = PART_INDEX[name]

    image = np.empty((height, width, 3), np.float32)
    grad = 0.85 + 0.15 * (yy / max(height - 1, 1))
    image[:] = np.asarray(app.background, np.float32) * grad[..., None]
    u, v = uv
    for name, *_ in PARTS:
        m = parts == PART_INDEX[name]
        if not m.any():
            continue
        if name == "head" or (name.startswith("lower_arm") and app.sleeves == "short"):
            colour = np.asarray(app.skin, np.float32)
            shade = 0.8 + 0.2 * np.sin(np.pi * v[m])
            image[m] = colour * shade[:, None]
            continue
        if name == "torso" or "arm" in name:
            colour = np.asarray(app.top, np.float32)
            if name.startswith("upper_arm") and app.sleeves == "short":
                colour = np.where(u[m, None] < 0.5, colour, np.asarray(app.skin, np.float32))
            elif app.stripes and name == "torso":
                band = (np.floor(u[m] * app.stripes * 2) % 2)[:, None]
                colour = colour * (1 - 0.35 * band)
        else:
            colour = np.asarray(app.bottom, np.float32)
        shade = 0.75 + 0.25 * np.sin(np.pi * v[m])
        image[m] = colour * shade[:, None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), uv, parts


def render_sequence(
    poses: list[Pose], height: int, width: int, appearance: Appearance | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a sequence: images (T, H, W, 3) uint8, uv (T, 2, H, W) float32, parts (T, H, W) uint8."""
    frames = [render_figure(p, height, width, appearance) for p in poses]
    return (np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]), np.stack([f[2] for f in frames]))
