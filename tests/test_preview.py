"""Preview PNG with nucleus outlines (wsi_grunet.outputs.preview)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon, box

from wsi_grunet.errors import OutputError
from wsi_grunet.outputs.preview import OUTLINE_RGB, render_preview


def outline_mask(png) -> np.ndarray:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return (np.abs(rgb - np.array(OUTLINE_RGB)).sum(axis=2) == 0)


def test_outline_lands_on_the_right_thumbnail_pixels(tmp_path):
    thumb = np.full((100, 160, 3), 200, np.uint8)  # pale pink-ish background
    # slide 0.25 um/px, thumbnail 4 um/px: level-0 / 16. Box x 320..640, y 480..800 -> thumb x 20..40, y 30..50.
    out = tmp_path / "preview.png"
    size = render_preview(thumb, 4.0, 0.25, iter([box(320, 480, 640, 800)]), out)
    assert size == (100, 160)
    drawn = outline_mask(out)
    ys, xs = np.nonzero(drawn)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 40, 30, 50)
    assert not drawn[35:45, 25:35].any()  # 1-px outline, interior untouched
    assert drawn[30, 20:41].all() and drawn[30:51, 20].all()


def test_large_thumbnail_is_shrunk_and_outlines_follow(tmp_path):
    thumb = np.zeros((400, 1000), np.uint8)  # greyscale input is accepted
    polygons = [box(4000, 1000, 6000, 3000), MultiPolygon([box(100, 100, 300, 300), box(500, 500, 700, 700)])]
    out = tmp_path / "preview.png"
    size = render_preview(thumb, 2.0, 0.2, (p for p in polygons), out, max_px=500)
    assert size == (200, 500)
    assert Image.open(out).size == (500, 200)
    ys, xs = np.nonzero(outline_mask(out))
    # First box: level-0 x 4000..6000 -> thumb 400..600 -> preview 200..300.
    assert xs.max() == 300 and ys.max() == 150
    assert xs.min() == 5 and ys.min() == 5  # the MultiPolygon's first part: 100 -> 10 -> 5


def test_holes_are_outlined(tmp_path):
    ring = Polygon(box(0, 0, 400, 400).exterior.coords, [box(100, 100, 300, 300).exterior.coords])
    out = tmp_path / "preview.png"
    render_preview(np.zeros((60, 60, 3), np.uint8), 1.0, 0.1, [ring], out)
    drawn = outline_mask(out)
    assert drawn[10, 10:31].all() and drawn[0, 0:41].all()
    assert not drawn[5, 5] and not drawn[20, 20]


def test_bad_input_and_unwritable_path(tmp_path):
    with pytest.raises(ValueError, match="thumbnail"):
        render_preview(np.zeros((10, 10, 2), np.uint8), 1.0, 0.25, [], tmp_path / "p.png")
    with pytest.raises(ValueError, match="positive"):
        render_preview(np.zeros((10, 10, 3), np.uint8), 0.0, 0.25, [], tmp_path / "p.png")
    with pytest.raises(OutputError, match="missing"):
        render_preview(np.zeros((10, 10, 3), np.uint8), 1.0, 0.25, [], tmp_path / "missing" / "p.png")
