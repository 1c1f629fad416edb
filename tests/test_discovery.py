"""Slide discovery: every slide gets a unique, stable output name that mirrors the input tree.

Naming is checked as a pure function and on real files: small SVS slides written here (OpenSlide
opens them), DICOM headers written with pydicom, and the shared DICOM series when present.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from wsi_grunet.errors import SlideOpenError
from wsi_grunet.geometry import Box
from wsi_grunet.slide.discovery import (
    SlideEntry,
    dicom_series_uid,
    find_slides,
    name_problem,
    output_names,
    strip_slide_suffix,
)
from wsi_grunet.slide.reader import SlideReader

from synthetic import write_rgb_image

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _sha8(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _small_slide(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((32, 48, 3), value, dtype=np.uint8)
    write_rgb_image(path, rgb, mpp=0.5, levels=1, tile=16, compression="zlib")
    return path


def _dicom(path: Path, series_uid: str, instance_uid: str) -> Path:
    """A DICOM file with just the identifying header (enough for discovery, not a readable slide)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = WSI_SOP_CLASS
    dataset.SOPInstanceUID = instance_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = "SM"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    return path


def _names(entries: list[SlideEntry]) -> dict[str, str]:
    return {entry.name: entry.path.name for entry in entries}


# ---------------------------------------------------------------------------------------------
# Pure naming
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename,stem",
    [
        ("x.svs", "x"),
        ("x.v2.svs", "x.v2"),
        ("x.ome.tiff", "x"),
        ("x.OME.TIF", "x"),
        ("x.tiff", "x"),
        ("1.2.826.0.1.3680043.8.498.1.dcm", "1.2.826.0.1.3680043.8.498.1"),
        ("noext", "noext"),
        (".ome.tiff", ".ome"),
        ("x.ome", "x"),
    ],
)
def test_strip_slide_suffix(filename, stem):
    assert strip_slide_suffix(filename) == stem


def test_output_names_keep_unique_names_and_hash_collisions():
    assert output_names([("a/x", "/s/a/x.svs"), ("b/x", "/s/b/x.svs"), ("x", "/s/x.svs")]) == ["a/x", "b/x", "x"]
    names = output_names([("x", "/s/x.svs"), ("x", "/s/x.tiff"), ("y", "/s/y.svs")])
    sha = {p: hashlib.sha1(p.encode()).hexdigest()[:8] for p in ("/s/x.svs", "/s/x.tiff")}
    assert names == [f"x-{sha['/s/x.svs']}", f"x-{sha['/s/x.tiff']}", "y"]
    # stable: the same pairs in another order give each slide the same name
    swapped = output_names([("y", "/s/y.svs"), ("x", "/s/x.tiff"), ("x", "/s/x.svs")])
    assert swapped == ["y", f"x-{sha['/s/x.tiff']}", f"x-{sha['/s/x.svs']}"]


def test_output_names_case_and_folder_clashes():
    # names equal but for case would share a folder on case-insensitive file systems
    upper, lower = output_names([("Slide", "/s/Slide.svs"), ("slide", "/s/slide.svs")])
    assert upper.startswith("Slide-") and lower.startswith("slide-") and upper.lower() != lower.lower()
    # a slide named "a" beside a slide inside folder "a": the outer one would hold the other's folder
    outer, inner = output_names([("a", "/s/a.svs"), ("a/x", "/s/a/x.svs")])
    assert outer == f"a-{hashlib.sha1(b'/s/a.svs').hexdigest()[:8]}" and inner == "a/x"


@pytest.mark.parametrize(
    "name,ok",
    [
        ("a/x", True),
        ("x.v2", True),
        ("", False),
        ("../x", False),
        ("a/../x", False),
        (".x", False),
        ("a/.x", False),
        ("/abs", False),
        ("a//x", False),
        ("a\\x", False),
    ],
)
def test_name_problem(name, ok):
    assert (name_problem(name) is None) == ok


# ---------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------


def test_same_stem_in_different_folders_gets_distinct_names(tmp_path):
    root = tmp_path / "slides"
    paths = {
        name: _small_slide(root / name, 100 + k) for k, name in enumerate(["a/x.svs", "b/x.svs", "x.svs", "x.v2.svs"])
    }
    entries = find_slides([root])
    assert [(e.name, e.path, e.root) for e in entries] == [
        ("a/x", paths["a/x.svs"], root),
        ("b/x", paths["b/x.svs"], root),
        ("x", paths["x.svs"], root),
        ("x.v2", paths["x.v2.svs"], root),
    ]
    # each name leads to its own slide's pixels
    for entry, value in zip(entries, [100, 101, 102, 103]):
        with SlideReader(entry.path, 0.5) as reader:
            assert (reader.read(Box(0, 0, 32, 48)) == value).all()
    assert find_slides([root]) == entries  # stable


def test_file_arguments_root_at_their_folder_and_collide_with_hashes(tmp_path):
    first = _small_slide(tmp_path / "a" / "x.svs", 10)
    second = _small_slide(tmp_path / "b" / "x.svs", 20)
    entries = find_slides([first, second])
    assert [(e.path, e.name, e.root) for e in entries] == [
        (first, f"x-{_sha8(first)}", first.parent),
        (second, f"x-{_sha8(second)}", second.parent),
    ]
    assert find_slides([second, first]) == entries  # same names whatever the argument order
    assert [e.name for e in find_slides([first])] == ["x"]  # alone, no hash is needed


