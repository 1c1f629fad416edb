"""Pure geometry of reading a slide at the model's pixel size: which level, what scale, and the
resampling filter. No backend is imported here.

Frames (see also ``wsi_grunet.geometry``):

- level-0 pixels: the slide's full-resolution grid.
- level-L pixels: pyramid level L; level-0 coordinate ``x0`` is ``x0 / downsample[L]`` there.
- model pixels: the slide resampled to ``target_mpp``; model pixel (i, j) covers level-0
  ``[i * scale, (i + 1) * scale) x [j * scale, (j + 1) * scale)`` with ``scale = target_mpp / slide_mpp``.

Resampling evaluates a separable triangle ("linear") filter whose half-width is ``max(1, s)``
source pixels, where ``s`` is the number of source pixels per output pixel: that is bilinear
interpolation when enlarging and an antialiased linear filter when shrinking, the kernel of Pillow's
``BILINEAR`` resize. The weights of an output pixel depend only on its absolute position, so two
overlapping reads return identical pixels where they overlap and a tiled pass sees the same input as
a single pass. A linear filter never overshoots (no ringing at nucleus edges).

Pyramid levels. A level's geometry is its integral factor when its size is level 0's divided by that
factor up to rounding (``geometric_downsamples``), otherwise the reported downsample.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..config import pixel_size_problem
from ..display import display_text
from ..errors import MissingMppError, PixelSizeError
from ..geometry import Box
from .metadata import PLAUSIBLE_MPP, SlideInfo

# Relative tolerance under which a level's pixel size counts as equal to the target (exact copy).
SAME_SCALE_RTOL = 1e-6
# A level is adequate when it is at most this much coarser than the target (never upsample by more).
LEVEL_SLACK = 1.01


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def positive_number(value: object) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    number = float(value)
    return math.isfinite(number) and number > 0


def is_integral(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def choose_level(downsamples: Sequence[float], scale: float) -> int:
    """Pyramid level to read for ``scale`` level-0 pixels per output pixel.

    The coarsest level whose pixels are at most 1% larger than the output pixels: never upsample
    when a finer level exists. Level 0 when even it is coarser than the output (then upsampled).
    """
    best = 0
    for level, downsample in enumerate(downsamples):
        if downsample <= scale * LEVEL_SLACK and downsample > downsamples[best]:
            best = level
    return best


def geometric_downsamples(info: SlideInfo) -> tuple[float, ...]:
    """Level-0 pixels per level-L pixel as the pyramid was built.

    The reported downsample of a level is level-0 size over level size (averaged over both axes),
    which misses the scanner's integral factor whenever the level's size was rounded (2001 px
    halved to 1000 px reports 2.001); taken literally it misplaces pixels far from the origin by up
    to a level pixel. A level whose sizes are those of the nearest integral factor, up to rounding,
    is taken to have that factor; any other level keeps the reported value.
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


def snap_scale(scale: float, downsamples: Sequence[float]) -> float:
    """Snap ``scale`` to a level's downsample when equal within 1e-6, so that level is copied exactly."""
    for downsample in downsamples:
        if abs(scale / downsample - 1.0) <= SAME_SCALE_RTOL:
            return float(downsample)
    return scale


def shape_at(info: SlideInfo, scale: float) -> tuple[int, int]:
    """The slide's (H, W) in pixels of ``scale`` level-0 pixels (rounded half up, at least 1)."""
    return max(1, round_half_up(info.height / scale)), max(1, round_half_up(info.width / scale))


@dataclass(frozen=True)
class ReadPlan:
    """How a slide is read at one pixel size; shared by ``SlideReader`` and ``describe``.

    ``scale`` is level-0 pixels per output pixel, ``level`` the pyramid level read, ``shape`` the
    slide's (H, W) in output pixels, ``slide_mpp`` the level-0 pixel size used and ``mpp_source``
    where it came from ("--mpp" or the file's own field).
    """

    target_mpp: float
    slide_mpp: float
    mpp_source: str
    level: int
    scale: float
    shape: tuple[int, int]
    downsamples: tuple[float, ...]
    level_downsample: float  # as the backend reports it (placement of reads depends on it)

    @property
    def level_pixels_per_output(self) -> float:
        s = self.scale / self.downsamples[self.level]
        return 1.0 if abs(s - 1.0) <= SAME_SCALE_RTOL else s

    @property
    def copies_level(self) -> bool:
        """True when output pixels are the level's pixels (no resampling)."""
        return self.level_pixels_per_output == 1.0 and is_integral(self.level_downsample)

    def how(self) -> str:
        s = self.level_pixels_per_output
        if self.copies_level:
            return "copied without resampling"
        if s == 1.0:
            return "same pixel size, realigned to the level-0 grid"
        return f"shrunk {s:.4g}x" if s > 1 else f"enlarged {1 / s:.4g}x"


