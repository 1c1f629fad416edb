"""GRU-Net model, its checkpoints and batched inference."""
