"""Exception hierarchy: every error a user can cause names the file and the problem."""


class WsiGrunetError(Exception):
    """Base class for all errors raised on purpose by wsi-grunet."""


class ConfigError(WsiGrunetError):
    """A configuration file or option is invalid."""


class SlideError(WsiGrunetError):
    """A slide cannot be used. The message names the slide file."""


class SlideOpenError(SlideError):
    """The file is not a slide, or OpenSlide cannot open it."""


class SlideReadError(SlideError):
    """The slide opened but its pixels cannot be read (corrupt tiles)."""


class MissingMppError(SlideError):
    """The slide has no pixel size and none was given with --mpp."""


class PixelSizeError(SlideError):
    """The slide's pixel size (given with --mpp or read from the file) is one nuclei cannot be found at."""


class CheckpointError(WsiGrunetError):
    """A weights file or its metadata is missing, malformed or inconsistent."""


class StitchContractError(WsiGrunetError):
    """A nucleus is larger than the tile halo, so tile-border handling cannot be exact."""


class OutputError(WsiGrunetError):
    """An output location cannot be written."""
