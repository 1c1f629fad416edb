"""Which slides a run processes, and the output name of each.

A slide's name is its path relative to the input root it was found under, without the slide suffix,
with ``/`` kept so outputs mirror the input tree (``slides/a/x.svs`` -> ``a/x``). A file argument's
root is its parent folder. A DICOM WSI series (the .dcm files of one series in one folder) is one
slide named after its folder. Names that still clash (``x.svs`` beside ``x.tiff``, two file
arguments ``a/x.svs`` ``b/x.svs``, or a name that is a folder of another) get ``-<8 hex>`` of the
SHA-1 of the slide's resolved path appended, so no output is lost or nested in another. Bytes of a
file name that are not UTF-8 are written ``%XX`` in the output name (``odd_\\xff.svs`` -> ``odd_%FF``),
so every output name is valid UTF-8 text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..display import display_text
from ..errors import SlideOpenError

#: File name extensions searched for in folders (OpenSlide's formats plus common vendor TIFFs).
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi", ".qptiff"}
)
#: Two-part suffixes stripped whole from names.
COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif")


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: the file to open, its unique output name and the input root it was found under.

    For a DICOM series ``path`` is one file of the series (OpenSlide opens the whole series from it).
    """

    path: Path
    name: str
    root: Path


# --------------------------------------------------------------------------------------------
# Pure naming
# --------------------------------------------------------------------------------------------


def strip_slide_suffix(filename: str) -> str:
    """``x.svs`` -> ``x``, ``x.v2.svs`` -> ``x.v2``, ``x.ome.tiff`` -> ``x``, ``1.2.826.1.dcm`` -> ``1.2.826.1``."""
    lower = filename.lower()
    for suffix in COMPOUND_SUFFIXES:
        if lower.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    stem, dot, _ = filename.rpartition(".")
    return stem if dot and stem else filename


def utf8_name(name: str) -> str:
    """``name`` with each byte that is not UTF-8 written as ``%XX``.

    Python keeps such bytes of a file name as the surrogates U+DC80-U+DCFF (``os.fsdecode``); the output
    name also goes into the GeoJSON ids, the OME-Zarr metadata and the run's CSV, JSON and HTML, which
    hold only UTF-8. Clashes with a name that really holds ``%XX`` are resolved like any other clash.
    """
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in name)


