"""GRU-Net: layer widths and parameter counts of the published model, and the behaviour of the
project's fixes (per-sample gate, deterministic attention in eval, stored text prior).

The full-width model is only constructed (a forward pass takes seconds on CPU); everything that
runs uses a narrow variant with the same topology.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from wsi_grunet.model.checkpoint import untrained_bundle
from wsi_grunet.model.grunet import (
    BN_EPS,
    BN_MOMENTUM,
    GRUNet,
    GRUNetConfig,
    count_parameters,
    make_text_prior,
    multires_widths,
)
from wsi_grunet.model.predictor import Predictor, predict_image

SMALL = {"base_filters": 4, "attention_width": 8}


def small_model(seed: int = 0, **overrides) -> GRUNet:
    torch.manual_seed(seed)
    return GRUNet(GRUNetConfig(**{**SMALL, **overrides})).eval()


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def full_model() -> GRUNet:
    return GRUNet(GRUNetConfig())


# ---------------------------------------------------------------------------------------------
# Published widths and counts (architecture reference, section 2)


def test_full_width_parameter_count_matches_published_model(full_model):
    assert count_parameters(full_model) == 24_848_474
    assert params(full_model) == 24_848_474  # nothing frozen
    running = sum(b.numel() for name, b in full_model.named_buffers() if name.endswith(("running_mean", "running_var")))
    assert running == 31_048


def test_full_width_per_block_counts(full_model):
    m = full_model
    assert [params(b) for b in m.encoders] == [5_979, 36_048, 147_130, 592_140]
    assert [params(b) for b in m.skips] == [203_060, 825_962, 3_321_045, 13_318_571]
    assert sum(params(b) for b in m.skips) == 17_668_638
    assert params(m.bridge) == 2_368_994
    assert params(m.attention) == 1_661_974
    decoder_stages = [params(up) + params(dec) for up, dec in zip(m.ups, m.decoders)]
    assert decoder_stages == [1_785_368, 444_947, 110_250, 26_954]
    assert params(m.head) == 52


def test_full_width_gdam_breakdown(full_model):
    att = full_model.attention
    assert [params(u) for u in att.ups] == [873_728, 262_400, 262_400, 262_400]
    assert [params(t) for t in att.text_ups] == [5, 5, 5, 5]
    assert params(att.mean_head) == params(att.std_head) == 513


@pytest.mark.parametrize(
    "filters, chain, out",
    [
        (32, (8, 17, 26), 51),
        (64, (17, 35, 53), 105),
        (128, (35, 71, 106), 212),
        (256, (71, 142, 213), 426),
        (512, (142, 284, 427), 853),
    ],
)
def test_multires_widths_table(filters, chain, out):
    assert multires_widths(filters, 1.67) == chain
    assert sum(chain) == out


def test_full_width_block_channels(full_model):
    assert [b.out_channels for b in full_model.encoders] == [51, 105, 212, 426]
    assert full_model.bridge.out_channels == 853
    assert [b.out_channels for b in full_model.decoders] == [426, 212, 105, 51]
    # CDRB unit input widths C, F+C, 2(F+C), 4(F+C) at level 1 (C=51, F=32)
    s1 = full_model.skips[0]
    assert [u.conv3.conv.in_channels for u in (s1.unit1, s1.unit2, s1.unit3, s1.unit4)] == [51, 83, 166, 332]
    assert s1.gate.in_channels == 51 and s1.gate.out_channels == 1


# ---------------------------------------------------------------------------------------------
# Initialisation (Keras defaults)


def test_keras_initialisation():
    model = small_model()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.eps == BN_EPS == 1e-3
        assert bn.momentum == BN_MOMENTUM == 0.01
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with_bias = [m for m in convs if m.bias is not None]
    assert with_bias  # gate, transposed convs, separable pointwise, head
    for conv in with_bias:
        assert torch.all(conv.bias == 0)
    for conv in convs:
        # Glorot-uniform bound; the receptive field multiplies both fans for Conv and ConvT alike
        w = conv.weight.detach()
        receptive = w[0, 0].numel()
        bound = math.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * receptive))
        assert float(w.abs().max()) <= bound + 1e-7
        if w.numel() >= 1000:  # uniform over [-bound, bound]: the extremes come close to the bound
            assert float(w.abs().max()) > 0.9 * bound


# ---------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("height, width", [(16, 16), (64, 64), (32, 80), (48, 16)])
def test_output_shape(height, width):
    model = small_model()
    with torch.no_grad():
        out = model(torch.rand(2, 3, height, width))
    assert out.shape == (2, 1, height, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("height, width", [(50, 64), (64, 40), (8, 8)])
def test_sizes_not_divisible_by_16_are_refused(height, width):
    model = small_model()
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(1, 3, height, width))


def test_aux_distance_head_gives_two_channels():
    model = small_model(aux_distance_head=True)
    assert model.config.out_channels == 2
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 48)).shape == (1, 2, 32, 48)


def test_invalid_modes_are_refused():
    with pytest.raises(ValueError, match="gate_mode"):
        GRUNetConfig(gate_mode="scalar")
    with pytest.raises(ValueError, match="attention_mode"):
        GRUNetConfig(attention_mode="max")


# ---------------------------------------------------------------------------------------------
# Determinism and batch independence


def _trained_bn(model: GRUNet, seed: int = 1) -> GRUNet:
    """Give BN non-trivial running statistics so eval mode exercises them."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 3, 32, 32))
    return model.eval()


