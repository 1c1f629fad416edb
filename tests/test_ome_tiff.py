"""The tifffile backend: OME-TIFF and SubIFD pyramids written here with tifffile, compared with the
OpenSlide path on the same pixels (an Aperio-style SVS holding the identical pyramid)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from wsi_grunet.cli import main
from wsi_grunet.errors import MissingMppError, SlideOpenError, SlideReadError
from wsi_grunet.geometry import Box
from wsi_grunet.slide.metadata import ome_pixel_size, ome_pixels
from wsi_grunet.slide.reader import SlideReader, describe, inspect_slide

from synthetic import synthetic_rgb

WIDTH, HEIGHT, MPP = 1200, 900, 0.25
TILE = 256


def _pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level k is level 0 averaged over 2**k blocks (sizes here divide evenly)."""
    out = [rgb]
    for _ in range(1, levels):
        prev = out[-1].astype(np.uint32)
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        blocks = prev[: 2 * h, : 2 * w].reshape(h, 2, w, 2, -1).sum(axis=(1, 3))
        out.append(((blocks + 2) // 4).astype(np.uint8))
    return out


def write_ome(
    path: Path,
    levels: list[np.ndarray],
    compression: str | None,
    mpp: float | None = MPP,
    unit: str = "µm",
    ome: bool = True,
    resolution_mpp: float | None = None,
) -> Path:
    """Tiled pyramid: level 0 with the others in its SubIFDs; pixel size in the OME-XML (``ome``) or
    as TIFF resolution tags (``resolution_mpp``)."""
    rgb = levels[0].ndim == 3 and levels[0].shape[2] in (3, 4)
    metadata = {"axes": "YXS" if rgb else "CYX"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit=unit, PhysicalSizeY=mpp, PhysicalSizeYUnit=unit)
    photometric = "rgb" if rgb else "minisblack"
    options = {"tile": (TILE, TILE), "photometric": photometric, "compression": compression}
    if rgb and levels[0].shape[2] == 4:
        options["extrasamples"] = ["unassalpha"]
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path, ome=ome) as writer:
        for index, level in enumerate(levels):
            resolution = None
            if resolution_mpp is not None:
                per_cm = 1e4 / (resolution_mpp * 2**index)
                resolution = (per_cm, per_cm)
            writer.write(
                level,
                subifds=len(levels) - 1 if index == 0 else None,
                subfiletype=1 if index else 0,
                metadata=metadata if (index == 0 and ome) else None,
                resolution=resolution,
                resolutionunit="CENTIMETER" if resolution else None,
                **options,
            )
    return path


def write_svs(path: Path, levels: list[np.ndarray], compression: str | None, mpp: float = MPP) -> Path:
    """The same pyramid as an Aperio-style SVS (one page per level), which OpenSlide reads with its pixel size."""
    height, width = levels[0].shape[:2]
    description = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
        f"JPEG/RGB Q=90|AppMag = 40|MPP = {mpp:.6g}"
    )
    options = {"compressionargs": {"level": 90}} if compression == "jpeg" else {}
    with tifffile.TiffWriter(path) as writer:
        for index, level in enumerate(levels):
            writer.write(
                level,
                tile=(TILE, TILE),
                photometric="rgb",
                compression=compression,
                description=description if index == 0 else None,
                metadata=None,
                **options,
            )
    return path


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    rgb, _ = synthetic_rgb(WIDTH, HEIGHT, mpp=MPP, seed=3)
    return _pyramid(rgb, 3)


@pytest.fixture(scope="module", params=["zlib", "jpeg"])
def pair(request, tmp_path_factory, pixels):
    """(OME-TIFF path, SVS path, compression) holding the same level pixels."""
    folder = tmp_path_factory.mktemp(request.param)
    ome = write_ome(folder / "slide.ome.tiff", pixels, request.param)
    svs = write_svs(folder / "slide.svs", pixels, request.param)
    return ome, svs, request.param


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def test_openslide_alone_sees_one_level_without_pixel_size(pair):
    ome, _, _ = pair
    with openslide.OpenSlide(str(ome)) as handle:  # why the tifffile backend exists
        assert handle.level_count == 1 and openslide.PROPERTY_NAME_MPP_X not in handle.properties


def test_levels_downsamples_and_pixel_size(pair):
    ome, _, _ = pair
    info = inspect_slide(ome)
    assert info.backend == "tifffile" and info.vendor == "ome-tiff"
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.level_dimensions == ((1200, 900), (600, 450), (300, 225))
    assert info.level_downsamples == (1.0, 2.0, 4.0)
    assert info.mpp_x == pytest.approx(0.25) and info.mpp_y == pytest.approx(0.25)
    assert info.mpp_source == "OME-XML PhysicalSizeX/Y"


