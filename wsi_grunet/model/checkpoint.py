"""Checkpoints without pickle: ``<name>.safetensors`` (tensors only) + ``<name>.json`` (metadata).

Loading reads tensors with safetensors and metadata with ``json``; nothing in either file can execute
code. The JSON records everything needed to use the weights: architecture, the microns per pixel the
model was trained at, patch size, threshold and post-processing parameters, training data, version and
the SHA-256 of the tensor file (checked on load).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError
from .grunet import GRUNet, GRUNetConfig

FORMAT_NAME = "wsi-grunet-checkpoint"
FORMAT_VERSION = 1
PACKAGED_DIR = Path(__file__).resolve().parent.parent / "weights"
PACKAGED_NAME = "grunet_default"
REQUIRED_KEYS = ("format", "format_version", "architecture", "mpp", "patch_size", "threshold", "trained", "sha256")


@dataclass
class ModelBundle:
    """A model ready for inference plus the metadata that says how to use it."""

    model: GRUNet
    metadata: dict[str, Any]
    source: str  # path of the weights, or "untrained (random initialisation)"
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return bool(self.metadata.get("trained"))

    @property
    def mpp(self) -> float:
        return float(self.metadata["mpp"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def status_line(self) -> str:
        if self.source == "null-model":
            return "NULL MODEL (colour deconvolution stand-in, not GRU-Net): for benchmarking the pipeline only"
        if self.trained:
            return f"GRU-Net weights {self.source} (sha256 {str(self.sha256)[:12]}, {self.mpp} um/px)"
        return "UNTRAINED GRU-Net (random weights): outputs are not meaningful nucleus segmentations"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_stem(path: str | Path) -> Path:
    """``x.safetensors``, ``x.json`` or ``x`` -> ``x``. Other dots belong to the name: ``grunet_v1.5``
    stays ``grunet_v1.5`` (its files ``grunet_v1.5.safetensors``, never ``grunet_v1.safetensors``)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """Accept ``x.safetensors``, ``x.json`` or ``x``; return both file paths."""
    stem = checkpoint_stem(path)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(path: str | Path, model: GRUNet, metadata: dict[str, Any], half: bool = True) -> Path:
    """Write tensors and metadata atomically (temporary names, then rename). Returns the tensor path.

    ``half`` stores floating-point weights with many elements in float16 (BN statistics and small
    tensors stay float32): a full-width model is then about 50 MB.
    """
    tensor_path, json_path = checkpoint_paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point() and value.numel() >= 4096 and "running" not in name:
            value = value.half()
        tensors[name] = value
    tmp_tensor = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file(tensors, str(tmp_tensor))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wsi_grunet_version": __version__,
        **metadata,
        "architecture": {"name": "grunet", **model.config.to_dict()},
        "sha256": _sha256(tmp_tensor),
    }
    tmp_json = json_path.with_name(json_path.name + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_tensor, tensor_path)
    os.replace(tmp_json, json_path)
    return tensor_path


def read_metadata(path: str | Path) -> dict[str, Any]:
    _, json_path = checkpoint_paths(path)
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{json_path}: checkpoint metadata file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: not a valid checkpoint metadata file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{json_path}: not a wsi-grunet checkpoint (format is not {FORMAT_NAME!r})")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{json_path}: checkpoint metadata lacks {', '.join(missing)}")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{json_path}: format_version must be an integer, got {version!r}")
    for key in ("mpp", "threshold"):  # used as numbers far from here: refuse nonsense early
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise CheckpointError(f"{json_path}: {key} must be a non-negative number, got {value!r}")
    if not meta["mpp"] > 0:
        raise CheckpointError(f"{json_path}: mpp must be positive, got {meta['mpp']!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format {meta['format_version']} is newer than this wsi-grunet supports"
        )
    return meta


def architecture_from_metadata(meta: dict[str, Any], where: str) -> GRUNetConfig:
    if not isinstance(meta["architecture"], dict):
        raise CheckpointError(f"{where}: architecture must be a mapping, got {meta['architecture']!r}")
    arch = dict(meta["architecture"])
    if arch.pop("name", None) != "grunet":
        raise CheckpointError(f"{where}: unknown architecture {meta['architecture'].get('name')!r}")
    try:
        return GRUNetConfig(**arch)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid architecture settings ({exc})") from None


def load_checkpoint(path: str | Path, verify_hash: bool = True) -> ModelBundle:
    """Load a checkpoint into a GRU-Net in eval mode (on CPU). Never executes code from the files."""
    tensor_path, json_path = checkpoint_paths(path)
    meta = read_metadata(json_path)
    if not tensor_path.exists():
        raise CheckpointError(f"{tensor_path}: checkpoint tensor file is missing")
    digest = _sha256(tensor_path)
    if verify_hash and meta["sha256"] != digest:
        raise CheckpointError(
            f"{tensor_path}: SHA-256 does not match {json_path.name}; the file is damaged or replaced"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path}: not a valid safetensors file ({exc})") from None
    config = architecture_from_metadata(meta, str(json_path))
    try:
        model = GRUNet(config)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a width that is not a positive integer
        raise CheckpointError(f"{json_path}: cannot build the architecture it describes ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{tensor_path}: tensors do not match the architecture in {json_path.name} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{tensor_path}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.eval()
    return ModelBundle(model=model, metadata=meta, source=str(tensor_path), sha256=digest)


def packaged_weights() -> Path | None:
    tensor_path, json_path = checkpoint_paths(PACKAGED_DIR / PACKAGED_NAME)
    return tensor_path if tensor_path.exists() and json_path.exists() else None


def untrained_bundle(config: GRUNetConfig | None = None, mpp: float = 0.5, seed: int = 0) -> ModelBundle:
    """A randomly initialised GRU-Net, clearly marked untrained (used when no weights exist)."""
    torch.manual_seed(seed)
    model = GRUNet(config or GRUNetConfig()).eval()
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "mpp": mpp,
        "patch_size": 256,
        "threshold": 0.5,
        "trained": False,
        "architecture": {"name": "grunet", **model.config.to_dict()},
        "postprocess": {},
        "training": None,
    }
    return ModelBundle(model=model, metadata=meta, source="untrained (random initialisation)")


NULL_MODEL = "null-model"


def null_model_bundle(mpp: float = 0.5) -> ModelBundle:
    """The cheap colour-deconvolution stand-in for the network (benchmarks of the non-model path)."""
    meta = {"mpp": mpp, "threshold": 0.5, "trained": False, "architecture": {"name": NULL_MODEL}, "postprocess": {}}
    return ModelBundle(model=None, metadata=meta, source=NULL_MODEL, sha256=NULL_MODEL)  # type: ignore[arg-type]


def resolve_weights(weights: str | None) -> ModelBundle:
    """``None``: the packaged default (or an untrained model when none is packaged); "untrained";
    "null-model" (not a network: haematoxylin-based probabilities); else a checkpoint path."""
    if weights == NULL_MODEL:
        return null_model_bundle()
    if weights is None:
        packaged = packaged_weights()
        return load_checkpoint(packaged) if packaged else untrained_bundle()
    if weights == "untrained":
        return untrained_bundle()
    return load_checkpoint(weights)
