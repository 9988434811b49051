"""Labelled grids: A1111's `GridAnnotation`, `draw_grid_annotations` and `draw_prompt_matrix`.

Used by the prompt matrix and the X/Y/Z plot. `im` is a grid of equal cells (`width` x `height`);
the result is a new image with a white band on top (one label block per column) and one on the
left (one per row), and `margin` px of white between the cells. Inactive annotations are grey and
struck through, as A1111 draws the parts a prompt-matrix cell leaves out.

`im` may be packed (cells touching, as images.image_grid makes it) or already have `margin` px
between its cells; the two layouts are told apart by its size.
Only PIL here, so modules.images can re-export these names without an import cycle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["GridAnnotation", "draw_grid_annotations", "draw_prompt_matrix"]

COLOR_ACTIVE = (0, 0, 0)
COLOR_INACTIVE = (153, 153, 153)
MIN_FONT_SIZE = 10


@dataclass
class GridAnnotation:
    text: str = ""
    is_active: bool = True


@lru_cache(maxsize=32)
def _font(size: int) -> Any:
    """Pillow's bundled scalable font (no files needed); the fixed bitmap font on old Pillow."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> float:
    if hasattr(font, "getlength"):
        return float(font.getlength(text))
    box = font.getbbox(text)
    return float(box[2] - box[0])


def _line_height(font: Any) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    box = font.getbbox("Ay")
    return int(box[3] - box[1]) + 2


def _split_long_word(word: str, font: Any, max_width: float) -> list[str]:
    """A word wider than the block: cut it into pieces that fit (at least one char each)."""
    pieces, current = [], ""
    for ch in word:
        if current and _text_width(font, current + ch) > max_width:
            pieces.append(current)
            current = ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _wrap(text: str, font: Any, max_width: float) -> list[str]:
    """Greedy word wrap to max_width px; explicit newlines are kept."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if _text_width(font, candidate) <= max_width:
                current = candidate
                continue
            if current:
                lines.append(current)
            if _text_width(font, word) <= max_width:
                current = word
            else:
                *full, current = _split_long_word(word, font, max_width)
                lines.extend(full)
        lines.append(current)
    return lines


@dataclass
class _Block:
    """One cell's label: its annotations wrapped into (text, active) lines."""
    lines: list[tuple[str, bool]]

    def height(self, line_h: int, spacing: int) -> int:
        n = len(self.lines)
        return n * line_h + max(0, n - 1) * spacing


def _blocks(texts: Sequence[Sequence[GridAnnotation]], font: Any, max_width: float) -> list[_Block]:
    out = []
    for labels in texts:
        lines: list[tuple[str, bool]] = []
        for a in labels or []:
            if isinstance(a, str):  # be lenient: a bare string is an active label
                a = GridAnnotation(a)
            lines += [(line, bool(a.is_active)) for line in _wrap(a.text, font, max_width)]
        out.append(_Block(lines))
    return out


def _draw_block(draw: ImageDraw.ImageDraw, block: _Block, font: Any, center_x: float, top: float, line_h: int,
                spacing: int, stroke: int) -> None:
    y = top
    for text, active in block.lines:
        w = _text_width(font, text)
        x = center_x - w / 2
        color = COLOR_ACTIVE if active else COLOR_INACTIVE
        draw.text((x, y), text, font=font, fill=color)
        if not active and text:
            mid = y + line_h / 2
            draw.line([(x, mid), (x + w, mid)], fill=color, width=stroke)
        y += line_h + spacing