@pytest.mark.parametrize(
    "value,unit,um",
    [
        (250.0, "nm", 0.25),
        (0.00025, "mm", 0.25),
        (0.000025, "cm", 0.25),
        (0.5, "µm", 0.5),
        (0.5, None, 0.5),
        (0.5, "parsec", None),
    ],
)
def test_ome_units_convert_to_micrometres(value, unit, um):
    attrs = {"PhysicalSizeX": str(value), "PhysicalSizeY": str(value)}
    if unit is not None:
        attrs |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    x, y = ome_pixel_size(attrs)
    assert (x, y) == ((pytest.approx(um), pytest.approx(um)) if um is not None else (None, None))


def test_ome_pixels_reads_each_image():
    xml = (
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels '
        'SizeX="10" SizeY="5" PhysicalSizeX="0.5" PhysicalSizeXUnit="nm"/></Image><Image ID="Image:1">'
        '<Pixels SizeX="3" SizeY="2"/></Image></OME>'
    )
    assert [p["SizeX"] for p in ome_pixels(xml)] == ["10", "3"]
    assert ome_pixels("<not xml") == []


def test_pixel_size_in_nanometres_from_a_file(tmp_path, pixels):
    path = write_ome(tmp_path / "nm.ome.tif", pixels[:2], "zlib", mpp=250.0, unit="nm")
    with SlideReader(path, 0.5) as reader:
        assert reader.slide_mpp == pytest.approx(0.25) and reader.level == 1 and reader.level0_per_model == 2.0


def test_implausible_ome_pixel_size_needs_mpp(tmp_path, pixels):
    path = write_ome(tmp_path / "metres.ome.tiff", pixels[:1], "zlib", mpp=1.0, unit="m")
    info = inspect_slide(path)
    assert info.mpp is None and info.mpp_rejected == pytest.approx(1e6)
    with pytest.raises(MissingMppError, match=r"metres\.ome\.tiff: the slide records no microns-per-pixel.*--mpp"):
        SlideReader(path, 0.5)
    with SlideReader(path, 0.5, mpp_override=0.25) as reader:
        assert reader.model_shape == (450, 600) and reader.plan.mpp_source == "--mpp"


# ---------------------------------------------------------------------------------------------
# Pixels: the tifffile path agrees with the OpenSlide path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.25, 0.37, 0.5, 1.0, 2.3])
def test_reads_agree_with_openslide_on_the_same_pixels(pair, target):
    ome, svs, compression = pair
    box = Box(37, 53, 37 + 300, 53 + 260)
    with SlideReader(ome, target) as tiff_reader, SlideReader(svs, target) as slide_reader:
        assert (tiff_reader.backend, slide_reader.backend) == ("tifffile", "openslide")
        # same level, scale, shape and pixel size; only where the pixel size was found differs
        assert tiff_reader.plan == replace(slide_reader.plan, mpp_source="OME-XML PhysicalSizeX/Y")
        got = tiff_reader.read(box).astype(int)
        ref = slide_reader.read(box).astype(int)
    assert got.shape == (300, 260, 3)
    if compression == "zlib":
        np.testing.assert_array_equal(got, ref)
    else:  # the same JPEG bytes through two decoders
        diff = np.abs(got - ref)
        assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_level_pixels_are_the_written_pixels(tmp_path, pixels):
    path = write_ome(tmp_path / "exact.ome.tiff", pixels, "zlib")
    for target, level in [(0.25, 0), (0.5, 1), (1.0, 2)]:
        with SlideReader(path, target) as reader:
            assert reader.level == level and reader.plan.copies_level
            np.testing.assert_array_equal(reader.read(Box(10, 20, 110, 220)), pixels[level][10:110, 20:220])
            outside = reader.read(Box(-8, -8, 8, 8))
            assert (outside[:8] == 255).all() and (outside[:, :8] == 255).all()
            np.testing.assert_array_equal(outside[8:, 8:], pixels[level][:8, :8])


def test_thumbnail_and_pickle(pair):
    ome, svs, _ = pair
    with SlideReader(ome, 0.5) as reader, SlideReader(svs, 0.5) as other:
        thumb, um = reader.thumbnail(8.0)
        ref, _ = other.thumbnail(8.0)
        assert um == 8.0 and thumb.shape == (28, 38, 3)  # 900 * 0.25 / 8 = 28.1, 1200 * 0.25 / 8 = 37.5
        assert np.abs(thumb.astype(int) - ref.astype(int)).max() <= 3
        clone = pickle.loads(pickle.dumps(reader))
        try:
            assert clone.backend == "tifffile"
            np.testing.assert_array_equal(clone.read(Box(0, 0, 64, 64)), reader.read(Box(0, 0, 64, 64)))
        finally:
            clone.close()


