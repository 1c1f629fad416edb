"""The integer path for halving equals the triangle filter's general (sparse, float) path bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_grunet.geometry import Box
from wsi_grunet.slide import resample as rs


@pytest.mark.parametrize("seed", range(4))
def test_halving_equals_the_general_filter(seed: int):
    rng = np.random.default_rng(seed)
    for trial in range(60):
        y0, x0 = (int(v) for v in rng.integers(-40, 40, 2))
        # up to 100 rows: the integer path works in blocks of output rows, the last one partial
        h, w = (int(v) for v in rng.integers(1, 101 if trial % 4 == 1 else 48, 2))
        box = Box(y0, x0, y0 + h, x0 + w)
        sy0, sy1 = rs.source_span(box.y0, box.y1, 2.0)
        sx0, sx1 = rs.source_span(box.x0, box.x1, 2.0)
        extra_y, extra_x = (int(v) for v in rng.integers(0, 3, 2))  # strips may start earlier
        shape = (sy1 - sy0 + extra_y, sx1 - sx0 + extra_x, 3)
        if trial % 3 == 0:  # black and white only: many sums fall exactly half-way (ties)
            strip = (rng.integers(0, 2, shape) * 255).astype(np.uint8)
        else:
            strip = rng.integers(0, 256, shape, dtype=np.uint8)
        origin_y, origin_x = float(sy0 - extra_y), float(sx0 - extra_x)
        fast = rs.resample(strip, box, 2.0, origin_y, origin_x)
        np.testing.assert_array_equal(fast, rs.triangle_filter(strip, box, 2.0, origin_y, origin_x))


def test_halving_takes_strided_views_and_rejects_short_strips():
    rng = np.random.default_rng(9)
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    box = Box(3, 4, 15, 16)
    view = rgba[..., :3]  # what a reader may pass without copying
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(
        rs.resample(view, box, 2.0, 0.0, 0.0), rs.triangle_filter(view.copy(), box, 2.0, 0.0, 0.0)
    )
    with pytest.raises(RuntimeError, match="too small"):
        rs.halve(view[:20], Box(0, 0, 12, 12), 0, 0)
