"""Write a larger slide for benchmarks: a real slide's pixels repeated in a grid, as a pyramidal SVS.

Usage: python benchmarks/make_mosaic_slide.py SOURCE_SLIDE OUT.svs --repeat 4
The source's microns per pixel is kept, so the mosaic is processed like a real slide of that size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import openslide

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic import write_rgb_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    slide = openslide.OpenSlide(args.source)
    mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    mosaic = np.tile(rgb, (args.repeat, args.repeat, 1))
    write_rgb_image(args.out, mosaic, mpp=mpp, levels=3, compression="zlib")
    print(f"{args.out}: {mosaic.shape[1]} x {mosaic.shape[0]} px at {mpp} um/px")


if __name__ == "__main__":
    main()
