"""GRU-Net as a TIAToolbox 2.x model, so TIAToolbox's own engines run it on a slide.

    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from wsi_grunet.interop.tiatoolbox_model import GRUNetTIAModel

    model = GRUNetTIAModel.from_weights()          # packaged weights, or a checkpoint path
    engine = SemanticSegmentor(model=model, batch_size=1, device="cpu")
    out = engine.run(["slide.svs"], patch_mode=False, ioconfig=model.ioconfig, save_dir="out/", output_type="zarr")

The engine reads patches of ``patch`` pixels at the model's microns per pixel and places the central
``patch - 2 * halo`` pixels of each output side by side (stride = output shape), the same core + halo
scheme as ``wsi-grunet run``. ``infer_batch`` returns two channels, background and nucleus probability
(channels-last), so TIAToolbox's argmax post-processing gives the nucleus mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from . import require_tiatoolbox

require_tiatoolbox()

from tiatoolbox.models.engine.io_config import IOSegmentorConfig  # noqa: E402
from tiatoolbox.models.models_abc import ModelABC  # noqa: E402

from ..config import DEFAULT_HALO, DEFAULT_TILE_SIZE  # noqa: E402
from ..model.checkpoint import ModelBundle, resolve_weights  # noqa: E402
from ..model.inference_form import fuse_for_inference  # noqa: E402

PYRAMID_STEP = 16  # GRU-Net pools four times: patch and halo must be multiples of 16


def io_config(mpp: float, patch: int = DEFAULT_TILE_SIZE, halo: int = DEFAULT_HALO) -> IOSegmentorConfig:
    """TIAToolbox IO config: ``patch`` px read at ``mpp``, the central ``patch - 2*halo`` px kept, no overlap."""
    if patch % PYRAMID_STEP or halo % PYRAMID_STEP:
        raise ValueError(f"patch ({patch}) and halo ({halo}) must be multiples of {PYRAMID_STEP}")
    core = patch - 2 * halo
    if core <= 0:
        raise ValueError(f"patch ({patch}) must be larger than twice the halo ({halo})")
    resolution = [{"units": "mpp", "resolution": float(mpp)}]
    return IOSegmentorConfig(
        input_resolutions=resolution,
        output_resolutions=[dict(r) for r in resolution],
        patch_input_shape=(patch, patch),
        patch_output_shape=(core, core),
        stride_shape=(core, core),
        save_resolution=dict(resolution[0]),
    )


def centre_crop(x: torch.Tensor, halo: int) -> torch.Tensor:
    """Drop ``halo`` pixels on every side of an (N, C, H, W) tensor."""
    return x[:, :, halo : x.shape[2] - halo, halo : x.shape[3] - halo] if halo else x


class GRUNetTIAModel(ModelABC):
    """A GRU-Net checkpoint under TIAToolbox's ``ModelABC`` contract (forward, infer_batch, preproc, postproc)."""

    def __init__(
        self,
        bundle: ModelBundle,
        patch: int = DEFAULT_TILE_SIZE,
        halo: int = DEFAULT_HALO,
        amp: str = "fp32",
        channels_last: bool = False,
        fuse: bool = True,
    ) -> None:
        super().__init__()
        if bundle.model is None:
            raise ValueError(f"model.weights: {bundle.source} is not a GRU-Net model; this needs network weights")
        # the same inference form wsi-grunet's predictor runs (model.fuse), so engines compare alike
        self.net = fuse_for_inference(bundle.model) if fuse else bundle.model.eval()
        self.halo = int(halo)
        self.mpp = bundle.mpp
        self.threshold = bundle.threshold
        self.source = bundle.source
        if amp not in ("fp32", "bf16"):
            raise ValueError(f"amp must be fp32 or bf16, not {amp!r}")
        self.amp = amp  # fp32 | bf16 (autocast on the model's device)
        self.channels_last = bool(channels_last)  # oneDNN's fast layout on CPU, as wsi-grunet's predictor uses
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.ioconfig = io_config(bundle.mpp, patch, halo)
        self.class_dict = {0: "background", 1: "nucleus"}

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, **kwargs: Any) -> GRUNetTIAModel:
        """``weights``: None (packaged), "untrained", or a ``.safetensors`` checkpoint (never unpickled)."""
        return cls(resolve_weights(None if weights is None else str(weights)), **kwargs)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(N, 3, H, W) float in [0, 1] -> nucleus logits (N, 1, H, W)."""
        return self.net(imgs)[:, :1]

    @staticmethod
    def infer_batch(model: torch.nn.Module, batch_data: np.ndarray | torch.Tensor, *, device: str) -> np.ndarray:
        """uint8 RGB patches (N, H, W, 3) -> float32 (N, H - 2*halo, W - 2*halo, 2): background, nucleus."""
        core = cast(GRUNetTIAModel, getattr(model, "module", model))  # unwrap DataParallel
        model.eval()
        imgs = torch.as_tensor(batch_data).to(device=device)
        imgs = imgs.permute(0, 3, 1, 2).float().div_(255.0)
        imgs = imgs.contiguous(memory_format=torch.channels_last if core.channels_last else torch.contiguous_format)
        autocast = torch.autocast(
            device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=core.amp == "bf16"
        )
        with torch.inference_mode(), autocast:
            prob = torch.sigmoid(model(imgs).float())
        prob = centre_crop(prob, core.halo)
        return torch.cat([1.0 - prob, prob], dim=1).permute(0, 2, 3, 1).cpu().numpy()

    @staticmethod
    def preproc(image: np.ndarray) -> np.ndarray:
        """Patches go to the network as read (RGB uint8); scaling to [0, 1] happens in ``infer_batch``."""
        return image

    @staticmethod
    def postproc(image: np.ndarray) -> np.ndarray:
        """(H, W, 2) probabilities -> nucleus mask (argmax, i.e. nucleus probability > 0.5)."""
        return np.argmax(image, axis=-1).astype(np.uint8)
