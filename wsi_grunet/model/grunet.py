"""GRU-Net (Roy et al., MIUA 2024) in PyTorch, NCHW.

A MultiResUNet whose skips are Controlled Dense Residual Blocks (CDRB) and whose decoder stages are
multiplied by a Gaussian distribution-based attention map (GdAM). Layer widths follow the published
Keras model: at ``base_filters=32`` and ``attention_width=256`` it has exactly 24,848,474 trainable
parameters. Two quirks of the original are fixed by default and remain selectable for parity:

* ``gate_mode="per_sample"``: the CDRB sigmoid gate is a per-sample, per-pixel map. The original
  (``"batch_mean"``) averages it over the batch, so a tile's output depends on its batch neighbours.
* ``attention_mode="mean"``: GdAM uses the mean of its Gaussian in eval mode and a reparameterised
  sample in training. The original (``"sample"``) also samples at inference.

``forward`` returns logits; apply a sigmoid for probabilities (training uses BCE on logits).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # Keras BatchNormalization defaults
BN_MOMENTUM = 0.01
TEXT_PHRASES = (
    "tumor epithelial tissue",
    "necrotic tissue",
    "lymphocytic tissue",
    "tumor associated stromal tissue",
    "coagulative necrosis",
    "liquefactive necrosis",
    "desmoplasia",
    "granular and non granular leukocytes",
    "perinuclear halo",
    "interstitial space",
    "neutrophils",
    "macrophages",
    "collagen",
    "fibronectin",
    "hyperplasia",
    "dysplasia",
)


@dataclass(frozen=True)
class GRUNetConfig:
    base_filters: int = 32
    alpha: float = 1.67
    attention_width: int = 256
    in_channels: int = 3
    aux_distance_head: bool = False  # extra output: normalised distance-to-background map
    gate_mode: str = "per_sample"  # per_sample | batch_mean (as written)
    attention_mode: str = "mean"  # mean | sample (as written: sample also at inference)

    def __post_init__(self) -> None:
        if self.gate_mode not in ("per_sample", "batch_mean"):
            raise ValueError(f"gate_mode must be per_sample or batch_mean, not {self.gate_mode!r}")
        if self.attention_mode not in ("mean", "sample"):
            raise ValueError(f"attention_mode must be mean or sample, not {self.attention_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_channels(self) -> int:
        return 2 if self.aux_distance_head else 1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class ConvBN(nn.Module):
    """Conv (no bias) -> BN -> optional ReLU: the basic unit of the Keras model."""

    def __init__(self, cin: int, cout: int, kernel: int, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = _bn(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


def multires_widths(filters: int, alpha: float) -> tuple[int, int, int]:
    width = alpha * filters
    return int(width * 0.167), int(width * 0.333), int(width * 0.5)


class MultiResBlock(nn.Module):
    """Three chained 3x3 convs (3x3, 5x5, 7x7 receptive fields) + 1x1 shortcut; add -> ReLU -> BN."""

    def __init__(self, cin: int, filters: int, alpha: float) -> None:
        super().__init__()
        w3, w5, w7 = multires_widths(filters, alpha)
        self.out_channels = w3 + w5 + w7
        self.shortcut = ConvBN(cin, self.out_channels, 1, relu=False)
        self.conv3 = ConvBN(cin, w3, 3)
        self.conv5 = ConvBN(w3, w5, 3)
        self.conv7 = ConvBN(w5, w7, 3)
        self.bn_concat = _bn(self.out_channels)
        self.bn_out = _bn(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv3(x)
        b = self.conv5(a)
        c = self.conv7(b)
        out = self.bn_concat(torch.cat([a, b, c], dim=1))
        del a, b, c  # at full resolution the largest maps alive: let them go before the shortcut
        return self.bn_out(F.relu(out + self.shortcut(x)))


class DenseUnit(nn.Module):
    """u(z) = BN(ReLU(BN(conv3x3 z) + BN(conv1x1 z))), no ReLU inside either branch."""

    def __init__(self, cin: int, filters: int) -> None:
        super().__init__()
        self.conv3 = ConvBN(cin, filters, 3, relu=False)
        self.conv1 = ConvBN(cin, filters, 1, relu=False)
        self.bn = _bn(filters)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv3(z) + self.conv1(z)))


class ControlledDenseResidualBlock(nn.Module):
    """CDRB: four densely connected units whose output is scaled by a sigmoid gate of the input.

    The concatenations repeat the block input as the original does (x02 and x03 already hold x01).
    """

    def __init__(self, cin: int, filters: int, gate_mode: str) -> None:
        super().__init__()
        self.unit1 = DenseUnit(cin, filters)
        self.unit2 = DenseUnit(filters + cin, filters)
        self.unit3 = DenseUnit(2 * (filters + cin), filters)
        self.unit4 = DenseUnit(4 * (filters + cin), filters)
        self.gate = nn.Conv2d(cin, 1, 1, bias=True)
        self.gate_mode = gate_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x02 = torch.cat([self.unit1(x), x], dim=1)
        x03 = torch.cat([self.unit2(x02), x, x02], dim=1)
        x04 = torch.cat([self.unit3(x03), x, x02, x03], dim=1)
        out = self.unit4(x04)
        gate = torch.sigmoid(self.gate(x))
        if self.gate_mode == "batch_mean":
            gate = gate.mean(dim=0, keepdim=True)
        return out * gate


class SeparableConv1x1(nn.Module):
    """Keras SeparableConv2D(1, 1x1): depthwise 1x1 without bias, then pointwise C->1 with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def make_text_prior(size: int = 32, embed_dim: int = 768, seed: int = 2024) -> torch.Tensor:
    """The fixed, non-negative 32x32 text-prior map T0 (1, 1, size, size).

    The original projects 16 phrase embeddings through two untrained, unseeded dense layers. Here each
    phrase gets a deterministic pseudo-embedding seeded by its SHA-256, and two seeded random
    projections with ReLU map the (16, D) matrix to (size, size). The result is stored as a buffer in
    every checkpoint, so a checkpoint alone determines the model's outputs.
    """
    rows = []
    for phrase in TEXT_PHRASES:
        digest = int.from_bytes(hashlib.sha256(phrase.encode()).digest()[:8], "little")
        rows.append(torch.randn(embed_dim, generator=torch.Generator().manual_seed(digest)))
    embeddings = torch.stack(rows)  # (16, D)
    gen = torch.Generator().manual_seed(seed)
    proj1 = torch.randn(embed_dim, size, generator=gen) / embed_dim**0.5
    proj2 = torch.randn(len(TEXT_PHRASES), size, generator=gen) / len(TEXT_PHRASES) ** 0.5
    hidden = F.relu(embeddings @ proj1)  # (16, size)
    prior = F.relu(hidden.T @ proj2)  # (size, size)
    return prior.reshape(1, 1, size, size).contiguous()


