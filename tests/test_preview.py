"""Preview PNG (wsi_grunet.outputs.preview): density heat map on the thumbnail, inset of the densest region
with nucleus outlines, streamed over the nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box

from wsi_grunet.errors import OutputError
from wsi_grunet.geometry import Box
from wsi_grunet.outputs.preview import (
    OUTLINE_RGB,
    InsetSource,
    cell_area_mm2,
    density_counts,
    density_per_mm2,
    inset_box,
    render_preview,
)

THUMB_RGB = (230, 200, 220)
INSET_RGB = (10, 20, 200)  # the inset's pixels, so the test can find it in the canvas


def square_nucleus(x: float, y: float, half: float = 4.0):
    return (x, y, box(x - half, y - half, x + half, y + half))


def colour_mask(image: np.ndarray, rgb) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(rgb)).sum(axis=2) == 0


class CountingNuclei:
    """A nucleus source that yields from a generator and counts the passes, like the pipeline's."""

    def __init__(self, nuclei):
        self.nuclei, self.passes = nuclei, 0

    def __call__(self):
        self.passes += 1
        return (n for n in self.nuclei)


def test_density_is_nuclei_per_mm2_and_edges_are_not_diluted():
    # 0.5 um level-0 pixels, 50 um cells; a slide of 120 x 75 um: 3 x 2 cells, the last row/column cut.
    grid, extent = (3, 2), (120.0, 75.0)
    area = cell_area_mm2(extent, grid, 50.0)
    assert area == pytest.approx(np.array([[50 * 50, 50 * 25], [50 * 50, 50 * 25], [20 * 50, 20 * 25]]) / 1e6)
    # 5 nuclei in cell (0, 0), 1 in the cut corner cell (2, 1), one outside the slide (dropped).
    centroids = [(10.0, 10.0)] * 5 + [(120.0, 220.0), (1000.0, 1000.0)]
    counts = density_counts(centroids, grid, 0.5, 50.0)
    assert counts.tolist() == [[5, 0], [0, 0], [0, 1]]
    density = density_per_mm2(counts, area, smooth_cells=0)
    assert density[0, 0] == pytest.approx(5 / 0.0025)  # 2,000 per mm^2
    assert density[2, 1] == pytest.approx(1 / 0.0005)  # a cut cell is divided by its own area
    # Smoothing keeps a uniform density uniform, also at the slide's edge.
    uniform = density_per_mm2(area * 4000.0, area, smooth_cells=1.0)
    assert uniform == pytest.approx(np.full(grid, 4000.0))


def test_inset_box_is_centred_and_kept_inside_the_slide():
    assert inset_box((100.0, 100.0), 50.0, (1000.0, 1000.0), 0.5) == Box(150, 150, 250, 250)
    assert inset_box((5.0, 995.0), 50.0, (1000.0, 1000.0), 0.5) == Box(0, 1900, 100, 2000)
    assert inset_box((10.0, 10.0), 50.0, (30.0, 1000.0), 0.5) == Box(0, 0, 60, 100)  # slide thinner than inset


def test_preview_heat_map_and_inset(tmp_path):
    # Slide: 0.5 um/px level 0, 1600 x 2400 px (800 x 1200 um); thumbnail at 4 um/px: 200 x 300.
    thumb = np.full((200, 300, 3), THUMB_RGB, np.uint8)
    rng = np.random.default_rng(0)
    dense = [square_nucleus(x, y) for x, y in rng.uniform([1700, 300], [1900, 500], size=(300, 2))]
    sparse = [square_nucleus(x, y) for x, y in rng.uniform([100, 900], [700, 1500], size=(30, 2))]
    target = square_nucleus(1800.0, 400.0, half=10.0)  # a known nucleus at the centre of the dense cluster
    nuclei = CountingNuclei(dense + sparse + [target])
    requested: list[Box] = []

    def read(b: Box) -> np.ndarray:
        requested.append(b)
        return np.full((b.height, b.width, 3), INSET_RGB, np.uint8)

    out = tmp_path / "preview.png"
    size = render_preview(
        thumb,
        4.0,
        0.5,
        nuclei,
        out,
        slide_shape_l0=(1600, 2400),
        inset=InsetSource(read, 0.5),
        inset_um=100.0,
        title="slide A",
    )
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[:2] == size
    assert nuclei.passes == 2  # centroids once, outlines once: never a list of every polygon

    # The inset is read at full resolution around the densest region (x ~ 1800, y ~ 400 level-0 px).
    assert len(requested) == 1 and requested[0].shape == (200, 200)
    inset_region = requested[0]
    assert inset_region.contains_point(400, 1800)
    assert (
        abs((inset_region.y0 + inset_region.y1) / 2 - 400) < 60
        and abs((inset_region.x0 + inset_region.x1) / 2 - 1800) < 60
    )

    # Thumbnail at (MARGIN, header + MARGIN): glass far from any nucleus is untouched (heat map transparent),
    # the dense cluster (thumbnail x 212..237, y 37..62) is coloured.
    ys, xs = np.nonzero(colour_mask(image, THUMB_RGB))
    top, left = ys.min(), xs.min()
    thumb_view = image[top : top + 200, left : left + 300]
    assert (thumb_view[190, 10] == THUMB_RGB).all()
    assert np.abs(thumb_view[50, 225].astype(int) - THUMB_RGB).sum() > 60
    # Denser means redder: the dense cluster is more red than blue, the sparse area more blue than red.
    cluster, scattered = thumb_view[50, 225].astype(int), thumb_view[150, 50].astype(int)
    assert cluster[0] - cluster[2] > scattered[0] - scattered[2]

    # The inset: the target nucleus' outline (level-0 x 1790..1810, y 390..410) drawn on the inset pixels.
    inset_mask = colour_mask(image, INSET_RGB) | colour_mask(image, OUTLINE_RGB)
    iy, ix = np.nonzero(inset_mask)
    inset_view = image[iy.min() : iy.max() + 1, ix.min() : ix.max() + 1]
    assert inset_view.shape[:2] == (200, 200)
    ox, oy = 1790 - inset_region.x0, 390 - inset_region.y0
    outline = colour_mask(inset_view, OUTLINE_RGB)
    assert outline[oy, ox : ox + 21].all() and outline[oy : oy + 21, ox].all()
    assert (inset_view[oy + 10, ox + 10] == INSET_RGB).all()  # outlines only, interiors untouched


