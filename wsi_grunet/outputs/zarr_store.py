"""OME-Zarr 0.5 output: nucleus probability image plus a ``labels/nuclei`` instance-label pyramid.

Layout (zarr v3, sharded, Blosc-zstd compressed)::

    slide.ome.zarr/            image group, attributes.ome = {version: "0.5", multiscales: [...]}
      0, 1, ... L-1            uint8 probability, value = round(probability * 255)
      labels/                  attributes.ome = {version: "0.5", labels: ["nuclei"]}
        nuclei/                multiscales + image-label, source image "../../"
          0, 1, ... L-1        int32 nucleus ids, 0 = background

With the RGB slide (``rgb=True``, ``output.slide_rgb``) the image arrays are (c, y, x) with four channels:
c = 0 nucleus probability, 1 red, 2 green, 3 blue (the slide at the model's resolution), described by
``omero`` channel metadata. napari's OME-Zarr reader splits an image's channels into layers (the first
opaque, the others added), so one drag-and-drop shows the slide in colour with the probability added in
green, and the labels above it; the probability stays at channel 0 for programs. Chunks hold one
channel, shards all four: the task that writes a tile core's probability writes its RGB in the same write.

Frames: arrays are (y, x) (or (c, y, x)) in model pixels at level 0, halved per level (sizes round up).
Scales are micrometres per pixel, ``pixel_um * 2**i`` (1 on the channel axis). A coordinate transformation
maps a pixel index to the position of that pixel's centre:

* probability levels are 2x2 means, so a level-i pixel is centred on the middle of the 2**i x 2**i block it
  summarises: translation ``(2**i - 1) / 2 * pixel_um``;
* label levels keep the top-left pixel of every 2x2 block (nearest, never a blend of ids), so a level-i
  pixel is the level-0 pixel at index ``2**i * j``: translation 0.

Concurrency: a shard is one storage object. Every write covers whole shards (the image's right and bottom
edges excepted, where a shard is cut by the image border), so writers that own different shards never
touch the same object and need no locks. The pyramid is built one destination shard per task.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..errors import OutputError
from ..geometry import Box

OME_VERSION = "0.5"
LABELS_NAME = "nuclei"
LABELS_PATH = f"labels/{LABELS_NAME}"
# Channels of the image with the RGB slide: (label, colour of napari's colormap black -> colour).
RGB_CHANNELS = (("nucleus probability", "00FF00"), ("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
_INT32_MAX = np.iinfo(np.int32).max
# Blosc's clevel 2 is zstd level 3; its clevel 5 (zstd level 9) made 8 % smaller probability chunks for
# ten times the CPU (benchmarks/RESULTS.md).
_COMPRESSOR = BloscCodec(cname="zstd", clevel=2, shuffle="shuffle")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def level_shapes(shape: tuple[int, int], chunk: int, levels: int) -> list[tuple[int, int]]:
    """Shapes of up to ``levels`` pyramid levels, each half the previous (rounded up).

    A further level is added only while the previous one spans more than one chunk along some axis, so
    the smallest level fits in a single chunk and there is always at least one level.
    """
    shapes: list[tuple[int, int]] = [(int(shape[0]), int(shape[1]))]
    while len(shapes) < levels and max(shapes[-1]) > chunk:
        h, w = shapes[-1]
        shapes.append((ceil_div(h, 2), ceil_div(w, 2)))
    return shapes


def effective_chunk(shard: int, chunk: int) -> int:
    """Inner chunk edge: ``chunk`` if it divides ``shard``, else their greatest common divisor.

    Sharding requires the shard to be a whole number of chunks; the gcd is the largest edge that is both no
    bigger than requested and compatible with the caller's shard (the tile core).
    """
    if shard <= 0 or chunk <= 0:
        raise ValueError(f"shard ({shard}) and chunk ({chunk}) must be positive")
    return chunk if shard % chunk == 0 else math.gcd(shard, chunk)


def level_shard(shape: tuple[int, int], shard: int, chunk: int) -> tuple[int, int]:
    """Shard shape of one level: ``shard`` per axis, shrunk to the level (in whole chunks) when smaller."""
    height, width = (min(shard, ceil_div(s, chunk) * chunk) for s in shape)
    return height, width


def shard_boxes(shape: tuple[int, int], shard: tuple[int, int]) -> Iterator[Box]:
    """The shard-aligned boxes that tile an array of ``shape`` (row-major), cut at the right/bottom edge."""
    for y0 in range(0, shape[0], shard[0]):
        for x0 in range(0, shape[1], shard[1]):
            yield Box(y0, x0, min(y0 + shard[0], shape[0]), min(x0 + shard[1], shape[1]))


def check_shard_aligned(box: Box, shape: tuple[int, int], shard: tuple[int, int], what: str) -> None:
    """Raise ValueError unless ``box`` lies inside ``shape`` and covers whole shards only."""
    if box.is_empty() or box.y0 < 0 or box.x0 < 0 or box.y1 > shape[0] or box.x1 > shape[1]:
        raise ValueError(f"{what}: box {box} is empty or outside the image {shape}")
    starts_ok = box.y0 % shard[0] == 0 and box.x0 % shard[1] == 0
    ends_ok = (box.y1 % shard[0] == 0 or box.y1 == shape[0]) and (box.x1 % shard[1] == 0 or box.x1 == shape[1])
    if not (starts_ok and ends_ok):
        raise ValueError(
            f"{what}: box {box} is not aligned to the {shard} shard grid; it would share a shard with another writer"
        )


def probability_to_uint8(values: np.ndarray) -> np.ndarray:
    """Probability in [0, 1] -> uint8 0..255 (rounded; NaN -> 0, out-of-range clipped). uint8 passes through."""
    if values.dtype == np.uint8:
        return values
    scaled = np.clip(np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def labels_to_int32(labels: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > _INT32_MAX):
        raise ValueError(f"{where}: label ids must lie in 0..{_INT32_MAX}")
    return labels.astype(np.int32, copy=False)


def mean_2x2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of a uint8 array, rounded half up; an odd last row/column averages the pixels present."""
    h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    # Pairs of rows, then pairs of columns: strided sums, 30x faster than summing a 4-d reshape.
    sums = np.add(block[0::2], block[1::2], dtype=np.uint16)
    sums = sums[:, 0::2] + sums[:, 1::2]
    sums += np.uint16(2)
    sums >>= 2
    return sums.astype(np.uint8)


