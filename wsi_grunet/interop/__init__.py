"""Interoperability with TIAToolbox 2.x: GRU-Net as a TIAToolbox model, nuclei as a TIAToolbox SQLiteStore.

TIAToolbox is an optional extra kept in its own environment (it declares ``torch<2.13`` and needs
torchvision): ``bash benchmarks/setup_tiatoolbox_env.sh`` creates ``.venv-tiatoolbox/``.
"""

from __future__ import annotations

INSTALL_HINT = (
    "TIAToolbox is not installed in this environment. It needs its own environment (TIAToolbox 2.x declares "
    "torch<2.13 and needs torchvision): run `bash benchmarks/setup_tiatoolbox_env.sh` in the wsi-grunet "
    "repository and use .venv-tiatoolbox/bin/python (or .venv-tiatoolbox/bin/wsi-grunet), or install the "
    "extra deliberately with `pip install 'wsi-grunet[tiatoolbox]'` next to a torch/torchvision pair it accepts."
)


def require_tiatoolbox() -> None:
    """Raise an ImportError that says how to install the extra when TIAToolbox cannot be imported."""
    try:
        import tiatoolbox  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None


require_tiatoolbox()
