"""A chart as a list of shapes, and its two renderers: hand-written SVG and a Pillow PNG.

The layout is computed once (``nurture.charts``) into :class:`Chart`: rectangles, polygons,
lines and text in pixel coordinates on a white canvas. :meth:`Chart.svg` writes them as SVG
elements; :meth:`Chart.png` draws the same shapes with Pillow. Text is positioned by its
baseline in both (``text-anchor`` start/middle/end in SVG, Pillow's ``ls``/``ms``/``rs``
anchors), so the two images line up.

Text is measured with the font the PNG is drawn in: DejaVu Sans when the machine has it
(it covers accented letters), otherwise the font Pillow bundles in its wheel
(``ImageFont.load_default``), so a fresh machine needs no system fonts; measured with that
narrower font, text is given 10% more room. The SVG names DejaVu Sans first, then Verdana (of
the same width); narrower fallbacks only leave more room.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

from PIL import Image, ImageDraw, ImageFont

Anchor = Literal["start", "middle", "end"]
FONT_FAMILY = "DejaVu Sans, Verdana, Aileron, Arial, sans-serif"
BACKGROUND = "#ffffff"
# Shapes are drawn this many times larger and scaled down, which smooths their edges.
_SUPERSAMPLE = 2
_PIL_ANCHORS = {"start": "ls", "middle": "ms", "end": "rs"}
# Characters XML 1.0 cannot carry, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    fill: str


@dataclass(frozen=True)
class Polygon:
    points: tuple[tuple[float, float], ...]
    fill: str


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    stroke: str
    width: float = 1.0


@dataclass(frozen=True)
class Text:
    """One line of text; ``y`` is its baseline."""

    x: float
    y: float
    text: str
    size: int
    fill: str = "#1f2937"
    anchor: Anchor = "start"


Shape = Rect | Polygon | Line | Text


def clean(text: str) -> str:
    """Text for one line of a chart: line breaks as spaces, characters XML cannot hold removed."""
    return _NOT_XML.sub("", " ".join(text.splitlines()))


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """The font charts are measured and drawn in, at ``size`` pixels."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        bundled = ImageFont.load_default(size=size)
        assert isinstance(bundled, ImageFont.FreeTypeFont), "Pillow was built without FreeType"
        return bundled


# Pillow's bundled font (Aileron) is up to ~8% narrower than DejaVu Sans, which an SVG viewer may use:
# measured with it, text is given room for the wider font.
_BUNDLED_FONT_ALLOWANCE = 1.1


def text_width(text: str, size: int) -> float:
    """How wide ``text`` is drawn at ``size`` pixels (with room for the SVG's wider fonts)."""
    measured = float(font(size).getlength(text))
    return measured if font(size).getname()[0] == "DejaVu Sans" else measured * _BUNDLED_FONT_ALLOWANCE


def truncate(text: str, size: int, max_width: float) -> str:
    """``text`` cut with "…" so that it fits in ``max_width`` pixels (whole if it fits)."""
    text = clean(text)
    if text_width(text, size) <= max_width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with its ellipsis
        middle = (low + high + 1) // 2
        if text_width(text[:middle].rstrip() + "…", size) <= max_width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "…"


@dataclass(frozen=True)
class Chart:
    """A laid-out chart, drawn as SVG (:meth:`svg`) or PNG (:meth:`png`) from the same shapes."""

    width: int
    height: int
    title: str
    description: str
    shapes: tuple[Shape, ...]

    def svg(self) -> str:
        """The chart as a standalone SVG document, with a ``<title>`` and ``<desc>`` for screen readers."""
        lines = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}"'
            f' viewBox="0 0 {self.width} {self.height}" role="img" aria-labelledby="chart-title chart-desc"'
            f" font-family={quoteattr(FONT_FAMILY)}>",
            f'<title id="chart-title">{escape(clean(self.title))}</title>',
            f'<desc id="chart-desc">{escape(clean(self.description))}</desc>',
            f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="{BACKGROUND}"/>',
        ]
        lines.extend(_svg_element(shape) for shape in _drawing_order(self.shapes))
        lines.append("</svg>")
        return "\n".join(lines) + "\n"

    def png(self, *, scale: int = 2) -> bytes:
        """The chart as PNG, ``scale`` pixels per unit (2 by default: sharp on a projector or a retina screen)."""
        if scale < 1:
            raise ValueError(f"scale must be at least 1, not {scale}")
        big = scale * _SUPERSAMPLE
        canvas = Image.new("RGB", (self.width * big, self.height * big), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        texts: list[Text] = []
        for shape in _drawing_order(self.shapes):
            if isinstance(shape, Text):
                texts.append(shape)
            else:
                _draw_shape(draw, shape, big)
        image = canvas.resize((self.width * scale, self.height * scale), Image.Resampling.LANCZOS)
        # Text is drawn at the final size: Pillow hints it for that size, which downscaling would blur.
        draw = ImageDraw.Draw(image)
        for text in texts:
            draw.text(
                (text.x * scale, text.y * scale),
                text.text,
                font=font(text.size * scale),
                fill=text.fill,
                anchor=_PIL_ANCHORS[text.anchor],
            )
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        return out.getvalue()


def _drawing_order(shapes: Sequence[Shape]) -> list[Shape]:
    """Text last, as the PNG draws it, so both formats stack shapes alike."""
    return [s for s in shapes if not isinstance(s, Text)] + [s for s in shapes if isinstance(s, Text)]


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def _svg_element(shape: Shape) -> str:
    n = _number
    if isinstance(shape, Rect):
        return (
            f'<rect x="{n(shape.x)}" y="{n(shape.y)}" width="{n(shape.width)}" height="{n(shape.height)}"'
            f' fill="{shape.fill}"/>'
        )
    if isinstance(shape, Polygon):
        points = " ".join(f"{n(x)},{n(y)}" for x, y in shape.points)
        return f'<polygon points="{points}" fill="{shape.fill}"/>'
    if isinstance(shape, Line):
        return (
            f'<line x1="{n(shape.x1)}" y1="{n(shape.y1)}" x2="{n(shape.x2)}" y2="{n(shape.y2)}"'
            f' stroke="{shape.stroke}" stroke-width="{n(shape.width)}"/>'
        )
    return (
        f'<text x="{n(shape.x)}" y="{n(shape.y)}" font-size="{shape.size}" fill="{shape.fill}"'
        f' text-anchor="{shape.anchor}">{escape(clean(shape.text))}</text>'
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Rect | Polygon | Line, k: int) -> None:
    if isinstance(shape, Rect):
        if shape.width > 0 and shape.height > 0:
            x0, y0 = shape.x * k, shape.y * k
            box = (x0, y0, max(x0, (shape.x + shape.width) * k - 1), max(y0, (shape.y + shape.height) * k - 1))
            draw.rectangle(box, fill=shape.fill)
    elif isinstance(shape, Polygon):
        draw.polygon([(x * k, y * k) for x, y in shape.points], fill=shape.fill)
    else:
        draw.line(
            [(shape.x1 * k, shape.y1 * k), (shape.x2 * k, shape.y2 * k)],
            fill=shape.stroke,
            width=max(1, round(shape.width * k)),
        )