def _cells(total: int, cell: int, count: int, margin: int) -> tuple[int, bool]:
    """(cells along this axis, whether `im` already has margins between them)."""
    if count > 0:
        if total == count * cell:
            return count, False
        if margin and total == count * cell + (count - 1) * margin:
            return count, True
        raise ValueError(f"grid of {total}px does not hold {count} cells of {cell}px"
                         + (f" (with or without {margin}px margins)" if margin else ""))
    if margin and (total + margin) % (cell + margin) == 0 and total % cell:
        return max(1, (total + margin) // (cell + margin)), True
    return max(1, total // cell), False


def draw_grid_annotations(im: Image.Image, width: int, height: int,
                          hor_texts: Sequence[Sequence[GridAnnotation]],
                          ver_texts: Sequence[Sequence[GridAnnotation]], margin: int = 0) -> Image.Image:
    """`im` with column labels above and row labels on the left; hor_texts[i] labels column i,
    ver_texts[j] row j (an empty list: no label). Returns a new image."""
    width, height, margin = int(width), int(height), max(0, int(margin))
    if width <= 0 or height <= 0:
        raise ValueError("cell width and height must be positive")
    cols, spaced_x = _cells(im.width, width, len(hor_texts), margin)
    rows, spaced_y = _cells(im.height, height, len(ver_texts), margin)
    hor_texts = list(hor_texts) or [[] for _ in range(cols)]
    ver_texts = list(ver_texts) or [[] for _ in range(rows)]

    # Font size follows the cell size (A1111: (w + h) / 25), readable on tiny cells.
    size = max(MIN_FONT_SIZE, (width + height) // 25)
    has_ver = any(ver_texts)
    pad_left = width * 3 // 4 if has_ver else 0
    inner = max(4, size // 4)  # room between a label and the band's edge

    # The row labels must fit their row: shrink the font for them when they do not.
    font = _font(size)
    line_h, spacing = _line_height(font), size // 2
    hor = _blocks(hor_texts, font, max(1, width - 2 * inner))
    ver_size = size
    while True:
        ver_font = _font(ver_size)
        ver_line_h, ver_spacing = _line_height(ver_font), ver_size // 2
        ver = _blocks(ver_texts, ver_font, max(1, pad_left - 2 * inner))
        tallest = max((b.height(ver_line_h, ver_spacing) for b in ver), default=0)
        if tallest <= height or ver_size <= MIN_FONT_SIZE:
            break
        ver_size = max(MIN_FONT_SIZE, ver_size * 3 // 4)

    tallest_hor = max((b.height(line_h, spacing) for b in hor), default=0)
    pad_top = tallest_hor + 2 * spacing if tallest_hor else 0

    mode = "RGBA" if "A" in im.getbands() else "RGB"
    source = im if im.mode == mode else im.convert(mode)
    out_w = pad_left + cols * width + (cols - 1) * margin
    out_h = pad_top + rows * height + (rows - 1) * margin
    result = Image.new(mode, (out_w, out_h), "white")
    for row in range(rows):
        for col in range(cols):
            sx = col * (width + (margin if spaced_x else 0))
            sy = row * (height + (margin if spaced_y else 0))
            cell = source.crop((sx, sy, sx + width, sy + height))
            result.paste(cell, (pad_left + col * (width + margin), pad_top + row * (height + margin)))

    draw = ImageDraw.Draw(result)
    stroke = max(1, size // 12)
    for col, block in enumerate(hor[:cols]):
        center_x = pad_left + col * (width + margin) + width / 2
        top = (pad_top - block.height(line_h, spacing)) / 2
        _draw_block(draw, block, font, center_x, top, line_h, spacing, stroke)
    for row, block in enumerate(ver[:rows]):
        top = pad_top + row * (height + margin) + (height - block.height(ver_line_h, ver_spacing)) / 2
        _draw_block(draw, block, ver_font, pad_left / 2, top, ver_line_h, ver_spacing, max(1, ver_size // 12))
    return result


def _matrix_annotations(parts: Sequence[str]) -> list[list[GridAnnotation]]:
    """One label list per combination: part i is active in combination `pos` when bit i is set
    (the order in which the prompt matrix makes its prompts)."""
    return [[GridAnnotation(text, is_active=bool(pos & (1 << i))) for i, text in enumerate(parts)]
            for pos in range(1 << len(parts))]


def draw_prompt_matrix(im: Image.Image, width: int, height: int, all_prompts: Sequence[str],
                       margin: int = 0) -> Image.Image:
    """all_prompts[0] is the base prompt, the rest the optional parts: the first half (rounded up)
    labels the columns, the rest the rows; each cell shows which parts its prompt has."""
    parts = [str(p).strip().strip(",").strip() for p in list(all_prompts)[1:]]
    boundary = math.ceil(len(parts) / 2)
    return draw_grid_annotations(im, width, height, _matrix_annotations(parts[:boundary]),
                                 _matrix_annotations(parts[boundary:]), margin)
