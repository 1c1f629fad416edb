"""Whole-slide image access through OpenSlide, resampled to the model's pixel size.

Frames (see also ``wsi_grunet.geometry``):

- level-0 pixels: the slide's full-resolution grid; OpenSlide's ``read_region`` location is in it.
- level-L pixels: pyramid level L; OpenSlide maps level-0 coordinate ``x0`` to ``x0 / downsample[L]``.
- model pixels: the slide resampled to ``target_mpp``; model pixel (i, j) covers level-0
  ``[i * scale, (i + 1) * scale) x [j * scale, (j + 1) * scale)`` with ``scale = target_mpp / slide_mpp``.

OpenSlide's (x, y) / (width, height) order never leaves this module: everything else is (y, x).

Resampling. ``SlideReader.read`` evaluates a separable triangle ("linear") filter whose half-width
is ``max(1, s)`` source pixels, where ``s`` is the number of source pixels per output pixel: that is
bilinear interpolation when enlarging and an antialiased linear filter when shrinking, the kernel of
Pillow's ``BILINEAR`` resize. The weights of an output pixel depend only on its absolute position,
so two overlapping reads return identical pixels where they overlap and a tiled pass sees the same
input as a single pass. A linear filter never overshoots (no ringing at nucleus edges). When the
chosen level's pixel size equals the target, pixels are copied without resampling. Shrinking by
four or more first averages whole blocks of source pixels (exact area averaging, short filter).

Pyramid levels. A level's geometry is its integral factor when its size is level 0's divided by that
factor up to rounding (``geometric_downsamples``), otherwise OpenSlide's reported downsample. When
OpenSlide's own figure is not an integer, it places a region read from that level with a sub-pixel
shift that it interpolates; the shift is accounted for (placement stays exact), but reads from such a
level agree between overlapping boxes only to within that interpolation. Level 0 and levels with an
integral reported downsample are bit-exact.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openslide
import scipy.sparse as sp

from ..errors import ConfigError, MissingMppError, SlideOpenError, SlideReadError
from ..geometry import Box

#: File name extensions searched for in folders (OpenSlide's formats plus common vendor TIFFs).
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi", ".qptiff"}
)

#: Pixel sizes outside this range (um/px) are not taken from a file: generic TIFF resolution tags
#: often hold a scanner-independent default (72 dpi is 352.8 um/px), not the optics.
PLAUSIBLE_MPP = (0.05, 20.0)

# Relative tolerance under which a level's pixel size counts as equal to the target (exact copy).
_SAME_SCALE_RTOL = 1e-6
# A level is adequate when it is at most this much coarser than the target (never upsample by more).
_LEVEL_SLACK = 1.01
# Source pixels read per axis in one OpenSlide call when building thumbnails (bounds memory).
_THUMBNAIL_BLOCK = 2048


@dataclass(frozen=True)
class SlideInfo:
    """What OpenSlide reports about a slide. Sizes are (width, height), as OpenSlide gives them.

    ``mpp_x``/``mpp_y`` are um per level-0 pixel, or None when the file records none or records an
    implausible value; ``mpp_rejected`` then holds that implausible value (um/px) for messages.
    """

    path: str
    vendor: str | None
    width: int
    height: int
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    associated_images: tuple[str, ...]
    mpp_rejected: float | None = None

    @property
    def mpp(self) -> float | None:
        """Mean of ``mpp_x`` and ``mpp_y`` (um/px), or None."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2.0

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (tuples become lists)."""
        data = asdict(self)
        data["level_dimensions"] = [list(dims) for dims in self.level_dimensions]
        data["level_downsamples"] = list(self.level_downsamples)
        data["associated_images"] = list(self.associated_images)
        return data


# --------------------------------------------------------------------------------------------
# Opening and inspecting
# --------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike) -> openslide.OpenSlide:
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file")
    if path.is_dir():
        raise SlideOpenError(f"{path}: is a folder, not a slide file")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideOpenError(f"{path}: not a slide file (OpenSlide does not recognise its format)") from None
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(f"{path}: unsupported format/compression: {exc}") from None
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _float_or_none(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def _tiff_resolution_mpp(properties, axis: str) -> float | None:
    """um/px from TIFF XResolution/YResolution (pixels per unit) when the unit is a length."""
    resolution = _float_or_none(properties.get(f"tiff.{axis}Resolution"))
    unit = (properties.get("tiff.ResolutionUnit") or "").lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if resolution is None or resolution <= 0 or microns_per_unit is None:
        return None
    return microns_per_unit / resolution


def _slide_mpp(properties) -> tuple[float | None, float | None, float | None]:
    """(mpp_x, mpp_y, rejected): OpenSlide's mpp, else TIFF resolution tags, each only if plausible.

    OpenSlide 4 itself derives ``openslide.mpp-x`` from TIFF resolution tags for generic TIFFs, so
    the plausibility check applies to every source.
    """
    rejected = None
    for source in ("openslide", "tiff"):
        if source == "openslide":
            mpp_x = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_X))
            mpp_y = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_Y))
        else:
            mpp_x = _tiff_resolution_mpp(properties, "X")
            mpp_y = _tiff_resolution_mpp(properties, "Y")
        if mpp_x is None and mpp_y is None:
            continue
        mpp_x = mpp_x if mpp_x is not None else mpp_y
        mpp_y = mpp_y if mpp_y is not None else mpp_x
        if _plausible(mpp_x) and _plausible(mpp_y):
            return mpp_x, mpp_y, None
        if rejected is None:
            rejected = mpp_x if not _plausible(mpp_x) else mpp_y
    return None, None, rejected


def _info_from(slide: openslide.OpenSlide, path: str | os.PathLike) -> SlideInfo:
    properties = slide.properties
    mpp_x, mpp_y, rejected = _slide_mpp(properties)
    objective = _float_or_none(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    width, height = slide.dimensions
    return SlideInfo(
        path=str(path),
        vendor=properties.get(openslide.PROPERTY_NAME_VENDOR),
        width=int(width),
        height=int(height),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=objective if objective and objective > 0 else None,
        level_count=int(slide.level_count),
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        associated_images=tuple(sorted(slide.associated_images)),
        mpp_rejected=rejected,
    )


def inspect_slide(path: str | os.PathLike) -> SlideInfo:
    """Open ``path`` with OpenSlide and describe it. Raises SlideOpenError naming the file."""
    slide = _open(path)
    try:
        return _info_from(slide, path)
    finally:
        slide.close()


def find_slides(paths: list[Path]) -> list[Path]:
    """Slide files to process: files are kept as given, folders are searched recursively.

    In folders, files with a slide extension (``SLIDE_EXTENSIONS``) are collected, hidden files and
    folders skipped. A DICOM slide is a series of ``.dcm`` files in one folder and OpenSlide opens
    the whole series from any of them, so each folder contributes only its first ``.dcm`` file.
    Returns sorted, de-duplicated paths. Raises SlideOpenError for a path that does not exist.
    """
    found: dict[Path, Path] = {}
    for given in paths:
        given = Path(given)
        if given.is_dir():
            dicom_folders: set[Path] = set()
            candidates = sorted(
                p
                for p in given.rglob("*")
                if p.suffix.lower() in SLIDE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(given).parts)
                and p.is_file()
            )
            for candidate in candidates:
                if candidate.suffix.lower() == ".dcm":
                    if candidate.parent in dicom_folders:
                        continue
                    dicom_folders.add(candidate.parent)
                found.setdefault(candidate.resolve(), candidate)
        elif given.exists():
            found.setdefault(given.resolve(), given)
        else:
            raise SlideOpenError(f"{given}: no such file or folder")
    return sorted(found.values(), key=str)


# --------------------------------------------------------------------------------------------
# Pure geometry and resampling
# --------------------------------------------------------------------------------------------


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def choose_level(downsamples: tuple[float, ...] | list[float], scale: float) -> int:
    """Pyramid level to read for ``scale`` level-0 pixels per output pixel.

    The coarsest level whose pixels are at most 1% larger than the output pixels: never upsample
    when a finer level exists. Level 0 when even it is coarser than the output (then upsampled).
    """
    best = 0
    for level, downsample in enumerate(downsamples):
        if downsample <= scale * _LEVEL_SLACK and downsample > downsamples[best]:
            best = level
    return best


def geometric_downsamples(info: SlideInfo) -> tuple[float, ...]:
    """Level-0 pixels per level-L pixel as the pyramid was built.

    OpenSlide reports a level's downsample as level-0 size over level size (averaged over both
    axes), which misses the scanner's integral factor whenever the level's size was rounded
    (2001 px halved to 1000 px reports 2.001); taken literally it misplaces pixels far from the
    origin by up to a level pixel. A level whose sizes are those of the nearest integral factor,
    up to rounding, is taken to have that factor; any other level keeps OpenSlide's value.
    """
    width0, height0 = info.level_dimensions[0]
    result = []
    for (width, height), downsample in zip(info.level_dimensions, info.level_downsamples):
        factor = round(downsample)
        if factor >= 1 and abs(width - width0 / factor) < 1 and abs(height - height0 / factor) < 1:
            result.append(float(factor))
        else:
            result.append(float(downsample))
    return tuple(result)


def _snap_scale(scale: float, downsamples) -> float:
    """Snap ``scale`` to a level's downsample when equal within 1e-6, so that level is copied exactly."""
    for downsample in downsamples:
        if abs(scale / downsample - 1.0) <= _SAME_SCALE_RTOL:
            return float(downsample)
    return scale


