"""Run configuration: frozen dataclasses filled from YAML files in ``configs/`` and CLI overrides.

Every value has a default here; ``configs/default.yaml`` spells the same defaults out for users to
copy. Unknown keys are rejected so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

def config_file(name: str) -> Path:
    """A file of ``configs/``: the source tree's when running from it, else the installed copy."""
    source = Path(__file__).resolve().parent.parent / "configs" / name
    return source if source.exists() else Path(__file__).resolve().parent / "configs" / name


DEFAULT_CONFIG_PATH = config_file("default.yaml")


@dataclass(frozen=True)
class ModelOptions:
    weights: str | None = None  # None: the weights packaged with wsi-grunet
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 8
    amp: str = "bf16"  # bf16 | fp16 | off (autocast is used on CUDA only)
    channels_last: bool = False


@dataclass(frozen=True)
class SlideOptions:
    mpp: float | None = None  # overrides the slide's own microns per pixel


@dataclass(frozen=True)
class TilingOptions:
    tile_size: int = 1152  # model pixels read per tile, halo included (core 1024)
    halo: int = 64  # model pixels of context on each side of a tile's core

    def __post_init__(self) -> None:
        if self.halo < 0 or self.halo % 16 or self.tile_size % 16:
            raise ConfigError("tiling.tile_size and tiling.halo must be non-negative multiples of 16")
        if self.tile_size - 2 * self.halo < 16:
            raise ConfigError(
                f"tiling.tile_size ({self.tile_size}) must exceed twice the halo ({self.halo}) by 16 or more"
            )

    @property
    def core(self) -> int:
        return self.tile_size - 2 * self.halo


@dataclass(frozen=True)
class TissueOptions:
    enabled: bool = True
    thumbnail_mpp: float = 8.0  # resolution the tissue mask is computed at
    min_region_um2: float = 20000.0  # tissue specks smaller than this are ignored
    dilation_um: float = 64.0  # margin kept around detected tissue


@dataclass(frozen=True)
class PostprocessOptions:
    """``None`` means: use the value stored with the model weights (tuned on validation data)."""

    threshold: float | None = None
    min_area_um2: float | None = None
    marker_threshold: float | None = None
    marker_min_distance_um: float | None = None
    compactness: float | None = None


@dataclass(frozen=True)
class ClusterOptions:
    scheduler: str | None = None  # address of an existing dask scheduler; None starts a local cluster
    workers: int = 2  # CPU worker processes of the local cluster
    threads_per_worker: int = 1
    tiles_in_flight: int = 32  # bound on tiles read but not yet post-processed (memory cap)


@dataclass(frozen=True)
class OutputOptions:
    chunk: int = 256  # zarr chunk edge (pixels at model resolution)
    preview_max_px: int = 2048
    overwrite: bool = False  # False: a slide whose finished results exist is skipped
    pyramid_levels: int = 4


@dataclass(frozen=True)
class RunConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    slide: SlideOptions = field(default_factory=SlideOptions)
    tiling: TilingOptions = field(default_factory=TilingOptions)
    tissue: TissueOptions = field(default_factory=TissueOptions)
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a dataclass field annotation (ints are accepted as floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) frozen dataclass from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = build_dataclass(annotation, value or {}, key)
        else:
            kwargs[name] = _coerce(value, annotation, key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into ``{"section": {"key": value}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    result: dict[str, Any] = {}
    node = result
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections")
    return data


def load_config(path: Path | str | None = None, overrides: list[dict[str, Any]] | None = None) -> RunConfig:
    """Defaults <- ``configs/default.yaml`` (when present) <- ``path`` <- overrides, in that order."""
    data: dict[str, Any] = {}
    if DEFAULT_CONFIG_PATH.exists():
        data = read_yaml(DEFAULT_CONFIG_PATH)
    if path is not None:
        data = _deep_merge(data, read_yaml(Path(path)))
    for override in overrides or []:
        data = _deep_merge(data, override)
    where = str(path) if path is not None else ""
    return build_dataclass(RunConfig, data, where)


TRAIN_CONFIG_PATH = config_file("train.yaml")


@dataclass(frozen=True)
class TrainConfig:
    mpp: float = 0.5
    crop: int = 256
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 20000
    max_minutes: float | None = None
    val_every: int = 250
    seed: int = 0
    base_filters: int = 32
    attention_width: int = 256
    aux_distance_head: bool = False
    distance_weight: float = 1.0
    amp: str = "bf16"
    colour_jitter: float = 0.05
    device: str = "auto"


def load_train_config(path: str | Path | None, overrides: list[dict[str, Any]] | None = None) -> TrainConfig:
    data: dict[str, Any] = read_yaml(TRAIN_CONFIG_PATH) if TRAIN_CONFIG_PATH.exists() else {}
    if path is not None:
        data.update(read_yaml(Path(path)))
    for override in overrides or []:
        data.update(override)
    return build_dataclass(TrainConfig, data, str(path or "train config"))
