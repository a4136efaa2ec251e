"""A procedural articulated 2-D figure with exact DensePose-like U, V maps.

Used by the embedded demo (a subject image and a walking pose sequence that need no downloads) and as
the core of the synthetic training data (dreampose.data.synth). A figure is a set of capsules (head,
torso, upper and lower arms and legs); for every pixel inside a part, U runs along the part's axis (0 at
its first joint, 1 at its second) and V across it (0 on one edge, 1 on the other); outside the figure
both are 0. The part map (``parts > 0``) is the silhouette.

Motion: :func:`walk_cycle` walks in place; :func:`random_motion` mixes steps, arm swings, turns (the
``facing`` of a pose moves smoothly from +1 through 0, front-on, to -1) and drift.
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
    stripes: int = 4  # frequency of the top's pattern (0 = plain)
    sleeves: str = "short"  # "short" or "long"
    pattern: str = "stripes"  # the top's pattern: one of PATTERNS
    bottom_pattern: str = "plain"  # the bottom garment's pattern: one of PATTERNS
    backdrop: str = "gradient"  # one of BACKDROPS
    background2: tuple[float, float, float] = (0.70, 0.75, 0.80)  # second backdrop colour

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Appearance":
        """A random subject: garment colours and patterns, skin tone, sleeves and backdrop."""

        def colour(lo: float = 0.05, hi: float = 0.95) -> tuple[float, float, float]:
            return tuple(float(c) for c in rng.uniform(lo, hi, 3))  # type: ignore[return-value]

        return cls(
            skin=tuple(float(c) for c in np.array([0.9, 0.7, 0.55]) * rng.uniform(0.45, 1.05)),  # type: ignore[arg-type]
            top=colour(),
            bottom=colour(),
            background=colour(0.5, 1.0),
            stripes=int(rng.integers(2, 8)),
            sleeves=str(rng.choice(["short", "long"])),
            pattern=str(rng.choice(PATTERNS)),
            bottom_pattern=str(rng.choice(PATTERNS)),
            backdrop=str(rng.choice(BACKDROPS)),
            background2=colour(0.3, 1.0),
        )


PATTERNS = ("plain", "stripes", "checks", "dots")
BACKDROPS = ("gradient", "split", "stripes", "vignette")


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
    spread = 0.06 + 0.3 * (1.0 - min(abs(pose.facing), 1.0))  # shoulders and hips widen when front-on
    for side in ("f", "b"):
        off = spread * unit * (1 if side == "f" else -1)
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

    image = _backdrop(app, yy, xx, height, width)
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
                colour = colour * (1 - 0.35 * _pattern(app.pattern, app.stripes, u[m], v[m]))[:, None]
        else:
            colour = np.asarray(app.bottom, np.float32)
            if app.stripes:
                colour = colour * (1 - 0.3 * _pattern(app.bottom_pattern, app.stripes, u[m], v[m]))[:, None]
        shade = 0.75 + 0.25 * np.sin(np.pi * v[m])
        image[m] = colour * shade[:, None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), uv, parts


def _pattern(kind: str, freq: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A garment pattern in surface coordinates (it moves with the body): 1 = dark, 0 = light, shape of u."""
    if kind == "plain":
        return np.zeros_like(u)
    if kind == "stripes":
        return np.floor(u * freq * 2) % 2
    if kind == "checks":
        return (np.floor(u * freq * 2) + np.floor(v * 4)) % 2
    if kind == "dots":
        fu, fv = (u * freq * 2) % 1.0 - 0.5, (v * 4) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}; choose one of {PATTERNS}")


