"""The example slide shipped in the package (`wsi-grunet run --example`)."""

from __future__ import annotations

import filecmp

from wsi_grunet.cli import main
from wsi_grunet.examples import EXAMPLE_SLIDE, example_slide
from wsi_grunet.slide.reader import SlideReader


def test_packaged_example_slide_opens_as_the_cmu_sample(tmp_path):
    path = example_slide()
    assert path.name == EXAMPLE_SLIDE and path.is_file()
    assert path.parent.name == "examples" and path.parent.parent.name == "wsi_grunet"  # inside the package
    assert example_slide() == path  # the same path every run, so finished results are recognised
    with SlideReader(path, 0.5) as reader:
        assert (reader.info.width, reader.info.height) == (2220, 2967)
        assert abs(reader.slide_mpp - 0.499) < 1e-3
    copied = example_slide(tmp_path / "copy")  # where a real file is needed elsewhere
    assert copied == tmp_path / "copy" / EXAMPLE_SLIDE and filecmp.cmp(copied, path, shallow=False)
    assert not [p for p in copied.parent.iterdir() if p.name != EXAMPLE_SLIDE]  # no partial copy left


def test_run_without_slides_or_example_is_a_usage_error(tmp_path, caplog):
    assert main(["run", "--out", str(tmp_path / "out")]) == 2
    assert "--example" in caplog.text
