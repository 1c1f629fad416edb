"""Nucleus instances for ordinary image files (tif, png, jpg), with the whole-slide post-processing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .config import DEFAULT_HALO, DEFAULT_TILE_SIZE
from .errors import ConfigError, OutputError, WsiGrunetError
from .geometry import Box
from .model.checkpoint import ModelBundle
from .model.predictor import Predictor, predict_image
from .postprocess import PostprocessParams, label_nuclei
from .tiling import plan_tiles, same_shape_batches
from .train.data import read_rgb, resample_image, resample_labels

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def predict_tiled(
    predictor: Predictor,
    image: np.ndarray,
    tile_size: int = DEFAULT_TILE_SIZE,
    halo: int = DEFAULT_HALO,
    batch_size: int = 1,
) -> dict[str, np.ndarray]:
    """Probability maps for an image of any size, with the slide pipeline's tiles (cores kept)."""
    height, width = image.shape[:2]
    if height <= tile_size and width <= tile_size:  # one pass, padded only to a multiple of 16
        return predict_image(predictor, image)
    maps: dict[str, np.ndarray] = {}
    tiles = plan_tiles((height, width), tile_size, halo)
    for group in same_shape_batches(tiles, max(1, batch_size)):
        patches = np.full((len(group), *group[0].read.shape, 3), 255, np.uint8)
        for patch, tile in zip(patches, group):
            box = tile.read.intersect(Box(0, 0, height, width))
            patch[box.relative_to(tile.read).slices()] = image[box.slices()]
        out = predictor.predict(patches)
        for k, tile in enumerate(group):
            core = tile.core.relative_to(tile.read)
            for key, value in out.items():
                maps.setdefault(key, np.zeros((height, width), np.float32))[tile.core.slices()] = value[k][
                    core.slices()
                ]
    return maps


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a float map to ``shape`` (H, W), pixel centres aligned as in ``resample_image``:
    bilinear when enlarging, area-averaging when shrinking (no aliasing of thin structures)."""
    if values.shape == tuple(shape):
        return values.astype(np.float32, copy=False)
    shrink = shape[0] * shape[1] < values.shape[0] * values.shape[1]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    resized = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32)).resize((shape[1], shape[0]), method)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def predict_at_model_mpp(
    predictor: Predictor,
    image: np.ndarray,
    image_mpp: float,
    tile_size: int = DEFAULT_TILE_SIZE,
    halo: int = DEFAULT_HALO,
    batch_size: int = 1,
) -> dict[str, np.ndarray]:
    """The model's maps for ``image`` (at ``image_mpp``), at the model's resolution."""
    if not image_mpp > 0:
        raise ConfigError(f"--mpp must be a positive number of microns per pixel, got {image_mpp!r}")
    scaled = resample_image(image, image_mpp / predictor.bundle.mpp)
    return predict_tiled(predictor, scaled, tile_size, halo, batch_size)


def label_maps(
    maps: dict[str, np.ndarray],
    shape: tuple[int, int],
    image_mpp: float,
    model_mpp: float,
    params: PostprocessParams,
    at: str = "input",
) -> tuple[np.ndarray, np.ndarray]:
    """Instances and probability at the input image's ``shape`` from maps at model resolution.

    ``at="input"``: the probability (and distance) maps are resampled to the input first and the
    nuclei are found there, with the sizes in micrometres converted at ``image_mpp``: boundaries
    keep the input's detail. ``at="model"``: nuclei are found at model resolution and the labels
    are resampled (nearest neighbour), as in the slide pipeline.
    """
    if at == "input":
        prob = resize_map(maps["prob"], shape)
        distance = resize_map(maps["distance"], shape) if "distance" in maps else None
        return label_nuclei(prob, image_mpp, params, distance), prob
    if at != "model":
        raise ValueError(f"at must be 'input' or 'model', got {at!r}")
    labels = label_nuclei(maps["prob"], model_mpp, params, maps.get("distance"))
    return resample_labels(labels, shape), resize_map(maps["prob"], shape)


def segment_image(
    predictor: Predictor,
    image: np.ndarray,
    image_mpp: float,
    params: PostprocessParams,
    tile_size: int = DEFAULT_TILE_SIZE,
    halo: int = DEFAULT_HALO,
    batch_size: int = 1,
    at: str = "input",
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (int32) and probability (float32) at the input image's own size (see ``label_maps``)."""
    maps = predict_at_model_mpp(predictor, image, image_mpp, tile_size, halo, batch_size)
    return label_maps(maps, image.shape[:2], image_mpp, predictor.bundle.mpp, params, at)


def find_images(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such file or folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise ConfigError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def segment_folder(
    images: Path,
    out_dir: Path,
    image_mpp: float,
    bundle: ModelBundle,
    params: PostprocessParams,
    predictor: Predictor,
    save_probability: bool = False,
    progress: bool = True,
    tile_size: int = DEFAULT_TILE_SIZE,
    halo: int = DEFAULT_HALO,
    batch_size: int = 1,
) -> list[dict]:
    """Write ``<stem>.png`` (uint16 labels, int32 as TIFF when over 65535 nuclei) per input image.

    The model sees each image resampled to its own microns per pixel (in tiles of ``tile_size``
    with ``halo`` when larger than one tile); nuclei are found at the image's own resolution.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create output folder ({exc.strerror or exc})") from None
    results: list[dict[str, Any]] = []
    for path in tqdm(find_images(images), desc="segment", unit="image", disable=not progress):
        try:
            image = read_rgb(path)
        except (OSError, ValueError) as exc:
            results.append({"image": str(path), "status": "failed", "error": f"{path}: cannot read image ({exc})"})
            log.error("%s: cannot read image (%s)", path, exc)
            continue
        try:
            labels, prob = segment_image(predictor, image, image_mpp, params, tile_size, halo, batch_size)
        except WsiGrunetError as exc:
            results.append({"image": str(path), "status": "failed", "error": str(exc)})
            continue
        if labels.max() <= np.iinfo(np.uint16).max:
            _save_png(labels.astype(np.uint16), out_dir / f"{path.stem}.png")
        else:
            import tifffile

            tmp = out_dir / f"{path.stem}.partial.tif"
            tifffile.imwrite(tmp, labels.astype(np.int32))
            os.replace(tmp, out_dir / f"{path.stem}.tif")
        if save_probability:
            _save_png(np.round(prob * 255).astype(np.uint8), out_dir / f"{path.stem}_prob.png")
        results.append({"image": str(path), "status": "ok", "nuclei": int(labels.max())})
    return results