def _positive_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_integral(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def _filter_taps(out0: int, n_out: int, s: float, origin: float, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n_out, T) into a source strip and float32 weights of the triangle filter.

    Output pixel ``o`` (absolute index, ``out0 <= o < out0 + n_out``) has its centre at absolute
    source coordinate ``(o + 0.5) * s``; the strip's pixel ``k`` has its centre at ``origin + k + 0.5``.
    With an integral ``origin`` both are exact, so weights do not depend on where a read starts.
    """
    radius = max(1.0, s)
    centres = (np.arange(out0, out0 + n_out, dtype=np.float64) + 0.5) * s
    first = np.floor(centres - radius - origin - 0.5).astype(np.int64) + 1
    taps = int(math.ceil(2.0 * radius)) + 1
    index = first[:, None] + np.arange(taps, dtype=np.int64)[None, :]
    weights = 1.0 - np.abs((origin + index + 0.5) - centres[:, None]) / radius
    weights = np.clip(weights, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    if index.min() < 0 or index.max() >= n_in:
        # Only zero-weight taps can fall outside (the strip carries a margin); keep indices valid.
        outside = (index < 0) | (index >= n_in)
        if np.any(weights[outside] > 0):
            raise RuntimeError("resampling strip too small for its filter")
        index = np.clip(index, 0, n_in - 1)
    return index, weights.astype(np.float32)


def _source_span(out0: int, out1: int, s: float) -> tuple[int, int]:
    """Half-open range of source pixels (absolute, in the source grid) the filter may touch, plus margin."""
    radius = max(1.0, s)
    lo = math.floor((out0 + 0.5) * s - radius - 0.5) - 1
    hi = math.ceil((out1 - 0.5) * s + radius - 0.5) + 2
    return lo, hi


def _taps_matrix(index: np.ndarray, weights: np.ndarray, n_in: int) -> sp.csr_matrix:
    """Sparse (n_out, n_in) matrix with the filter taps of each output pixel in its row."""
    n_out, taps = index.shape
    indptr = np.arange(0, n_out * taps + 1, taps)
    return sp.csr_matrix((weights.ravel(), index.ravel(), indptr), shape=(n_out, n_in))


def _resample(strip: np.ndarray, box: Box, s: float, origin_y: float, origin_x: float) -> np.ndarray:
    """Separable triangle-filter resampling of ``strip`` (uint8 RGB) onto ``box`` (output pixels).

    Rows, then columns, as sparse products; the fixed order of operations keeps results
    reproducible bit for bit.
    """
    ky, wy = _filter_taps(box.y0, box.height, s, origin_y, strip.shape[0])
    kx, wx = _filter_taps(box.x0, box.width, s, origin_x, strip.shape[1])
    n_in_y, n_in_x = strip.shape[:2]
    rows = _taps_matrix(ky, wy, n_in_y) @ strip.reshape(n_in_y, n_in_x * 3).astype(np.float32)
    columns = rows.reshape(box.height, n_in_x, 3).transpose(1, 0, 2).reshape(n_in_x, box.height * 3)
    out = (_taps_matrix(kx, wx, n_in_x) @ columns).reshape(box.width, box.height, 3).transpose(1, 0, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks (the array's sides are multiples of ``factor``)."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb.reshape(h, factor, w, factor, 3).astype(np.float32)
    return np.clip(np.rint(blocks.mean(axis=(1, 3))), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of non-premultiplied RGBA over a white background (missing slide areas become white)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class SlideReader:
    """Reads regions of a slide resampled exactly to ``target_mpp`` (model pixels).

    ``scale`` is level-0 pixels per model pixel (``target_mpp / slide_mpp``, snapped to a pyramid
    downsample when equal within 1e-6 so that level is copied pixel for pixel). ``model_shape`` is
    the slide's (H, W) in model pixels. One OpenSlide handle per reader; OpenSlide handles are
    thread-safe and the reader holds no other mutable state, so threads may share a reader.
    Readers pickle by path (the handle is reopened), so they can travel to dask workers.
    """

    def __init__(self, path: str | os.PathLike, target_mpp: float, mpp_override: float | None = None):
        if not _positive_number(target_mpp):
            raise ConfigError(f"target microns-per-pixel must be a positive number, got {target_mpp!r}")
        if mpp_override is not None and not _positive_number(mpp_override):
            raise ConfigError(f"--mpp must be a positive number of microns per pixel, got {mpp_override!r}")
        self.path = str(path)
        self.target_mpp = float(target_mpp)
        self.mpp_override = None if mpp_override is None else float(mpp_override)
        self._slide = _open(path)
        try:
            self.info = _info_from(self._slide, path)
        except Exception:
            self._slide.close()
            raise
        if self.mpp_override is not None:
            self.slide_mpp = self.mpp_override
        elif self.info.mpp is not None:
            self.slide_mpp = self.info.mpp
        else:
            self._slide.close()
            detail = ""
            if self.info.mpp_rejected is not None:
                detail = (
                    f" (its resolution tags say {self.info.mpp_rejected:.4g} um/px, outside the plausible "
                    f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px)"
                )
            raise MissingMppError(f"{path}: the slide records no microns-per-pixel{detail}; pass --mpp")
        self.downsamples = geometric_downsamples(self.info)
        self.scale = _snap_scale(self.target_mpp / self.slide_mpp, self.downsamples)
        self.model_shape = self._shape_at(self.scale)
        self.level = choose_level(self.downsamples, self.scale)

    # -- plumbing ---------------------------------------------------------------------------

    def __reduce__(self):
        return (SlideReader, (self.path, self.target_mpp, self.mpp_override))

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    def __repr__(self) -> str:
        return (
            f"SlideReader({self.path!r}, target_mpp={self.target_mpp}, slide_mpp={self.slide_mpp}, "
            f"model_shape={self.model_shape}, level={self.level})"
        )

    def _shape_at(self, scale: float) -> tuple[int, int]:
        return (
            max(1, _round_half_up(self.info.height / scale)),
            max(1, _round_half_up(self.info.width / scale)),
        )

    # -- pixels -----------------------------------------------------------------------------

    def _read_level(self, level: int, y0: int, x0: int, y1: int, x1: int) -> tuple[np.ndarray, float, float]:
        """RGB of level-``level`` pixels [y0, y1) x [x0, x1) and the strip's true origin (level px).

        Pixels outside the level are white; only the part inside is asked of OpenSlide (which
        handles negative locations inexactly for non-integral downsamples). OpenSlide converts a
        level-0 location to the level by dividing by its reported downsample: when that is not an
        integer, the nearest level-0 pixel is used, OpenSlide shifts the strip by the remaining
        fraction of a level pixel (interpolating), and the returned origin says where it landed.
        """
        level_w, level_h = self.info.level_dimensions[level]
        strip = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        cy0, cx0 = max(y0, 0), max(x0, 0)
        cy1, cx1 = min(y1, level_h), min(x1, level_w)
        if cy1 <= cy0 or cx1 <= cx0:
            return strip, float(y0), float(x0)
        downsample = self.info.level_downsamples[level]
        if _is_integral(downsample):
            step = int(round(downsample))
            loc_x, loc_y = cx0 * step, cy0 * step
            origin_x, origin_y = float(cx0), float(cy0)
        else:
            loc_x, loc_y = _round_half_up(cx0 * downsample), _round_half_up(cy0 * downsample)
            origin_x, origin_y = loc_x / downsample, loc_y / downsample
        try:
            region = self._slide.read_region((loc_x, loc_y), level, (cx1 - cx0, cy1 - cy0))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: cannot read pixels of level {level} at level-0 (x={loc_x}, y={loc_y}), "
                f"size {cx1 - cx0}x{cy1 - cy0}: {exc}"
            ) from None
        strip[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = _composite_on_white(np.asarray(region))
        return strip, origin_y - (cy0 - y0), origin_x - (cx0 - x0)

    def _read_scaled(self, box: Box, scale: float, level: int) -> np.ndarray:
        """Pixels of ``box`` in a grid of ``scale`` level-0 pixels per pixel, read from ``level``."""
        if box.is_empty():
            return np.zeros((max(box.height, 0), max(box.width, 0), 3), dtype=np.uint8)
        s = scale / self.downsamples[level]  # level pixels per output pixel
        if abs(s - 1.0) <= _SAME_SCALE_RTOL:
            s = 1.0
        if s == 1.0 and _is_integral(self.info.level_downsamples[level]):
            rgb, _, _ = self._read_level(level, box.y0, box.x0, box.y1, box.x1)
            return rgb
        # Shrinking 4x or more: area-average integer blocks first. Block boundaries lie on multiples
        # of the factor in the level grid, so the reduced grid is a virtual level of its own.
        factor = int(s // 2) if s >= 4.0 else 1
        s_eff = s / factor
        sy0, sy1 = _source_span(box.y0, box.y1, s_eff)
        sx0, sx1 = _source_span(box.x0, box.x1, s_eff)
        strip, origin_y, origin_x = self._read_level(
            level, sy0 * factor, sx0 * factor, sy1 * factor, sx1 * factor
        )
        if factor > 1:
            strip = _block_mean(strip, factor)
            origin_y, origin_x = origin_y / factor, origin_x / factor
        out = _resample(strip, box, s_eff, origin_y, origin_x)
        self._whiten_outside(out, box, scale)
        return out

    def _whiten_outside(self, out: np.ndarray, box: Box, scale: float) -> None:
        """Set pixels whose footprint lies wholly outside the slide to white, in place.

        The filter reaches a little past a pixel's footprint; without this, pixels just outside the
        slide would pick up a trace of its edge.
        """
        ys = np.arange(box.y0, box.y1)
        xs = np.arange(box.x0, box.x1)
        out[((ys + 1) * scale <= 0) | (ys * scale >= self.info.height)] = 255
        out[:, ((xs + 1) * scale <= 0) | (xs * scale >= self.info.width)] = 255

    def read(self, box: Box) -> np.ndarray:
        """uint8 RGB array (box.height, box.width, 3) of ``box`` in model pixels.

        The box may extend beyond the slide: those pixels are white (255), as are transparent
        areas of the slide. Raises SlideReadError (naming file and region) on undecodable pixels.
        """
        return self._read_scaled(box, self.scale, self.level)

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at ``mpp`` um/px and that pixel size (exact: pixel (i, j) covers level-0
        ``[i*f, (i+1)*f) x [j*f, (j+1)*f)`` with ``f = pixel_um / slide_mpp``; the last row/column
        may reach past the slide and be partly white).

        Reads the coarsest pyramid level at least as fine as ``mpp``, in blocks of bounded size, so a
        large slide is never decoded whole at level 0.
        """
        if not _positive_number(mpp):
            raise ConfigError(f"thumbnail microns-per-pixel must be positive, got {mpp!r}")
        scale = _snap_scale(mpp / self.slide_mpp, self.downsamples)
        level = choose_level(self.downsamples, scale)
        height, width = self._shape_at(scale)
        s = scale / self.downsamples[level]
        block = max(16, int(_THUMBNAIL_BLOCK // max(s, 1.0)))
        out = np.empty((height, width, 3), dtype=np.uint8)
        for y0 in range(0, height, block):
            for x0 in range(0, width, block):
                part = Box(y0, x0, min(y0 + block, height), min(x0 + block, width))
                out[part.slices()] = self._read_scaled(part, scale, level)
        exact_mpp = float(mpp) if scale == mpp / self.slide_mpp else scale * self.slide_mpp
        return out, exact_mpp

    # -- frames -----------------------------------------------------------------------------

    def model_to_level0(self, y: float, x: float) -> tuple[float, float]:
        """Continuous model-pixel coordinates to level-0 pixel coordinates."""
        return y * self.scale, x * self.scale


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, target_mpp: float, mpp_override: float | None) -> SlideReader:
    return SlideReader(path, target_mpp, mpp_override)


def open_reader_cached(path: str | os.PathLike, target_mpp: float, mpp_override: float | None = None) -> SlideReader:
    """A per-process shared reader (small LRU cache), so workers reuse one handle per slide.

    Do not close the returned reader: other tasks in the process may be using it.
    """
    return _cached_reader(str(path), float(target_mpp), None if mpp_override is None else float(mpp_override))


# --------------------------------------------------------------------------------------------
# Human-readable description
# --------------------------------------------------------------------------------------------


def describe(info: SlideInfo, target_mpp: float | None = None, mpp_override: float | None = None) -> str:
    """Multi-line text for ``wsi-grunet info SLIDE``; with ``target_mpp``, what a run would read."""
    lines = [f"Slide:       {info.path}", f"Format:      {info.vendor or 'unknown'}"]
    lines.append(f"Size:        {info.width} x {info.height} px (width x height, level 0)")
    slide_mpp = mpp_override if mpp_override is not None else info.mpp
    if info.mpp is not None:
        lines.append(f"Pixel size:  {info.mpp_x:.4g} x {info.mpp_y:.4g} um/px")
    elif info.mpp_rejected is not None:
        lines.append(
            f"Pixel size:  missing (the file says {info.mpp_rejected:.4g} um/px, outside the plausible "
            f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px)"
        )
    else:
        lines.append("Pixel size:  missing")
    if mpp_override is not None:
        lines.append(f"             overridden with --mpp {mpp_override:g} um/px")
    lines.append(f"Objective:   {f'{info.objective_power:g}x' if info.objective_power else 'unknown'}")
    lines.append(f"Levels:      {info.level_count}")
    downsamples = geometric_downsamples(info)
    for level, ((w, h), reported) in enumerate(zip(info.level_dimensions, info.level_downsamples)):
        geometric = downsamples[level]
        text = f"downsample {reported:.6g}"
        if geometric != reported:
            text += f" (read as {geometric:g})"
        if slide_mpp is not None:
            text += f", {slide_mpp * geometric:.4g} um/px"
        lines.append(f"  level {level}: {w} x {h} px, {text}")
    lines.append(f"Associated:  {', '.join(info.associated_images) if info.associated_images else 'none'}")
    if target_mpp is not None:
        if slide_mpp is None:
            lines.append(f"At {target_mpp:g} um/px: unknown until the pixel size is given (pass --mpp)")
        else:
            scale = _snap_scale(target_mpp / slide_mpp, downsamples)
            level = choose_level(downsamples, scale)
            s = scale / downsamples[level]
            if abs(s - 1.0) <= _SAME_SCALE_RTOL and _is_integral(info.level_downsamples[level]):
                how = "copied without resampling"
            elif abs(s - 1.0) <= _SAME_SCALE_RTOL:
                how = "same pixel size, realigned to the level-0 grid"
            elif s > 1:
                how = f"shrunk {s:.4g}x"
            else:
                how = f"enlarged {1 / s:.4g}x"
            height = max(1, _round_half_up(info.height / scale))
            width = max(1, _round_half_up(info.width / scale))
            lines.append(
                f"At {target_mpp:g} um/px: reads level {level} ({slide_mpp * downsamples[level]:.4g} um/px), "
                f"{how}; model image {height} x {width} px (height x width)"
            )
    return "\n".join(lines)
