"""The example slide shipped with wsi-grunet: CMU-1-Small-Region.svs (CC0; see README.md here)."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

EXAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def example_slide(folder: str | Path | None = None) -> Path:
    """A real file path of the packaged example slide.

    An ordinary install holds the slide as a file, which is used in place (the same path on every run,
    so a finished result is recognised). When the package is not on disk as files (a zip), OpenSlide
    still needs one: the slide is copied into ``folder`` (default: a fixed folder under the system's
    temporary folder), complete before it appears under its name.
    """
    source = resources.files(__name__).joinpath(EXAMPLE_SLIDE)
    if folder is None and isinstance(source, Path) and source.is_file():
        return source
    target_dir = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "wsi-grunet-example"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / EXAMPLE_SLIDE
    if not target.exists():
        with resources.as_file(source) as path:
            partial = target.with_name(f".{EXAMPLE_SLIDE}.{os.getpid()}.partial")
            shutil.copyfile(path, partial)
            os.replace(partial, target)
    return target
