"""wsi-grunet: whole-slide nucleus segmentation with GRU-Net."""

__version__ = "0.1.0"
