"""Fuzzed inputs never crash, never hang, and always say what is wrong.

Settings: random ``--set KEY=VALUE`` strings (the real config keys and made-up ones; values of random
text, numbers, YAML fragments, NaN, infinities, huge integers, unicode) and random YAML config files
either load or raise ``ConfigError`` naming the key (or the file), and the CLI answers them with exit
code 2 and one logged line, never a traceback.

Slides: a small tiled pyramidal TIFF with bytes overwritten in its header and IFDs, tile tables
(TileOffsets, TileByteCounts) and sizes set to random values, or cut short, either reads (opened,
thumbnail, every tile) or raises the project's error naming the file. The reads run in a child process,
so that a crash in C code (OpenSlide, libtiff, GLib) or a hang fails the test instead of killing it; the
offending file is kept for reproduction. A few fixed corrupt slides also go through the real CLI.

Examples are derandomized, so CI sees the same inputs on every run.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import subprocess
import sys
import traceback
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import tifffile
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsi_grunet.cli import EXIT_FAILED, EXIT_USAGE, main
from wsi_grunet.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    load_config,
    load_train_config,
    parse_override,
    yaml_load,
)

from synthetic import NULL_MODEL_RUN_OPTIONS, synthetic_rgb, write_rgb_image, write_synthetic_slide

REPO_ROOT = Path(__file__).resolve().parent.parent
# Derandomized (CI sees the same inputs every run) and without an example database on disk.
FUZZ = settings(deadline=None, derandomize=True, database=None)


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of a config dataclass, dotted (``model.amp``); sections are not keys."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out += dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def with_examples(name: str, values: list) -> Callable:
    """Attach ``values`` as explicit examples of the argument ``name`` (inputs that once failed)."""

    def decorate(test: Callable) -> Callable:
        for value in reversed(values):
            test = example(**{name: value})(test)
        return test

    return decorate


RUN_KEYS = dotted_keys(RunConfig)
TRAIN_KEYS = dotted_keys(TrainConfig)
RUN_SECTIONS = sorted({key.split(".")[0] for key in RUN_KEYS})


def test_the_key_lists_cover_the_configs():
    assert "model.amp" in RUN_KEYS and "slurm.walltime" in RUN_KEYS and "output.formats" in RUN_KEYS
    assert "lr" in TRAIN_KEYS and "model" not in RUN_KEYS


# --- settings -----------------------------------------------------------------------------------------

# YAML that parsers and validators trip over: unclosed flows, tags (Python objects, malformed typed
# scalars), anchors and aliases (recursive, or nested into a huge value), documents, odd numbers.
YAML_FRAGMENTS = [
    "[",
    "]",
    "{",
    "{a: 1}",
    "{a: [1, {b: 2}]}",
    "[1, 2, [3]]",
    "!!python/object:os.system x",
    "!!python/name:os.system",
    "!!bool maybe",
    "!!timestamp garbage",
    "!!timestamp 2001-99-99",
    "!!timestamp 2001-12-14t21:59:43.10-999999999:00",
    "!!int x",
    "!!float x",
    "!!binary ###",
    "!!set {a}",
    "!!omap [1]",
    "!!str [1]",
    "&a [*a]",
    "&a {b: *a}",
    "*a",
    "<<: 1",
    "--- a\n--- b",
    "%YAML 1.1\n--- x",
    "a: b: c",
    "- - - - -",
    "? [a]\n: 1",
    "'unclosed",
    '"\\x"',
    "|\n  text",
    "~",
    "null",
    "",
    " ",
    ".nan",
    ".inf",
    "-.inf",
    "1e400",
    "-0",
    "0x",
    "0x" + "f" * 300,
    "1" + "0" * 400,
    "9" * 5000,
    "0x" + "f" * 5000,
    "[" * 2000,
    "[" * 300 + "]" * 300,
    "{a: " * 300 + "}" * 300,
    "x" * 100_000,
    "cuda:٣",
    "cuda:99999999999999999999",
    "٣:٣",
    "12:00:00",
    "4GB",
    "\x00",
    "\ud800",
    "é ☃ 𝔘",
]
# Aliases nested ten deep, ten wide: a value of 10**9 strings in a few hundred bytes of text.
LAUGHS = "&a0 [x, x, x, x, x, x, x, x, x, x]"
for _level in range(1, 10):
    LAUGHS = f"[{LAUGHS}, " + ", ".join([f"&a{_level} [{', '.join([f'*a{_level - 1}'] * 10)}]"]) + "]"
YAML_FRAGMENTS.append(LAUGHS)

JUNK_KEY = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="=\n\r"), min_size=0, max_size=20
)
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
).map(str)
VALUES = st.one_of(
    st.sampled_from(YAML_FRAGMENTS),
    NUMBERS,
    st.text(max_size=40),
    st.sampled_from(["true", "off", "auto", "none", "zarr,geojson", "zarr,,zarr", "cpu", "cuda:0", "01:00:00"]),
    st.lists(st.sampled_from(YAML_FRAGMENTS[:20] + ["1", "x", "zarr"]), max_size=4).map(" ".join),
)


def key_strategy(keys: list[str]) -> st.SearchStrategy[str]:
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    return st.one_of(
        st.sampled_from(keys),
        st.sampled_from(keys).map(lambda k: k + ".deeper"),
        st.builds(lambda s, j: f"{s}.{j}", st.sampled_from(sections or keys), JUNK_KEY),
        st.sampled_from(sections or keys),
        JUNK_KEY,
    )


def set_texts(keys: list[str]) -> st.SearchStrategy[str]:
    pairs = st.builds(lambda k, v: f"{k}={v}", key_strategy(keys), VALUES)
    return st.one_of(pairs, pairs, pairs, JUNK_KEY)


def message_head(message: str) -> str:
    """The message without the ``(set by --set TEXT)`` suffix, which repeats the key whatever the message."""
    return message.split(" (set by --set ", 1)[0]


def shows(key: str, text: str) -> bool:
    """``text`` shows ``key``: as it is or quoted by repr(), abridged where long."""
    return (key != "" and key[:60] in text) or repr(key)[:60] in text


def assert_names_the_key(text: str, message: str) -> None:
    """``message`` names the key of ``--set text`` (or, for a key that is not one, its known part)."""
    assert message.strip(), f"--set {text!r}: empty message"
    assert "Traceback" not in message
    if "=" not in text:
        assert "must look like section.key=value" in message, (text, message)
        return
    parts = text.split("=", 1)[0].strip().split(".")
    head = message_head(message)
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    # the text of a --set that does not parse is quoted with repr(): its key appears escaped
    named = any(shows(p, head) or shows(repr(p)[1:-1], head) for p in prefixes if p)
    assert named or "is not a dotted key" in head, (text, message)


def load_with_set(text: str, train: bool) -> Any:
    loader = load_train_config if train else load_config
    return loader(None, [parse_override(text)])


REGRESSIONS = [  # each raised something other than ConfigError before
    "model.fuse=!!bool maybe",  # KeyError inside PyYAML
    "model.amp=!!timestamp garbage",  # AttributeError inside PyYAML
    "tissue.thumbnail_mpp=1" + "0" * 400,  # OverflowError: int too large to convert to float
    "model.batch_size=0x" + "f" * 4000,  # ValueError: repr() of an integer of more than 4300 digits
    "model.amp=" + "[" * 2000,  # RecursionError in the YAML parser
    "x=&a {y: *a}",  # RecursionError: a mapping that contains itself
    "model=&a {model: *a}",
    "model.amp=" + LAUGHS,  # repr() of 10**9 strings
]
SLIPPED_THROUGH = [  # loaded before, then broke the run
    "tissue.dilation_um=.inf",
    "model.device=cuda:99999999999999999999",  # torch cannot parse the number
    "model.device=cuda:128",  # torch wraps it to cuda:-128
    "model.device=cuda:٣",  # a non-ASCII digit
    "slurm.walltime=٣",
    "model.batch_size=99999999999999999999",  # beyond 64 bits
]


@settings(FUZZ, max_examples=400)
@given(text=set_texts(RUN_KEYS))
@with_examples("text", REGRESSIONS + SLIPPED_THROUGH)
def test_run_set_strings_load_or_name_the_key(text):
    try:
        load_with_set(text, train=False)
    except ConfigError as exc:
        assert_names_the_key(text, str(exc))


@pytest.mark.parametrize("text", SLIPPED_THROUGH)
def test_values_that_broke_runs_are_refused(text):
    with pytest.raises(ConfigError) as info:
        load_with_set(text, train=False)
    assert_names_the_key(text, str(info.value))


@settings(FUZZ, max_examples=200)
@given(text=set_texts(TRAIN_KEYS))
@example(text="lr=1" + "0" * 400)
@example(text="seed=0x" + "f" * 40)
@example(text="max_minutes=.inf")
@example(text="device=cuda:١")
def test_train_set_strings_load_or_name_the_key(text):
    try:
        load_with_set(text, train=True)
    except ConfigError as exc:
        assert_names_the_key(text, str(exc))


def test_error_messages_stay_short():
    """A value's repr is bounded in messages: a long or deeply aliased value is shown abridged."""
    for text in ["model.amp=" + "x" * 100_000, "model.amp=" + LAUGHS, "model.batch_size=0x" + "f" * 5000]:
        with pytest.raises(ConfigError) as info:
            load_with_set(text, train=False)
        assert len(message_head(str(info.value))) < 1000, text


