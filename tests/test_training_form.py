"""The training form: the same function as the published layout, gradients that match it kernel by
kernel, and weights written back in the published layout with equal outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from wsi_grunet.model.grunet import ControlledDenseResidualBlock, GRUNet, GRUNetConfig
from wsi_grunet.model.training_form import (
    UNIT3_DISTINCT,
    UNIT3_SEGMENTS,
    UNIT4_DISTINCT,
    UNIT4_SEGMENTS,
    TrainingGRUNet,
)

TINY = GRUNetConfig(base_filters=4, attention_width=8)


def _model(seed: int = 0) -> GRUNet:
    torch.manual_seed(seed)
    model = GRUNet(TINY)
    # non-trivial BatchNorm statistics and affine terms, so folding and sharing are really tested
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
    return model


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


def _copy_slices(segments: list[str], widths: dict[str, int]) -> dict[str, list[slice]]:
    """For each map name, the input-channel slices of its copies in the published concatenation."""
    slices: dict[str, list[slice]] = {}
    start = 0
    for name in segments:
        slices.setdefault(name, []).append(slice(start, start + widths[name]))
        start += widths[name]
    return slices


def test_training_form_gives_the_published_loss_and_gradients():
    published = _model().train()
    form = TrainingGRUNet(copy.deepcopy(published)).train()
    x = _batch()
    torch.manual_seed(5)  # GdAM samples its maps in training: the same noise for both
    loss_published = torch.sigmoid(published(x)).square().mean()
    torch.manual_seed(5)
    loss_form = torch.sigmoid(form(x)).square().mean()
    assert torch.allclose(loss_form, loss_published, rtol=1e-5, atol=1e-7)
    loss_published.backward()
    loss_form.backward()

    grads_published = {name: p.grad for name, p in published.named_parameters()}
    checked = 0
    for name, parameter in form.named_parameters():
        assert parameter.grad is not None, name
        if name in grads_published and grads_published[name].shape == parameter.shape:
            assert torch.allclose(parameter.grad, grads_published[name], rtol=1e-4, atol=1e-6), name
            checked += 1
    assert checked > 50
    # merged kernels: the gradient of each distinct map's kernel equals that of every copy it replaces
    for level, block in enumerate(form.skips):
        source = published.skips[level]
        widths = block.widths
        for unit, segments, distinct in (
            ("unit3", UNIT3_SEGMENTS, UNIT3_DISTINCT),
            ("unit4", UNIT4_SEGMENTS, UNIT4_DISTINCT),
        ):
            copies = _copy_slices(segments, widths)
            for conv in ("conv3", "conv1"):
                merged_grad = getattr(getattr(block, unit), conv).conv.weight.grad
                published_grad = getattr(getattr(source, unit), conv).conv.weight.grad
                start = 0
                for name in distinct:
                    part = merged_grad[:, start : start + widths[name]]
                    for where in copies[name]:
                        assert torch.allclose(part, published_grad[:, where], rtol=1e-4, atol=1e-6)
                    start += widths[name]


def test_the_form_reads_fewer_channels():
    form = TrainingGRUNet(_model())
    published = _model()
    for block, original in zip(form.skips, published.skips):
        assert isinstance(original, ControlledDenseResidualBlock)
        x_width, f = block.widths["x"], block.widths["u1"]
        assert block.unit4.conv3.conv.in_channels == 3 * f + x_width
        assert original.unit4.conv3.conv.in_channels == 4 * (f + x_width)


@pytest.mark.parametrize("freeze_levels, freeze_attention", [(0, False), (1, False), (2, True)])
def test_trained_weights_written_back_in_the_published_layout_give_equal_outputs(freeze_levels, freeze_attention):
    form = TrainingGRUNet(_model(), freeze_levels=freeze_levels, freeze_attention=freeze_attention).train()
    optimizer = torch.optim.AdamW(form.trainable_parameters(), lr=1e-2)
    for step in range(3):  # move every trainable kernel and BatchNorm statistic away from the start
        loss = torch.sigmoid(form(_batch(step))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    published = form.published_model().eval()
    assert type(published) is GRUNet
    reloaded = GRUNet(TINY)
    reloaded.load_state_dict(published.state_dict())  # the published keys and shapes, nothing else
    form.eval()
    with torch.no_grad():
        x = _batch(9)
        assert torch.allclose(reloaded.eval()(x), form(x), rtol=1e-4, atol=1e-5)


def test_frozen_levels_and_attention_keep_their_weights_and_statistics():
    start = _model()
    form = TrainingGRUNet(copy.deepcopy(start), freeze_levels=1, freeze_attention=True).train()
    trainable = {id(p) for p in form.trainable_parameters()}
    assert all(id(p) not in trainable for p in form.frozen.parameters())
    optimizer = torch.optim.AdamW(form.trainable_parameters(), lr=1e-2)
    loss = torch.sigmoid(form(_batch())).mean()
    loss.backward()
    optimizer.step()
    published = form.published_model()
    for name, value in start.state_dict().items():
        if name.startswith(("encoders.0.", "skips.0.", "attention.")):
            assert torch.equal(published.state_dict()[name], value), name
    assert not torch.equal(published.state_dict()["head.weight"], start.state_dict()["head.weight"])
    with pytest.raises(ValueError, match="freeze_levels"):
        TrainingGRUNet(_model(), freeze_levels=5)