def path_hash(resolved: str) -> str:
    """8 hex digits of the SHA-1 of a resolved path (stable across runs)."""
    return hashlib.sha1(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an output folder name (relative, ``/``-separated), or None."""
    if not name:
        return "it is empty"
    if name.startswith("/") or "\\" in name or "\x00" in name:
        return "it is not a plain relative path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"it has an empty, '.' or '..' component ({name!r})"
        if part.startswith("."):
            return f"a component starts with a dot ({part!r}), which would hide the results"
    return None


def _key(name: str) -> str:
    # Case-insensitive file systems would merge names differing in case only.
    return name.casefold()


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def output_names(candidates: Sequence[tuple[str, str]]) -> list[str]:
    """Unique output names for ``(base name, resolved path)`` pairs, in order.

    A base name shared by several slides (ignoring case), or one that is a folder in another slide's
    name, gets ``-<8 hex of sha1(resolved path)>`` appended; other names are kept. The same pairs
    always give the same names.
    """
    names = [base for base, _ in candidates]
    for _ in range(3):  # one pass fixes real clashes; more only guard against contrived inputs
        counts: dict[str, int] = {}
        for name in names:
            counts[_key(name)] = counts.get(_key(name), 0) + 1
        folders = {_key(folder) for name in names for folder in _ancestors(name)}
        clashing = [counts[_key(name)] > 1 or _key(name) in folders for name in names]
        if not any(clashing):
            return names
        names = [
            f"{name}-{path_hash(resolved)}" if clash else name
            for name, clash, (_, resolved) in zip(names, clashing, candidates)
        ]
    raise ValueError(f"cannot make output names unique: {sorted(names)}")


# --------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------


def dicom_series_uid(path: Path) -> str | None:
    """SeriesInstanceUID of a DICOM file (header only), or None when it is not readable DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None
    uid = getattr(dataset, "SeriesInstanceUID", None)
    return str(uid) if uid else None


@dataclass(frozen=True)
class _Candidate:
    path: Path  # file to open
    relative: PurePosixPath  # name before de-duplication, relative to root
    root: Path
    identity: Path  # resolved: a file, or a series' folder plus its UID


def _dicom_candidates(folder: Path, files: list[Path], root: Path) -> list[_Candidate]:
    """One candidate per series among ``files`` (the .dcm files of ``folder``, sorted).

    Files whose series cannot be read are grouped as one unknown series: OpenSlide decides later.
    """
    series: dict[str | None, list[Path]] = {}
    for file in files:
        series.setdefault(dicom_series_uid(file), []).append(file)
    relative = PurePosixPath(folder.relative_to(root).as_posix())
    if str(relative) == ".":
        relative = PurePosixPath(folder.resolve().name)
    out = []
    for uid, members in series.items():
        if len(series) == 1:
            name = relative
        else:
            name = relative / (uid if uid is not None else strip_slide_suffix(members[0].name))
        identity = folder.resolve() if len(series) == 1 else folder.resolve() / (uid or "unknown-series")
        out.append(_Candidate(members[0], name, root, identity))
    return out


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_candidates(folder: Path) -> list[_Candidate]:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in SLIDE_EXTENSIONS and not _hidden(p, folder) and p.is_file()
    )
    dicom: dict[Path, list[Path]] = {}
    out = []
    for file in files:
        if file.suffix.lower() == ".dcm":
            dicom.setdefault(file.parent, []).append(file)
        else:
            relative = file.relative_to(folder).as_posix()
            parent, _, filename = relative.rpartition("/")
            name = f"{parent}/{strip_slide_suffix(filename)}" if parent else strip_slide_suffix(filename)
            out.append(_Candidate(file, PurePosixPath(name), folder, file.resolve()))
    for series_folder, members in dicom.items():
        out.extend(_dicom_candidates(series_folder, members, folder))
    return out


def _file_candidates(file: Path) -> list[_Candidate]:
    root = file.parent
    if file.suffix.lower() == ".dcm":
        # The whole series of this file: its folder's .dcm files with the same series UID.
        members = sorted(p for p in root.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
        uid = dicom_series_uid(file)
        candidates = _dicom_candidates(root, members, root)
        return [c for c in candidates if len(candidates) == 1 or c.identity.name == (uid or "unknown-series")]
    return [_Candidate(file, PurePosixPath(strip_slide_suffix(file.name)), root, file.resolve())]


def find_slides(paths: Sequence[str | Path]) -> list[SlideEntry]:
    """Slides to process, each with a unique output name (see the module's description).

    Folders are searched recursively for files with a slide extension (``SLIDE_EXTENSIONS``),
    skipping hidden files and folders; files are kept as given. A slide reached twice (the same file
    given twice, or inside a folder also given) is listed once, named after the first way it was
    reached. Returns entries sorted by path. Raises SlideOpenError for a path that does not exist or
    a slide whose name cannot be an output folder.
    """
    found: dict[Path, _Candidate] = {}
    for given in paths:
        given = Path(given)
        if given.is_dir():
            candidates = _folder_candidates(given)
        elif given.exists():
            candidates = _file_candidates(given)
        else:
            raise SlideOpenError(f"{display_text(given)}: no such file or folder")
        for candidate in candidates:
            found.setdefault(candidate.identity, candidate)
    chosen = sorted(found.values(), key=lambda c: str(c.path))
    bases = [utf8_name(str(c.relative)) for c in chosen]
    for candidate, base in zip(chosen, bases):
        problem = name_problem(base)
        if problem is not None:
            raise SlideOpenError(
                f"{display_text(candidate.path)}: cannot name its output folder after it: {problem}; rename it"
            )
    names = output_names([(base, str(c.identity)) for c, base in zip(chosen, bases)])
    return [SlideEntry(c.path, name, c.root) for c, name in zip(chosen, names)]
