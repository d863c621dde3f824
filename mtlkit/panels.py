"""One PNG panel per prediction: the input, then each task's output, side by side.

Drawn with PIL on a pixel grid that is known exactly (:func:`panel_layout`), so every pane
shows its map pixel for pixel (scaled by a whole factor, nearest neighbour): a label map
in a fixed palette with a legend of the classes it shows, a scalar map (depth) in viridis
with a colour bar of its range, surface normals as RGB (``(n + 1) / 2``), and class scores
as their top five. Only the colour table comes from matplotlib.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MARGIN, GAP, TITLE_H, ROW_H, SWATCH = 6, 10, 16, 14, 10
BAR_W, BAR_LABEL_W = 12, 52  # colour bar and the room for its labels
TEXT_W = 190  # a class pane's width
LEGEND_ROWS = 12  # at most this many legend lines (the most frequent classes)
MIN_PANE_H = 128  # smaller inputs are scaled up by a whole factor to at least this height
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)

# The fixed palette: class i is always this colour (then generated colours beyond it).
BASE_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)
IGNORE_COLOUR = (0, 0, 0)  # label -1 (not predicted by a model, but a target may hold it)


def palette(n: int) -> np.ndarray:
    """``n`` x 3 uint8 colours, all different: the base palette, then hue, saturation and
    value stepped by three irrational fractions (a low-discrepancy walk through HSV)."""
    colours = list(BASE_PALETTE[:n])
    seen = set(colours)
    i = len(colours)
    while len(colours) < n:
        h, s, v = (i * 0.6180339887) % 1.0, (i * 0.3819660113) % 1.0, (i * 0.7548776662) % 1.0
        colour = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, 0.45 + 0.5 * s, 0.5 + 0.45 * v))
        if colour not in seen:
            colours.append(colour)
            seen.add(colour)
        i += 1
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def colour_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """H x W labels -> H x W x 3 uint8 in the fixed palette (-1 black)."""
    table = np.concatenate([palette(num_classes), np.asarray([IGNORE_COLOUR], dtype=np.uint8)])
    return table[np.where(labels < 0, num_classes, labels)]


def viridis(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> H x W x 3 uint8 on matplotlib's viridis between ``lo`` and ``hi``."""
    from matplotlib import colormaps

    lut = (colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    span = hi - lo if hi > lo else 1.0
    index = np.clip((values - lo) / span * 255 + 0.5, 0, 255).astype(np.int64)
    return lut[index]


@dataclass
class Pane:
    """One pane: ``kind`` is "image" (H x W x 3 float in [0, 1]), "labels" (H x W ints,
    ``num_classes``, ``names``), "scalar" (H x W floats), "rgb" (H x W x 3 in [0, 1]) or
    "classes" (``top``: [(name, probability)])."""

    kind: str
    title: str
    data: Any = None
    num_classes: int = 0
    names: Sequence[str] = ()
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Layout:
    size: tuple[int, int]  # (width, height) of the whole panel
    scale: int  # each map pixel is scale x scale panel pixels
    boxes: list[tuple[int, int, int, int]]  # each pane's map (left, top, right, bottom)


def _legend(pane: Pane) -> list[tuple[int, str]]:
    """(class, name) lines of a label pane: the classes it shows, most frequent first."""
    labels = np.asarray(pane.data)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=pane.num_classes)
    shown = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:LEGEND_ROWS]
    return [(c, pane.names[c] if c < len(pane.names) else f"class {c}") for c in shown]


def panel_layout(panes: Sequence[Pane], height: int, width: int) -> Layout:
    """Where each pane's map goes, for maps of ``height`` x ``width``."""
    scale = max(1, min(8, math.ceil(MIN_PANE_H / max(1, height))))
    h, w = height * scale, width * scale
    x, boxes = MARGIN, []
    legend_rows = 0
    for pane in panes:
        pane_w = max(w, TEXT_W) if pane.kind == "classes" else w
        boxes.append((x, MARGIN + TITLE_H, x + pane_w, MARGIN + TITLE_H + h))
        x += pane_w + (BAR_W + BAR_LABEL_W if pane.kind == "scalar" else 0) + GAP
        if pane.kind == "labels":
            legend_rows = max(legend_rows, len(_legend(pane)))
    total_h = MARGIN + TITLE_H + h + (4 + legend_rows * ROW_H if legend_rows else 0) + MARGIN
    return Layout(size=(x - GAP + MARGIN, total_h), scale=scale, boxes=boxes)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _paste(canvas: Image.Image, rgb: np.ndarray, box: tuple[int, int, int, int], scale: int) -> None:
    pixels = np.asarray(rgb, dtype=np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    canvas.paste(Image.fromarray(np.ascontiguousarray(pixels), "RGB"), box[:2])


def _unit_rgb(a: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def draw_panel(panes: Sequence[Pane], height: int, width: int) -> tuple[Image.Image, Layout]:
    """The panel of ``panes`` (maps of ``height`` x ``width``) and its layout."""
    layout = panel_layout(panes, height, width)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    for pane, box in zip(panes, layout.boxes):
        left, top, right, bottom = box
        draw.text((left, MARGIN), _fit(draw, pane.title, right - left, font), fill=INK, font=font)
        if pane.kind in ("image", "rgb"):
            _paste(canvas, _unit_rgb(pane.data), box, layout.scale)
        elif pane.kind == "labels":
            _paste(canvas, colour_labels(np.asarray(pane.data), pane.num_classes), box, layout.scale)
            colours = palette(pane.num_classes)
            for row, (c, name) in enumerate(_legend(pane)):
                y = bottom + 4 + row * ROW_H
                draw.rectangle((left, y + 1, left + SWATCH - 1, y + SWATCH), fill=tuple(int(v) for v in colours[c]),
                               outline=INK)
                draw.text((left + SWATCH + 4, y), _fit(draw, name, right - left - SWATCH - 4, font),
                          fill=INK, font=font)
        elif pane.kind == "scalar":
            values = np.asarray(pane.data, dtype=np.float64)
            lo, hi = float(values.min()), float(values.max())
            _paste(canvas, viridis(values, lo, hi), box, layout.scale)
            ramp = np.linspace(hi, lo, bottom - top)[:, None].repeat(BAR_W, axis=1)
            bar = (right + 4, top, right + 4 + BAR_W, bottom)
            canvas.paste(Image.fromarray(viridis(ramp, lo, hi), "RGB"), bar[:2])
            draw.rectangle((bar[0] - 1, bar[1] - 1, bar[2], bar[3]), outline=INK)
            for value, y in ((hi, top), (lo, bottom - 10)):
                draw.text((bar[2] + 3, y), f"{value:.3g}", fill=INK, font=font)
        elif pane.kind == "classes":
            for row, (name, p) in enumerate(pane.top):
                draw.text((left, top + row * ROW_H), _fit(draw, f"{row + 1}. {name}  {100 * p:.1f}%", right - left,
                                                          font), fill=INK, font=font)
        else:
            raise ValueError(f"unknown pane kind '{pane.kind}'")
    return canvas, layout
