"""A built-in synthetic domain-shift benchmark standing in for GTA5 -> Cityscapes.

`generate_example` draws a crude street scene (sky, buildings, fence, vegetation, road,
sidewalks, terrain, poles with signs / traffic lights, cars, persons) directly in the
Cityscapes train-id label space, together with an RGB rendering of it. Both domains share one
scene grammar; they differ in how the scene is rendered and in a few layout statistics:

* ``source`` ("game"): flat-shaded, saturated class colours, sharp edges, no noise, horizon
  high in the frame, moderate car sizes.
* ``target`` ("real"): per-class hue / saturation / brightness shifts (class-dependent, not a
  permutation), per-class textures (asphalt noise, window grids, leaf speckle, sky gradient),
  a random lighting ramp, vignetting, a colour cast, blur and pixel noise; a lower and more
  variable horizon, larger cars and more persons.

All shift parameters live in `STYLES` (one frozen `DomainStyle` per domain). Scenes are
described in normalised coordinates (y as a fraction of H, x as a fraction of W, nominal
aspect 1:2), so one (domain, split, index, seed) gives the same scene at every resolution.
Generation is deterministic: one `np.random.default_rng` seeded from integers only, and the
per-pixel maths avoids transcendental functions and reductions, whose last bits may differ
between CPUs / SIMD paths. No ignore (255) pixels are produced.
"""

import dataclasses

import numpy as np

from jaxda.data import labels

ROAD, SIDEWALK, BUILDING = (labels.class_id(n) for n in ("road", "sidewalk", "building"))
FENCE, POLE, LIGHT = (labels.class_id(n) for n in ("fence", "pole", "traffic light"))
SIGN, VEGETATION, TERRAIN = (labels.class_id(n) for n in ("traffic sign", "vegetation", "terrain"))
SKY, PERSON, CAR = (labels.class_id(n) for n in ("sky", "person", "car"))

DOMAINS = ("source", "target")
SPLITS = ("train", "validation")
# Fixed integer codes for the rng seed (Python's hash() of a str is salted per process).
_DOMAIN_CODES = {"source": 11, "target": 23}
_SPLIT_CODES = {"train": 101, "validation": 202}
MIN_HEIGHT, MIN_WIDTH = 32, 64


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """Layout statistics and rendering of one domain; the defaults are the source ("game")."""

    horizon: tuple[float, float] = (0.40, 0.45)  # horizon row ~ U(range), fraction of H
    car_scale: float = 1.0  # car height / (ground row - horizon), times a U(0.45, 0.6) draw
    max_cars: int = 4  # cars per scene ~ U{0..max_cars}
    max_persons: int = 3  # persons per scene ~ U{0..max_persons}
    hue_shift: float = 0.0  # degrees; class c rotates by hue_shift * CLASS_RESPONSE[c][0]
    saturation: float = 1.0  # multiplier on HSV saturation of all class colours
    value_shift: float = 0.0  # class c's HSV value scales by 1 + this * CLASS_RESPONSE[c][1]
    colour_jitter: float = 6.0  # std of the per-instance RGB jitter (0..255 units)
    texture: float = 0.0  # strength of the per-class textures, CLASS_RESPONSE[c][2:]
    lane_marks: bool = False  # dashed centre line on the road (still labelled road)
    lighting: float = 0.0  # amplitude of a random-direction linear brightness ramp
    vignette: float = 0.0  # brightness loss in the corners
    colour_cast: float = 0.0  # std of a per-image multiplicative RGB white-balance error
    blur: float = 0.0  # triangle blur radius in pixels at H = 128 (scaled with H; 0 = none)
    noise_std: float = 0.0  # std of additive Gaussian pixel noise (0..255 units)

    @property
    def flat(self) -> bool:
        """True when no texture / camera effect is on (then `_render` is skipped)."""
        effects = (self.texture, self.lighting, self.vignette, self.colour_cast, self.blur)
        return not any(effects) and not self.noise_std


STYLES = {
    "source": DomainStyle(),  # the defaults: flat, saturated, sharp, high horizon
    "target": DomainStyle(
        horizon=(0.47, 0.58),
        car_scale=1.3,
        max_cars=4,
        max_persons=5,
        hue_shift=40.0,
        saturation=0.55,
        value_shift=0.3,
        colour_jitter=10.0,
        texture=1.0,
        lane_marks=True,
        lighting=0.25,
        vignette=0.35,
        colour_cast=0.05,
        blur=1.5,
        noise_std=6.0,
    ),
}

