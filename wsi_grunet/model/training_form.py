"""GRU-Net rewritten for training: the same function, with less work per step.

Three rewrites, all exact in the forward pass:

* **Repeated skip inputs read once.** A CDRB's concatenations repeat the block input and earlier
  units (unit 4 reads ``[u3, x, u1, x, u2, x, u1, x]``). A conv over repeated channels equals a conv
  over each distinct channel once with the repeated kernels summed, so units 3 and 4 read
  ``[u2, x, u1]`` and ``[u3, x, u1, u2]``: at base width 32 the CDRBs' convs read 40% fewer channels,
  and the CDRBs hold most of the network's arithmetic. This is a reparametrisation: the merged kernel
  is a free parameter (the published layout's repeated kernels only ever act through their sum), so
  the model can express exactly what the published one can. :func:`published_model` writes a
  trained form back in the published layout (each merged kernel on the first occurrence of its
  input, zeros on the repeats), which loads with ``fuse: false`` and gives the same outputs.
* **GdAM's two heads as one conv** (see :class:`TrainingGaussianAttention`).

Two choices for fine-tuning, which change what is trained (not the function):

* **Frozen full-resolution levels** (``freeze_levels``): the first encoder blocks and their CDRBs run
  as their inference form (BatchNorm folded at its running statistics) without gradients. Their
  maps are the largest of the network, so their backward pass is a large share of a step, and
  their weights are left as they were.
* **Frozen attention** (``freeze_attention``): GdAM's maps are still sampled in training but carry no
  gradient. Its finest map comes from a ``width``-channel full-resolution transposed conv whose
  backward pass is the single largest operation of a step.

BatchNorm layers are shared with the published model's modules where they are kept, so their
running statistics are trained in place.
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
    check_input_size,
    decode,
)
from .inference_form import FoldedConvBN, FusedCDRB, merge_repeated_inputs

# The published concatenations (names of the maps, in order) and the distinct maps the training form reads.
UNIT3_SEGMENTS, UNIT3_DISTINCT = ["u2", "x", "u1", "x"], ["u2", "x", "u1"]
UNIT4_SEGMENTS, UNIT4_DISTINCT = ["u3", "x", "u1", "x", "u2", "x", "u1", "x"], ["u3", "x", "u1", "u2"]


def _dedup_unit(unit: DenseUnit, segments: list[str], distinct: list[str], widths: dict[str, int]) -> DenseUnit:
    """A DenseUnit over ``distinct`` equal to ``unit`` over ``segments``; its BatchNorms are ``unit``'s."""
    merged = DenseUnit(sum(widths[name] for name in distinct), unit.bn.num_features)
    for name in ("conv3", "conv1"):
        source, target = getattr(unit, name), getattr(merged, name)
        target.conv.weight.data.copy_(merge_repeated_inputs(source.conv.weight.data, segments, distinct, widths))
        target.bn = source.bn
    merged.bn = unit.bn
    return merged


def _cdrb_widths(block: ControlledDenseResidualBlock) -> dict[str, int]:
    conv = block.unit1.conv3.conv
    return {"x": conv.in_channels, "u1": conv.out_channels, "u2": conv.out_channels, "u3": conv.out_channels}


class TrainingCDRB(nn.Module):
    """A CDRB whose units 3 and 4 read each distinct map once (see the module docstring)."""

    def __init__(self, block: ControlledDenseResidualBlock) -> None:
        super().__init__()
        widths = _cdrb_widths(block)
        self.unit1, self.unit2 = block.unit1, block.unit2
        self.unit3 = _dedup_unit(block.unit3, UNIT3_SEGMENTS, UNIT3_DISTINCT, widths)
        self.unit4 = _dedup_unit(block.unit4, UNIT4_SEGMENTS, UNIT4_DISTINCT, widths)
        self.gate = block.gate
        self.gate_mode = block.gate_mode
        self.widths = widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u1 = self.unit1(x)
        u2 = self.unit2(torch.cat([u1, x], dim=1))
        u3 = self.unit3(torch.cat([u2, x, u1], dim=1))
        out = self.unit4(torch.cat([u3, x, u1, u2], dim=1))
        gate = torch.sigmoid(self.gate(x))
        if self.gate_mode == "batch_mean":
            gate = gate.mean(dim=0, keepdim=True)
        return out * gate


