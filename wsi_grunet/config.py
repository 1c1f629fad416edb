"""Run and training configuration: frozen dataclasses, validated when loaded.

The dataclasses below are the one place that holds the defaults; ``configs/default.yaml``,
``configs/cluster/slurm.yaml`` and ``configs/train.yaml`` spell the same values out for users to copy
(a test keeps them equal). Loading merges, in order: those files <- ``--config FILE`` <- command-line
overrides; then every key is checked for type, range and allowed values, and the sections against
each other, before any slide is touched. Unknown keys are rejected so that a typo never silently
falls back to a default. Errors name the dotted key, the value given and what is allowed, e.g.
``model.amp: 'fp33' is not one of auto, bf16, fp16, fp32``.

Field annotations say what a key accepts: ``int``, ``float`` (integers accepted), ``str``, ``bool``,
``typing.Literal[...]`` choices, ``X | None`` (YAML ``null``), unions such as ``bool | Literal["auto"]``,
and ``tuple[X, ...]`` / ``list[X]`` (a YAML list, or one comma-separated string). Ranges and other
checks sit in the field metadata (``min``, ``max``, ``gt``, ``lt``, ``multiple_of``, ``min_len``,
``unique``, ``check``), written with :func:`option`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "InvalidValue",
    "RunConfig",
    "TrainConfig",
    "SlurmOptions",
    "load_config",
    "load_train_config",
    "parse_override",
    "read_yaml",
    "build_dataclass",
    "config_file",
    "option",
]


def config_file(name: str) -> Path:
    """A file of ``configs/``: the source tree's when running from it, else the installed copy."""
    source = Path(__file__).resolve().parent.parent / "configs" / name
    return source if source.exists() else Path(__file__).resolve().parent / "configs" / name


DEFAULT_CONFIG_PATH = config_file("default.yaml")
SLURM_CONFIG_PATH = config_file("cluster/slurm.yaml")
TRAIN_CONFIG_PATH = config_file("train.yaml")


class InvalidValue(ConfigError):
    """A value fails its check; ``keys`` are the dotted keys involved (for naming where they were set)."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


# --- YAML ---------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans, so ``off``/``no``/``on``/``yes`` stay text (a bool
    field still accepts them, an ``amp: off`` is not silently ``false``); ``12:00:00`` stays text (no
    base-60 integers, it is a walltime); ``1e-6`` is a number; ``010`` is ten."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    return int(text, 16) if text.startswith("0x") else int(text)


_Loader.add_constructor(_INT, _construct_int)


# What parsing YAML text can raise besides YAMLError: PyYAML's constructors look up and compute on the
# text of a tagged scalar unchecked (``!!bool maybe``: KeyError, ``!!timestamp x``: AttributeError;
# TypeError and OverflowError are of the same kind), integers beyond Python's 4300-digit limit raise
# ValueError, text that is not UTF-8 UnicodeDecodeError (a ValueError), and nesting a thousand levels
# deep exhausts the parser's recursion.
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)


def yaml_load(text: str) -> Any:
    """Parse YAML text the way config files are read (see ``_Loader``); raises one of ``YAML_ERRORS``."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: BaseException) -> str:
    """One line saying why YAML text did not parse, and where (line and column of the text)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        parts = [p for p in (exc.context, exc.problem) if p]
        return f"{'; '.join(parts) or type(exc).__name__}{where}"
    if isinstance(exc, (KeyError, AttributeError, TypeError)):  # their text speaks of PyYAML's insides
        return "a value with an explicit tag (such as !!bool or !!timestamp) that does not fit the tag"
    return " ".join(re.sub(r'\s+in "<unicode string>",', " at", str(exc)).split()) or type(exc).__name__


def read_yaml(path: Path | str) -> dict[str, Any]:
    try:
        data = yaml_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except YAML_ERRORS as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys")
    return data


# --- field checks -------------------------------------------------------------------------------------


def option(
    default: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    multiple_of: int | None = None,
    min_len: int | None = None,
    unique: bool = False,
    check: Callable[[Any], str | None] | None = None,
    allowed: str | None = None,
) -> Any:
    """A dataclass field with checks: ``min``/``max`` inclusive, ``gt``/``lt`` exclusive bounds,
    ``multiple_of``, ``min_len``/``unique`` for lists, ``check(value) -> problem or None`` with
    ``allowed`` describing what it accepts."""
    meta = {
        "min": min,
        "max": max,
        "gt": gt,
        "lt": lt,
        "multiple_of": multiple_of,
        "min_len": min_len,
        "unique": unique,
        "check": check,
        "allowed": allowed,
    }
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None and v is not False})


# Values longer than this (in characters of repr) are abridged in error messages.
SHOWN_CHARACTERS = 300


class _Shown(reprlib.Repr):
    """repr() of a value for an error message, bounded: YAML aliases can nest a short text into a value
    whose full repr never ends (or is infinite, for a recursive alias), and repr() of an integer of
    more than 4300 digits raises."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxset, self.maxfrozenset, self.maxdict = 3, 6, 6, 6, 6, 6
        self.maxstring, self.maxother = SHOWN_CHARACTERS - 100, SHOWN_CHARACTERS - 100

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return repr(x)


