"""Nucleus instances for ordinary image files (tif, png, jpg), with the whole-slide post-processing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import ConfigError, OutputError, WsiGrunetError
from .geometry import Box
from .model.checkpoint import ModelBundle
from .model.predictor import Predictor, predict_image
from .postprocess import PostprocessParams, label_nuclei
from .tiling import plan_tiles
from .train.data import read_rgb, resample_image, resample_labels

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def predict_tiled(predictor: Predictor, image: np.ndarray, tile_size: int = 1152, halo: int = 64) -> dict[str, np.ndarray]:
    """Probability maps for an image of any size, with the slide pipeline's tiles (cores kept)."""
    height, width = image.shape[:2]
    if height <= tile_size and width <= tile_size:  # one pass, padded only to a multiple of 16
        return predict_image(predictor, image)
    maps: dict[str, np.ndarray] = {}
    for tile in plan_tiles((height, width), tile_size, halo):
        box = tile.read.intersect(Box(0, 0, height, width))
        patch = np.full((tile.read.height, tile.read.width, 3), 255, np.uint8)
        patch[box.relative_to(tile.read).slices()] = image[box.slices()]
        out = predictor.predict(patch[None])
        core = tile.core.relative_to(tile.read)
        for key, value in out.items():
            maps.setdefault(key, np.zeros((height, width), np.float32))[tile.core.slices()] = value[0][core.slices()]
    return maps


def segment_image(predictor: Predictor, image: np.ndarray, image_mpp: float, params: PostprocessParams,
                  tile_size: int = 1152, halo: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Labels (int32) and probability (float32) at the input image's own size."""
    bundle = predictor.bundle
    scaled = resample_image(image, image_mpp / bundle.mpp)
    maps = predict_tiled(predictor, scaled, tile_size, halo)
    labels = label_nuclei(maps["prob"], bundle.mpp, params, maps.get("distance"))
    if scaled.shape[:2] != image.shape[:2]:
        labels = resample_labels(labels, image.shape[:2])
        prob = np.asarray(Image.fromarray(maps["prob"]).resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR))
    else:
        prob = maps["prob"]
    return labels, prob


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


def segment_folder(images: Path, out_dir: Path, image_mpp: float, bundle: ModelBundle, params: PostprocessParams,
                   predictor: Predictor, save_probability: bool = False, progress: bool = True) -> list[dict]:
    """Write ``<stem>.png`` (uint16 labels, int32 as TIFF when over 65535 nuclei) per input image."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create output folder ({exc.strerror or exc})") from None
    results = []
    for path in tqdm(find_images(images), desc="segment", unit="image", disable=not progress):
        try:
            image = read_rgb(path)
        except (OSError, ValueError) as exc:
            results.append({"image": str(path), "status": "failed", "error": f"{path}: cannot read image ({exc})"})
            log.error("%s: cannot read image (%s)", path, exc)
            continue
        try:
            labels, prob = segment_image(predictor, image, image_mpp, params)
        except WsiGrunetError as exc:
            results.append({"image": str(path), "status": "failed", "error": str(exc)})
            continue
        if labels.max() <= np.iinfo(np.uint16).max:
            _save_png(labels.astype(np.uint16), out_dir / f"{path.stem}.png")
        else:
            import tifffile
            tifffile.imwrite(out_dir / f"{path.stem}.tif", labels.astype(np.int32))
        if save_probability:
            _save_png(np.round(prob * 255).astype(np.uint8), out_dir / f"{path.stem}_prob.png")
        results.append({"image": str(path), "status": "ok", "nuclei": int(labels.max())})
    return results
