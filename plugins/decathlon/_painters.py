"""The ten synthetic domains' painters: one function per domain that draws a sample of a
class (see :mod:`.synthetic` for what decides each domain's class)."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .domains import DOMAINS


class _Canvas:
    """Normalised coordinates u (x) and v (y) in [-1, 1] for an s x s image."""

    def __init__(self, s: int) -> None:
        c = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
        self.v, self.u = np.meshgrid(c, c, indexing="ij")
        self.s = s

    def disc(self, cx: float, cy: float, r: float) -> np.ndarray:
        return (self.u - cx) ** 2 + (self.v - cy) ** 2 <= r * r

    def box(self, cx: float, cy: float, hw: float, hh: float, angle: float = 0.0) -> np.ndarray:
        du, dv = self.u - cx, self.v - cy
        ca, sa = math.cos(angle), math.sin(angle)
        x, y = ca * du + sa * dv, -sa * du + ca * dv
        return (np.abs(x) <= hw) & (np.abs(y) <= hh)

    def polygon(self, cx: float, cy: float, r: float, n: int, angle: float = 0.0) -> np.ndarray:
        # A regular n-gon as the intersection of n half-planes (apothem r cos(pi/n)).
        inside = np.ones_like(self.u, dtype=bool)
        apothem = r * math.cos(math.pi / n)
        for k in range(n):
            a = angle + (2 * k + 1) * math.pi / n
            inside &= (self.u - cx) * math.cos(a) + (self.v - cy) * math.sin(a) <= apothem
        return inside

    def segment(self, p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
        (x0, y0), (x1, y1) = p0, p1
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy or 1e-9
        t = np.clip(((self.u - x0) * dx + (self.v - y0) * dy) / length2, 0.0, 1.0)
        return (self.u - x0 - t * dx) ** 2 + (self.v - y0 - t * dy) ** 2 <= width * width


def _paint(img: np.ndarray, mask: np.ndarray, colour: Any) -> None:
    img[mask] = np.asarray(colour, dtype=np.float32)


def _noise(rng: np.random.Generator, img: np.ndarray, amount: float) -> np.ndarray:
    return img + amount * rng.standard_normal(img.shape).astype(np.float32)


def _background(rng: np.random.Generator, cv: _Canvas, base: Any, spread: float = 0.15) -> np.ndarray:
    base = np.asarray(base, dtype=np.float32)
    grad = rng.uniform(-spread, spread, size=2).astype(np.float32)
    shade = grad[0] * cv.u + grad[1] * cv.v
    return np.clip(base[None, None, :] + shade[..., None], 0, 1).astype(np.float32)


HUES = np.array([[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.85, 0.1], [0.75, 0.2, 0.85]],
                dtype=np.float32)


def _aircraft(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    wing_pos, span, tail = cls // 4, (cls // 2) % 2, cls % 2
    img = _background(rng, cv, [0.45 + 0.1 * rng.random(), 0.65 + 0.1 * rng.random(), 0.9], 0.2)
    angle = rng.uniform(-0.2, 0.2)
    cx, cy, scale = rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.85, 1.1)
    grey = rng.uniform(0.1, 0.45)
    body = cv.box(cx, cy, 0.09 * scale, 0.75 * scale, angle)
    wy = cy + (-0.3 + 0.3 * wing_pos) * scale
    wings = cv.box(cx, wy, (0.45 + 0.3 * span) * scale, 0.09 * scale, angle)
    mask = body | wings
    if tail:
        mask |= cv.box(cx, cy + 0.62 * scale, 0.3 * scale, 0.06 * scale, angle)
    _paint(img, mask, [grey] * 3)
    return _noise(rng, img, 0.03)


def _cifar100(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    shape, colour = cls // 5, cls % 5
    img = np.clip(_background(rng, cv, rng.uniform(0.2, 0.6, 3), 0.2), 0, 1)
    img = _noise(rng, img, 0.08)
    cx, cy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.35, 0.55)
    if shape == 0:
        mask = cv.disc(cx, cy, r)
    elif shape == 1:
        mask = cv.box(cx, cy, r * 0.8, r * 0.8)
    elif shape == 2:
        mask = cv.polygon(cx, cy, r, 3, angle=math.pi / 2)
    else:
        mask = cv.disc(cx, cy, r) & ~cv.disc(cx, cy, r * 0.55)
    _paint(img, mask, HUES[colour] * rng.uniform(0.8, 1.0))
    return img


def _daimler(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    img = _background(rng, cv, [rng.uniform(0.3, 0.6)] * 3, 0.2)
    tone = float(np.clip(img.mean() + rng.choice([-0.3, 0.3]), 0, 1))
    cx, scale = rng.uniform(-0.2, 0.2), rng.uniform(0.85, 1.05)
    if cls == 1:
        mask = cv.disc(cx, -0.62 * scale, 0.13 * scale) | cv.box(cx, -0.15 * scale, 0.17 * scale, 0.33 * scale)
        mask |= cv.box(cx - 0.09 * scale, 0.5 * scale, 0.05 * scale, 0.33 * scale)
        mask |= cv.box(cx + 0.09 * scale, 0.5 * scale, 0.05 * scale, 0.33 * scale)
    else:
        mask = np.zeros_like(cv.u, dtype=bool)
        for _ in range(int(rng.integers(2, 4))):
            mask |= cv.box(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.1, 0.5), rng.uniform(0.05, 0.2))
    _paint(img, mask, [tone] * 3)
    return _noise(rng, img, 0.06)


def _dtd(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    f = rng.uniform(5.0, 8.0)
    ph = rng.uniform(0, 2 * math.pi)
    u, v = cv.u, cv.v
    if cls == 0:
        t = np.sin(f * v + ph)
    elif cls == 1:
        t = np.sin(f * u + ph)
    elif cls == 2:
        t = np.sign(np.sin(f * u + ph) * np.sin(f * v + ph))
    elif cls == 3:
        t = (np.sin(f * u + ph) * np.sin(f * v + ph) > 0.6) * 2.0 - 1
    elif cls == 4:
        t = np.sin(f * 1.5 * np.sqrt((u - rng.uniform(-0.3, 0.3)) ** 2 + (v - rng.uniform(-0.3, 0.3)) ** 2) + ph)
    elif cls == 5:
        t = np.maximum(np.sin(f * (u + v) + ph), np.sin(f * (u - v) + ph)) * 2 - 1
    elif cls == 6:
        t = np.sin(2.0 * u + ph) * np.cos(2.5 * v - ph)  # smooth, low-frequency blobs
    else:
        t = np.sin(f * v + 1.5 * np.abs(np.sin(f * u)) + ph)
    t = (t.astype(np.float32) + 1) / 2
    c0, c1 = rng.uniform(0.0, 1.0, 3).astype(np.float32), rng.uniform(0.0, 1.0, 3).astype(np.float32)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return _noise(rng, img, 0.04)


def _gtsrb(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    img = _noise(rng, _background(rng, cv, rng.uniform(0.2, 0.7, 3), 0.25), 0.05)
    cx, cy, r = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0.55, 0.75)
    red, blue, white, yellow = [0.85, 0.1, 0.1], [0.1, 0.25, 0.85], [0.95, 0.95, 0.95], [0.95, 0.8, 0.1]
    if cls == 0:  # red ring, white inside
        _paint(img, cv.disc(cx, cy, r), red)
        _paint(img, cv.disc(cx, cy, r * 0.7), white)
    elif cls == 1:  # blue disc with a white bar
        _paint(img, cv.disc(cx, cy, r), blue)
        _paint(img, cv.box(cx, cy, r * 0.55, r * 0.12), white)
    elif cls == 2:  # triangle pointing down (v grows downwards)
        _paint(img, cv.polygon(cx, cy, r, 3, angle=math.pi / 2), red)
        _paint(img, cv.polygon(cx, cy, r * 0.6, 3, angle=math.pi / 2), white)
    elif cls == 3:  # triangle pointing up
        _paint(img, cv.polygon(cx, cy, r, 3, angle=-math.pi / 2), red)
        _paint(img, cv.polygon(cx, cy, r * 0.6, 3, angle=-math.pi / 2), white)
    elif cls == 4:  # red octagon
        _paint(img, cv.polygon(cx, cy, r, 8, angle=math.pi / 8), red)
        _paint(img, cv.box(cx, cy, r * 0.6, r * 0.1), white)
    else:  # yellow diamond
        _paint(img, cv.polygon(cx, cy, r, 4, angle=0.0), white)
        _paint(img, cv.polygon(cx, cy, r * 0.75, 4, angle=0.0), yellow)
    return _noise(rng, img, 0.03)


def _imagenet12(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    shape, fill = cls // 4, cls % 4
    img = _noise(rng, _background(rng, cv, rng.uniform(0.3, 0.7, 3), 0.3), 0.05)
    for _ in range(int(rng.integers(1, 4))):  # clutter
        _paint(img, cv.box(rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15)),
               rng.uniform(0, 1, 3))
    cx, cy, r = rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.45, 0.6)
    if shape == 0:
        mask = cv.disc(cx, cy, r)
    elif shape == 1:
        mask = cv.box(cx, cy, r * 0.8, r * 0.8)
    elif shape == 2:
        mask = cv.box(cx, cy, r, r * 0.3) | cv.box(cx, cy, r * 0.3, r)
    else:
        mask = cv.polygon(cx, cy, r, 6)
    colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    if fill == 0:
        pattern = np.ones_like(cv.u)
    elif fill == 1:
        pattern = (np.sin(18 * cv.v) > 0).astype(np.float32)
    elif fill == 2:
        pattern = ((np.sin(18 * cv.u) * np.sin(18 * cv.v)) > 0.3).astype(np.float32)
    else:
        pattern = np.clip((cv.v - cy) / (2 * r) + 0.5, 0, 1)
    shaded = colour[None, None] * (0.25 + 0.75 * pattern[..., None])
    img[mask] = shaded[mask]
    return img


def _glyph_strokes(cls: int) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    # A fixed prototype per class (its own seed), on a 4x4 grid of anchor points.
    g = np.random.default_rng(7919 + cls)
    grid = np.linspace(-0.6, 0.6, 4)
    strokes = []
    for _ in range(3):
        a, b = g.choice(16, size=2, replace=False)
        strokes.append(((grid[a % 4], grid[a // 4]), (grid[b % 4], grid[b // 4])))
    return strokes


def _omniglot(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    img = np.ones((cv.s, cv.s, 3), dtype=np.float32)
    dx, dy, sc = rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.85, 1.1)
    mask = np.zeros_like(cv.u, dtype=bool)
    for (x0, y0), (x1, y1) in _glyph_strokes(cls):
        j = rng.uniform(-0.05, 0.05, 4)
        mask |= cv.segment((x0 * sc + dx + j[0], y0 * sc + dy + j[1]), (x1 * sc + dx + j[2], y1 * sc + dy + j[3]), 0.07)
    _paint(img, mask, [0.0, 0.0, 0.0])
    return img


# Seven segments: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle.
_SEGMENTS = {"a": ((-1, -1), (1, -1)), "b": ((1, -1), (1, 0)), "c": ((1, 0), (1, 1)), "d": ((-1, 1), (1, 1)),
             "e": ((-1, 0), (-1, 1)), "f": ((-1, -1), (-1, 0)), "g": ((-1, 0), (1, 0))}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def _svhn(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    bg = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    fg = np.where(bg > 0.5, rng.uniform(0.0, 0.3, 3), rng.uniform(0.7, 1.0, 3)).astype(np.float32)
    img = _noise(rng, _background(rng, cv, bg, 0.2), 0.05)
    cx, cy = rng.uniform(-0.15, 0.15), rng.uniform(-0.1, 0.1)
    w, h = rng.uniform(0.25, 0.35), rng.uniform(0.5, 0.65)
    mask = np.zeros_like(cv.u, dtype=bool)
    for seg in _DIGITS[cls]:
        (x0, y0), (x1, y1) = _SEGMENTS[seg]
        mask |= cv.segment((cx + x0 * w, cy + y0 * h), (cx + x1 * w, cy + y1 * h), 0.08)
    _paint(img, mask, fg)
    return _noise(rng, img, 0.03)


def _ucf101(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    img = _noise(rng, _background(rng, cv, rng.uniform(0.1, 0.4, 3), 0.2), 0.04)
    centres: list[tuple[float, float]] = []
    while len(centres) < cls + 1:  # rejection sampling keeps the blobs apart, so they can be counted
        c = (float(rng.uniform(-0.75, 0.75)), float(rng.uniform(-0.75, 0.75)))
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 0.38**2 for a, b in centres):
            centres.append(c)
    for cx, cy in centres:
        _paint(img, cv.disc(cx, cy, 0.16), rng.uniform(0.6, 1.0, 3))
    return img


def _flowers(rng: np.random.Generator, cls: int, cv: _Canvas) -> np.ndarray:
    petals, centre = 3 + cls // 2, cls % 2
    img = _noise(rng, _background(rng, cv, [0.1, rng.uniform(0.3, 0.5), 0.1], 0.2), 0.05)
    cx, cy, r = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0.5, 0.65)
    turn = rng.uniform(0, 2 * math.pi)
    colour = rng.uniform(0.5, 1.0, 3)
    for k in range(petals):
        a = turn + 2 * math.pi * k / petals
        px, py = cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a)
        _paint(img, cv.box(px, py, 0.45 * r, 0.16 * r, angle=a) | cv.disc(px, py, 0.18 * r), colour)
    _paint(img, cv.disc(cx, cy, 0.22 * r), [0.95, 0.85, 0.1] if centre == 0 else [0.35, 0.2, 0.05])
    return img


GENERATORS: dict[str, tuple[int, Callable[[np.random.Generator, int, _Canvas], np.ndarray]]] = {
    "aircraft": (12, _aircraft),
    "cifar100": (20, _cifar100),
    "daimlerpedcls": (2, _daimler),
    "dtd": (8, _dtd),
    "gtsrb": (6, _gtsrb),
    "imagenet12": (16, _imagenet12),
    "omniglot": (20, _omniglot),
    "svhn": (10, _svhn),
    "ucf101": (5, _ucf101),
    "vgg-flowers": (12, _flowers),
}
SYNTHETIC_CLASSES: dict[str, int] = {d: n for d, (n, _) in GENERATORS.items()}
assert list(GENERATORS) == list(DOMAINS)