# Colour options per class in the shared "grammar" (RGB, source look); instances pick one.
_BASE_COLOURS = {
    ROAD: [(96, 92, 108)],
    SIDEWALK: [(186, 172, 168)],
    BUILDING: [(150, 100, 80), (196, 182, 150), (120, 122, 136), (176, 140, 100)],
    FENCE: [(160, 120, 70)],
    POLE: [(100, 100, 108)],
    LIGHT: [(36, 36, 36)],
    SIGN: [(235, 205, 20), (210, 35, 30), (30, 90, 210)],
    VEGETATION: [(60, 160, 40), (40, 130, 50)],
    TERRAIN: [(160, 190, 70)],
    SKY: [(100, 170, 245)],
    PERSON: [(200, 50, 60), (50, 60, 160), (230, 200, 60), (60, 60, 60)],
    CAR: [(200, 30, 30), (30, 70, 190), (225, 225, 225), (45, 45, 50), (160, 165, 175)],
}
# Colours of instance parts: (class whose domain shift they follow, RGB).
_PART_COLOURS = {
    "glass": (CAR, (40, 50, 62)),
    "skin": (PERSON, (225, 180, 150)),
    "lamp": (LIGHT, (250, 200, 40)),
}
SCENE_CLASSES = tuple(sorted(_BASE_COLOURS))
# Per-class response to the domain style, chosen class-dependent on purpose (so the shift is
# not one global colour transform): (hue response, value response, fine texture amplitude,
# coarse texture amplitude). Class c's hue rotates by style.hue_shift * hue response, its HSV
# value scales by 1 + style.value_shift * value response, and its shading is modulated by
# style.texture * (fine * per-pixel noise + coarse * low-frequency noise).
CLASS_RESPONSE = {
    ROAD: (0.5, -0.9, 0.10, 0.12),
    SIDEWALK: (-1.0, -0.6, 0.06, 0.08),
    BUILDING: (0.8, 0.4, 0.05, 0.12),
    FENCE: (1.0, 0.5, 0.05, 0.10),
    POLE: (0.0, 0.8, 0.04, 0.0),
    LIGHT: (0.0, 0.0, 0.0, 0.0),
    SIGN: (0.5, 0.0, 0.0, 0.0),
    VEGETATION: (1.0, -0.8, 0.35, 0.20),
    TERRAIN: (-0.8, 0.3, 0.22, 0.15),
    SKY: (-0.6, -0.25, 0.0, 0.06),
    PERSON: (-1.0, -0.5, 0.05, 0.0),
    CAR: (1.0, -0.4, 0.04, 0.05),
}


def _shift_colour(rgb, cls: int, style: DomainStyle) -> np.ndarray:
    """(3,) RGB -> (3,) float64 RGB with the style's class-dependent HSV shift applied."""
    r, g, b = (float(c) / 255.0 for c in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    v, s, h = hi, (hi - lo) / hi if hi > 0 else 0.0, 0.0
    if hi > lo and hi == r:
        h = ((g - b) / (hi - lo)) % 6
    elif hi > lo and hi == g:
        h = (b - r) / (hi - lo) + 2
    elif hi > lo:
        h = (r - g) / (hi - lo) + 4
    h = (h + style.hue_shift * CLASS_RESPONSE[cls][0] / 60.0) % 6
    s = min(1.0, s * style.saturation)
    v = min(1.0, v * (1.0 + style.value_shift * CLASS_RESPONSE[cls][1]))
    sector, f = int(h), h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    out = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][sector % 6]
    return np.array(out) * 255.0


# Domain palettes, computed once: _PALETTES[domain][cls] -> [options, 3] float64 RGB.
_PALETTES = {
    d: {c: np.stack([_shift_colour(o, c, s) for o in opts]) for c, opts in _BASE_COLOURS.items()}
    for d, s in STYLES.items()
}
_EXTRAS = {
    d: {k: _shift_colour(rgb, c, s) for k, (c, rgb) in _PART_COLOURS.items()}
    for d, s in STYLES.items()
}