def test_outlines_given_as_wkt_draw_the_same_preview(tmp_path):
    """The pipeline hands the preview each outline as WKT text (parsed only for the nuclei the inset draws)."""
    thumb = np.full((100, 150, 3), THUMB_RGB, np.uint8)
    rng = np.random.default_rng(3)
    nuclei = [square_nucleus(x, y, half=6.0) for x, y in rng.uniform([100, 100], [1100, 700], size=(200, 2))]

    def read(b: Box) -> np.ndarray:
        return np.full((b.height, b.width, 3), INSET_RGB, np.uint8)

    images = []
    for name, items in (("geometry", nuclei), ("wkt", [(x, y, polygon.wkt) for x, y, polygon in nuclei])):
        out = tmp_path / f"{name}.png"
        render_preview(thumb, 8.0, 1.0, CountingNuclei(items), out, inset=InsetSource(read, 1.0), inset_um=120.0)
        images.append(np.asarray(Image.open(out).convert("RGB")))
    assert colour_mask(images[0], OUTLINE_RGB).sum() > 100  # outlines were drawn
    np.testing.assert_array_equal(images[0], images[1])


def test_no_nuclei_gives_a_plain_thumbnail_without_inset(tmp_path):
    thumb = np.full((50, 80, 3), THUMB_RGB, np.uint8)

    def read(b: Box) -> np.ndarray:
        raise AssertionError("no inset without nuclei")

    out = tmp_path / "preview.png"
    render_preview(thumb, 2.0, 0.25, CountingNuclei([]), out, inset=InsetSource(read, 0.25))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert colour_mask(image, THUMB_RGB).sum() == 50 * 80  # the thumbnail, no heat map


def test_large_thumbnail_is_shrunk(tmp_path):
    thumb = np.zeros((400, 1000), np.uint8)  # greyscale input is accepted
    out = tmp_path / "preview.png"
    height, width = render_preview(thumb, 2.0, 0.2, CountingNuclei([square_nucleus(5000, 2000)]), out, max_px=500)
    assert height >= 200 and width >= 500
    image = np.asarray(Image.open(out).convert("RGB"))
    dark = image[:, :518].sum(axis=2) < 200  # the black thumbnail, shrunk to 500 x 200, left of the panel
    ys, xs = np.nonzero(dark)
    assert xs.max() - xs.min() + 1 == 500 and ys.max() - ys.min() + 1 == 200


def test_bad_input_and_unwritable_path(tmp_path):
    empty = CountingNuclei([])
    with pytest.raises(ValueError, match="thumbnail"):
        render_preview(np.zeros((10, 10, 2), np.uint8), 1.0, 0.25, empty, tmp_path / "p.png")
    with pytest.raises(ValueError, match="positive"):
        render_preview(np.zeros((10, 10, 3), np.uint8), 0.0, 0.25, empty, tmp_path / "p.png")
    with pytest.raises(OutputError, match="missing"):
        render_preview(np.zeros((10, 10, 3), np.uint8), 1.0, 0.25, empty, tmp_path / "missing" / "p.png")
