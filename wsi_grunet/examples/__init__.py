"""The example slide shipped with wsi-grunet: CMU-1-Small-Region.svs (CC0; see README.md here)."""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

EXAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def example_slide(folder: str | Path | None = None) -> Path:
    """A real file path of the packaged example slide.

    The package may be installed as a zip or a wheel cache, and OpenSlide needs a file on disk, so the
    slide is copied into ``folder`` (a new temporary folder when None) unless it already lies there.
    """
    target_dir = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="wsi-grunet-example-"))
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / EXAMPLE_SLIDE
    source = resources.files(__name__).joinpath(EXAMPLE_SLIDE)
    if not target.exists():
        with resources.as_file(source) as path:
            partial = target.with_name(f".{EXAMPLE_SLIDE}.partial")
            shutil.copyfile(path, partial)
            partial.replace(target)  # a half-copied slide never appears under its name
    return target