class _Canvas:
    """Label map [H, W] uint8 and colour image [H, W, 3] float32 drawn in normalised coords."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, domain: str):
        self.h, self.w, self.rng, self.domain = height, width, rng, domain
        self.label = np.full((height, width), SKY, np.uint8)
        self.rgb = np.empty((height, width, 3), np.float32)
        self.ys = (np.arange(height, dtype=np.float32) + 0.5) / height  # pixel centres
        self.xs = (np.arange(width, dtype=np.float32) + 0.5) / width

    def colour(self, cls: int, extra: str | None = None) -> np.ndarray:
        """A per-instance (3,) colour: a random palette option of `cls` plus jitter."""
        if extra is not None:
            base = _EXTRAS[self.domain][extra]
        else:
            opts = _PALETTES[self.domain][cls]
            base = opts[self.rng.integers(len(opts))]
        return base + self.rng.normal(0.0, STYLES[self.domain].colour_jitter, 3)

    @staticmethod
    def _span(a: float, b: float, n: int, min_px: int) -> slice:
        """Pixel indices whose centres lie in [a, b) of an axis of n pixels (>= min_px wide)."""
        i0, i1 = int(np.ceil(a * n - 0.5)), int(np.ceil(b * n - 0.5))
        if i1 - i0 < min_px:
            i0 = int(np.floor((a + b) * n / 2)) - min_px // 2
            i1 = i0 + min_px
        return slice(max(i0, 0), min(i1, n))

    def rect(self, cls, rgb, y0, y1, x0, x1, min_w: int = 0) -> None:
        """Fills rows [y0, y1) x cols [x0, x1) (fractions); `min_w` keeps thin poles visible."""
        rs, cs = self._span(y0, y1, self.h, 0), self._span(x0, x1, self.w, min_w)
        self.label[rs, cs] = cls
        self.rgb[rs, cs] = rgb

    def ellipse(self, cls, rgb, cy, cx, ry, rx) -> None:
        """Fills an axis-aligned ellipse (centre and radii as fractions of H / W)."""
        rs, cs = self._span(cy - ry, cy + ry, self.h, 0), self._span(cx - rx, cx + rx, self.w, 0)
        dy, dx = (self.ys[rs, None] - cy) / ry, (self.xs[None, cs] - cx) / rx
        mask = dy * dy + dx * dx <= 1.0
        self.label[rs, cs][mask] = cls
        self.rgb[rs, cs][mask] = rgb


def _validate(domain, split, index, seed, height, width) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("index", index), ("seed", seed), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    for name, value, low in (("height", height, MIN_HEIGHT), ("width", width, MIN_WIDTH)):
        if value < low:
            raise ValueError(
                f"{name} must be >= {low} (minimum size {MIN_HEIGHT}x{MIN_WIDTH}), got {value}"
            )


def generate_example(
    domain: str, split: str, index: int, *, seed: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """-> (image [height, width, 3] uint8 RGB, label [height, width] uint8 train ids)."""
    _validate(domain, split, index, seed, height, width)
    style = STYLES[domain]
    rng = np.random.default_rng([int(seed), _DOMAIN_CODES[domain], _SPLIT_CODES[split], int(index)])
    cv = _Canvas(height, width, rng, domain)
    hz = rng.uniform(*style.horizon)
    vp = 0.5 + rng.uniform(-0.12, 0.12)  # vanishing point (x) on the horizon
    cb, hwb, swb = vp + rng.uniform(-0.12, 0.12), rng.uniform(0.3, 0.5), rng.uniform(0.12, 0.3)
    outer = [TERRAIN if rng.random() < 0.55 else SIDEWALK for _ in range(2)]

    def edges(t, side):
        """Road edge and sidewalk outer edge (x) on `side` (-1 left, +1 right) at depth t."""
        centre, half = vp + t * (cb - vp), 0.006 + t * hwb
        return centre + side * half, centre + side * (half + t * swb)

    def ground_y(t):
        return hz + t * (1.0 - hz)

    cv.rgb[:] = cv.colour(SKY)
    _draw_backdrop(cv, rng, hz, vp)
    _draw_ground(cv, style, hz, vp, cb, hwb, swb, outer)
    for _ in range(rng.integers(1, 6)):  # trees: trunk on the far sidewalk, crown above
        side, t = rng.choice((-1, 1)), rng.uniform(0.02, 0.22)
        yb, x = ground_y(t), edges(t, side)[1] - side * rng.uniform(0.0, 0.04)
        depth, col = yb - hz, cv.colour(VEGETATION)
        top = yb - rng.uniform(1.2, 2.0) * depth - 0.04
        cv.rect(VEGETATION, col, top, yb, x - 0.1 * depth, x + 0.1 * depth, min_w=1)
        r = rng.uniform(0.6, 1.0) * depth + 0.03
        for _ in range(3):  # a crown is a union of three ellipses
            cv.ellipse(
                VEGETATION,
                col,
                top + rng.uniform(-0.5, 0.3) * r,
                x + rng.uniform(-0.5, 0.5) * r,
                r * rng.uniform(0.7, 1.1),
                r * 0.55,
            )

    objects = []  # (ground row, kind, side, t): drawn far to near for correct occlusion
    for _ in range(rng.integers(1, 5)):
        t = rng.uniform(0.05, 0.6)
        objects.append((ground_y(t), "pole", rng.choice((-1, 1)), t))
    for _ in range(rng.integers(0, style.max_cars + 1)):
        t = rng.uniform(0.08, 0.9)
        objects.append((ground_y(t), "car", rng.choice((-1, 1)), t))
    for _ in range(rng.integers(0, style.max_persons + 1)):
        t = rng.uniform(0.08, 0.8)
        objects.append((ground_y(t), "person", rng.choice((-1, 1)), t))
    for yb, kind, side, t in sorted(objects, key=lambda o: o[0]):
        depth = yb - hz  # image height of a 1-camera-height object standing at row yb
        road_x, walk_x = edges(t, side)
        if kind == "pole":
            x = float(np.clip(road_x + rng.uniform(0.2, 0.8) * (walk_x - road_x), 0.01, 0.99))
            _draw_pole(cv, rng, yb, x, depth)
        elif kind == "car":
            x = float(
                np.clip(road_x + rng.uniform(0.25, 0.75) * (vp + t * (cb - vp) - road_x), 0.0, 1.0)
            )
            _draw_car(cv, rng, yb, x, depth * style.car_scale * rng.uniform(0.45, 0.6))
        else:
            x = float(np.clip(road_x + rng.uniform(0.1, 0.9) * (walk_x - road_x), 0.02, 0.98))
            ph = depth * rng.uniform(0.9, 1.15)
            cv.ellipse(PERSON, cv.colour(PERSON), yb - 0.42 * ph, x, 0.40 * ph, 0.06 * ph)
            cv.ellipse(PERSON, cv.colour(PERSON, "skin"), yb - 0.88 * ph, x, 0.08 * ph, 0.04 * ph)
    image = cv.rgb if style.flat else _render(cv, style, hz)
    return np.clip(image + 0.5, 0.0, 255.0).astype(np.uint8), cv.label


def _draw_backdrop(cv: _Canvas, rng: np.random.Generator, hz: float, vp: float) -> None:
    """Buildings standing on the horizon (lower near the vanishing point), fence and hedges."""
    x = -rng.uniform(0.0, 0.1)
    while x < 1.0:
        bw = rng.uniform(0.06, 0.2)
        if rng.random() < 0.85:  # else a gap showing the sky
            far = min(1.0, abs(x + bw / 2 - vp) / 0.5)  # perspective: far buildings look lower
            top = max(0.0, hz - rng.uniform(0.12, 0.4) * (0.45 + 0.55 * far))
            cv.rect(BUILDING, cv.colour(BUILDING), top, hz + 0.01, x, x + bw)
        x += bw + (rng.uniform(0.01, 0.05) if rng.random() < 0.3 else 0.0)
    if rng.random() < 0.5:  # fence: rails + slats in front of the buildings on one side
        x0 = rng.uniform(0.0, 0.3) if rng.random() < 0.5 else rng.uniform(0.55, 0.75)
        x1, fh = x0 + rng.uniform(0.15, 0.3), rng.uniform(0.04, 0.08)
        rs = cv._span(hz - fh, hz + 0.01, cv.h, 1)
        cs = cv._span(x0, x1, cv.w, 1)
        rel_y, slat_x = (cv.ys[rs, None] - (hz - fh)) / fh, (cv.xs[None, cs] * 90.0) % 1.0
        mask = (slat_x < 0.45) | (rel_y < 0.15) | ((rel_y > 0.55) & (rel_y < 0.7))
        cv.label[rs, cs][mask] = FENCE
        cv.rgb[rs, cs][mask] = cv.colour(FENCE)
    if rng.random() < 0.4:  # hedge
        x0 = rng.uniform(0.0, 0.8)
        cv.rect(
            VEGETATION,
            cv.colour(VEGETATION),
            hz - rng.uniform(0.02, 0.05),
            hz + 0.01,
            x0,
            x0 + rng.uniform(0.1, 0.3),
        )


def _draw_ground(cv, style, hz, vp, cb, hwb, swb, outer) -> None:
    """Road trapezoid converging to (vp, hz), sidewalks beside it, terrain / pavement outside."""
    rs = cv._span(hz, 1.0, cv.h, 1)
    t = ((cv.ys[rs] - hz) / (1.0 - hz))[:, None]
    dx = cv.xs[None, :] - (vp + t * (cb - vp))
    adx, half = np.abs(dx), 0.006 + t * hwb
    region = (dx > 0).astype(np.intp)  # 0 / 1: left / right outer area
    region[adx < half + t * swb] = 2
    region[adx < half] = 3
    classes = np.array([outer[0], outer[1], SIDEWALK, ROAD], np.uint8)
    colours = np.stack(
        [cv.colour(outer[0]), cv.colour(outer[1]), cv.colour(SIDEWALK), cv.colour(ROAD)]
    ).astype(np.float32)
    cv.label[rs] = classes[region]
    cv.rgb[rs] = colours[region]
    if style.lane_marks:  # dashes of constant length on the ground plane: period ~ 1 / depth
        dash = (2.5 / (t + 0.05)) % 1.0 < 0.45
        mark = dash & (adx < 0.002 + 0.012 * t) & (region == 3)
        cv.rgb[rs][mark] = (205.0, 205.0, 195.0)


def _draw_pole(cv: _Canvas, rng: np.random.Generator, yb: float, x: float, depth: float):
    """A pole of ~2.5 camera heights with an optional sign and / or traffic light on top."""
    top = max(0.02, yb - rng.uniform(2.0, 3.0) * depth)
    half_w = 0.012 * depth
    cv.rect(POLE, cv.colour(POLE), top, yb, x - half_w, x + half_w, min_w=1)
    kind = rng.choice(4)  # 0 bare, 1 sign, 2 traffic light, 3 both
    if kind in (1, 3):
        size = rng.uniform(0.15, 0.25) * depth
        sy = top + (size if kind == 1 else 0.45 * depth)
        if rng.random() < 0.5:
            cv.ellipse(SIGN, cv.colour(SIGN), sy, x, size, size / 2)
        else:
            cv.rect(SIGN, cv.colour(SIGN), sy - size, sy + size, x - size / 2, x + size / 2)
    if kind in (2, 3):
        bh, bw = 0.3 * depth, 0.055 * depth
        cv.rect(LIGHT, cv.colour(LIGHT), top, top + bh, x - bw, x + bw, min_w=1)
        lamp_y = top + bh * (1 + 2 * rng.integers(3)) / 6
        cv.ellipse(LIGHT, cv.colour(LIGHT, "lamp"), lamp_y, x, bh / 7, bw * 0.7)


def _draw_car(cv: _Canvas, rng: np.random.Generator, yb: float, x: float, ch: float) -> None:
    """A car seen from behind, `ch` tall: body, cabin with a dark window band, two wheels."""
    hw = ch * rng.uniform(0.8, 1.1)  # half width in H units; x is in W units (aspect 2)
    body, wheel = cv.colour(CAR), cv.colour(CAR, "glass") * 0.6
    for wx in (x - 0.35 * hw, x + 0.35 * hw):
        cv.ellipse(CAR, wheel, yb - 0.12 * ch, wx, 0.12 * ch, 0.06 * ch)
    cv.rect(CAR, body, yb - 0.55 * ch, yb - 0.1 * ch, x - hw / 2, x + hw / 2)
    cv.rect(CAR, body, yb - ch, yb - 0.55 * ch, x - 0.37 * hw, x + 0.37 * hw)
    cv.rect(
        CAR, cv.colour(CAR, "glass"), yb - 0.9 * ch, yb - 0.6 * ch, x - 0.31 * hw, x + 0.31 * hw
    )


def _smooth_noise(rng: np.random.Generator, cv: _Canvas, cells: int) -> np.ndarray:
    """[H, W] float32 value noise: a (cells+1) x (2*cells+1) grid, bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, 2 * cells + 1), dtype=np.float32)
    fy, fx = cv.ys * cells, cv.xs * (2 * cells)
    iy, ix = fy.astype(np.intp), fx.astype(np.intp)
    wy, wx = (fy - iy)[:, None], fx - ix
    rows = grid[iy] * (1 - wy) + grid[iy + 1] * wy
    return rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx


