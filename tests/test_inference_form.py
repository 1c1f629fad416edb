"""The inference form of GRU-Net computes the same function as the trained layers (small models with
random BatchNorm statistics, so every fold is exercised), and the predictor runs it by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsi_grunet.config import load_config
from wsi_grunet.errors import ConfigError
from wsi_grunet.model.checkpoint import untrained_bundle
from wsi_grunet.model.grunet import ControlledDenseResidualBlock, GRUNet, GRUNetConfig
from wsi_grunet.model.inference_form import (
    FusedCDRB,
    FusedGaussianAttention,
    fuse_for_inference,
    merge_repeated_inputs,
)
from wsi_grunet.model.predictor import Predictor

SMALL = {"base_filters": 4, "attention_width": 8}


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield


def _trained_looking(config: GRUNetConfig, seed: int = 0) -> GRUNet:
    """A small GRU-Net whose BatchNorms hold non-trivial statistics and affine parameters, as after
    training (fresh ones are the identity, which would hide a wrong fold)."""
    torch.manual_seed(seed)
    model = GRUNet(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.3, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "extra",
    [{}, {"gate_mode": "batch_mean"}, {"aux_distance_head": True}],
    ids=["default", "batch-mean-gate", "distance-head"],
)
def test_fused_model_computes_the_same_logits(extra):
    model = _trained_looking(GRUNetConfig(**SMALL, **extra))
    fused = fuse_for_inference(model)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.1  # a model that outputs ~0 everywhere would prove nothing
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_fusing_leaves_the_trained_model_alone_and_removes_work():
    model = _trained_looking(GRUNetConfig(**SMALL))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fused = fuse_for_inference(model)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(isinstance(block, ControlledDenseResidualBlock) for block in model.skips)
    assert all(isinstance(block, FusedCDRB) for block in fused.skips)
    # unit 4 of a CDRB reads each distinct feature map once: 3 units + the block input
    block, original = fused.skips[0], model.skips[0]
    assert block.unit4.conv.in_channels == 3 * block.unit1.conv.out_channels + block.unit1.conv.in_channels
    assert block.unit4.conv.in_channels < original.unit4.conv3.conv.in_channels
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert batch_norms < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) / 2
    assert not any(p.requires_grad for p in fused.parameters())


def test_fused_attention_gives_every_map_without_full_resolution_features():
    model = _trained_looking(GRUNetConfig(**SMALL), seed=5)
    fused = fuse_for_inference(model)
    assert isinstance(fused.attention, FusedGaussianAttention)
    bridge = torch.rand(1, model.bridge.out_channels, 5, 7, generator=torch.Generator().manual_seed(6))
    shapes = []

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            shapes.append(tuple(output.shape))

    hooks = [m.register_forward_hook(record) for m in fused.attention.modules()]
    with torch.no_grad():
        expected, got = model.attention(bridge), fused.attention(bridge)
    for hook in hooks:
        hook.remove()
    assert [m.shape for m in got] == [m.shape for m in expected] == [(1, 1, 5 * 2**k, 7 * 2**k) for k in (1, 2, 3, 4)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)
    width = SMALL["attention_width"]
    assert (1, width, 40, 56) in shapes  # features at the scale below the finest map
    assert not any(s[1] == width and s[2:] == (80, 112) for s in shapes if len(s) == 4)  # none at the finest


def test_sampled_attention_keeps_its_layers():
    model = _trained_looking(GRUNetConfig(**SMALL, attention_mode="sample"))
    assert not isinstance(fuse_for_inference(model).attention, FusedGaussianAttention)


def test_merged_weights_over_distinct_inputs_give_the_same_conv():
    rng = torch.Generator().manual_seed(2)
    widths = {"a": 2, "b": 3, "c": 1}
    features = {name: torch.rand(1, width, 9, 7, generator=rng) for name, width in widths.items()}
    segments = ["b", "a", "b", "c", "a", "b"]
    weight = torch.randn(4, sum(widths[s] for s in segments), 3, 3, generator=rng)
    repeated = torch.cat([features[s] for s in segments], dim=1)
    merged = merge_repeated_inputs(weight, segments, ["a", "b", "c"], widths)
    assert merged.shape == (4, 6, 3, 3)
    distinct = torch.cat([features[s] for s in ("a", "b", "c")], dim=1)
    torch.testing.assert_close(
        nn.functional.conv2d(distinct, merged, padding=1),
        nn.functional.conv2d(repeated, weight, padding=1),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="segments cover"):
        merge_repeated_inputs(weight, segments[:-1], ["a", "b", "c"], widths)


def test_predictor_runs_the_fused_form_by_default_with_the_same_probabilities():
    bundle = untrained_bundle(GRUNetConfig(**SMALL), seed=0)
    bundle.model.load_state_dict(_trained_looking(GRUNetConfig(**SMALL), seed=3).state_dict())
    tiles = np.random.default_rng(4).integers(0, 256, size=(2, 64, 48, 3), dtype=np.uint8)
    fused = Predictor(bundle, device="cpu", amp="fp32", threads=1)
    plain = Predictor(bundle, device="cpu", amp="fp32", threads=1, fuse=False)
    assert fused.describe()["fused"] is True and plain.describe()["fused"] is False
    assert isinstance(fused.model.skips[0], FusedCDRB)
    assert isinstance(plain.model.skips[0], ControlledDenseResidualBlock)
    np.testing.assert_allclose(fused.predict(tiles)["prob"], plain.predict(tiles)["prob"], atol=1e-5)


def test_fuse_is_a_validated_model_option():
    assert load_config(None).model.fuse is True
    assert load_config(None, [{"model": {"fuse": False}}]).model.fuse is False
    with pytest.raises(ConfigError, match="model.fuse"):
        load_config(None, [{"model": {"fuse": "sometimes"}}])
    options = load_config(None, [{"model": {"fuse": False, "device": "cpu", "threads": 1}}]).model
    predictor = Predictor.from_options(untrained_bundle(GRUNetConfig(**SMALL), seed=0), options)
    assert predictor.describe()["fused"] is False
