"""Synthesise a large pyramidal whole-slide image (Aperio SVS, tiled JPEG) from real H&E images.

Tissue is a set of smooth blobs (a thresholded low-pass noise field at 1/64 scale) on blank glass; inside
it the pixels are a mosaic of the real 40x H&E images in ../shared/data (MoNuSeg 2018 training images and
TNBC, both about 0.25 um/px), each block flipped / transposed by its position, blended into glass at the
tissue edge. The slide is written tile row by tile row with tifffile (a tile iterator): the full image is
never in memory. Lower pyramid levels (each 4x smaller, as Aperio's) are built from the rows of the level
above, kept in temporary memory-mapped files. OpenSlide reads the result (Aperio driver: ``MPP`` in the
ImageDescription gives the pixel size).

    python benchmarks/synthesise_slide.py --size 20000 --out /tmp/synthetic.svs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi

TILE = 512  # TIFF tile edge (pixels)
COARSE = 64  # tissue mask resolution: one mask cell per 64 x 64 level-0 pixels
GLASS = np.array([242, 241, 245], dtype=np.float32)
BLOCK = 1000  # mosaic block edge at level 0 (source images are cropped / mirrored to this)


def load_sources(data: Path, limit: int) -> np.ndarray:
    """(k, BLOCK, BLOCK, 3) uint8 blocks of real H&E at ~0.25 um/px (MoNuSeg 1000 px; TNBC 512 px mirrored)."""
    paths = sorted((data / "monuseg2018-train" / "images").glob("*.tif"))
    paths += sorted((data / "tnbc" / "images").glob("*.jpg"))
    if not paths:
        sys.exit(f"error: no H&E images under {data} (expected monuseg2018-train/images or tnbc/images)")
    blocks = []
    for path in paths[:limit]:
        image = np.asarray(Image.open(path).convert("RGB"))
        # Mirror-pad small images up to a block: edges meet their own mirror image, no seams.
        reps_y, reps_x = -(-BLOCK // image.shape[0]), -(-BLOCK // image.shape[1])
        rows = [image if k % 2 == 0 else image[::-1] for k in range(reps_y)]
        column = np.concatenate(rows, axis=0)
        cols = [column if k % 2 == 0 else column[:, ::-1] for k in range(reps_x)]
        blocks.append(np.concatenate(cols, axis=1)[:BLOCK, :BLOCK])
    return np.stack(blocks)


def tissue_mask(height: int, width: int, fraction: float, seed: int) -> np.ndarray:
    """(ceil(h/COARSE), ceil(w/COARSE)) float32 tissue weight in [0, 1]: smooth blobs covering ``fraction``."""
    rng = np.random.default_rng(seed)
    shape = (-(-height // COARSE), -(-width // COARSE))
    # Blobs a few millimetres across: sigma ~ 1.5 mm at 0.25 um/px = 6000 px = ~94 cells; smaller for small slides.
    sigma = max(min(shape) / 8.0, 4.0)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    field += (
        0.35
        * ndi.gaussian_filter(rng.standard_normal(shape), sigma / 4, mode="wrap")
        * field.std()
        / max(ndi.gaussian_filter(rng.standard_normal(shape), sigma / 4, mode="wrap").std(), 1e-12)
    )
    # A margin of glass around the slide edge, as on a real slide.
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    edge = np.minimum(np.minimum(yy, shape[0] - 1 - yy), np.minimum(xx, shape[1] - 1 - xx))
    field -= 3.0 * field.std() * np.clip(1.0 - edge / (0.06 * min(shape)), 0.0, 1.0)
    level = np.quantile(field, 1.0 - fraction)
    soft = np.clip((field - level) / (0.05 * field.std()) + 0.5, 0.0, 1.0)  # a few cells of soft edge
    return soft.astype(np.float32)


class Mosaic:
    """Level-0 pixels of the synthetic slide, produced one tile row at a time."""

    def __init__(self, height: int, width: int, sources: np.ndarray, mask: np.ndarray, seed: int) -> None:
        self.height, self.width, self.sources, self.mask = height, width, sources, mask
        n_by, n_bx = -(-height // BLOCK), -(-width // BLOCK)
        rng = np.random.default_rng(seed + 1)
        self.choice = rng.integers(0, len(sources), (n_by, n_bx))
        self.flip = rng.integers(0, 8, (n_by, n_bx))  # dihedral transform of each block

    def _block(self, by: int, bx: int) -> np.ndarray:
        block = self.sources[self.choice[by, bx]]
        code = self.flip[by, bx]
        if code & 1:
            block = block[::-1]
        if code & 2:
            block = block[:, ::-1]
        if code & 4:
            block = block.transpose(1, 0, 2)
        return block

    def row(self, y0: int, rows: int) -> np.ndarray:
        """Level-0 rows y0 .. y0+rows (uint8, width padded up to whole tiles)."""
        width = -(-self.width // TILE) * TILE
        out = np.empty((rows, width, 3), np.uint8)
        out[:] = GLASS.astype(np.uint8)
        y1 = min(y0 + rows, self.height)
        # Tissue weight upsampled to pixels (bilinear between mask cells).
        cy = (np.arange(y0, y1) + 0.5) / COARSE - 0.5
        cx = (np.arange(self.width) + 0.5) / COARSE - 0.5
        weight = ndi.map_coordinates(self.mask, np.meshgrid(cy, cx[::16], indexing="ij"), order=1, mode="nearest")
        weight = np.repeat(weight, 16, axis=1)[:, : self.width]  # 16-px steps: smooth enough at 0.25 um
        for by in range(y0 // BLOCK, (y1 - 1) // BLOCK + 1):
            ys = slice(max(y0, by * BLOCK), min(y1, (by + 1) * BLOCK))
            for bx in range(0, -(-self.width // BLOCK)):
                xs = slice(bx * BLOCK, min(self.width, (bx + 1) * BLOCK))
                w = weight[ys.start - y0 : ys.stop - y0, xs]
                if not w.any():
                    continue
                block = self._block(by, bx)[ys.start - by * BLOCK : ys.stop - by * BLOCK, : xs.stop - xs.start]
                target = out[ys.start - y0 : ys.stop - y0, xs]
                full = w >= 1.0
                if full.all():
                    target[:] = block
                    continue
                mixed = w[..., None] * block.astype(np.float32) + (1.0 - w[..., None]) * GLASS
                target[:] = mixed.astype(np.uint8)
        return out


def downsample4(strip: np.ndarray) -> np.ndarray:
    """4x box downsample of a (4k, 4m, 3) uint8 strip."""
    h, w = strip.shape[0] // 4 * 4, strip.shape[1] // 4 * 4
    s = strip[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((s + 8) // 16).astype(np.uint8)


def tiles_of(rows: Iterator[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """TILE x TILE tiles in row-major order from strips TILE high (last strip may be shorter: padded)."""
    for strip in rows:
        if strip.shape[0] < TILE:
            strip = np.concatenate([strip, np.empty((TILE - strip.shape[0],) + strip.shape[1:], np.uint8)])
            strip[strip.shape[0] :] = GLASS.astype(np.uint8)
        for x in range(0, width, TILE):
            tile = strip[:, x : x + TILE]
            if tile.shape[1] < TILE:
                tile = np.pad(tile, ((0, 0), (0, TILE - tile.shape[1]), (0, 0)), constant_values=242)
            yield np.ascontiguousarray(tile)


def write_slide(
    out: Path,
    size: tuple[int, int],
    mpp: float,
    fraction: float,
    seed: int,
    data: Path,
    quality: int,
    sources_limit: int,
) -> dict:
    height, width = size
    sources = load_sources(data, sources_limit)
    mask = tissue_mask(height, width, fraction, seed)
    mosaic = Mosaic(height, width, sources, mask, seed)
    # Levels: each 4x smaller, down to about 2000 px (Aperio style).
    shapes = [(height, width)]
    while max(shapes[-1]) > 4000:
        shapes.append((shapes[-1][0] // 4, shapes[-1][1] // 4))
    description = (
        f"Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
        f"JPEG/RGB Q={quality}|AppMag = 40|MPP = {mpp}|Synthetic = wsi-grunet mosaic of MoNuSeg/TNBC"
    )
    tmp = tempfile.TemporaryDirectory(dir=out.parent, prefix=".synth-")
    padded = [(-(-h // TILE) * TILE, -(-w // TILE) * TILE) for h, w in shapes]
    stores = [
        np.lib.format.open_memmap(
            Path(tmp.name) / f"level{k}.npy", mode="w+", dtype=np.uint8, shape=(padded[k][0], padded[k][1], 3)
        )
        for k in range(1, len(shapes))
    ]

    def level0_rows() -> Iterator[np.ndarray]:
        for y0 in range(0, height, TILE):
            strip = mosaic.row(y0, TILE)
            if stores:
                small = downsample4(strip)
                stores[0][y0 // 4 : y0 // 4 + small.shape[0], : small.shape[1]] = small[:, : stores[0].shape[1]]
            yield strip[: min(TILE, height - y0)]

    def level_rows(k: int) -> Iterator[np.ndarray]:
        h = shapes[k][0]
        src = stores[k - 1]
        for y0 in range(0, h, TILE):
            strip = np.asarray(src[y0 : y0 + TILE])
            if k < len(stores):
                small = downsample4(strip)
                dst = stores[k]
                dst[y0 // 4 : y0 // 4 + small.shape[0], : small.shape[1]] = small[:, : dst.shape[1]]
            yield strip[: min(TILE, h - y0)]

    partial = out.with_name(f".{out.name}.partial")
    options = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "subsampling": (2, 2),
        "resolution": (1e4 / mpp, 1e4 / mpp),
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        tif.write(
            tiles_of(level0_rows(), width),
            shape=(height, width, 3),
            dtype=np.uint8,
            description=description,
            metadata=None,
            **options,
        )
        thumb = np.asarray(
            Image.fromarray(np.asarray(stores[-1] if stores else mosaic.row(0, TILE))).resize(
                (
                    max(1, (stores[-1].shape[1] if stores else width) // 4),
                    max(1, (stores[-1].shape[0] if stores else TILE) // 4),
                )
            )
        )
        tif.write(
            thumb,
            photometric="rgb",
            compression="jpeg",
            description="Aperio Image Library v12.0.15 thumbnail",
            metadata=None,
        )
        for k in range(1, len(shapes)):
            tif.write(
                tiles_of(level_rows(k), shapes[k][1]),
                shape=(shapes[k][0], shapes[k][1], 3),
                dtype=np.uint8,
                description=f"Aperio Image Library v12.0.15 \n{width}x{height} -> {shapes[k][1]}x{shapes[k][0]}",
                metadata=None,
                **options,
            )
    partial.replace(out)
    stores.clear()  # close the memory maps before their folder goes
    tmp.cleanup()
    return {"levels": [list(s) for s in shapes], "tissue_fraction_mask": float((mask > 0.5).mean())}


def verify(path: Path, fraction_hint: float) -> dict:
    import openslide

    slide = openslide.OpenSlide(str(path))
    props = slide.properties
    level = slide.level_count - 1
    thumb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")).astype(int)
    chroma = thumb.max(axis=2) - thumb.min(axis=2)
    tissue = float(((chroma > 20) | (thumb.mean(axis=2) < 200)).mean())
    w, h = slide.dimensions
    region = np.asarray(slide.read_region((w // 2 - 256, h // 2 - 256), 0, (512, 512)).convert("RGB"))
    return {
        "vendor": props.get("openslide.vendor"),
        "mpp_x": float(props["openslide.mpp-x"]),
        "mpp_y": float(props["openslide.mpp-y"]),
        "dimensions": [w, h],
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": [round(d, 3) for d in slide.level_downsamples],
        "tissue_fraction": round(tissue, 3),
        "centre_read_mean_rgb": [round(float(v), 1) for v in region.mean(axis=(0, 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[20000], help="edge (or height width) in pixels")
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--tissue", type=float, default=0.45, help="fraction of the slide covered by tissue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--sources", type=int, default=60, help="at most this many source images")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    size = (args.size[0], args.size[-1])
    if not (256 <= min(size) and max(size) <= 200_000):
        sys.exit(f"error: --size {args.size} must lie between 256 and 200000 pixels")
    if not 0.0 < args.tissue < 1.0:
        sys.exit(f"error: --tissue {args.tissue} must lie in (0, 1)")
    if not args.out.parent.is_dir():
        sys.exit(f"error: the output folder {args.out.parent} does not exist")
    start = time.perf_counter()
    info = write_slide(args.out, size, args.mpp, args.tissue, args.seed, args.data, args.quality, args.sources)
    seconds = time.perf_counter() - start
    check = verify(args.out, args.tissue)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB) in {seconds:.1f} s")
    print(
        f"openslide: vendor {check['vendor']}, {check['level_count']} levels {check['level_dimensions']}, "
        f"mpp {check['mpp_x']:g} x {check['mpp_y']:g}, tissue fraction {check['tissue_fraction']:.2f} "
        f"(mask {info['tissue_fraction_mask']:.2f}), centre read mean RGB {check['centre_read_mean_rgb']}"
    )


if __name__ == "__main__":
    main()
