"""The objects of a synthetic scene (numpy): boxes turned about the vertical axis, spheres
and upright capped cylinders, each intersecting a bundle of rays at once.

Every shape gives ``hit(o, d)`` (the ray parameter t of the nearest hit, inf for a miss),
``normal(p)`` (the unit world-frame normal at hit points) and ``texture(p)`` (a factor on
its colour); world frame as in :mod:`.scenes_render` (y up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-6  # smallest t counted as a hit: a ray leaving a surface must not hit that surface


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# -- primitives: hit(o, d) -> t (inf = miss), normal(p) -> unit world normal, texture(p) -----
@dataclass
class Box:
    centre: np.ndarray
    half: np.ndarray
    yaw: float
    colour: np.ndarray
    cls: int
    stripes: float

    def __post_init__(self) -> None:
        self.rot = rot_y(self.yaw)

    def local(self, p: np.ndarray) -> np.ndarray:
        return (p - self.centre) @ self.rot  # = R^T (p - c) row-wise

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        ol = self.local(np.broadcast_to(o, d.shape))
        dl = d @ self.rot
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-self.half - ol) / dl
            t2 = (self.half - ol) / dl
        tnear = np.nanmax(np.minimum(t1, t2), axis=1)
        tfar = np.nanmin(np.maximum(t1, t2), axis=1)
        ok = (tfar >= tnear) & (tnear > EPS)
        return np.where(ok, tnear, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        pl = self.local(p) / self.half
        axis = np.abs(pl).argmax(1)
        n = np.zeros_like(pl)
        n[np.arange(len(pl)), axis] = np.sign(pl[np.arange(len(pl)), axis])
        return n @ self.rot.T

    def texture(self, p: np.ndarray) -> np.ndarray:
        pl = self.local(p)
        return 0.85 + 0.15 * np.sin(self.stripes * (pl[:, 0] + pl[:, 2]) + 3.0 * pl[:, 1])


@dataclass
class Sphere:
    centre: np.ndarray
    radius: float
    colour: np.ndarray
    cls: int
    stripes: float

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - self.centre
        a = (d * d).sum(1)
        b = 2.0 * (d * oc).sum(-1)
        c = (oc * oc).sum(-1) - self.radius**2
        disc = b * b - 4 * a * c
        with np.errstate(invalid="ignore"):
            t = (-b - np.sqrt(disc)) / (2 * a)
        return np.where((disc >= 0) & (t > EPS), t, np.inf)

    def normal(self, p: np.ndarray) -> np.ndarray:
        return (p - self.centre) / self.radius

    def texture(self, p: np.ndarray) -> np.ndarray:
        return 0.8 + 0.2 * np.sin(self.stripes * (p[:, 1] - self.centre[1]))


@dataclass
class Cylinder:
    base: np.ndarray  # (x, 0, z) centre of the bottom cap, on the floor
    radius: float
    height: float
    colour: np.ndarray
    cls: int
    stripes: float

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        o = np.broadcast_to(o, d.shape)
        ox, oz = o[:, 0] - self.base[0], o[:, 2] - self.base[2]
        dx, dz = d[:, 0], d[:, 2]
        a = dx * dx + dz * dz
        b = 2 * (ox * dx + oz * dz)
        c = ox * ox + oz * oz - self.radius**2
        disc = b * b - 4 * a * c
        with np.errstate(invalid="ignore", divide="ignore"):
            t_side = (-b - np.sqrt(disc)) / (2 * a)
            y_side = o[:, 1] + t_side * d[:, 1]
            side_ok = (disc >= 0) & (a > 0) & (t_side > EPS) & (y_side >= 0) & (y_side <= self.height)
            t_cap = (self.height - o[:, 1]) / d[:, 1]
        cx, cz = ox + t_cap * dx, oz + t_cap * dz
        cap_ok = (d[:, 1] < 0) & (t_cap > EPS) & (cx * cx + cz * cz <= self.radius**2)
        return np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))

    def normal(self, p: np.ndarray) -> np.ndarray:
        n = np.zeros_like(p)
        on_cap = p[:, 1] >= self.height - 1e-7 * max(1.0, self.height)
        rx, rz = p[:, 0] - self.base[0], p[:, 2] - self.base[2]
        r = np.maximum(np.hypot(rx, rz), 1e-12)
        n[:, 0], n[:, 2] = rx / r, rz / r
        n[on_cap] = (0.0, 1.0, 0.0)
        return n

    def texture(self, p: np.ndarray) -> np.ndarray:
        ang = np.arctan2(p[:, 2] - self.base[2], p[:, 0] - self.base[0])
        return 0.85 + 0.15 * np.sin(self.stripes * ang)