def test_eval_mode_is_deterministic():
    model = _trained_bn(small_model())
    x = torch.rand(2, 3, 48, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)


def _tile_and_neighbours() -> tuple[torch.Tensor, torch.Tensor]:
    """One tile and three darker tiles to batch it with."""
    gen = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 64, 64, generator=gen), torch.rand(3, 3, 64, 64, generator=gen) * 0.5


def test_per_sample_gate_makes_tiles_independent_of_their_batch():
    model = _trained_bn(small_model())
    tile, others = _tile_and_neighbours()
    with torch.no_grad():
        alone = model(tile)
        first = model(torch.cat([tile, others]))[:1]
        last = model(torch.cat([others, tile]))[-1:]
    assert torch.allclose(alone, first, atol=1e-5, rtol=0)
    assert torch.allclose(alone, last, atol=1e-5, rtol=0)


def test_batch_mean_gate_depends_on_batch_composition():
    """The as-written gate averages over the batch: the same tile changes with its neighbours."""
    model = small_model(gate_mode="batch_mean")
    model.load_state_dict(_trained_bn(small_model()).state_dict())
    tile, others = _tile_and_neighbours()
    with torch.no_grad():
        alone = model(tile)
        batched = model(torch.cat([tile, others]))[:1]
    assert float((alone - batched).abs().max()) > 1e-3


def test_attention_sampling_at_inference_only_in_sample_mode():
    state = _trained_bn(small_model()).state_dict()
    x = torch.rand(1, 3, 32, 32)
    outputs = {}
    for mode in ("mean", "sample"):
        model = small_model(attention_mode=mode)
        model.load_state_dict(state)
        with torch.no_grad():
            outputs[mode] = (model(x), model(x))
    assert torch.equal(*outputs["mean"])
    assert float((outputs["sample"][0] - outputs["sample"][1]).abs().max()) > 1e-4


def test_training_mode_samples_the_attention():
    model = small_model().train()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert float((a - b).abs().max()) > 1e-4


def test_training_mode_runs_backward():
    model = small_model().train()
    out = model(torch.rand(2, 3, 32, 32))
    out.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    # the text-prior transposed convs are learnable through the Gaussian sample in training
    assert any(float(t.weight.grad.abs().sum()) > 0 for t in model.attention.text_ups)


# ---------------------------------------------------------------------------------------------
# Text prior


def test_text_prior_is_fixed_non_negative_and_saved():
    a, b = make_text_prior(), make_text_prior()
    assert torch.equal(a, b)
    assert a.shape == (1, 1, 32, 32)
    assert float(a.min()) >= 0.0
    assert float(a.max()) > 0.0 and float(a.std()) > 0.0  # a map, not a constant
    model = small_model()
    state = model.state_dict()
    assert "attention.text_prior" in state
    assert torch.equal(state["attention.text_prior"], a)
    assert "attention.text_prior" not in dict(model.named_parameters())
    # different seeds give different priors: the seed is what pins it down
    assert not torch.equal(make_text_prior(seed=7), a)


def test_text_prior_from_state_dict_changes_outputs():
    """The buffer, not a recomputation, feeds the attention: a checkpoint fully determines outputs."""
    model = _trained_bn(small_model())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        state = model.state_dict()
        state["attention.text_prior"] = state["attention.text_prior"] * 3 + 1
        model.load_state_dict(state)
        after = model(x)
    assert float((before - after).abs().max()) > 1e-5


# ---------------------------------------------------------------------------------------------
# Predictor (CPU)


def test_predictor_matches_model_and_crops_padding():
    bundle = untrained_bundle(GRUNetConfig(**SMALL))
    predictor = Predictor(bundle, device="cpu", amp="fp32", threads=1)  # fp32: compared with the plain model
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(2, 32, 48, 3), dtype=np.uint8)
    result = predictor.predict(tiles)
    assert set(result) == {"prob"}
    assert result["prob"].shape == (2, 32, 48) and result["prob"].dtype == np.float32
    with torch.no_grad():
        expected = torch.sigmoid(bundle.model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255))[:, 0]
    np.testing.assert_allclose(result["prob"], expected.numpy(), atol=1e-6)
    image = rng.integers(0, 256, size=(37, 50, 3), dtype=np.uint8)
    single = predict_image(predictor, image)
    assert single["prob"].shape == (37, 50)
    assert 0.0 <= single["prob"].min() and single["prob"].max() <= 1.0


def test_predictor_returns_distance_for_aux_head():
    bundle = untrained_bundle(GRUNetConfig(**SMALL, aux_distance_head=True))
    result = Predictor(bundle, device="cpu", threads=1).predict(np.zeros((1, 16, 32, 3), np.uint8))
    assert set(result) == {"prob", "distance"}
    assert result["distance"].shape == (1, 16, 32)