def test_side_by_side_suffixes_collide_and_compound_suffix_is_stripped(tmp_path):
    svs = _small_slide(tmp_path / "x.svs", 1)
    tiff = _small_slide(tmp_path / "x.tiff", 2)
    ome = _small_slide(tmp_path / "y.ome.tiff", 3)
    names = [e.name for e in find_slides([tmp_path])]
    assert names == [f"x-{_sha8(svs)}", f"x-{_sha8(tiff)}", "y"]
    assert ome.exists()


def test_the_same_slide_reached_twice_is_listed_once(tmp_path):
    slide = _small_slide(tmp_path / "sub" / "x.svs", 5)
    entries = find_slides([slide, tmp_path / "sub" / ".." / "sub" / "x.svs", tmp_path])
    assert [(e.path, e.name) for e in entries] == [(slide, "x")]  # named the first way it was reached


def test_folder_search_filters_and_hides(tmp_path):
    for name in ["b.svs", "a.TIF", "notes.txt", "sub/c.ndpi", "sub/deeper/d.mrxs", ".hidden/e.svs", "sub/.f.svs"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    explicit = tmp_path / "notes.txt"
    found = find_slides([tmp_path, explicit, tmp_path / "b.svs"])
    assert [(e.path.relative_to(tmp_path).as_posix(), e.name) for e in found] == [
        ("a.TIF", "a"),
        ("b.svs", "b"),
        ("notes.txt", "notes"),
        ("sub/c.ndpi", "sub/c"),
        ("sub/deeper/d.mrxs", "sub/deeper/d"),
    ]
    with pytest.raises(SlideOpenError, match="no such file"):
        find_slides([tmp_path / "missing"])


def test_a_name_that_cannot_be_an_output_folder_is_refused(tmp_path):
    hidden = _small_slide(tmp_path / ".x.svs", 1)
    with pytest.raises(SlideOpenError, match=r"\.x\.svs: cannot name its output folder.*starts with a dot"):
        find_slides([hidden])


# ---------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------


def test_dicom_series_is_one_slide_named_by_its_folder(tmp_path):
    series = "1.2.826.0.1.3680043.8.498.10"
    folder = tmp_path / "cases" / "patient 1" / "scan"
    files = [
        _dicom(folder / f"1.2.826.0.1.3680043.8.498.{k}.dcm", series, f"1.2.826.0.1.3680043.8.498.{k}")
        for k in (11, 12, 13)
    ]
    assert dicom_series_uid(files[0]) == series
    entries = find_slides([tmp_path])
    assert [(e.name, e.path) for e in entries] == [("cases/patient 1/scan", files[0])]
    # a file of the series given alone names the series after its folder, never after the UID's first digit
    assert [(e.name, e.path) for e in find_slides([files[2]])] == [("scan", files[0])]
    # reached as a file and through its folder: listed once
    assert len(find_slides([files[1], tmp_path])) == 1


def test_two_series_in_one_folder_are_two_slides_named_by_uid(tmp_path):
    first, second = "1.2.826.0.1.3680043.8.498.100", "1.2.826.0.1.3680043.8.498.200"
    a = _dicom(tmp_path / "mixed" / "1.2.826.0.1.3680043.8.498.101.dcm", first, "1.2.826.0.1.3680043.8.498.101")
    b = _dicom(tmp_path / "mixed" / "1.2.826.0.1.3680043.8.498.201.dcm", second, "1.2.826.0.1.3680043.8.498.201")
    _dicom(tmp_path / "mixed" / "1.2.826.0.1.3680043.8.498.102.dcm", first, "1.2.826.0.1.3680043.8.498.102")
    entries = find_slides([tmp_path])
    assert [(e.name, e.path) for e in entries] == [(f"mixed/{first}", a), (f"mixed/{second}", b)]
    assert [(e.name, e.path) for e in find_slides([b])] == [(f"mixed/{second}", b)]


def test_unreadable_dcm_files_of_a_folder_stay_one_slide(tmp_path):
    for name in ["x_1.dcm", "x_0.dcm"]:
        (tmp_path / "dicom" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dicom" / name).write_bytes(b"not dicom")
    (tmp_path / "dicom2").mkdir()
    (tmp_path / "dicom2" / "y.dcm").write_bytes(b"")
    entries = find_slides([tmp_path])
    assert [(e.name, e.path.name) for e in entries] == [("dicom", "x_0.dcm"), ("dicom2", "y.dcm")]


@pytest.mark.shared
def test_real_dicom_series_under_uid_names_opens_as_one_slide(shared_dir, tmp_path):
    folder = tmp_path / "case 7"
    folder.mkdir()
    for source in sorted((shared_dir / "slides" / "fixtures").glob("boxes_*.dcm")):
        uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
        shutil.copy(source, folder / f"{uid}.dcm")
    entries = find_slides([tmp_path])
    assert [e.name for e in entries] == ["case 7"]
    with SlideReader(entries[0].path, 0.499) as reader:
        assert reader.backend == "openslide" and reader.info.vendor == "dicom"
        assert reader.read(Box(0, 0, 16, 16)).std() > 0