def _blur_axis(img: np.ndarray, radius: float, axis: int) -> np.ndarray:
    """Triangle filter of (fractional) `radius` pixels along `axis` (0 or 1), edge-replicated."""
    src = img if axis == 0 else img.swapaxes(0, 1)
    k = int(np.ceil(radius)) - 1 if radius == int(radius) else int(radius)
    weights = [1.0 - i / radius for i in range(k + 1)]
    norm = weights[0] + 2.0 * sum(weights[1:])
    out = np.float32(weights[0] / norm) * src
    for i in range(1, k + 1):  # taps at -i and +i; neighbours outside clamp to the edge
        w = np.float32(weights[i] / norm)
        out[i:] += w * src[:-i]
        out[:i] += w * src[:1]
        out[:-i] += w * src[i:]
        out[-i:] += w * src[-1:]
    return out if axis == 0 else out.swapaxes(0, 1)


# A fixed table of standard normals: slicing it at a random offset is ~10x cheaper than
# drawing fresh per-pixel Gaussians, which alone would exceed the time budget.
_NOISE_TABLE = np.random.default_rng(20240607).standard_normal(1 << 20, dtype=np.float32)


def _table_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 noise of `shape`, a window of the table at a random offset."""
    n, off = int(np.prod(shape)), int(rng.integers(_NOISE_TABLE.size))
    if off + n <= _NOISE_TABLE.size:
        return _NOISE_TABLE[off : off + n].reshape(shape)
    return np.resize(np.concatenate([_NOISE_TABLE[off:], _NOISE_TABLE[:off]]), n).reshape(shape)


def _render(cv: _Canvas, style: DomainStyle, hz: float) -> np.ndarray:
    """Target "camera": class textures, lighting ramp, vignette, colour cast, blur, noise."""
    rng, lab, img = cv.rng, cv.label, cv.rgb
    direction = rng.standard_normal(2)
    dx, dy = (float(d) for d in direction / np.sqrt(direction @ direction))
    cast = (1.0 + style.colour_cast * rng.standard_normal(3)).astype(np.float32)
    coarse = _smooth_noise(rng, cv, 6)
    fine = _table_noise(rng, lab.shape)
    amps = np.zeros((2, 256), np.float32)
    for cls, response in CLASS_RESPONSE.items():
        amps[:, cls] = response[2:]
    amps *= style.texture
    shade = 1.0 + amps[0].take(lab) * fine + amps[1].take(lab) * coarse
    ys, xs = cv.ys[:, None], cv.xs[None, :]
    sky_grad = 1.0 + 0.35 * style.texture * ys / max(hz, 0.1)  # hazier towards the horizon
    windows = ((xs * 60.0) % 1.0 > 0.45) & ((ys * 24.0) % 1.0 > 0.5)
    tiles = ((xs * 40.0) % 1.0 < 0.08) | ((ys * 30.0) % 1.0 < 0.1)
    shade *= np.where(lab == SKY, sky_grad, np.float32(1.0))
    shade *= np.where((lab == BUILDING) & windows, np.float32(1.0 - 0.45 * style.texture), 1.0)
    shade *= np.where((lab == SIDEWALK) & tiles, np.float32(1.0 - 0.2 * style.texture), 1.0)
    light = 1.0 + 2.0 * style.lighting * (dx * (xs - 0.5) + dy * (ys - 0.5))
    vignette = 1.0 - style.vignette * 2.0 * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2)
    shade *= light * vignette
    img *= shade[..., None]
    img *= cast
    radius = style.blur * cv.h / 128.0
    if radius > 1.0:  # a triangle of radius <= 1 is the identity
        img = _blur_axis(_blur_axis(img, radius, 0), radius, 1)
    img += np.float32(style.noise_std) * _table_noise(rng, img.shape)
    return img