# Random config files: mappings of real and made-up keys, dumped as YAML, sometimes with a YAML fragment
# spliced in at a random place.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["auto", "fp32", "zarr", "cpu", "01:00:00", "4GB", "local", "slurm"]),
)
NESTED = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JUNK_KEY, inner, max_size=3))


def section_strategy(section: str) -> st.SearchStrategy[dict]:
    names = [k.split(".", 1)[1] for k in RUN_KEYS if k.startswith(section + ".")]
    return st.dictionaries(st.sampled_from(names) | JUNK_KEY, NESTED, max_size=4)


RUN_FILES = st.dictionaries(
    st.sampled_from(RUN_SECTIONS) | JUNK_KEY,
    st.one_of(*[section_strategy(s) for s in RUN_SECTIONS], NESTED),
    max_size=4,
)
TRAIN_FILES = st.dictionaries(st.sampled_from(TRAIN_KEYS) | JUNK_KEY, NESTED, max_size=5)


def file_text(data: dict, splice: tuple[float, str] | None) -> str:
    text = yaml.safe_dump(data, allow_unicode=True)
    if splice is not None:
        at = int(splice[0] * len(text))
        text = text[:at] + splice[1] + text[at:]
    return text


def file_keys(data: Any) -> set[str] | None:
    """The dotted keys (two levels) a parsed config file sets, or None where a key is not text."""
    if not isinstance(data, dict):
        return set()
    out: set[str] = set()
    for key, value in data.items():
        if not isinstance(key, str):
            return None
        out.add(key)
        for sub in value if isinstance(value, dict) else {}:
            if not isinstance(sub, str):
                return None
            out.add(f"{key}.{sub}")
    return out


