"""Batched GRU-Net inference on one device: uint8 RGB tiles in, probability maps out.

Speed settings resolve per device (``auto``): on a CPU with native bf16 (AVX-512 BF16 or AMX) the
model runs under bf16 autocast in channels-last layout, otherwise in float32 channels-last; on CUDA
under bf16 autocast in NCHW with cuDNN autotuning (a slide has at most four tile shapes).
Test-time augmentation (TTA) averages the probabilities over flips/rotations after undoing each one; every transform is
applied to every tile alike, so stitched slides stay independent of the tiling.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .checkpoint import ModelBundle
from .cpu_heap import heap_retained, retain_freed_memory
from .inference_form import fuse_for_inference

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
TTA_CHOICES = ("auto", "none", "flips", "rot4", "dihedral")
_AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# tta: auto, per device type (benchmarks/tta_and_resolution.py, README "Speed and accuracy settings").
# ``tta: auto`` per workload and device, chosen by measurement (README, "Test-time augmentation").
# Every transform is one more forward pass. Slides on a CPU: the model dominates the run time, so
# four passes would nearly quadruple it; none. Annotated images on a CPU: four passes cost seconds;
# the flips (+0.014 AJI on the report images). CUDA: post-processing on the CPU workers bounds
# throughput, and rot4 gained more than flips at the same cost.
AUTO_TTA = {"slides": {"cpu": "none", "cuda": "rot4"}, "images": {"cpu": "flips", "cuda": "rot4"}}


@dataclass(frozen=True)
class Transform:
    """One element of the dihedral group on the last two axes: ``k`` quarter turns, then an
    optional left-right flip. ``apply`` maps an image, ``undo`` maps the prediction back."""

    k: int = 0
    flip: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, self.k, dims=(-2, -1)) if self.k % 4 else x
        return torch.flip(x, dims=(-1,)) if self.flip else x

    def undo(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.flip(y, dims=(-1,)) if self.flip else y
        return torch.rot90(y, -self.k, dims=(-2, -1)) if self.k % 4 else y

    @property
    def name(self) -> str:
        return f"rot{90 * self.k}" + ("+hflip" if self.flip else "")


TTA_TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "none": (Transform(),),
    # identity, left-right, up-down (= half turn + left-right), both (= half turn)
    "flips": (Transform(), Transform(0, True), Transform(2, True), Transform(2)),
    "rot4": tuple(Transform(k) for k in range(4)),
    "dihedral": tuple(Transform(k, flip) for flip in (False, True) for k in range(4)),
}


def choose_device(requested: str = "auto", key: str = "model.device") -> torch.device:
    """``auto`` (CUDA when present) | ``cpu`` | ``cuda`` | ``cuda:N``; a ConfigError names ``key`` otherwise."""
    text = str(requested).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = text.split(":")
    if not (text == "cpu" or (parts[0] == "cuda" and (len(parts) == 1 or (len(parts) == 2 and parts[1].isdigit())))):
        raise ConfigError(f"{key}: {requested!r} is not a device; allowed: auto, cpu, cuda or cuda:N")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}: {requested!r} needs CUDA, which is not available here (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); allowed here: auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key}: {requested!r}: this machine has {count} CUDA device(s); allowed: cuda:0 to cuda:{count - 1}"
            )
    return device


# oneDNN's ISA caps below AVX512_CORE_BF16: with one of them bf16 is emulated whatever the CPU has
ISA_CAPS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU computes bf16 natively (x86 AVX-512 BF16 or AMX, Arm BF16).

    Without it oneDNN emulates bf16 and autocast is slower than float32, so ``amp: auto`` keeps
    float32 there. Non-Linux systems without /proc/cpuinfo are treated as lacking it, and so is a
    CPU whose instruction set oneDNN is told to stop short of bf16 (``ONEDNN_MAX_CPU_ISA``, e.g.
    ``AVX2`` to behave as an AVX2-only machine).
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper() in ISA_CAPS_WITHOUT_BF16:
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or cgroup allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parse_channels_last(value: Any) -> bool | None:
    """``auto`` -> None; true/false as bool or text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"model.channels_last must be auto, true or false, got {value!r}")


