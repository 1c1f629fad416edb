"""Batched GRU-Net inference on one device: uint8 RGB tiles in, probability maps out."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from .checkpoint import ModelBundle

log = logging.getLogger(__name__)


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but CUDA is not available")
    return device


class Predictor:
    """Owns the model on its device. Not thread-safe: one predictor per GPU lane."""

    def __init__(self, bundle: ModelBundle, device: str = "auto", amp: str = "bf16", channels_last: bool = False) -> None:
        self.bundle = bundle
        self.device = choose_device(device)
        self.model = bundle.model.to(self.device).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        if self.device.type != "cuda":
            self.amp_dtype = None  # autocast on CPU is slower than float32 for these convs
        self.has_distance = bundle.model.config.aux_distance_head

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``tiles``: uint8 (N, H, W, 3) RGB, H and W multiples of 16.

        Returns ``{"prob": float32 (N, H, W)}`` and, for models with the auxiliary head,
        ``"distance": float32 (N, H, W)`` in [0, 1].
        On CPU tiles run one at a time: a full-width GRU-Net holds several GB of activations per
        1152-pixel tile, so a batch would multiply peak memory for no speed gain.
        """
        if self.device.type == "cpu" and len(tiles) > 1:
            parts = [self._predict(tiles[i:i + 1]) for i in range(len(tiles))]
            return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return self._predict(tiles)

    @torch.inference_mode()
    def _predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self.model(batch)
        out = torch.sigmoid(logits.float()).cpu().numpy()
        result = {"prob": out[:, 0]}
        if self.has_distance:
            result["distance"] = out[:, 1]
        return result


def predict_image(predictor: Predictor, image: np.ndarray, pad_value: int = 255) -> dict[str, np.ndarray]:
    """Predict one image of any size in a single pass (padded to a multiple of 16, then cropped)."""
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % 16, (-width) % 16
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=pad_value)
    result = predictor.predict(padded[None])
    return {key: value[0, :height, :width] for key, value in result.items()}