def check_config_file(path: Path, text: str, train: bool) -> None:
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # a lone surrogate makes the file not UTF-8
    try:
        (load_train_config if train else load_config)(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip() and "Traceback" not in message
        if message.startswith(f"{path}: "):  # the file itself: unreadable, not YAML, not a mapping
            return
        head = message.split(f" (set in {path})", 1)[0]
        keys = file_keys(yaml_load(text))
        assert keys is None or any(shows(k, head) for k in keys), (text, message)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=150)
@given(
    data=RUN_FILES,
    splice=st.none() | st.tuples(st.floats(0, 1), st.sampled_from(YAML_FRAGMENTS + ["\n  - x\n", ": :", "\t"])),
)
@example(data={}, splice=(0.0, "model: &a {model: *a}\n"))
@example(data={"model": {"amp": "fp32"}}, splice=(0.0, "x: &a {y: *a}\n"))
@example(data={"tissue": {"thumbnail_mpp": 10**400}}, splice=None)
@example(data={"model": {0x10: 1}}, splice=(1.0, "0x" + "f" * 5000 + ": 1\n"))
def test_run_config_files_load_or_name_the_key(scratch, data, splice):
    check_config_file(scratch / "run.yaml", file_text(data, splice), train=False)


@settings(FUZZ, max_examples=60)
@given(data=TRAIN_FILES, splice=st.none() | st.tuples(st.floats(0, 1), st.sampled_from(YAML_FRAGMENTS)))
def test_train_config_files_load_or_name_the_key(scratch, data, splice):
    check_config_file(scratch / "train.yaml", file_text(data, splice), train=True)


