"""Stage 1 of a slide: the plan. What will be read, at which scale, and which tiles hold tissue.

The plan is small, frozen and saved as ``plan.json`` in the slide's work folder, so the inference and
finishing stages (possibly on other processes) work from one description instead of recomputing it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .slide.reader import SlideReader, open_reader_cached
from .slide.tissue import tile_has_tissue, tissue_mask
from .tiling import Tile, grid_shape, plan_tiles


@dataclass(frozen=True)
class SlidePlan:
    slide: str  # path of the slide file
    name: str  # output name (unique within a run; may hold "/" to mirror the input tree)
    model_mpp: float  # microns per model pixel
    mpp_override: float | None  # --mpp given for the slide, if any
    slide_mpp: float  # microns per level-0 pixel actually used
    level0_per_model: float  # level-0 pixels per model pixel
    model_shape: tuple[int, int]  # slide size in model pixels (height, width)
    tile_size: int
    halo: int
    tissue_tiles: tuple[int, ...]  # indices of the tiles that are run, in index order
    slide_info: dict[str, Any]  # what the reader found (levels, vendor, ...)

    def all_tiles(self) -> list[Tile]:
        return plan_tiles(self.model_shape, self.tile_size, self.halo)

    def tiles_to_run(self) -> list[Tile]:
        keep = set(self.tissue_tiles)
        return [tile for tile in self.all_tiles() if tile.index in keep]

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.model_shape, self.tile_size, self.halo)

    @property
    def core(self) -> int:
        return self.tile_size - 2 * self.halo

    def reader_args(self) -> tuple[str, float, float | None]:
        """Arguments of ``open_reader_cached`` on any process that sees the slide."""
        return self.slide, self.model_mpp, self.mpp_override

    def open_reader(self) -> SlideReader:
        return open_reader_cached(*self.reader_args())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> SlidePlan:
        data = json.loads(path.read_text())
        data["model_shape"] = (int(data["model_shape"][0]), int(data["model_shape"][1]))
        data["tissue_tiles"] = tuple(data["tissue_tiles"])
        return cls(**data)


def plan_slide(slide: str | Path, name: str, cfg: RunConfig, model_mpp: float) -> tuple[SlidePlan, np.ndarray, float]:
    """Open the slide, find its tissue and plan its tiles. Returns the plan and the tissue thumbnail
    (RGB, and its microns per pixel) for the preview. Raises SlideError for unusable slides."""
    with SlideReader(slide, model_mpp, cfg.slide.mpp) as reader:  # fresh handle: the file may be new
        tiles = plan_tiles(reader.model_shape, cfg.tiling.tile_size, cfg.tiling.halo)
        thumb, thumb_um = reader.thumbnail(cfg.tissue.thumbnail_mpp)
    if cfg.tissue.enabled:
        mask = tissue_mask(thumb, thumb_um, cfg.tissue)
        tiles = [t for t in tiles if tile_has_tissue(mask, thumb_um, t.read, reader.model_mpp)]
    plan = SlidePlan(
        slide=str(slide),
        name=name,
        model_mpp=reader.model_mpp,
        mpp_override=reader.mpp_override,
        slide_mpp=reader.slide_mpp,
        level0_per_model=reader.level0_per_model,
        model_shape=(int(reader.model_shape[0]), int(reader.model_shape[1])),
        tile_size=cfg.tiling.tile_size,
        halo=cfg.tiling.halo,
        tissue_tiles=tuple(t.index for t in tiles),
        slide_info=reader.info.to_dict(),
    )
    return plan, thumb, thumb_um
