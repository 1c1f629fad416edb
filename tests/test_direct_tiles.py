"""tifffile decoding a slide's tiles in place of OpenSlide, only where the pixels are OpenSlide's own."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsi_grunet.examples import example_slide
from wsi_grunet.geometry import Box
from wsi_grunet.slide.backends import open_backend
from wsi_grunet.slide.direct_tiles import DirectTiles, probe_regions, same_pixels
from wsi_grunet.slide.reader import SlideReader
from wsi_grunet.slide.tiff_backend import TiffBackend

from synthetic import write_synthetic_slide


def _random_regions(width: int, height: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    regions = [(0, 0, width, height), (width - 1, height - 1, 1, 1)]
    for _ in range(n):
        w, h = int(rng.integers(1, min(width, 600) + 1)), int(rng.integers(1, min(height, 600) + 1))
        regions.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
    return regions


def _assert_reads_are_openslides(path, expected_direct: list[int]) -> None:
    backend = open_backend(path)
    try:
        info = backend.info
        for level, (width, height) in enumerate(info.level_dimensions):
            for x, y, w, h in _random_regions(width, height, 12, seed=level):
                ours = backend.read_region(level, x, y, w, h)
                reference = backend._read_openslide(level, x, y, w, h)  # OpenSlide itself, for comparison
                if ours.shape[-1] == 3:
                    assert same_pixels(ours, reference), (path, level, x, y, w, h)
                else:
                    assert np.array_equal(ours, reference)
        assert backend.direct_levels == expected_direct
    finally:
        backend.close()


def test_probe_regions_cross_the_central_seams_and_hold_the_corner():
    regions = probe_regions(1000, 700, 256, 240)
    assert len(regions) == 2
    (x, y, w, h), (cx, cy, cw, ch) = regions
    assert (w, h) == (256, 240) and (cw, ch) == (256, 240)
    # The tile corner nearest the centre (512, 240) lies strictly inside the first region.
    assert x < 512 < x + w and y < 240 < y + h
    assert (cx + cw, cy + ch) == (1000, 700)
    # A level smaller than one tile is probed whole.
    assert probe_regions(100, 50, 256, 256) == [(0, 0, 100, 50), (0, 0, 100, 50)]


def test_same_pixels_needs_opaque_equal_pixels():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 255, np.uint8)], axis=-1)
    assert same_pixels(rgb, rgba) and same_pixels(rgb, rgb)
    translucent = rgba.copy()
    translucent[1, 2, 3] = 254
    assert not same_pixels(rgb, translucent)
    changed = rgba.copy()
    changed[0, 0, 0] += 1
    assert not same_pixels(rgb, changed)


def test_the_example_aperio_slide_is_decoded_by_tifffile_with_openslides_pixels():
    _assert_reads_are_openslides(example_slide(), expected_direct=[0])


def test_levels_are_matched_by_size(tmp_path):
    """These files have no thumbnail page, so tifffile takes their second page for one and OpenSlide
    for level 1: levels 0 and 2 are matched, level 1 stays with OpenSlide."""
    path = tmp_path / "pyramid.svs"
    write_synthetic_slide(path, 1500, 1100, levels=3, tile=256, compression="jpeg")
    assert open_backend(path).info.level_downsamples == (1.0, 2.0, 4.0)
    _assert_reads_are_openslides(path, expected_direct=[0, 2])


def test_the_model_resolution_read_is_unchanged_by_the_direct_path(tmp_path):
    """SlideReader.read (resampling included) gives the same model pixels as OpenSlide's own reads."""
    path = tmp_path / "slide.svs"
    write_synthetic_slide(path, 1300, 900, mpp=0.25, levels=1, tile=256, compression="jpeg")
    reader = SlideReader(path, 0.5)
    box = Box(-20, -30, 400, 500)  # reaches beyond the slide's top-left
    fast = reader.read(box)
    backend = reader._backend
    assert backend.direct_levels == [0]
    backend._direct = DirectTiles(str(path), backend.info, lambda *args: np.zeros((1, 1, 4), np.uint8))
    slow = reader.read(box)  # the probe fails against this reference, so OpenSlide reads
    assert backend.direct_levels == []
    assert np.array_equal(fast, slow)
    reader.close()


def test_a_level_whose_probe_differs_stays_with_openslide():
    backend = open_backend(example_slide())
    try:

        def off_by_one(level, x, y, w, h):
            pixels = backend._read_openslide(level, x, y, w, h).copy()
            pixels[0, 0, 0] ^= 1
            return pixels

        direct = DirectTiles(backend.path, backend.info, off_by_one)
        assert direct.read(0, 10, 10, 64, 64) is None
        assert direct.levels == []
        direct.close()
    finally:
        backend.close()


def test_missing_tiles_stay_with_openslide(tmp_path):
    """OpenSlide paints a tile that is not stored transparent (white once composited); tifffile would
    give black, so such a level is never decoded by tifffile."""
    path = tmp_path / "missing.tiff"
    rgb = (np.random.default_rng(1).random((512, 512, 3)) * 255).astype(np.uint8)

    def tiles():
        for ty in range(2):
            for tx in range(2):
                yield None if (ty, tx) == (1, 1) else rgb[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256]

    tifffile.imwrite(
        path, tiles(), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb", compression="jpeg"
    )
    assert TiffBackend(path).level_tile_shape(0) is None
    backend = open_backend(path)
    try:
        pixels = backend.read_region(0, 0, 0, 512, 512)
        assert pixels.shape[-1] == 4 and (pixels[300:, 300:, 3] == 0).all()
        assert backend.direct_levels == []
    finally:
        backend.close()


def test_a_corrupt_slide_still_reports_openslides_error(shared_dir):
    from wsi_grunet.errors import SlideReadError

    backend = open_backend(shared_dir / "slides" / "fixtures" / "unreadable.svs")
    try:
        with pytest.raises(SlideReadError, match="unreadable.svs: cannot read pixels"):
            backend.read_region(0, 1, 1, 14, 11)
    finally:
        backend.close()