class TrainingGaussianAttention(nn.Module):
    """GdAM whose two separable heads (mean, spread) are one 1x1 conv to two channels.

    A separable head is a depthwise 1x1 (one factor per channel) then a pointwise C->1: together one
    C->1 conv whose kernel is their product, a free vector, so this is a reparametrisation. Both heads
    read the same features, so in training (where the spread is sampled) they are one conv: at the
    finest level this saves two passes over a ``width``-channel full-resolution map each way."""

    def __init__(self, attention: GaussianAttention, frozen: bool = False) -> None:
        super().__init__()
        self.ups, self.text_ups, self.mode = attention.ups, attention.text_ups, attention.mode
        weights, biases = zip(*(_merged_head(head) for head in (attention.mean_head, attention.std_head)))
        self.heads = nn.Conv2d(weights[0].shape[1], 2, 1, bias=True)
        self.heads.weight.data.copy_(torch.cat(weights))
        self.heads.bias.data.copy_(torch.cat(biases))  # type: ignore[union-attr]
        self.register_buffer("text_prior", cast(torch.Tensor, attention.text_prior))
        self.frozen = frozen
        if frozen:
            for parameter in self.parameters():
                parameter.requires_grad_(False)

    def forward(self, bridge: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:  # maps still sampled in training, but no gradient through them
            with torch.no_grad():
                return self._maps(bridge.detach())
        return self._maps(bridge)

    def _maps(self, bridge: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        features, text = bridge, self.text_prior
        sample = self.training or self.mode == "sample"
        for up, text_up in zip(self.ups, self.text_ups):
            features = F.relu(up(features))
            text = F.relu(text_up(text))
            if sample:
                both = self.heads(features)
                mu = F.softplus(both[:, :1]) + text.mean()
                sigma = torch.sqrt(F.softplus(both[:, 1:]) ** 2 + text.var(unbiased=False))
                maps.append(mu + sigma * torch.randn_like(mu))
            else:
                maps.append(F.softplus(F.conv2d(features, self.heads.weight[:1], self.heads.bias[:1])) + text.mean())  # type: ignore[index]
        return maps

    @torch.no_grad()
    def write_back(self, attention: GaussianAttention) -> None:
        """Put the merged heads into ``attention``'s separable heads (depthwise factors 1); frozen heads
        were not trained, so ``attention`` keeps its own."""
        if self.frozen:
            return
        for index, head in enumerate((attention.mean_head, attention.std_head)):
            head.depthwise.weight.fill_(1.0)
            head.pointwise.weight.copy_(self.heads.weight[index : index + 1])
            head.pointwise.bias.copy_(self.heads.bias[index : index + 1])  # type: ignore[union-attr, index]


def _merged_head(head: SeparableConv1x1) -> tuple[torch.Tensor, torch.Tensor]:
    assert head.pointwise.bias is not None
    weight = head.pointwise.weight.data * head.depthwise.weight.data.reshape(1, -1, 1, 1)
    return weight, head.pointwise.bias.data


def _expand_merged(
    weight: torch.Tensor, segments: list[str], distinct: list[str], widths: dict[str, int]
) -> torch.Tensor:
    """Published-layout kernels equal to ``weight`` over ``distinct``: each distinct map's kernel on its
    first occurrence in ``segments``, zeros on its repeats."""
    starts, start = {}, 0
    for name in distinct:
        starts[name] = start
        start += widths[name]
    parts, seen = [], set()
    for name in segments:
        piece = weight[:, starts[name] : starts[name] + widths[name]]
        parts.append(torch.zeros_like(piece) if name in seen else piece)
        seen.add(name)
    return torch.cat(parts, dim=1)


class FrozenLevel(nn.Module):
    """An encoder block and its CDRB in their inference form, without gradients (``freeze_levels``)."""

    def __init__(self, encoder: nn.Module, skip: ControlledDenseResidualBlock) -> None:
        super().__init__()
        encoder = copy.deepcopy(encoder).eval()
        for parent in list(encoder.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, ConvBN):
                    setattr(parent, name, FoldedConvBN(child))
        self.encoder = encoder
        self.skip = FusedCDRB(copy.deepcopy(skip).eval())
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenLevel:
        return super().train(False)  # BatchNorm stays at its running statistics

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        return x, self.skip(x)


class TrainingGRUNet(nn.Module):
    """GRU-Net as trained fast: the published model's modules, CDRBs de-duplicated, the first
    ``freeze_levels`` levels frozen. Same input and output as :class:`GRUNet`."""

    def __init__(self, model: GRUNet, freeze_levels: int = 0, freeze_attention: bool = False) -> None:
        super().__init__()
        if not 0 <= freeze_levels <= len(model.encoders):
            raise ValueError(f"freeze_levels must be 0..{len(model.encoders)}, got {freeze_levels}")
        self.config = model.config
        # The published model is kept outside the module tree: its BatchNorms and unmerged layers are
        # this form's own (shared modules), its CDRB kernels are stale until written back.
        self._published = [model]
        self.freeze_levels = freeze_levels
        self.frozen = nn.ModuleList(
            [
                FrozenLevel(model.encoders[k], cast(ControlledDenseResidualBlock, model.skips[k]))
                for k in range(freeze_levels)
            ]
        )
        self.encoders = nn.ModuleList(list(model.encoders)[freeze_levels:])
        self.skips = nn.ModuleList(
            [TrainingCDRB(cast(ControlledDenseResidualBlock, block)) for block in list(model.skips)[freeze_levels:]]
        )
        self.bridge = model.bridge
        self.attention = TrainingGaussianAttention(model.attention, frozen=freeze_attention)
        self.ups, self.decoders, self.head = model.ups, model.decoders, model.head

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates, in a fixed order (for its saved state): all but the frozen levels."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x)
        skips = []
        for level in self.frozen:
            x, skip = level(x)
            skips.append(skip)
            x = F.max_pool2d(x, 2)
        for encoder, skip_block in zip(self.encoders, self.skips):
            x = encoder(x)
            skips.append(skip_block(x))
            x = F.max_pool2d(x, 2)
        return decode(self, x, skips)

    @torch.no_grad()
    def published_model(self) -> GRUNet:
        """A copy of the model in the published layout with this form's weights (see the module docstring)."""
        model = copy.deepcopy(self._published[0])
        self.attention.write_back(model.attention)
        for level, block in enumerate(self.skips, start=self.freeze_levels):
            target = cast(ControlledDenseResidualBlock, model.skips[level])
            block = cast(TrainingCDRB, block)
            for unit_name, segments, distinct in (
                ("unit3", UNIT3_SEGMENTS, UNIT3_DISTINCT),
                ("unit4", UNIT4_SEGMENTS, UNIT4_DISTINCT),
            ):
                source_unit, target_unit = getattr(block, unit_name), getattr(target, unit_name)
                for conv_name in ("conv3", "conv1"):
                    weight = getattr(source_unit, conv_name).conv.weight
                    getattr(target_unit, conv_name).conv.weight.copy_(
                        _expand_merged(weight, segments, distinct, block.widths)
                    )
        return model