def test_a_recursive_file_and_override_merge(scratch):
    """Both layers recursive through the same key: merging stops at the config's sections."""
    path = scratch / "recursive.yaml"
    path.write_text("model: &a {model: *a}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, [parse_override("model=&b {model: *b}")])


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.with_traceback = False

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.with_traceback |= record.exc_info is not None


# capsys is read out at the start of each example, so sharing it between examples is harmless
@settings(FUZZ, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=set_texts(RUN_KEYS).filter(lambda t: not t.startswith("-")))
@example(text="model.fuse=!!bool maybe")
@example(text="tissue.thumbnail_mpp=1" + "0" * 400)
@example(text="model.device=cuda:99999999999999999999")
@example(text="model.amp=fp32")
def test_cli_run_answers_any_setting_with_exit_code_2(scratch, capsys, text):
    """No slide is processed (the folder is empty): a bad setting is named, a good one meets no slides."""
    capsys.readouterr()
    empty = scratch / "empty"
    empty.mkdir(exist_ok=True)
    handler = LogLines()
    logger = logging.getLogger("wsi_grunet")
    logger.addHandler(handler)
    try:
        code = main(["run", str(empty), "--out", str(scratch / "out"), "--quiet", "--set", text])
    finally:
        logger.removeHandler(handler)
    captured = capsys.readouterr()
    assert code == EXIT_USAGE, (text, handler.lines)
    assert len(handler.lines) == 1, (text, handler.lines)
    assert "Traceback" not in captured.err and not handler.with_traceback
    logged = "\n".join(handler.lines)
    try:
        load_with_set(text, train=False)
    except ConfigError as exc:
        assert str(exc) in logged, (text, logged)
        assert_names_the_key(text, logged)
    else:  # the device may still be refused (no CUDA here), naming model.device
        assert "no slide files found" in logged or "model.device" in logged, (text, logged)
    assert not (scratch / "out").exists()


# --- slides -------------------------------------------------------------------------------------------

MODEL_MPP = 0.5
THUMBNAIL_MPP = 8.0  # tissue.thumbnail_mpp's default: plan_slide reads the thumbnail at it
READ_TIMEOUT_S = 30.0  # a read of these small slides takes milliseconds; the margin is for a loaded machine
IFD_TAGS = (256, 257, 262, 277, 322, 323, 324, 325)  # sizes, photometric, samples, tile size and tables


def _read_like_a_run(path: str, mpp: float | None) -> None:
    """What a run does with a slide: describe it, plan it (thumbnail) and read every tile."""
    from wsi_grunet.geometry import Box
    from wsi_grunet.slide.reader import SlideReader, inspect_slide

    inspect_slide(path)
    with SlideReader(path, MODEL_MPP, mpp) as reader:
        reader.thumbnail(THUMBNAIL_MPP)
        height, width = reader.model_shape
        for y in range(0, height, 256):
            for x in range(0, width, 256):
                reader.read(Box(y - 64, x - 64, y + 320, x + 320))


def serve_reads(conn) -> None:
    """The child process: read each (path, mpp) received and answer (outcome, text); never raises."""
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # a corrupt file makes it warn at length
    from wsi_grunet.errors import WsiGrunetError

    while True:
        try:
            path, mpp = conn.recv()
        except EOFError:
            return
        try:
            _read_like_a_run(path, mpp)
            answer = ("ok", "")
        except WsiGrunetError as exc:
            answer = ("error", str(exc))
        except BaseException:
            answer = ("other", traceback.format_exc())
        conn.send(answer)


class ReaderProcess:
    """A child process that reads slides (spawned once; started again after a crash or a hang)."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._conn, child = self._context.Pipe()
        self._process = self._context.Process(target=serve_reads, args=(child,), daemon=True)
        self._process.start()
        child.close()

    def _restart(self) -> None:
        self.close()
        self._start()

    def read(self, path: Path, mpp: float | None, timeout: float = READ_TIMEOUT_S) -> tuple[str, str]:
        self._conn.send((str(path), mpp))
        if not self._conn.poll(timeout):
            self._restart()
            return "hang", f"no answer within {timeout:g} s"
        try:
            return self._conn.recv()
        except EOFError:
            self._process.join(10)
            code = self._process.exitcode
            self._restart()
            return "crash", f"the reading process died (exit code {code}; a negative code is a signal)"

    def close(self) -> None:
        self._process.kill()
        self._process.join(10)
        self._conn.close()


@dataclass(frozen=True)
class Slide:
    """A valid small slide and where its IFD entries and tag values lie."""

    name: str
    data: bytes
    mpp: float | None  # the --mpp a run needs for it (None: the file has its pixel size)
    entries: dict[tuple[int, int], int]  # (image, tag code) -> offset of the 12-byte IFD entry
    values: dict[tuple[int, int], tuple[int, int, int]]  # (image, tag code) -> (offset, count, item size)
    images: int


_ITEM_SIZE = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8


def describe_layout(name: str, path: Path, mpp: float | None) -> Slide:
    entries, values = {}, {}
    with tifffile.TiffFile(path) as tif:
        assert tif.byteorder == "<" and not tif.is_bigtiff
        pages = list(tif.pages)
        for index, page in enumerate(pages):
            for tag in page.tags.values():
                if tag.code in IFD_TAGS and int(tag.dtype) in _ITEM_SIZE:
                    entries[(index, tag.code)] = tag.offset
                    values[(index, tag.code)] = (tag.valueoffset, tag.count, _ITEM_SIZE[int(tag.dtype)])
    return Slide(name, path.read_bytes(), mpp, entries, values, len(pages))


def write_ome_tiff(path: Path) -> None:
    """An OME-TIFF with its second level in a SubIFD: read through tifffile, not OpenSlide."""
    rgb, _ = synthetic_rgb(512, 384, mpp=MODEL_MPP, seed=5)
    metadata = {"axes": "YXS", "PhysicalSizeX": MODEL_MPP, "PhysicalSizeY": MODEL_MPP}
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(rgb, subifds=1, metadata=metadata, **options)
        writer.write(rgb[::2, ::2], subfiletype=1, metadata=None, **options)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Slide]:
    folder = tmp_path_factory.mktemp("fuzz-slides")
    write_synthetic_slide(folder / "raw.svs", 512, 384, mpp=MODEL_MPP, levels=2, tile=128, seed=3)
    write_synthetic_slide(folder / "zlib.svs", 512, 384, mpp=MODEL_MPP, levels=2, tile=128, seed=4, compression="zlib")
    # a generic tiled TIFF without a pixel size: read with --mpp, as a run must
    write_rgb_image(
        folder / "generic.tif", synthetic_rgb(512, 384, mpp=MODEL_MPP, seed=6)[0], mpp=None, levels=2, tile=128
    )
    write_ome_tiff(folder / "ome.ome.tif")
    return {
        "raw": describe_layout("raw.svs", folder / "raw.svs", None),
        "zlib": describe_layout("zlib.svs", folder / "zlib.svs", None),
        "generic": describe_layout("generic.tif", folder / "generic.tif", MODEL_MPP),
        "ome": describe_layout("ome.ome.tif", folder / "ome.ome.tif", None),
    }


@pytest.fixture(scope="module")
def reader_process(slides, tmp_path_factory):
    process = ReaderProcess()
    folder = tmp_path_factory.mktemp("fuzz-warmup")
    for slide in slides.values():  # the valid slides read; the first read also pays for the imports
        path = folder / slide.name
        path.write_bytes(slide.data)
        assert process.read(path, slide.mpp, timeout=300) == ("ok", ""), slide.name
    yield process
    process.close()


# One edit of a slide's bytes:
#   ("byte", position, value)            a byte of the header and first IFD
#   ("tag", image, code, item, value)    an item of a tag's value (sizes, tile offsets and byte counts)
#   ("entry", image, code, byte, value)  a byte of a tag's IFD entry (its code, type, count or value)
#   ("anywhere", fraction, value)        a byte anywhere in the file
#   ("truncate", fraction)               the file cut short (applied last)
Edit = tuple


def apply_edits(slide: Slide, edits: list[Edit]) -> bytes:
    data = bytearray(slide.data)
    keep = len(data)
    for edit in edits:
        kind = edit[0]
        if kind == "byte":
            data[edit[1] % 512] = edit[2]
        elif kind == "anywhere":
            data[min(int(edit[1] * len(data)), len(data) - 1)] = edit[2]
        elif kind == "truncate":
            keep = min(keep, int(edit[1] * len(data)))
        else:
            key = (edit[1] % slide.images, edit[2])
            if kind == "tag" and key in slide.values:
                offset, count, size = slide.values[key]
                at = offset + size * (edit[3] % count)
                data[at : at + size] = (edit[4] % 2 ** (8 * size)).to_bytes(size, "little")
            elif kind == "entry" and key in slide.entries:
                data[slide.entries[key] + edit[3] % 12] = edit[4]
    return bytes(data[:keep])


BYTE = st.integers(0, 255)
WORD = st.one_of(st.sampled_from([0, 1, 2**15, 2**16 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 511), BYTE),
        st.tuples(st.just("tag"), st.integers(0, 3), st.sampled_from(IFD_TAGS), st.integers(0, 15), WORD),
        st.tuples(st.just("entry"), st.integers(0, 3), st.sampled_from(IFD_TAGS), st.integers(0, 11), BYTE),
        st.tuples(st.just("anywhere"), st.floats(0, 1), BYTE),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
    ),
    min_size=1,
    max_size=4,
)
# The first three killed the reading process inside OpenSlide before; the next four raised TypeError,
# ValueError, TiffFileError or ZeroDivisionError (tifffile parses tags and series lazily).
SLIDE_REGRESSIONS = [
    [("tag", 0, 322, 0, 1912602752)],  # a huge TileWidth: GLib aborts (SIGABRT) on a tile buffer of 979 GB
    [("tag", 1, 323, 0, 174402383)],  # a huge TileLength of level 1: the same, for 89 GB
    # sizes that disagree with the tiles listed: SIGFPE (a division by zero) in OpenSlide
    [("tag", 0, 257, 0, 456), ("tag", 1, 257, 0, 2197815488), ("tag", 1, 323, 0, 174402383)],
    [("entry", 0, 323, 4, 2)],  # TileLength with two values: a tuple compared with an int
    [("tag", 0, 262, 0, 248)],  # a photometric the TIFF standard does not know: ValueError naming it
    [("entry", 0, 322, 5, 127)],  # TileWidth with 32513 values: "the truth value of an array is ambiguous"
    [("byte", 17, 142), ("byte", 91, 54), ("byte", 151, 235), ("byte", 215, 240), ("byte", 218, 85)],
    [("tag", 0, 325, 3, 2**32 - 1)],  # a tile byte count past the end of the file
    [("truncate", 0.5)],
]


def check_corrupt_slide(slide: Slide, edits: list[Edit], process: ReaderProcess, path: Path) -> None:
    """Read the corrupted slide in the child process; on failure the file stays at ``path``."""
    path.write_bytes(apply_edits(slide, edits))
    outcome, text = process.read(path, slide.mpp)
    if outcome == "ok" or (outcome == "error" and str(path) in text):
        path.unlink()
        return
    if outcome == "error":
        pytest.fail(f"{path}: the error does not name the file: {text}")
    pytest.fail(f"{path} (kept for reproduction; edits {edits}): {outcome}: {text}")


@pytest.mark.parametrize("name", ["raw", "zlib", "generic", "ome"])
def test_corrupt_slides_read_or_fail_naming_the_file(name, slides, reader_process, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fuzz-{name}")
    numbers: Iterator[int] = itertools.count()  # a new file each time: nothing cached is read again

    @settings(FUZZ, max_examples=70)
    @given(edits=EDITS)
    @with_examples("edits", SLIDE_REGRESSIONS)
    def corrupt_and_read(edits):
        check_corrupt_slide(slides[name], edits, reader_process, folder / f"{next(numbers)}-{slides[name].name}")

    corrupt_and_read()


def test_the_regressions_edit_the_tags_they_name(slides):
    """The fixed examples above keep hitting what they name (the synthetic slide's layout is unchanged)."""
    raw = slides["raw"]
    assert raw.images == 2 and raw.values[(0, 325)][1] == 12
    for edits in SLIDE_REGRESSIONS:
        assert apply_edits(raw, edits) != raw.data, edits


def test_cli_fails_each_corrupt_slide_with_one_line_and_finishes_the_good_one(tmp_path):
    """The real command on a good slide and three corrupt copies: exit code 1, each copy failed with one
    line naming it in run_summary.json (refused when opened, or when its pixels are read), no traceback."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_synthetic_slide(folder / "good.svs", 256, 192, mpp=MODEL_MPP, levels=2, tile=128, seed=1, compression="zlib")
    good = describe_layout("good.svs", folder / "good.svs", None)
    (folder / "truncated.svs").write_bytes(good.data[: len(good.data) * 2 // 3])
    (folder / "garbage-header.svs").write_bytes(bytes(range(7, 71)) + good.data[64:])
    # half of each tile's compressed bytes: the tables look sound, and decoding fails when pixels are read
    offset, count, size = good.values[(0, 325)]
    halved = [
        int.from_bytes(good.data[offset + size * k : offset + size * (k + 1)], "little") // 2 for k in range(count)
    ]
    (folder / "bad-byte-counts.svs").write_bytes(
        apply_edits(good, [("tag", 0, 325, k, n) for k, n in enumerate(halved)])
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "wsi_grunet.cli", "run", str(folder), "--out", str(out), *NULL_MODEL_RUN_OPTIONS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert done.returncode == EXIT_FAILED, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    summary = {Path(s["slide"]).name: s for s in json.loads((out / "run_summary.json").read_text())["slides"]}
    assert summary["good.svs"]["status"] == "ok", summary["good.svs"]
    for name in ("truncated.svs", "garbage-header.svs", "bad-byte-counts.svs"):
        error = summary[name]["error"] or ""
        assert summary[name]["status"] == "failed", summary[name]
        assert name in error and "\n" not in error, error
