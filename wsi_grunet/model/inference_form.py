"""GRU-Net rewritten for inference: the same function with fewer, smaller operations.

Four exact rewrites of an eval-mode GRU-Net (equal in real arithmetic; float32 outputs agree to
about 1e-5), so the trained layers stay as published while inference skips redundant work:

* every conv -> BatchNorm pair becomes one conv with a bias (the BN's running statistics folded in);
* a dense unit's parallel 3x3 and 1x1 convs, which read the same input and are summed, become one
  3x3 conv (the 1x1 kernel added to the centre tap);
* a CDRB's concatenations repeat the block input and earlier units (unit 4 reads
  ``[u3, x, u1, x, u2, x, u1, x]``, 332 channels at level 0): a conv over repeated channels equals a
  conv over each distinct channel once with the repeated weights summed, so units 3 and 4 read
  ``[u2, x, u1]`` and ``[u3, x, u1, u2]`` (115 and 147 channels) instead.
* GdAM's separable 1x1 head (depthwise, then pointwise to one channel) becomes one 1x1 conv, and its
  finest map is computed at the scale below, one transposed-conv tap at a time
  (:class:`FusedGaussianAttention`), instead of from full-resolution features.

On a 2-core Intel Xeon with AMX this makes a 1152-pixel bf16 pass about 1.6x faster
(benchmarks/RESULTS.md); the first CDRB, at full resolution, was a third of the time. The result is for inference only: BatchNorm
statistics are frozen into the weights, so it must never be trained.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .grunet import (
    ControlledDenseResidualBlock,
    ConvBN,
    DenseUnit,
    GaussianAttention,
    GRUNet,
    SeparableConv1x1,
)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` per channel."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def folded_conv_weights(unit: ConvBN) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one conv equal to ``unit``'s conv followed by its BatchNorm."""
    scale, shift = bn_scale_shift(unit.bn)
    weight = unit.conv.weight * scale[:, None, None, None]
    bias = shift if unit.conv.bias is None else shift + unit.conv.bias * scale
    return weight, bias


def conv_with(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A same-padded conv holding ``weight`` (O, I, k, k) and ``bias`` (O,)."""
    out_channels, in_channels, kernel, _ = weight.shape
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=True)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)  # type: ignore[union-attr]
    return conv


def merge_repeated_inputs(
    weight: torch.Tensor, segments: list[str], distinct: list[str], widths: dict[str, int]
) -> torch.Tensor:
    """Weights over the concatenation of ``distinct`` that give the same conv as ``weight`` over the
    concatenation of ``segments`` (names, repeats allowed): repeated channels' weights are summed."""
    parts = {name: weight.new_zeros(weight.shape[0], widths[name], *weight.shape[2:]) for name in distinct}
    start = 0
    for name in segments:
        parts[name] += weight[:, start : start + widths[name]]
        start += widths[name]
    if start != weight.shape[1]:
        raise ValueError(f"segments cover {start} input channels, the weight has {weight.shape[1]}")
    return torch.cat([parts[name] for name in distinct], dim=1)


class FoldedConvBN(nn.Module):
    """ConvBN with the BatchNorm folded into the conv."""

    def __init__(self, unit: ConvBN) -> None:
        super().__init__()
        self.conv = conv_with(*folded_conv_weights(unit))
        self.relu = unit.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class FusedDenseUnit(nn.Module):
    """DenseUnit as one 3x3 conv -> ReLU -> BN, optionally over de-duplicated input channels."""

    def __init__(
        self,
        unit: DenseUnit,
        segments: list[str] | None = None,
        distinct: list[str] | None = None,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        weight3, bias3 = folded_conv_weights(unit.conv3)
        weight1, bias1 = folded_conv_weights(unit.conv1)
        weight = weight3.clone()
        weight[:, :, 1, 1] += weight1[:, :, 0, 0]
        if segments is not None:
            assert distinct is not None and widths is not None
            weight = merge_repeated_inputs(weight, segments, distinct, widths)
        self.conv = conv_with(weight, bias3 + bias1)
        self.bn = unit.bn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(z)))