def test_alpha_is_composited_on_white(tmp_path, pixels):
    rgba = np.dstack([pixels[0], np.full(pixels[0].shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0  # transparent: missing scan area
    rgba[100:200, :100, 3] = 128
    path = write_ome(tmp_path / "alpha.ome.tiff", _pyramid(rgba, 2), "zlib")
    with SlideReader(path, 0.25) as reader:
        got = reader.read(Box(0, 0, 300, 300)).astype(int)
    assert (got[:100, :100] == 255).all()
    rgb = pixels[0][100:200, :100].astype(int)
    np.testing.assert_array_equal(got[100:200, :100], (rgb * 128 + 255 * 127 + 127) // 255)
    np.testing.assert_array_equal(got[200:300], pixels[0][200:300, :300])


def test_planar_rgb_is_read(tmp_path, pixels):
    planar = [np.ascontiguousarray(level.transpose(2, 0, 1)) for level in pixels[:2]]
    path = tmp_path / "planar.ome.tiff"
    with tifffile.TiffWriter(path, ome=True) as writer:
        for index, level in enumerate(planar):
            writer.write(
                level,
                tile=(TILE, TILE),
                photometric="rgb",
                planarconfig="separate",
                compression="zlib",
                subifds=1 if index == 0 else None,
                subfiletype=1 if index else 0,
                metadata={"axes": "SYX", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP} if index == 0 else None,
            )
    with SlideReader(path, 0.5) as reader:
        assert reader.backend == "tifffile" and reader.level == 1
        np.testing.assert_array_equal(reader.read(Box(5, 7, 205, 307)), pixels[1][5:205, 7:307])


def test_region_reads_decode_only_the_tiles_they_touch(tmp_path, pixels):
    # Corrupt the last tile of level 0: a read elsewhere still works, a read there names the file.
    path = write_ome(tmp_path / "damaged.ome.tiff", pixels, "zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * count)
    with SlideReader(path, 0.25) as reader:
        np.testing.assert_array_equal(reader.read(Box(0, 0, 256, 256)), pixels[0][:256, :256])
        with pytest.raises(SlideReadError, match=r"damaged\.ome\.tiff: cannot read pixels of level 0"):
            reader.read(Box(HEIGHT - 10, WIDTH - 10, HEIGHT, WIDTH))


# ---------------------------------------------------------------------------------------------
# Which backend reads which file
# ---------------------------------------------------------------------------------------------


def test_subifd_pyramid_without_ome_uses_tiff_resolution(tmp_path, pixels):
    path = write_ome(tmp_path / "subifds.tiff", pixels, "zlib", mpp=None, ome=False, resolution_mpp=0.25)
    info = inspect_slide(path)
    assert info.backend == "tifffile" and info.level_count == 3
    assert info.mpp == pytest.approx(0.25) and info.mpp_source == "TIFF resolution tags"


def test_a_tiff_openslide_declines_is_read_by_tifffile(tmp_path, pixels):
    path = tmp_path / "png-tiles.tiff"
    tifffile.imwrite(
        path,
        pixels[0],
        tile=(TILE, TILE),
        photometric="rgb",
        compression="png",
        resolution=(4e4, 4e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    with pytest.raises(openslide.OpenSlideError, match="Unsupported TIFF compression"):
        openslide.OpenSlide(str(path))
    with SlideReader(path, 0.25) as reader:
        assert reader.backend == "tifffile" and reader.slide_mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(reader.read(Box(0, 0, HEIGHT, WIDTH)), pixels[0])


def test_multichannel_fluorescence_is_refused_clearly(tmp_path):
    channels = np.random.default_rng(0).integers(0, 4000, (5, 512, 512), dtype=np.uint16)
    path = write_ome(tmp_path / "if.ome.tiff", [channels, channels[:, ::2, ::2]], "zlib")
    message = r"if\.ome\.tiff: not a brightfield RGB slide: it has 5 channels of uint16"
    with pytest.raises(SlideOpenError, match=message):
        inspect_slide(path)
    with pytest.raises(SlideOpenError, match=message):
        SlideReader(path, 0.5)


def test_info_names_the_backend(pair, capsys):
    ome, svs, _ = pair
    assert main(["info", str(ome), str(svs)]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\n")[:2]
    assert "Backend:     tifffile" in first and "Format:      ome-tiff" in first
    assert "0.25 x 0.25 um/px (from OME-XML PhysicalSizeX/Y)" in first and "level 2: 300 x 225 px" in first
    assert "Backend:     openslide" in second and "Format:      aperio" in second
    assert describe(inspect_slide(ome), model_mpp=0.5).splitlines()[-1] == (
        "At 0.5 um/px: reads level 1 (0.5 um/px), copied without resampling; model image 450 x 600 px (height x width)"
    )