def nearest_2x2(block: np.ndarray) -> np.ndarray:
    """Top-left pixel of every 2x2 block (labels must never be blended)."""
    return block[::2, ::2]


_DOWNSAMPLERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"mean": mean_2x2, "nearest": nearest_2x2}


def _stamp(path: Path) -> tuple[int, int]:
    """Identity of a zarr metadata file (inode, modification time): a store made again is a new key."""
    status = (path / "zarr.json").stat()
    return status.st_ino, status.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _cached_array(root: str, path: str, stamp: tuple[int, int]) -> zarr.Array:
    return zarr.open_array(store=root, path=path, mode="r+")


def open_array(root: str, path: str) -> zarr.Array:
    """A level array of a store, opened once per process: the many small writing tasks of a slide each
    wrote into it after reading its metadata again (about 10 ms a task)."""
    return _cached_array(root, path, _stamp(Path(root) / path))


def downsample_shard(root: str, group: str, level: int, method: str, box: tuple[int, int, int, int]) -> None:
    """Fill one destination shard ``box`` of ``group/level`` from ``group/level-1``.

    Module-level and argument-only so that process pools and dask can run it; reads at most the 2x2
    source shards under the destination shard.
    """
    dst_box = Box(*box)
    prefix = f"{group}/" if group else ""
    src = open_array(root, f"{prefix}{level - 1}")
    dst = open_array(root, f"{prefix}{level}")
    height, width = src.shape[-2:]
    src_box = Box(2 * dst_box.y0, 2 * dst_box.x0, min(2 * dst_box.y1, height), min(2 * dst_box.x1, width))
    down = _DOWNSAMPLERS[method]
    if src.ndim == 3:  # (c, y, x): every channel of the shard in one write
        block = np.asarray(src[(slice(None), *src_box.slices())])
        dst[(slice(None), *dst_box.slices())] = np.stack([down(channel) for channel in block])
    else:
        dst[dst_box.slices()] = down(np.asarray(src[src_box.slices()]))


def downsample_shard_after(prerequisites: list, root: str, group: str, level: int, method: str, box: tuple) -> None:
    """:func:`downsample_shard` as a task that waits for ``prerequisites`` (task results, ignored):
    the writes of the level above, so levels of the image and the labels can be built side by side."""
    downsample_shard(root, group, level, method, box)


def _axes(channels: bool = False) -> list[dict]:
    space = [{"name": axis, "type": "space", "unit": "micrometer"} for axis in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def _datasets(levels: int, pixel_um: float, centred: bool, channels: bool = False) -> list[dict]:
    datasets = []
    lead = [1.0] if channels else []
    for i in range(levels):
        scale = pixel_um * 2**i
        shift = (2**i - 1) / 2 * pixel_um if centred else 0.0
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [*lead, scale, scale]},
                    {"type": "translation", "translation": [*[0.0] * len(lead), shift, shift]},
                ],
            }
        )
    return datasets