class FusedCDRB(nn.Module):
    """ControlledDenseResidualBlock whose units read each distinct feature map once."""

    def __init__(self, block: ControlledDenseResidualBlock) -> None:
        super().__init__()
        conv = block.unit1.conv3.conv
        widths = {"x": conv.in_channels, "u1": conv.out_channels, "u2": conv.out_channels, "u3": conv.out_channels}
        self.unit1 = FusedDenseUnit(block.unit1)
        self.unit2 = FusedDenseUnit(block.unit2)  # [u1, x]: nothing repeated
        # x03 = [u2, x, x02] = [u2, x, u1, x]
        self.unit3 = FusedDenseUnit(block.unit3, ["u2", "x", "u1", "x"], ["u2", "x", "u1"], widths)
        # x04 = [u3, x, x02, x03] = [u3, x, u1, x, u2, x, u1, x]
        segments = ["u3", "x", "u1", "x", "u2", "x", "u1", "x"]
        self.unit4 = FusedDenseUnit(block.unit4, segments, ["u3", "x", "u1", "u2"], widths)
        self.gate = block.gate
        self.gate_mode = block.gate_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u1 = self.unit1(x)
        u2 = self.unit2(torch.cat([u1, x], dim=1))
        u3 = self.unit3(torch.cat([u2, x, u1], dim=1))
        # The widest map of the pass (147 channels at full resolution): the units' own maps and then the
        # joined one are let go as soon as they are read.
        joined = torch.cat([u3, x, u1, u2], dim=1)
        del u1, u2, u3
        out = self.unit4.conv(joined)
        del joined
        out = self.unit4.bn(F.relu(out))
        gate = torch.sigmoid(self.gate(x))
        if self.gate_mode == "batch_mean":
            gate = gate.mean(dim=0, keepdim=True)
        return out * gate


class FusedGaussianAttention(nn.Module):
    """GdAM (mean mode) whose finest map never holds its features at full resolution.

    The last transposed conv (kernel 2, stride 2) writes each output pixel ``(2i + a, 2j + b)`` from input
    pixel ``(i, j)`` alone, through its tap ``(a, b)``; ReLU and the 1x1 head act per pixel. So the map is
    computed at the coarser scale for each of the four taps (a 1x1 conv, ReLU, the head) and the four
    one-channel results are interleaved. At level 0 this avoids a ``width``-channel full-resolution tensor
    and its ReLU copy (2 x 680 MB at 1152 px in bf16), the largest working set of the whole pass.
    """

    def __init__(self, attention: GaussianAttention) -> None:
        super().__init__()
        self.ups = nn.ModuleList(list(attention.ups)[:-1])
        self.text_ups = attention.text_ups
        self.mean_head = merged_separable(attention.mean_head)
        last = cast(nn.ConvTranspose2d, attention.ups[-1])
        assert last.kernel_size == (2, 2) and last.stride == (2, 2) and last.bias is not None
        weight, bias = last.weight, last.bias  # weight: (in, out, 2, 2)
        self.taps = nn.ModuleList(
            [conv_with(weight[:, :, a, b].T[:, :, None, None], bias) for a in (0, 1) for b in (0, 1)]
        )
        self.register_buffer("text_prior", cast(torch.Tensor, attention.text_prior))

    def forward(self, bridge: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        features, text = bridge, self.text_prior
        for up, text_up in zip(self.ups, self.text_ups):
            features = F.relu(up(features))
            text = F.relu(text_up(text))
            maps.append(F.softplus(self.mean_head(features)) + text.mean())
        text = F.relu(self.text_ups[-1](text))
        # Channel 2a + b holds tap (a, b): pixel_shuffle puts it at (2i + a, 2j + b).
        quarters = torch.cat([self.mean_head(F.relu(tap(features))) for tap in self.taps], dim=1)
        maps.append(F.softplus(F.pixel_shuffle(quarters, 2)) + text.mean())
        return maps


def merged_separable(head: SeparableConv1x1) -> nn.Conv2d:
    """Depthwise 1x1 (no bias) then pointwise C->1: one 1x1 conv whose weights are their product."""
    weight = head.pointwise.weight * head.depthwise.weight.reshape(1, -1, 1, 1)
    assert head.pointwise.bias is not None
    return conv_with(weight, head.pointwise.bias)


@torch.no_grad()
def fuse_for_inference(model: GRUNet) -> GRUNet:
    """An eval-mode copy of ``model`` with the rewrites above; ``model`` itself is left unchanged."""
    fused = copy.deepcopy(model).eval()
    for index, block in enumerate(fused.skips):
        fused.skips[index] = FusedCDRB(cast(ControlledDenseResidualBlock, block))
    for module in list(fused.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ConvBN):
                setattr(module, name, FoldedConvBN(child))
    attention = fused.attention
    if attention.mode == "mean":
        fused.attention = FusedGaussianAttention(attention)  # type: ignore[assignment]
    else:  # sampled maps (a config choice; never for the packaged weights): only the head is merged
        attention.mean_head = merged_separable(attention.mean_head)  # type: ignore[assignment]
    for parameter in fused.parameters():
        parameter.requires_grad_(False)
    return fused
