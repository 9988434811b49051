"""modules/grid_labels.py: labelled grids (A1111's draw_grid_annotations / draw_prompt_matrix)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modules import images
from modules.core.grid_labels import GridAnnotation, draw_grid_annotations, draw_prompt_matrix

COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10), (10, 200, 200), (200, 10, 200)]


def _cells(n: int, w: int = 64, h: int = 48) -> list[Image.Image]:
    out = []
    for i in range(n):
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[...] = COLORS[i % len(COLORS)]
        arr[i % h, :, :] = 255 - i   # a line that makes each cell unique
        out.append(Image.fromarray(arr))
    return out


def _band_sizes(out: Image.Image, grid: Image.Image, cols: int, rows: int, margin: int) -> tuple[int, int]:
    pad_left = out.width - grid.width - (cols - 1) * margin
    pad_top = out.height - grid.height - (rows - 1) * margin
    return pad_left, pad_top


def _assert_cells_at(out: Image.Image, cells: list[Image.Image], cols: int, pad_left: int, pad_top: int,
                     margin: int) -> None:
    w, h = cells[0].size
    arr = np.asarray(out)
    for i, cell in enumerate(cells):
        x = pad_left + (i % cols) * (w + margin)
        y = pad_top + (i // cols) * (h + margin)
        assert np.array_equal(arr[y:y + h, x:x + w], np.asarray(cell)), f"cell {i} moved or changed"


def test_bands_grow_the_image_and_cells_are_unchanged():
    cells = _cells(6)
    grid = images.image_grid(cells, rows=2)
    hor = [[GridAnnotation("x = 1")], [GridAnnotation("x = 2")], [GridAnnotation("x = 3")]]
    ver = [[GridAnnotation("y = a")], [GridAnnotation("y = b", is_active=False)]]
    out = draw_grid_annotations(grid, 64, 48, hor, ver)
    pad_left, pad_top = _band_sizes(out, grid, 3, 2, 0)
    assert pad_left == 64 * 3 // 4 and pad_top > 0
    _assert_cells_at(out, cells, 3, pad_left, pad_top, 0)
    arr = np.asarray(out)
    top_band, left_band = arr[:pad_top], arr[pad_top:, :pad_left]
    assert (top_band < 100).any() and (left_band < 250).any()   # labels were drawn
    assert (top_band == 255).mean() > 0.5                        # on white
    # the inactive row label is grey: no black pixels in its half of the band
    second_row = arr[pad_top + 48:, :pad_left]
    assert (second_row < 250).any() and not (second_row < 60).all(axis=-1).any()


def test_margins_separate_the_cells_and_prespaced_grids_are_accepted():
    cells = _cells(4)
    packed = images.image_grid(cells, rows=2)
    hor = [[GridAnnotation("left")], [GridAnnotation("right")]]
    ver = [[GridAnnotation("top")], [GridAnnotation("bottom")]]
    out = draw_grid_annotations(packed, 64, 48, hor, ver, margin=10)
    pad_left, pad_top = _band_sizes(out, packed, 2, 2, 10)
    _assert_cells_at(out, cells, 2, pad_left, pad_top, 10)
    arr = np.asarray(out)
    assert (arr[pad_top:, pad_left + 64:pad_left + 74] == 255).all()       # white gap between columns
    assert (arr[pad_top + 48:pad_top + 58, pad_left:] == 255).all()        # and between rows
    # the same grid already spaced by the margin gives the same picture
    spaced = Image.new("RGB", (64 * 2 + 10, 48 * 2 + 10), "white")
    for i, cell in enumerate(cells):
        spaced.paste(cell, ((i % 2) * 74, (i // 2) * 58))
    assert np.array_equal(np.asarray(draw_grid_annotations(spaced, 64, 48, hor, ver, margin=10)), arr)


def test_long_text_wraps_to_more_lines():
    cells = _cells(2, w=96, h=96)
    grid = images.image_grid(cells, rows=1)
    short = draw_grid_annotations(grid, 96, 96, [[GridAnnotation("cat")], [GridAnnotation("dog")]], [[]])
    long_text = "a very long label that can never fit on one line of a small cell " * 2
    long = draw_grid_annotations(grid, 96, 96, [[GridAnnotation(long_text)], [GridAnnotation("dog")]], [[]])
    assert short.width == long.width == grid.width               # no row labels: no left band
    assert long.height > short.height + 2 * (short.height - grid.height) // 2
    # an unbreakable word is cut so that nothing spills into the next column
    word = draw_grid_annotations(grid, 96, 96, [[GridAnnotation("x" * 80)], []], [[]])
    arr = np.asarray(word)
    pad_top = word.height - grid.height
    assert (arr[:pad_top, :96] < 200).any() and (arr[:pad_top, 96:] == 255).all()


def test_no_labels_is_the_grid_itself():
    cells = _cells(4)
    grid = images.image_grid(cells, rows=2)
    out = draw_grid_annotations(grid, 64, 48, [[], []], [[], []])
    assert np.array_equal(np.asarray(out), np.asarray(grid))


def test_wrong_cell_count_is_an_error():
    grid = images.image_grid(_cells(4), rows=2)
    with pytest.raises(ValueError, match="3 cells"):
        draw_grid_annotations(grid, 64, 48, [[]] * 3, [[]] * 2)


def test_prompt_matrix_labels_follow_the_combinations():
    # base + 3 parts: columns take "b", "c" (4 columns), rows take "d" (2 rows)
    w, h = 128, 96
    cells = _cells(8, w, h)
    grid = images.image_grid(cells, rows=2)
    out = draw_prompt_matrix(grid, w, h, ["a ", " b", " c,", " d"], margin=4)
    pad_left, pad_top = _band_sizes(out, grid, 4, 2, 4)
    assert pad_left == w * 3 // 4 and pad_top > 0
    _assert_cells_at(out, cells, 4, pad_left, pad_top, 4)
    arr = np.asarray(out)

    def dark(region):  # black (active) text present; inactive text is grey
        return (region.max(axis=-1) < 100).any()

    def column(c):
        return arr[:pad_top, pad_left + c * (w + 4):pad_left + c * (w + 4) + w]
    assert [dark(column(c)) for c in range(4)] == [False, True, True, True]
    assert (column(0) < 250).any()  # but its labels are there, in grey
    assert [dark(arr[pad_top:pad_top + h, :pad_left]), dark(arr[pad_top + h + 4:, :pad_left])] == [False, True]


def test_prompt_matrix_without_parts_adds_nothing():
    grid = _cells(1)[0]
    assert draw_prompt_matrix(grid, 64, 48, ["just a base"]).size == grid.size


def test_images_reexports_a1111_names():
    assert images.GridAnnotation is GridAnnotation
    assert images.draw_grid_annotations is draw_grid_annotations
    assert images.draw_prompt_matrix is draw_prompt_matrix