def render_backdrop(appearance: Appearance, height: int, width: int) -> np.ndarray:
    """The subject's background alone (no figure): float32 (H, W, 3) in [0, 1], exactly what render_figure
    draws behind the figure (used to segment rendered frames into figure and background)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return _backdrop(appearance, yy, xx, height, width)


def _backdrop(app: Appearance, yy: np.ndarray, xx: np.ndarray, height: int, width: int) -> np.ndarray:
    """The background image (H, W, 3) float32 in [0, 1]."""
    c1, c2 = np.asarray(app.background, np.float32), np.asarray(app.background2, np.float32)
    ty, tx = yy / max(height - 1, 1), xx / max(width - 1, 1)
    image = np.empty((height, width, 3), np.float32)
    if app.backdrop == "gradient":
        image[:] = c1 * (0.85 + 0.15 * ty)[..., None]
    elif app.backdrop == "split":  # a wall and a floor
        image[:] = np.where((ty > 0.78)[..., None], c2, c1 * (0.9 + 0.1 * ty)[..., None])
    elif app.backdrop == "stripes":  # vertical panels
        image[:] = np.where((np.floor(tx * 6) % 2 == 1)[..., None], c2, c1)
    elif app.backdrop == "vignette":
        r2 = (tx - 0.5) ** 2 + (ty - 0.45) ** 2
        image[:] = c1 + (c2 - c1) * np.clip(r2 * 3.0, 0.0, 1.0)[..., None]
    else:
        raise ValueError(f"unknown backdrop {app.backdrop!r}; choose one of {BACKDROPS}")
    return image


def random_motion(
    rng: np.random.Generator,
    n_frames: int,
    fps: float = 8.0,
) -> list[Pose]:
    """A smooth random motion of ``n_frames`` poses: steps, arm swings, turns and drift.

    Every quantity is a smooth function of time (sums of sines and a smoothstep turn), so consecutive
    frames differ a little, as in a fashion video. ``fps`` sets how far the motion gets per frame.
    """
    t = np.arange(n_frames, dtype=np.float64) / fps
    step_hz = rng.uniform(0.4, 1.0)  # gait cycles per second
    stride = rng.uniform(0.0, 0.5)  # 0 = standing, 0.5 = long steps
    arm_amp = rng.uniform(0.1, 0.9)
    arm_hz = rng.uniform(0.2, 0.8)
    arm_phase = rng.uniform(0, 2 * np.pi, 2)
    elbow = rng.uniform(0.0, 0.8)
    scale = rng.uniform(0.85, 1.05)
    x0 = rng.uniform(0.4, 0.6)
    drift = rng.uniform(-0.15, 0.15)
    start_facing = float(rng.choice([-1.0, 1.0]))
    # A turn: facing goes smoothly from start to -start between turn_at and turn_at + turn_len seconds.
    duration = max(t[-1], 1e-6) if n_frames > 1 else 1.0
    turns = rng.random() < 0.6
    turn_at, turn_len = rng.uniform(0.1, 0.6) * duration, rng.uniform(0.2, 0.5) * duration
    poses = []
    for k in range(n_frames):
        a = 2 * np.pi * step_hz * t[k]
        s = math.sin(a)
        facing = start_facing
        if turns:
            x = min(max((t[k] - turn_at) / max(turn_len, 1e-6), 0.0), 1.0)
            facing = start_facing * math.cos(math.pi * x * x * (3 - 2 * x))  # smoothstep through front-on
        swing = [arm_amp * math.sin(2 * np.pi * arm_hz * t[k] + arm_phase[i]) for i in range(2)]
        poses.append(
            Pose(
                x=x0 + drift * (t[k] / duration - 0.5),
                scale=scale,
                lean=0.04 * math.sin(2 * a),
                shoulder_f=-stride * s + swing[0],
                shoulder_b=stride * s + swing[1],
                elbow_f=elbow + 0.25 * max(0.0, -s) * stride * 2,
                elbow_b=elbow + 0.25 * max(0.0, s) * stride * 2,
                hip_f=stride * s,
                hip_b=-stride * s,
                knee_f=-stride * max(0.0, -math.cos(a)),
                knee_b=-stride * max(0.0, math.cos(a)),
                facing=facing,
            )
        )
    return poses


def render_sequence(
    poses: list[Pose], height: int, width: int, appearance: Appearance | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a sequence: images (T, H, W, 3) uint8, uv (T, 2, H, W) float32, parts (T, H, W) uint8."""
    frames = [render_figure(p, height, width, appearance) for p in poses]
    return (np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]), np.stack([f[2] for f in frames]))