class GaussianAttention(nn.Module):
    """GdAM: four Gaussian attention maps (H/8 .. H) from the bridge features and the text prior."""

    def __init__(self, cin: int, width: int, mode: str) -> None:
        super().__init__()
        self.ups = nn.ModuleList([nn.ConvTranspose2d(cin if k == 0 else width, width, 2, stride=2) for k in range(4)])
        self.text_ups = nn.ModuleList([nn.ConvTranspose2d(1, 1, 2, stride=2) for _ in range(4)])
        self.mean_head = SeparableConv1x1(width)  # shared by all four scales, as in the original
        self.std_head = SeparableConv1x1(width)
        self.register_buffer("text_prior", make_text_prior())
        self.mode = mode

    def forward(self, bridge: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        features, text = bridge, self.text_prior
        sample = self.training or self.mode == "sample"
        for up, text_up in zip(self.ups, self.text_ups):
            features = F.relu(up(features))
            text = F.relu(text_up(text))
            mu = F.softplus(self.mean_head(features)) + text.mean()
            if sample:
                var_text = text.var(unbiased=False)
                sigma = torch.sqrt(F.softplus(self.std_head(features)) ** 2 + var_text)
                maps.append(mu + sigma * torch.randn_like(mu))
            else:
                maps.append(mu)
        return maps


class GRUNet(nn.Module):
    """GRU-Net. Input: (N, 3, H, W) RGB in [0, 1], H and W multiples of 16. Output: logits (N, C, H, W)."""

    def __init__(self, config: GRUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GRUNetConfig()
        u, a = config.base_filters, config.alpha
        self.encoders = nn.ModuleList()
        self.skips = nn.ModuleList()
        cin = config.in_channels
        for level in range(4):
            block = MultiResBlock(cin, u * 2**level, a)
            self.encoders.append(block)
            self.skips.append(ControlledDenseResidualBlock(block.out_channels, u * 2**level, config.gate_mode))
            cin = block.out_channels
        self.bridge = MultiResBlock(cin, u * 16, a)
        self.attention = GaussianAttention(self.bridge.out_channels, config.attention_width, config.attention_mode)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        cin = self.bridge.out_channels
        for level in reversed(range(4)):
            filters = u * 2**level
            self.ups.append(nn.ConvTranspose2d(cin, filters, 2, stride=2))
            block = MultiResBlock(2 * filters, filters, a)
            self.decoders.append(block)
            cin = block.out_channels
        self.head = nn.Conv2d(cin, config.out_channels, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras initialisation: Glorot-uniform kernels, zero biases, BN gamma 1 / beta 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x)
        skips = []
        for encoder, skip in zip(self.encoders, self.skips):
            x = encoder(x)
            skips.append(skip(x))
            x = F.max_pool2d(x, 2)
        return decode(self, x, skips)


def check_input_size(x: torch.Tensor) -> None:
    if x.shape[-1] % 16 or x.shape[-2] % 16:
        raise ValueError(f"GRU-Net needs height and width divisible by 16, got {tuple(x.shape[-2:])}")


class DecoderModules(Protocol):
    """What ``decode`` reads of a model: GRU-Net and its training form both have these."""

    @property
    def bridge(self) -> nn.Module: ...
    @property
    def attention(self) -> nn.Module: ...
    @property
    def ups(self) -> nn.ModuleList: ...
    @property
    def decoders(self) -> nn.ModuleList: ...
    @property
    def head(self) -> nn.Module: ...


def decode(model: DecoderModules, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
    """Bridge, attention and decoder of ``model`` (a GRU-Net or a form of it with the same decoder
    modules) from the last pooled encoder features ``x`` and the skips, finest first."""
    bridge = model.bridge(x)
    attention = model.attention(bridge)
    x = bridge
    for up, decoder, skip, att in zip(model.ups, model.decoders, reversed(skips), attention):
        x = decoder(torch.cat([up(x), skip], dim=1)) * att
    return model.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
