"""Training GRU-Net on annotated tiles."""
