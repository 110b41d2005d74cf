"""A contact sheet: one row per query, the query's view then its neighbours, each captioned.

Layout (pixels), with ``T`` the thumbnail side, ``n`` rows and ``c`` columns (1 + the most neighbours)::

    width  = c * (T + GAP) + GAP
    height = n * (T + CAPTION + GAP) + GAP

Tiles are framed: blue for the query, green for a neighbour whose label is the query's, red for one
whose label differs, grey where the query's label is unknown. A tile whose image could not be read is a
grey square saying so (the sheet is still written).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 6
CAPTION = 30  # two lines of the default font
BACKGROUND = (255, 255, 255)
FRAME = {"query": (40, 90, 220), "same": (30, 160, 60), "other": (210, 50, 50), "unknown": (150, 150, 150)}
_FRAME_W = 3


@dataclass
class Tile:
    """One cell: an RGB ``(T, T, 3)`` uint8 thumbnail (None: unavailable), caption lines and a frame kind."""

    image: np.ndarray | None
    lines: list[str] = field(default_factory=list)
    frame: str = "unknown"  # a key of FRAME


def sheet_size(n_rows: int, n_cols: int, thumb: int) -> tuple[int, int]:
    """``(width, height)`` of a sheet with ``n_rows`` rows of ``n_cols`` tiles of side ``thumb``."""
    return n_cols * (thumb + GAP) + GAP, n_rows * (thumb + CAPTION + GAP) + GAP


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render(rows: list[list[Tile]], thumb: int) -> Image.Image:
    """The sheet as an RGB image of :func:`sheet_size` ``(len(rows), max row length, thumb)``."""
    n_cols = max((len(r) for r in rows), default=1)
    sheet = Image.new("RGB", sheet_size(len(rows), n_cols, thumb), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, row in enumerate(rows):
        y = GAP + i * (thumb + CAPTION + GAP)
        for j, tile in enumerate(row):
            x = GAP + j * (thumb + GAP)
            if tile.image is not None:
                img = Image.fromarray(np.asarray(tile.image, dtype=np.uint8))
                if img.size != (thumb, thumb):
                    img = img.resize((thumb, thumb), Image.Resampling.BICUBIC)
                sheet.paste(img, (x, y))
            else:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
                draw.text(
                    (x + 4, y + thumb // 2 - 6),
                    _fit(draw, "image unavailable", font, thumb - 8),
                    fill=(60, 60, 60),
                    font=font,
                )
            draw.rectangle(
                [x, y, x + thumb - 1, y + thumb - 1], outline=FRAME.get(tile.frame, FRAME["unknown"]), width=_FRAME_W
            )
            for li, line in enumerate(tile.lines[:2]):
                draw.text((x, y + thumb + 2 + 13 * li), _fit(draw, line, font, thumb), fill=(0, 0, 0), font=font)
    return sheet
