"""Batched augmentation on the training device: flips/rotations, scale, blur, brightness/contrast and
stain jitter (all seeded by one generator, so a resumed run draws the same values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ruifrok & Johnston haematoxylin/eosin/DAB stain vectors (rows) and their inverse.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)

SCALE_RANGE = (0.8, 1.25)  # crop edge factor: a nucleus appears up to 25% larger or smaller
BLUR_PROBABILITY = 0.2  # share of samples blurred (out-of-focus scans)
BLUR_SIGMA = (0.5, 1.5)  # Gaussian sigma in model pixels
CONTRAST = 0.1  # contrast factor 1 +- this
BRIGHTNESS = 0.05  # additive shift +- this (images in [0, 1])


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


def random_scale_edge(crop: int, generator: torch.Generator, scale_range: tuple[float, float] = SCALE_RANGE) -> int:
    """Edge of the source window that is resized to ``crop`` (log-uniform factor, even number of px)."""
    low, high = math.log(scale_range[0]), math.log(scale_range[1])
    factor = math.exp(low + (high - low) * float(torch.rand((), generator=generator)))
    return max(16, 2 * round(crop * factor / 2))


def resize_crop(
    image: torch.Tensor, masks: list[tuple[torch.Tensor, bool]], crop: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Resize a (C, S, S) float image (bilinear, antialiased) and (1, S, S) targets to ``crop``.

    Targets flagged ``nearest`` (masks) stay binary; the others (distance maps) are resized bilinearly."""
    if image.shape[-1] == crop:
        return image, [mask.float() for mask, _ in masks]
    size = (crop, crop)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    out = []
    for mask, nearest in masks:
        mode = "nearest-exact" if nearest else "bilinear"
        extra = {} if nearest else {"align_corners": False}
        out.append(F.interpolate(mask[None].float(), size=size, mode=mode, **extra)[0])
    return image, out


def random_blur(
    images: torch.Tensor,
    generator: torch.Generator,
    probability: float = BLUR_PROBABILITY,
    sigma_range: tuple[float, float] = BLUR_SIGMA,
) -> torch.Tensor:
    """Gaussian blur of a random share of the samples (separable, reflect-padded)."""
    n = images.shape[0]
    chosen = (torch.rand(n, generator=generator) < probability).tolist()
    sigmas = (sigma_range[0] + (sigma_range[1] - sigma_range[0]) * torch.rand(n, generator=generator)).tolist()
    if not any(chosen):
        return images
    out = images.clone()
    for i in range(n):
        if not chosen[i]:
            continue
        radius = max(1, math.ceil(3 * sigmas[i]))
        x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (x / sigmas[i]) ** 2)
        kernel = kernel / kernel.sum()
        channels = images.shape[1]
        item = F.pad(images[i : i + 1], (radius, radius, radius, radius), mode="reflect")
        item = F.conv2d(item, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        item = F.conv2d(item, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
        out[i] = item[0]
    return out


def brightness_contrast(
    images: torch.Tensor, generator: torch.Generator, contrast: float = CONTRAST, brightness: float = BRIGHTNESS
) -> torch.Tensor:
    """Per-sample contrast about the sample's mean and an additive brightness shift, clipped to [0, 1]."""
    n = images.shape[0]
    c = (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * contrast).to(images.device)
    b = ((torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * brightness).to(images.device)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * c + mean + b).clamp(0, 1)


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