def slide_pixel_size(info: SlideInfo, mpp_override: float | None) -> tuple[float, str]:
    """The level-0 pixel size to use and its source. Raises MissingMppError naming the file when it
    has none, PixelSizeError when nuclei cannot be resolved at it (``config.RESOLVABLE_MPP``)."""
    if mpp_override is not None:
        mpp, source, origin = float(mpp_override), "--mpp", "--mpp"
    elif info.mpp is not None:
        mpp, source = info.mpp, info.mpp_source or "file"
        origin = f"the slide's metadata, {source}"
    else:
        detail = ""
        if info.mpp_rejected is not None:
            detail = (
                f" (its resolution tags say {info.mpp_rejected:.4g} um/px, outside the plausible "
                f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px)"
            )
        raise MissingMppError(f"{display_text(info.path)}: the slide records no microns-per-pixel{detail}; pass --mpp")
    problem = pixel_size_problem(mpp)
    if problem is not None:
        raise PixelSizeError(
            f"{display_text(info.path)}: pixel size {mpp:g} um/px (from {origin}) {problem}; "
            "check the slide's metadata or --mpp"
        )
    return mpp, source


def plan_at(info: SlideInfo, slide_mpp: float, mpp_source: str, target_mpp: float) -> ReadPlan:
    """The read plan for output pixels of ``target_mpp`` um, given the level-0 pixel size."""
    downsamples = geometric_downsamples(info)
    scale = snap_scale(target_mpp / slide_mpp, downsamples)
    level = choose_level(downsamples, scale)
    return ReadPlan(
        target_mpp=float(target_mpp),
        slide_mpp=float(slide_mpp),
        mpp_source=mpp_source,
        level=level,
        scale=scale,
        shape=shape_at(info, scale),
        downsamples=downsamples,
        level_downsample=float(info.level_downsamples[level]),
    )


def plan_read(info: SlideInfo, target_mpp: float, mpp_override: float | None = None) -> ReadPlan:
    """The plan for reading ``info``'s slide at ``target_mpp``. Raises MissingMppError without a pixel size."""
    slide_mpp, source = slide_pixel_size(info, mpp_override)
    return plan_at(info, slide_mpp, source, target_mpp)


# --------------------------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------------------------