def _parse_amp(value: Any) -> str:
    text = str(value).strip().lower()
    text = {"off": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(text, text)
    if text not in AMP_CHOICES:
        raise ConfigError(f"model.amp must be one of {', '.join(AMP_CHOICES)}, got {value!r}")
    return text


def _parse_tta(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in TTA_CHOICES:
        raise ConfigError(f"model.tta must be one of {', '.join(TTA_CHOICES)}, got {value!r}")
    return text


def _parse_threads(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.threads must be a positive integer or null (all available cores), got {value!r}")
    return value


class Predictor:
    """Owns the model on its device. Not thread-safe: one predictor per GPU lane.

    ``amp``: auto | bf16 | fp16 | fp32 (autocast precision; fp32 = none); ``channels_last``: auto |
    True | False; ``tta``: auto | none | flips | rot4 | dihedral; ``threads``: CPU threads (None: the
    cores this process may use); ``workload``: slides | images, what ``tta: auto`` is chosen for;
    ``retain_heap``: on CPU, keep freed memory in the process heap (see ``cpu_heap``); ``fuse``: run
    the inference form of the network (see ``inference_form``; False: the layers as trained).
    ``auto`` values resolve for the device, see the module docstring.
    Unfused, the predictor takes the bundle's model over: it is moved to the device and layout in place.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        amp: str = "auto",
        channels_last: Any = "auto",
        tta: str = "none",
        threads: int | None = None,
        workload: str = "slides",
        retain_heap: bool = True,
        fuse: bool = True,
    ) -> None:
        if bundle.model is None:
            raise ConfigError(f"model.weights: {bundle.source} is not a GRU-Net model; this needs network weights")
        self.bundle = bundle
        self.device = choose_device(device)
        amp_choice, layout_choice = _parse_amp(amp), _parse_channels_last(channels_last)
        tta_choice, self.threads = _parse_tta(tta), _parse_threads(threads)
        self.native_bf16 = cpu_has_native_bf16() if self.device.type == "cpu" else None
        if self.device.type == "cpu":
            self.threads = self.threads or available_cores()
            torch.set_num_threads(self.threads)
            # 1.7x faster 1152-px passes, see cpu_heap; a process-wide setting, never undone
            self.heap_retained = retain_freed_memory() if retain_heap else heap_retained()
            if amp_choice == "auto":
                amp_choice = "bf16" if self.native_bf16 else "fp32"
            # channels-last is faster in both precisions on CPU (oneDNN's native layout)
            self.channels_last = True if layout_choice is None else layout_choice
        else:
            self.heap_retained = False
            if amp_choice == "auto":
                amp_choice = "bf16"
            # measured on an H200: channels-last was no faster, and slower at batch 32
            self.channels_last = False if layout_choice is None else layout_choice
            torch.backends.cudnn.benchmark = True  # few tile shapes per slide: autotune once per shape
        self.amp = amp_choice
        self.amp_dtype = _AMP_DTYPES[amp_choice]
        self.tta = AUTO_TTA[workload][self.device.type] if tta_choice == "auto" else tta_choice
        self.transforms = TTA_TRANSFORMS[self.tta]
        self.fused = bool(fuse)
        model = fuse_for_inference(bundle.model) if self.fused else bundle.model
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.has_distance = bundle.model.config.aux_distance_head
        self._pinned: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def from_options(cls, bundle: ModelBundle, options: Any, workload: str = "slides") -> Predictor:
        """Build from ``config.ModelOptions`` (device, amp, channels_last, tta, threads); ``workload``
        (slides | images) picks what ``tta: auto`` means."""
        return cls(
            bundle,
            device=getattr(options, "device", "auto"),
            amp=getattr(options, "amp", "auto"),
            channels_last=getattr(options, "channels_last", "auto"),
            tta=getattr(options, "tta", "none"),
            threads=getattr(options, "threads", None),
            workload=workload,
            retain_heap=getattr(options, "retain_heap", True),
            fuse=getattr(options, "fuse", True),
        )

    def describe(self) -> dict[str, Any]:
        """The resolved settings, for reports."""
        return {
            "device": str(self.device),
            "amp": "fp32" if self.amp_dtype is None else self.amp,
            "dtype": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "layout": "channels_last" if self.channels_last else "nchw",
            "tta": self.tta,
            "tta_passes": len(self.transforms),
            "threads": self.threads if self.device.type == "cpu" else None,
            "heap_retained": self.heap_retained,
            "fused": self.fused,
            "cpu_native_bf16": self.native_bf16,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if self.device.type == "cuda" else None,
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """``tiles``: uint8 (N, H, W, 3) RGB, H and W multiples of 16.

        Returns ``{"prob": float32 (N, H, W)}`` and, for models with the auxiliary head,
        ``"distance": float32 (N, H, W)`` in [0, 1]; with TTA the mean over the transforms.
        On CPU tiles run one at a time: a full-width GRU-Net holds several GB of activations per
        1152-pixel tile, so a batch would multiply peak memory for no speed gain.
        """
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be uint8 (N, H, W, 3), got {tiles.dtype} {tiles.shape}")
        if tiles.shape[1] % 16 or tiles.shape[2] % 16:
            raise ValueError(f"tile height and width must be multiples of 16, got {tiles.shape[1:3]}")
        if self.device.type == "cpu" and len(tiles) > 1:
            parts = [self._predict(tiles[i : i + 1]) for i in range(len(tiles))]
            return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return self._predict(tiles)

    def _to_device(self, tiles: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.type != "cuda":
            return host
        pinned = self._pinned.get(tiles.shape)
        if pinned is None:
            self._pinned.clear()  # one shape at a time in the pipeline; never hoard pinned memory
            pinned = self._pinned[tiles.shape] = torch.empty(tiles.shape, dtype=torch.uint8, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(self.device, non_blocking=True)

    def _passes(self, batch: torch.Tensor) -> Iterator[torch.Tensor]:
        """Sigmoid outputs (N, C, H, W) of each TTA transform, mapped back to the input frame.
        One transform at a time, so peak memory is that of a single pass."""
        for transform in self.transforms:
            x = transform.apply(batch)
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
            with self._autocast():
                logits = self.model(x)
            yield transform.undo(torch.sigmoid(logits.float()))

    @torch.inference_mode()
    def _predict(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._to_device(tiles).permute(0, 3, 1, 2).float().div_(255.0)
        total: torch.Tensor | None = None
        for out in self._passes(batch):
            total = out if total is None else total.add_(out)
        assert total is not None
        if len(self.transforms) > 1:
            total = total.div_(len(self.transforms))
        if self.device.type == "cuda":
            host = torch.empty(total.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(total, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            out_np = host.numpy()
        else:
            out_np = total.numpy()
        result = {"prob": np.ascontiguousarray(out_np[:, 0])}
        if self.has_distance:
            result["distance"] = np.ascontiguousarray(out_np[:, 1])
        return result


def predict_image(predictor: Predictor, image: np.ndarray, pad_value: int = 255) -> dict[str, np.ndarray]:
    """Predict one image of any size in a single pass (padded to a multiple of 16, then cropped)."""
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % 16, (-width) % 16
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=pad_value)
    result = predictor.predict(padded[None])
    return {key: value[0, :height, :width] for key, value in result.items()}