def _omero(name: str) -> dict:
    """Channel names, colours and display windows (napari and OMERO read them)."""
    channels = [
        {"label": label, "color": colour, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
        for label, colour in RGB_CHANNELS
    ]
    return {"name": name, "channels": channels, "rdefs": {"model": "color"}}


def _multiscales(
    name: str, levels: int, pixel_um: float, method: str, description: str, channels: bool = False
) -> list[dict]:
    return [
        {
            "name": name,
            "axes": _axes(channels),
            "datasets": _datasets(levels, pixel_um, centred=(method == "mean"), channels=channels),
            "type": method,
            "metadata": {"description": description, "method": "2x2 " + method + " per level"},
        }
    ]


class OmeZarrWriter:
    """Create an OME-Zarr 0.5 probability image with a ``labels/nuclei`` pyramid, and fill it.

    ``shape``: level-0 (H, W) in model pixels; ``pixel_um``: micrometres per model pixel; ``shard``: shard
    edge at level 0 (the tile core edge, so each tile core is a whole number of shards); ``chunk``: inner
    chunk edge, replaced by gcd(shard, chunk) when it does not divide ``shard``; ``levels``: requested
    pyramid depth (fewer when a level already fits one chunk). ``overwrite=False`` refuses an existing path.
    ``rgb``: the image also holds the RGB slide (channels 1-3, see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, int],
        pixel_um: float,
        shard: int,
        chunk: int,
        levels: int,
        name: str,
        overwrite: bool = False,
        rgb: bool = False,
    ) -> None:
        self.path = Path(path)
        self.rgb = bool(rgb)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{self.path}: image shape must be two positive sizes, got {shape}")
        if not pixel_um > 0 or levels < 1:
            raise ValueError(f"{self.path}: pixel_um ({pixel_um}) must be positive and levels ({levels}) >= 1")
        self.chunk = effective_chunk(shard, chunk)
        self.shard = shard
        self.pixel_um = float(pixel_um)
        self.name = name
        self.shapes = level_shapes(shape, self.chunk, levels)
        if self.path.exists():
            if not overwrite:
                raise OutputError(f"{self.path}: already exists (pass overwrite to replace it)")
            if self.path.is_dir():
                shutil.rmtree(self.path)
            else:
                self.path.unlink()
        try:
            self._create()
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create OME-Zarr store ({exc.strerror or exc})") from None

    @classmethod
    def open(cls, path: str | os.PathLike) -> OmeZarrWriter:
        """Attach to a store made by this class (e.g. in another process) to write into it; the store's
        description is read once per process (again only if the store is made anew)."""
        path = Path(path)
        try:
            stamp = _stamp(path)
        except OSError as exc:
            raise OutputError(f"{path}: not an OME-Zarr store written by wsi-grunet ({exc})") from None
        return _open_writer(str(path), stamp)

    @classmethod
    def _read(cls, path: str) -> OmeZarrWriter:
        self = cls.__new__(cls)
        self.path = Path(path)
        try:
            root = zarr.open_group(store=str(self.path), mode="r")
            ome: Any = root.attrs["ome"]
            ms: Any = ome["multiscales"][0]
            level0 = root["0"]
            if not isinstance(level0, zarr.Array):
                raise ValueError("0 is not an array")
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise OutputError(f"{self.path}: not an OME-Zarr store written by wsi-grunet ({exc})") from None
        self.name = ms.get("name", "")
        self.rgb = level0.ndim == 3
        self.pixel_um = float(ms["datasets"][0]["coordinateTransformations"][0]["scale"][-1])
        self.chunk = int(level0.chunks[-1])
        self.shard = int(level0.shards[-1]) if level0.shards else self.chunk
        shapes = [root[d["path"]].shape[-2:] for d in ms["datasets"]]  # type: ignore[union-attr]
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        return self

    def __reduce__(self):
        # Pickle as a re-open of the path, never the zarr handles: one instance per worker process.
        return (OmeZarrWriter.open, (str(self.path),))

    @property
    def levels(self) -> int:
        return len(self.shapes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.shapes[0]

    def shard_shape(self, level: int = 0) -> tuple[int, int]:
        return level_shard(self.shapes[level], self.shard, self.chunk)

    def shard_boxes(self, level: int = 0) -> list[Box]:
        """Shard-aligned boxes covering ``level``: the unit of work for one writer."""
        return list(shard_boxes(self.shapes[level], self.shard_shape(level)))

    def _create(self) -> None:
        description = "nucleus probability; value = round(p * 255)"
        if self.rgb:
            description = (
                "c = 0: nucleus probability, value = round(p * 255); c = 1, 2, 3: the slide's red, green, blue"
            )
        ome: dict = {
            "version": OME_VERSION,
            "multiscales": _multiscales(self.name, self.levels, self.pixel_um, "mean", description, channels=self.rgb),
        }
        if self.rgb:
            ome["omero"] = _omero(self.name)
        root = zarr.create_group(store=str(self.path), zarr_format=3, attributes={"ome": ome})
        labels = root.create_group("labels", attributes={"ome": {"version": OME_VERSION, "labels": [LABELS_NAME]}})
        nuclei = labels.create_group(
            LABELS_NAME,
            attributes={
                "ome": {
                    "version": OME_VERSION,
                    "multiscales": _multiscales(
                        LABELS_NAME, self.levels, self.pixel_um, "nearest", "nucleus instance ids; 0 = background"
                    ),
                    "image-label": {
                        "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
                        "source": {"image": "../../"},
                    },
                }
            },
        )
        lead: tuple[int, ...] = (len(RGB_CHANNELS),) if self.rgb else ()
        for group, dtype, channels in ((root, np.uint8, lead), (nuclei, np.int32, ())):
            for level, shape in enumerate(self.shapes):
                group.create_array(
                    name=str(level),
                    shape=(*channels, *shape),
                    dtype=dtype,
                    chunks=(*[1] * len(channels), self.chunk, self.chunk),  # one channel per chunk
                    shards=(*channels, *self.shard_shape(level)),  # all channels of a region in one shard
                    compressors=_COMPRESSOR,
                    fill_value=0,
                    dimension_names=("c", "y", "x") if channels else ("y", "x"),
                )

    def _write(self, array_path: str, box: Box, values: np.ndarray, what: str) -> None:
        check_shard_aligned(box, self.shape, self.shard_shape(0), f"{self.path}: {what}")
        if values.shape[-2:] != box.shape:
            raise ValueError(f"{self.path}: {what} values {values.shape} do not match box {box.shape}")
        array = open_array(str(self.path), array_path)
        region = (slice(None), *box.slices()) if values.ndim == 3 else box.slices()
        try:
            array[region] = values
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write {what} ({exc.strerror or exc})") from None

    def write_probability(self, box: Box, values: np.ndarray, rgb: np.ndarray | None = None) -> None:
        """Write level-0 probability (float in [0, 1], or uint8 already scaled) for a shard-aligned box.

        A store with the RGB slide needs ``rgb`` (uint8 (H, W, 3) of the same box) in the same call: both
        go into the same shards, so they are written together by the one writer of those shards.
        """
        probability = probability_to_uint8(np.asarray(values))
        if not self.rgb:
            if rgb is not None:
                raise ValueError(f"{self.path}: this store has no RGB channels (create it with rgb=True)")
            self._write("0", box, probability, "probability")
            return
        if rgb is None:
            raise ValueError(f"{self.path}: this store holds the RGB slide: write the probability with its rgb")
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape != (*box.shape, 3):
            raise ValueError(f"{self.path}: rgb must be uint8 {(*box.shape, 3)}, got {rgb.dtype} {rgb.shape}")
        if probability.shape != box.shape:
            raise ValueError(f"{self.path}: probability values {probability.shape} do not match box {box.shape}")
        stacked = np.concatenate([probability[None], np.moveaxis(rgb, -1, 0)], axis=0)
        self._write("0", box, stacked, "probability and RGB")

    def write_labels(self, box: Box, labels: np.ndarray) -> None:
        """Write level-0 nucleus ids (non-negative, fit int32) for a shard-aligned box."""
        self._write(f"{LABELS_PATH}/0", box, labels_to_int32(np.asarray(labels), f"{self.path}: labels"), "labels")

    def pyramid_tasks(self, level: int) -> list[tuple[str, str, int, str, tuple[int, int, int, int]]]:
        """Arguments of :func:`downsample_shard` for every destination shard of ``level`` (image and labels)."""
        boxes = [(b.y0, b.x0, b.y1, b.x1) for b in self.shard_boxes(level)]
        root = str(self.path)
        return [(root, "", level, "mean", b) for b in boxes] + [(root, LABELS_PATH, level, "nearest", b) for b in boxes]

    def build_pyramid(self, executor: Executor | None = None) -> None:
        """Compute levels 1..L-1, each from the level above, one task per destination shard.

        ``executor``: any ``concurrent.futures.Executor`` (a process pool, or a dask client's
        ``get_executor()``); None runs serially. Levels are built in order; a task holds at most one
        destination shard and its source region in memory.
        """
        for level in range(1, self.levels):
            tasks = self.pyramid_tasks(level)
            if executor is None:
                for args in tasks:
                    downsample_shard(*args)
            else:
                # list() waits for the level and re-raises the first task error.
                list(executor.map(downsample_shard, *zip(*tasks)))


@functools.lru_cache(maxsize=8)
def _open_writer(path: str, stamp: tuple[int, int]) -> OmeZarrWriter:
    return OmeZarrWriter._read(path)