def filter_taps(out0: int, n_out: int, s: float, origin: float, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n_out, T) into a source strip and float32 weights of the triangle filter.

    Output pixel ``o`` (absolute index, ``out0 <= o < out0 + n_out``) has its centre at absolute
    source coordinate ``(o + 0.5) * s``; the strip's pixel ``k`` has its centre at ``origin + k + 0.5``.
    With an integral ``origin`` both are exact, so weights do not depend on where a read starts.
    """
    radius = max(1.0, s)
    centres = (np.arange(out0, out0 + n_out, dtype=np.float64) + 0.5) * s
    first = np.floor(centres - radius - origin - 0.5).astype(np.int64) + 1
    taps = math.ceil(2.0 * radius) + 1
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


def source_span(out0: int, out1: int, s: float) -> tuple[int, int]:
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


def resample(strip: np.ndarray, box: Box, s: float, origin_y: float, origin_x: float) -> np.ndarray:
    """Separable triangle-filter resampling of ``strip`` (uint8 RGB) onto ``box`` (output pixels).

    Rows, then columns, as sparse products; the fixed order of operations keeps results
    reproducible bit for bit. Halving on the source grid (the usual 0.25 -> 0.5 um/px read) takes
    an integer path with the same result.
    """
    if s == 2.0 and is_integral(origin_y) and is_integral(origin_x):
        return halve(strip, box, round(origin_y), round(origin_x))
    return triangle_filter(strip, box, s, origin_y, origin_x)


def triangle_filter(strip: np.ndarray, box: Box, s: float, origin_y: float, origin_x: float) -> np.ndarray:
    """The general path of :func:`resample`, for any ``s``: rows, then columns, as sparse products."""
    ky, wy = filter_taps(box.y0, box.height, s, origin_y, strip.shape[0])
    kx, wx = filter_taps(box.x0, box.width, s, origin_x, strip.shape[1])
    n_in_y, n_in_x = strip.shape[:2]
    rows = _taps_matrix(ky, wy, n_in_y) @ strip.reshape(n_in_y, n_in_x * 3).astype(np.float32)
    columns = rows.reshape(box.height, n_in_x, 3).transpose(1, 0, 2).reshape(n_in_x, box.height * 3)
    out = (_taps_matrix(kx, wx, n_in_x) @ columns).reshape(box.width, box.height, 3).transpose(1, 0, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# Pixels as 3-byte items: every other pixel of a row is then copied by one strided item copy with long
# inner loops, where numpy's arithmetic on (..., 3) views loops over 3 values at a time.
_PIXEL = np.dtype((np.void, 3))
# Output rows per block: a block's source rows and sums stay in the core's cache (20 ms instead of
# 80 ms per 1152-px tile on whole-array passes; benchmarks/RESULTS.md).
_HALVE_BLOCK_ROWS = 32


def halve(strip: np.ndarray, box: Box, origin_y: int, origin_x: int) -> np.ndarray:
    """The triangle filter at exactly 2 source pixels per output pixel, in integers.

    Output pixel ``o`` has its centre on the boundary between source pixels ``2o`` and ``2o + 1``
    (absolute), so its taps are source pixels ``2o - 1 .. 2o + 2`` with weights 1, 3, 3, 1 (over 8
    per axis). The separable sum over 64 fits uint16 and is rounded half to even, like ``np.rint`` of
    the float path (whose arithmetic is exact here: dyadic weights, small integers). Columns first,
    over the even and odd source pixels copied apart, then rows, in blocks of output rows.
    """
    first_y = 2 * box.y0 - 1 - origin_y
    first_x = 2 * box.x0 - 1 - origin_x
    n_y, n_x = box.height, box.width
    rows_needed, columns_needed = first_y + 2 * n_y + 2, first_x + 2 * n_x + 2
    if min(first_y, first_x) < 0 or rows_needed > strip.shape[0] or columns_needed > strip.shape[1]:
        raise RuntimeError("resampling strip too small for its filter")
    if strip.strides[-1] != 1:
        strip = np.ascontiguousarray(strip)
    pixels = strip[first_y:rows_needed, first_x:columns_needed].view(_PIXEL)[..., 0]
    out = np.empty((n_y, n_x, 3), np.uint8)
    block = max(1, min(_HALVE_BLOCK_ROWS, n_y))
    even = np.empty((2 * block + 2, n_x + 1), _PIXEL)  # source columns first_x + 2o
    odd = np.empty_like(even)  # first_x + 2o + 1
    columns_sum = np.empty((2 * block + 2, n_x, 3), np.uint16)
    columns_mid = np.empty_like(columns_sum)
    total = np.empty((block, n_x, 3), np.uint16)
    middle = np.empty_like(total)
    for o0 in range(0, n_y, block):
        k = min(block, n_y - o0)
        rows = 2 * k + 2
        source = pixels[2 * o0 : 2 * o0 + rows]
        e, d = even[:rows], odd[:rows]
        e[...] = source[:, 0::2]
        d[...] = source[:, 1::2]
        e8 = e.view(np.uint8).reshape(rows, n_x + 1, 3)
        d8 = d.view(np.uint8).reshape(rows, n_x + 1, 3)
        # Columns: taps first_x + 2o .. + 3 are even[o], odd[o], even[o + 1], odd[o + 1].
        cs, cm = columns_sum[:rows], columns_mid[:rows]
        np.add(e8[:, :-1], d8[:, 1:], out=cs, dtype=np.uint16)
        np.add(d8[:, :-1], e8[:, 1:], out=cm, dtype=np.uint16)
        cm *= np.uint16(3)
        cs += cm
        # Rows: taps 2o .. 2o + 3 of the block's column sums.
        t, m = total[:k], middle[:k]
        np.add(cs[0 : 2 * k : 2], cs[3 : 3 + 2 * k : 2], out=t)
        np.add(cs[1 : 1 + 2 * k : 2], cs[2 : 2 + 2 * k : 2], out=m)
        m *= np.uint16(3)
        t += m
        # Half to even: a remainder of exactly 32 rounds up only from an odd quotient.
        np.right_shift(t, 6, out=m)
        m &= np.uint16(1)
        m += np.uint16(31)
        t += m
        t >>= 6
        out[o0 : o0 + k] = t
    return out


def block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks (the array's sides are multiples of ``factor``)."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb.reshape(h, factor, w, factor, 3).astype(np.float32)
    return np.clip(np.rint(blocks.mean(axis=(1, 3))), 0, 255).astype(np.uint8)


def composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """RGB of RGB or non-premultiplied RGBA over a white background (missing slide areas become white)."""
    if pixels.shape[-1] == 3:
        return np.ascontiguousarray(pixels)
    rgb = pixels[..., :3]
    alpha = pixels[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        # A contiguous copy: the filters read a strided view of RGBA slower than they copy it.
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