_SHOWN = _Shown()


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = _SHOWN.repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."


def _key_text(key: Any) -> str:
    """A mapping key as written in a dotted key (YAML keys may be numbers, dates or null)."""
    return key if isinstance(key, str) else _show(key)


def _dotted_shown(dotted: str) -> str:
    """A dotted key for a message: as it is, or quoted where it is empty or holds spaces or odd characters."""
    return dotted if re.fullmatch(r"[\w.-]+", dotted) and not dotted.endswith(".") else _show(dotted)


def _range_text(meta: typing.Mapping[str, Any]) -> str:
    parts = []
    if "gt" in meta:
        parts.append(f"> {meta['gt']:g}")
    if "min" in meta:
        parts.append(f">= {meta['min']:g}")
    if "lt" in meta:
        parts.append(f"< {meta['lt']:g}")
    if "max" in meta:
        parts.append(f"<= {meta['max']:g}")
    if "multiple_of" in meta:
        parts.append(f"a multiple of {meta['multiple_of']}")
    return " and ".join(parts)


def _choices(annotation: Any) -> list[str] | None:
    """The literal spellings an annotation accepts, when it accepts only such (plus bool/None)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [_show(v) if not isinstance(v, str) else v for v in typing.get_args(annotation)]
    if annotation is bool:
        return ["true", "false"]
    if annotation is type(None):
        return ["null"]
    if origin in (typing.Union, types.UnionType):
        out: list[str] = []
        for option_ in typing.get_args(annotation):
            sub = _choices(option_)
            if sub is None:
                return None
            out += sub
        return out
    return None


def describe(annotation: Any, meta: typing.Mapping[str, Any] | None = None) -> str:
    """What an annotation (with its field checks) accepts, in words."""
    meta = meta or {}
    if "allowed" in meta:
        text = str(meta["allowed"])
        return text + (", or null" if _optional(annotation) else "")
    choices = _choices(annotation)
    if choices is not None:
        return "one of " + ", ".join(choices)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a, meta) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(parts) + (" or null" if _optional(annotation) else "")
    if origin in (list, tuple):
        return f"a list of {describe(typing.get_args(annotation)[0])}".replace("of one of", "of")
    names = {int: "an integer", float: "a number", str: "a string"}
    text = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = _range_text(meta)
    return f"{text} {bounds}" if bounds else text


def _optional(annotation: Any) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


class _TooLarge(InvalidValue):
    """A number of the right type, too large to use: a union says so rather than try its other types."""


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation; return it in the field's own type."""
    origin = typing.get_origin(annotation)
    wrong = InvalidValue(f"{key}: {_show(value)} is not {describe(annotation)}", key)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in typing.get_args(annotation):
                return None
            raise wrong
        # Literal spellings first, so "auto" is not read as a string or a bool word
        options = sorted(
            (a for a in typing.get_args(annotation) if a is not type(None)),
            key=lambda a: typing.get_origin(a) is not Literal,
        )
        for candidate in options:
            try:
                return _coerce(value, candidate, key)
            except _TooLarge:
                raise
            except InvalidValue:
                continue
        raise wrong
    if origin is Literal:
        for choice in typing.get_args(annotation):
            if type(value) is type(choice) and value == choice:
                return value
        raise InvalidValue(f"{key}: {_show(value)} is not {describe(annotation)}", key)
    if origin in (list, tuple):
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str):  # --set output.formats=zarr,geojson
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise wrong
        items = [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise wrong
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # numpy, torch and the OS take 64-bit integers
                raise _TooLarge(f"{key}: {_show(value)} is too large; allowed: {describe(annotation)}", key)
            return value
        raise wrong
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond the float range (about 1.8e308)
                raise _TooLarge(f"{key}: {_show(value)} is too large; allowed: {describe(annotation)}", key) from None
        raise wrong
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise InvalidValue(f"{key}: unsupported annotation {annotation!r}", key)


def _check_field(value: Any, annotation: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    """Ranges and custom checks from the field metadata (``None`` always passes: it was allowed by type)."""
    if value is None:
        return
    allowed = describe(annotation, meta)
    if isinstance(value, (list, tuple)):
        if "min_len" in meta and len(value) < meta["min_len"]:
            raise InvalidValue(
                f"{key}: {_show(list(value))} needs at least {meta['min_len']} item(s); allowed: {allowed}", key
            )
        if meta.get("unique") and len(set(value)) != len(value):
            raise InvalidValue(f"{key}: {_show(list(value))} names an item twice", key)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            # NaN passes no comparison, and no setting means "infinitely much" (null stands for "none")
            raise InvalidValue(f"{key}: {value} is not allowed; allowed: {allowed}", key)
        broken = (
            ("min" in meta and value < meta["min"])
            or ("max" in meta and value > meta["max"])
            or ("gt" in meta and value <= meta["gt"])
            or ("lt" in meta and value >= meta["lt"])
            or ("multiple_of" in meta and value % meta["multiple_of"])
        )
        if broken:
            raise InvalidValue(f"{key}: {_show(value)} is out of range; allowed: {allowed}", key)
    if "check" in meta:
        problem = meta["check"](value)
        if problem:
            raise InvalidValue(f"{key}: {_show(value)} {problem}; allowed: {allowed}", key)


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """Build a (nested) frozen dataclass from a mapping: unknown keys rejected, every value checked.

    ``where`` is the dotted prefix of the keys (empty for the top level).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidValue(f"{where or 'config'}: expected a mapping of keys, got {_show(data)}", where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(_key_text(k) for k in set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise InvalidValue(
            f"unknown key(s) {', '.join(_dotted_shown(prefix + k) for k in unknown)}; known keys"
            f"{' of ' + where if where else ''}: {', '.join(fields)}",
            *(prefix + k for k in unknown),
        )
    kwargs = {}
    for name, value in data.items():
        annotation, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = build_dataclass(typing.cast(type, annotation), value, key)
        else:
            kwargs[name] = _coerce(value, annotation, key)
            _check_field(kwargs[name], annotation, fields[name].metadata, key)
    return cls(**kwargs)


# torch keeps a device number in 8 bits: cuda:128 becomes cuda:-128, and a longer number does not parse
MAX_CUDA_INDEX = 127


def _device_problem(value: str) -> str | None:
    match = re.fullmatch(r"auto|cpu|cuda|cuda:([0-9]+)", value)  # ASCII digits: torch reads no others
    if match is None:
        return "is not a device"
    if match.group(1) is not None and int(match.group(1)) > MAX_CUDA_INDEX:
        return f"names a device number above {MAX_CUDA_INDEX}"
    return None


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


# --- run configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    weights: str | None = option(
        None,
        check=lambda v: "is empty" if not v.strip() else None,
        allowed="a checkpoint path, 'untrained' or 'null-model'",
    )  # None: packaged weights
    device: str = option("auto", check=_device_problem, allowed=DEVICE_CHOICES)
    batch_size: int = option(8, min=1)  # tiles per forward pass
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast precision; fp32: none
    channels_last: bool | Literal["auto"] = "auto"  # memory layout of the input batch
    threads: int | None = option(None, min=1)  # CPU threads of the model; None: the cores available
    tta: Literal["auto", "none", "flips", "rot4", "dihedral"] = "auto"  # test-time augmentation
    retain_heap: bool = True  # CPU: keep freed memory in the heap (1.7x faster passes, 1.2-2.4 GB more resident)
    fuse: bool = True  # run the inference form (BN folded, repeated CDRB inputs merged; same outputs, fewer ops)
    backend: Literal["driver", "workers"] = "driver"  # model in the driver process, or on GPU-resource workers


# Slide pixel sizes (um/px) at which nuclei can be resolved. Coarser than 2 um/px a nucleus (5-15 um
# across) covers a few pixels and its outline is gone, so upsampling to the model's pixel size yields
# blobs; finer than 0.1 um/px samples beyond what brightfield optics resolve (about 0.2 um with a 100x
# oil objective). A value outside is a mistake: a typo, a unit slip (nm or mm taken for um) or a
# scanner's default field, and running on it gives nonsense (one nucleus the size of the tissue).
RESOLVABLE_MPP = (0.1, 2.0)


def pixel_size_problem(mpp: float) -> str | None:
    """Why a slide pixel size (um/px) cannot be worked at, or None. The one rule for ``--mpp`` and for
    the pixel size a slide's metadata gives (``slide.resample.slide_pixel_size``)."""
    low, high = RESOLVABLE_MPP
    if low <= mpp <= high:
        return None
    return f"is outside {low:g}-{high:g} um/px, where nuclei can be resolved"


@dataclass(frozen=True)
class SlideOptions:
    # overrides the slide's own microns per pixel (--mpp); it applies to every slide, so a value outside
    # RESOLVABLE_MPP stops the run before any slide is read
    mpp: float | None = option(
        None,
        check=pixel_size_problem,
        allowed=f"a slide pixel size (--mpp) from {RESOLVABLE_MPP[0]:g} to {RESOLVABLE_MPP[1]:g} um/px",
    )


# The network's context reaches about 128 model pixels: with that halo a stitched probability equals
# one pass over real H&E within 1e-4 at fp32; with 64 it differed by up to 0.36 (benchmarks/RESULTS.md).
DEFAULT_HALO = 128
# 1152 on CPU, per core pixel (halo included, benchmarks/RESULTS.md): with the current inference form 1280 and
# 1536 px are 6-8% cheaper but need 0.5-1.4 GB more memory; 1024 px is dearer
DEFAULT_TILE_SIZE = 1152  # core 896: two 448-px zarr chunks a side


@dataclass(frozen=True)
class TilingOptions:
    tile_size: int = option(DEFAULT_TILE_SIZE, min=32, multiple_of=16)  # model pixels read per tile, halo included
    halo: int = option(DEFAULT_HALO, min=0, multiple_of=16)  # model pixels of context on each side of a tile's core

    def __post_init__(self) -> None:
        if self.tile_size - 2 * self.halo < 16:
            raise InvalidValue(
                f"tiling.tile_size: {self.tile_size} leaves no tile core with tiling.halo {self.halo}; "
                f"allowed: tile_size - 2*halo >= 16 (here at least {2 * self.halo + 16})",
                "tiling.tile_size",
                "tiling.halo",
            )

    @property
    def core(self) -> int:
        return self.tile_size - 2 * self.halo


@dataclass(frozen=True)
class TissueOptions:
    enabled: bool = True
    thumbnail_mpp: float = option(8.0, gt=0)  # resolution the tissue mask is computed at
    min_region_um2: float = option(20000.0, min=0)  # tissue specks smaller than this are ignored
    dilation_um: float = option(64.0, min=0)  # margin kept around detected tissue


@dataclass(frozen=True)
class PostprocessOptions:
    """``None`` means: use the value stored with the model weights (tuned on validation data)."""

    threshold: float | None = option(None, min=0, lt=1)
    min_area_um2: float | None = option(None, min=0)
    marker_threshold: float | None = option(None, min=0, lt=1)
    marker_min_distance_um: float | None = option(None, min=0)
    compactness: float | None = option(None, min=0)
    relief_levels: int | None = option(None, min=1, max=8)


def _address_problem(value: str) -> str | None:
    if re.fullmatch(r"(tcp|tls|ucx)://[^\s/]+", value) or re.fullmatch(
        r"(\[[0-9a-fA-F:]+\]|[\w.-]+):[0-9]{1,5}", value
    ):
        return None
    return "is not a scheduler address"


@dataclass(frozen=True)
class ClusterOptions:
    kind: Literal["local", "slurm"] = "local"  # local: worker processes on this machine; slurm: batch jobs
    scheduler: str | None = option(
        None,
        check=_address_problem,  # an existing dask scheduler
        allowed="tcp://, tls:// or ucx://host:port, or host:port",
    )
    workers: int = option(2, min=1)  # CPU worker processes of the local cluster
    threads_per_worker: int = option(1, min=1)
    tiles_in_flight: int = option(32, min=1)  # bound on tiles read but not yet post-processed (memory cap)

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.kind == "slurm":
            raise InvalidValue(
                "cluster.scheduler: an existing scheduler and cluster.kind slurm (which starts one) "
                "exclude each other; allowed: set one of them",
                "cluster.scheduler",
                "cluster.kind",
            )


def _walltime_problem(value: str) -> str | None:
    # SLURM's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (ASCII digits: SLURM reads no others)
    ok = re.fullmatch(r"[0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2}", value.strip())
    return None if ok else "is not a SLURM walltime"


def _memory_problem(value: str) -> str | None:
    ok = re.fullmatch(r"([0-9]+(\.[0-9]+)?)\s*([kKmMgGtTpP]i?)?[bB]?", value.strip())
    return None if ok and float(ok.group(1)) > 0 else "is not an amount of memory"


@dataclass(frozen=True)
class SlurmOptions:
    """One SLURM job per ``processes`` workers (dask-jobqueue); defaults in ``configs/cluster/slurm.yaml``."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    walltime: str = option("01:00:00", check=_walltime_problem, allowed="HH:MM:SS, D-HH:MM:SS or minutes, quoted")
    cores: int = option(2, min=1)  # CPU cores per job
    memory: str = option("4GB", check=_memory_problem, allowed="an amount such as 4GB, 16GiB or 500MB")
    processes: int = option(1, min=1)  # dask worker processes per job (cores are split among them)
    gpus_per_job: int = option(0, min=0)
    jobs_min: int = option(0, min=0)  # adaptive scaling bounds
    jobs_max: int = option(4, min=1)
    prologue: tuple[str, ...] = ()  # shell lines run before the worker starts (module load ..., source ...)
    job_extra_directives: tuple[str, ...] = ()  # extra #SBATCH lines, e.g. "--qos=long"
    log_directory: str | None = None
    local_directory: str | None = None  # worker scratch space on the node
    python: str | None = None  # interpreter on the nodes; None: this one

    def __post_init__(self) -> None:
        if self.jobs_min > self.jobs_max:
            raise InvalidValue(
                f"slurm.jobs_min: {self.jobs_min} exceeds slurm.jobs_max {self.jobs_max}; "
                "allowed: jobs_min <= jobs_max",
                "slurm.jobs_min",
                "slurm.jobs_max",
            )
        if self.processes > self.cores:
            raise InvalidValue(
                f"slurm.processes: {self.processes} exceeds slurm.cores {self.cores}; allowed: "
                "at most one worker process per core",
                "slurm.processes",
                "slurm.cores",
            )
        if self.gpus_per_job > self.cores:  # one worker process per GPU, each needs a core
            raise InvalidValue(
                f"slurm.gpus_per_job: {self.gpus_per_job} needs at least as many slurm.cores "
                f"(one worker process per GPU), not {self.cores}; allowed: gpus_per_job <= cores",
                "slurm.gpus_per_job",
                "slurm.cores",
            )


OutputFormat = Literal["zarr", "geojson", "parquet", "preview"]
ALL_FORMATS: tuple[OutputFormat, ...] = ("zarr", "geojson", "parquet", "preview")


# output.chunk: auto takes the largest multiple of 16 that divides the tile core, up to this edge: chunks of
# 128 px cost twice the writing time of 448 px ones per shard (benchmarks/RESULTS.md), and viewers
# read chunks of a few hundred pixels well.
AUTO_CHUNK_MAX = 512


def zarr_chunk(core: int, chunk: int | str) -> int:
    """The zarr chunk edge for a tile core: ``chunk`` itself, or for ``auto`` the largest multiple of 16
    dividing ``core`` up to :data:`AUTO_CHUNK_MAX` (the core is a multiple of 16, so 16 always does)."""
    if chunk != "auto":
        return int(chunk)
    return max(c for c in range(16, min(core, AUTO_CHUNK_MAX) + 1, 16) if core % c == 0)


@dataclass(frozen=True)
class OutputOptions:
    # zarr chunk edge (model pixels), dividing the tile core; auto: see zarr_chunk
    chunk: int | Literal["auto"] = option("auto", min=16, multiple_of=16)
    preview_max_px: int = option(2048, min=16)
    overwrite: bool = False  # False: a slide whose finished results exist is skipped
    pyramid_levels: int = option(4, min=1)
    formats: tuple[OutputFormat, ...] = option(ALL_FORMATS, min_len=1, unique=True)
    slide_rgb: bool = False  # also write the RGB slide at model resolution into the OME-Zarr

    def __post_init__(self) -> None:
        if self.slide_rgb and "zarr" not in self.formats:
            raise InvalidValue(
                "output.slide_rgb: true needs zarr in output.formats", "output.slide_rgb", "output.formats"
            )


@dataclass(frozen=True)
class RunConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    slide: SlideOptions = field(default_factory=SlideOptions)
    tiling: TilingOptions = field(default_factory=TilingOptions)
    tissue: TissueOptions = field(default_factory=TissueOptions)
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    @property
    def zarr_chunk(self) -> int:
        """The OME-Zarr chunk edge this config writes (``output.chunk`` resolved)."""
        return zarr_chunk(self.tiling.core, self.output.chunk)

    def __post_init__(self) -> None:
        core, chunk = self.tiling.core, self.output.chunk
        if chunk != "auto" and core % chunk:
            raise InvalidValue(
                f"output.chunk: {chunk} does not divide the tile core {core} (tiling.tile_size {self.tiling.tile_size}"
                f" - 2*tiling.halo {self.tiling.halo}); allowed: auto (here {zarr_chunk(core, 'auto')})"
                f" or a multiple of 16 dividing {core}",
                "output.chunk",
                "tiling.tile_size",
                "tiling.halo",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ------------------------------------------------------------------------------------------


class Override(dict):  # type: ignore[type-arg]
    """A parsed ``--set`` value that remembers its text, so errors can say where a value came from."""

    text: str = ""


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into ``{"section": {"key": value}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {_show(text)} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {_show(text)}: {_show(dotted.strip())} is not a dotted key such as model.amp")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except YAML_ERRORS as exc:
        raise ConfigError(f"--set {_show(text)}: the value is not valid YAML ({yaml_problem(exc)})") from None
    result = Override()
    result.text = text
    node: dict[str, Any] = result
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def _sections(cls: type | None) -> dict[str, type]:
    """The fields of ``cls`` that are sections (dataclasses themselves), by name."""
    if cls is None:
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


# Merging and tracing descend only into the sections of the config: a mapping anywhere else is a wrong
# value, and YAML aliases can make it refer to itself (``x: &a {y: *a}``) or nest it exponentially deep.


def _deep_merge(base: dict[str, Any], update: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """``update`` merged over ``base``; the sections of ``cls`` are merged key by key, all else replaced."""
    merged = dict(base)
    sections = _sections(cls)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key in sections:
            merged[key] = _deep_merge(merged[key], value, sections[key])
        else:
            merged[key] = value
    return merged


def _leaves(data: dict[str, Any], cls: type | None, prefix: str = "") -> list[str]:
    """The dotted keys a layer sets: inside the sections of ``cls``, each key it sets there."""
    out = []
    sections = _sections(cls)
    for key, value in data.items():
        dotted = f"{prefix}{_key_text(key)}"
        if isinstance(value, dict) and value and key in sections:
            out += _leaves(value, sections[key], dotted + ".")
        else:
            out.append(dotted)
    return out


def _build(cls: type, layers: list[tuple[str, dict[str, Any]]]) -> Any:
    """Merge ``(source, mapping)`` layers in order and build ``cls``; errors say which source set the value."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, layer in layers:
        data = _deep_merge(data, layer, cls)
        for key in _leaves(layer, cls):
            origin[key] = source
    try:
        return build_dataclass(cls, data)
    except InvalidValue as exc:
        sources: list[str] = []
        for key in exc.keys:
            bare = re.sub(r"\[\d+\]$", "", key)
            found = next((origin[k] for k in (bare, *_parents(bare)) if k in origin), None)
            if found is not None and found != "defaults" and found not in sources:
                sources.append(found)
        suffix = f" (set {' and '.join(sources)})" if sources else ""
        raise ConfigError(f"{exc}{suffix}") from None


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _override_layers(overrides: list[dict[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"by --set {o.text}" if isinstance(o, Override) and o.text else "on the command line", o)
        for o in overrides or []
    ]


def default_layers() -> list[tuple[str, dict[str, Any]]]:
    """The packaged defaults: ``default.yaml`` with ``cluster/slurm.yaml`` under the key ``slurm``."""
    data: dict[str, Any] = read_yaml(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else {}
    if SLURM_CONFIG_PATH.exists():
        data = _deep_merge(data, {"slurm": read_yaml(SLURM_CONFIG_PATH)}, RunConfig)
    return [("defaults", data)]


def load_config(path: Path | str | None = None, overrides: list[dict[str, Any]] | None = None) -> RunConfig:
    """Defaults <- ``path`` (merged over them) <- overrides, in that order, then validated."""
    layers = default_layers()
    if path is not None:
        layers.append((f"in {path}", read_yaml(Path(path))))
    return typing.cast(RunConfig, _build(RunConfig, layers + _override_layers(overrides)))


# --- training configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    mpp: float = option(0.5, gt=0)  # microns per pixel the model is trained (and later run) at
    crop: int = option(256, min=32, multiple_of=16)  # training crop edge in model pixels
    batch_size: int = option(8, min=1)
    lr: float = option(1e-4, gt=0)
    weight_decay: float = option(1e-4, min=0)
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # learning-rate schedule after warm-up
    lr_min: float = option(1e-6, min=0)  # cosine: final learning rate
    step_gamma: float = option(0.1, gt=0, max=1)  # step: factor applied every step_every steps
    step_every: int = option(5000, min=1)
    warmup_steps: int = option(0, min=0)
    max_steps: int = option(20000, min=1)
    max_minutes: float | None = option(None, gt=0)  # stop after this wall time (the best checkpoint is kept)
    val_every: int = option(250, min=1)  # steps between validations
    # validation score that picks the kept checkpoint: a metric's mean, or worst_gain, the smallest gain
    # over the starting weights among the datasets (AJI, Dice where labels merge touching nuclei)
    select_by: Literal["aji", "dice", "soft_dice", "worst_gain"] = "aji"
    validation_split: Literal["select", "all"] = "select"  # validation images scored during training
    validation_threshold: float | None = option(None, gt=0, lt=1)  # None: the starting weights' threshold
    keep_candidates: bool = False  # also write every validated step's weights to <out>.candidates/
    seed: int = option(0, min=0)
    base_filters: int = option(32, min=1)
    attention_width: int = option(256, min=1)
    aux_distance_head: bool = False  # add a distance-to-background head used to split touching nuclei
    distance_weight: float = option(1.0, min=0)
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    threads: int | None = option(None, min=1)  # CPU threads; None: the cores available
    init_weights: str | None = option(
        None, check=lambda v: "is empty" if not v.strip() else None, allowed="a checkpoint path or 'packaged'"
    )  # start from these weights
    colour_jitter: float = option(0.05, min=0)  # stain (HED) jitter strength
    device: str = option("auto", check=_device_problem, allowed=DEVICE_CHOICES)
    # encoder levels (from full resolution down) kept as they are: for fine-tuning, their backward pass
    # is the costliest part of a step
    freeze_levels: int = option(0, min=0, max=4)
    freeze_attention: bool = False  # GdAM's maps carry no gradient (fine-tuning; its backward is the costliest op)

    def __post_init__(self) -> None:
        if self.schedule == "cosine" and self.lr_min > self.lr:
            raise InvalidValue(f"lr_min: {self.lr_min:g} exceeds lr {self.lr:g}; allowed: lr_min <= lr", "lr_min", "lr")
        if self.warmup_steps > self.max_steps:
            raise InvalidValue(
                f"warmup_steps: {self.warmup_steps} exceeds max_steps {self.max_steps}; "
                "allowed: warmup_steps <= max_steps",
                "warmup_steps",
                "max_steps",
            )


def load_train_config(path: str | Path | None = None, overrides: list[dict[str, Any]] | None = None) -> TrainConfig:
    """``configs/train.yaml`` <- ``path`` <- overrides (``--set key=value``), then validated."""
    layers: list[tuple[str, dict[str, Any]]] = [
        ("defaults", read_yaml(TRAIN_CONFIG_PATH) if TRAIN_CONFIG_PATH.exists() else {})
    ]
    if path is not None:
        layers.append((f"in {path}", read_yaml(Path(path))))
    return typing.cast(TrainConfig, _build(TrainConfig, layers + _override_layers(overrides)))
