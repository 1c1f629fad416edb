"""Annotated tiles: images + instance labels, resampled to the model's microns per pixel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from ..config import config_file
from ..errors import ConfigError

DATASETS_YAML = config_file("datasets.yaml")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_DIR_NAMES = ("labels_instance", "masks_instance_filled", "masks_instance")


@dataclass
class Sample:
    name: str
    dataset: str
    image: np.ndarray  # uint8 (H, W, 3) at the model's mpp
    labels: np.ndarray  # int32 (H, W) at the model's mpp, 0 = background
    split: str = "train"  # train | select (checkpoint selection, tuning) | report (reported numbers only)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    labels_dir: str
    mpp: float
    mpp_per_image: dict[str, float]
    validation: tuple[str, ...]
    licence: str
    report: tuple[str, ...] = ()  # validation images kept for reported numbers; the rest select and tune

    def split_of(self, stem: str) -> str:
        if stem in self.report:
            return "report"
        return "select" if stem in self.validation else "train"


def known_datasets() -> dict[str, Any]:
    if DATASETS_YAML.exists():
        return yaml.safe_load(DATASETS_YAML.read_text()) or {}
    return {}


def dataset_spec(folder: Path, labels_dir: str | None = None, mpp: float | None = None) -> DatasetSpec:
    """Describe a dataset folder from its own dataset.yaml, the known list, or the given options."""
    entry: dict[str, Any] = {}
    own = folder / "dataset.yaml"
    if own.exists():
        entry = yaml.safe_load(own.read_text()) or {}
    elif folder.name in known_datasets():
        entry = known_datasets()[folder.name]
    labels = labels_dir or entry.get("labels_dir")
    if labels is None:
        labels = next((d for d in LABEL_DIR_NAMES if (folder / d).is_dir()), None)
    if labels is None or not (folder / labels).is_dir():
        raise ConfigError(f"{folder}: no instance-label folder (looked for {labels or ', '.join(LABEL_DIR_NAMES)})")
    if not (folder / "images").is_dir():
        raise ConfigError(f"{folder}: no images/ folder")
    pixel = mpp if mpp is not None else entry.get("mpp")
    if pixel is None:
        raise ConfigError(f"{folder}: pixel size unknown; pass --mpp or add mpp to {own}")
    validation = tuple(str(v) for v in entry.get("validation") or ())
    report = tuple(str(v) for v in entry.get("report") or ())
    stray = sorted(set(report) - set(validation))
    if stray:
        raise ConfigError(
            f"{folder}: report images {', '.join(stray)} are not validation images "
            "(report must be a subset of validation)"
        )
    return DatasetSpec(
        name=folder.name,
        labels_dir=labels,
        mpp=float(pixel),
        mpp_per_image={str(k): float(v) for k, v in (entry.get("mpp_per_image") or {}).items()},
        validation=validation,
        licence=str(entry.get("licence", "unknown")),
        report=report,
    )


def resample_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale an RGB image by ``factor`` (output px per input px); area-averaging when shrinking."""
    if abs(factor - 1.0) < 1e-6:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resample = Image.Resampling.BOX if factor < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, resample))


def resample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image to ``shape`` (H, W) with pixel-centre alignment."""
    if labels.shape == tuple(shape):
        return labels.astype(np.int32, copy=False)
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(int), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]].astype(np.int32)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        im: Image.Image = opened
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return np.asarray(im.convert("RGB"))


def read_labels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int32)


def load_dataset(
    folder: Path, target_mpp: float, labels_dir: str | None = None, mpp: float | None = None
) -> tuple[list[Sample], list[Sample], DatasetSpec]:
    """Return (train, validation) samples of one dataset folder at ``target_mpp``.

    Validation samples carry ``split`` "select" or "report" (see ``DatasetSpec.report``)."""
    folder = Path(folder)
    spec = dataset_spec(folder, labels_dir, mpp)
    train: list[Sample] = []
    val: list[Sample] = []
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for image_path in images:
        label_path = next(
            (
                folder / spec.labels_dir / (image_path.stem + s)
                for s in (".png", ".tif", ".tiff")
                if (folder / spec.labels_dir / (image_path.stem + s)).exists()
            ),
            None,
        )
        if label_path is None:
            raise ConfigError(f"{image_path}: no label image in {folder / spec.labels_dir}")
        image = read_rgb(image_path)
        labels = read_labels(label_path)
        if labels.shape != image.shape[:2]:
            raise ConfigError(f"{label_path}: shape {labels.shape} differs from {image_path.name} {image.shape[:2]}")
        factor = spec.mpp_per_image.get(image_path.stem, spec.mpp) / target_mpp
        image = resample_image(image, factor)
        labels = resample_labels(labels, image.shape[:2])
        split = spec.split_of(image_path.stem)
        sample = Sample(name=image_path.stem, dataset=spec.name, image=image, labels=labels, split=split)
        (train if split == "train" else val).append(sample)
    return train, val, spec


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per-nucleus distance to background, normalised to 1 at each nucleus's centre (float32)."""
    out = np.zeros(labels.shape, np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        mask = labels[box] == index
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        if dist.max() > 0:
            out[box][mask] = (dist / dist.max())[mask]
    return out
