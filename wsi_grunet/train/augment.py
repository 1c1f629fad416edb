"""Batched augmentation on the training device: crops, flips/rotations, stain jitter (seeded)."""

from __future__ import annotations

import torch

# Ruifrok & Johnston haematoxylin/eosin/DAB stain vectors (rows) and their inverse.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def random_dihedral(tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """The same random flip + 90-degree rotation for every (N, C, H, W) tensor, per sample."""
    n = tensors[0].shape[0]
    k = torch.randint(0, 4, (n,), generator=generator).tolist()
    flip = torch.randint(0, 2, (n,), generator=generator).tolist()
    out = []
    for t in tensors:
        items = []
        for i in range(n):
            item = torch.rot90(t[i], k[i], dims=(-2, -1))
            items.append(torch.flip(item, dims=(-1,)) if flip[i] else item)
        out.append(torch.stack(items))
    return out


def stain_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Scale and shift each sample's H, E, D optical densities by up to ``strength`` (images in [0,1])."""
    if strength <= 0:
        return images
    n = images.shape[0]
    device = images.device
    alpha = (1 + (torch.rand(n, 3, generator=generator) * 2 - 1) * strength).to(device)
    beta = ((torch.rand(n, 3, generator=generator) * 2 - 1) * strength).to(device)
    brightness = (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(device)
    od = -torch.log(images.clamp(min=1 / 255))  # (N, 3, H, W) optical density
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(device))
    hed = hed * alpha[:, :, None, None] + beta[:, :, None, None]
    od = torch.einsum("ndhw,dc->nchw", hed, _RGB_FROM_HED.to(device))
    return (torch.exp(-od) * brightness).clamp(0, 1)
