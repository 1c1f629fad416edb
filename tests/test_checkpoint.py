"""Checkpoints: safetensors + JSON round trip, refusal of damaged or foreign files (never by running
code from them), and the packaged default weights."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wsi_grunet.errors import CheckpointError
from wsi_grunet.model.checkpoint import (
    FORMAT_NAME,
    PACKAGED_DIR,
    checkpoint_paths,
    load_checkpoint,
    packaged_weights,
    resolve_weights,
    save_checkpoint,
    untrained_bundle,
)
from wsi_grunet.model.grunet import GRUNet, GRUNetConfig
from wsi_grunet.postprocess import PostprocessParams

SMALL = dict(base_filters=4, attention_width=8)
META = {
    "mpp": 0.5,
    "patch_size": 256,
    "threshold": 0.45,
    "trained": True,
    "postprocess": {"threshold": 0.45, "min_area_um2": 6.0},
    "training": {"data": ["synthetic"], "step": 12},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_trained_model(seed: int = 0) -> GRUNet:
    """A narrow model whose BN statistics and text prior differ from a fresh one."""
    torch.manual_seed(seed)
    model = GRUNet(GRUNetConfig(**SMALL)).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 32, 32))
        model.attention.text_prior.mul_(2.0).add_(0.25)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved(tmp_path) -> tuple[Path, GRUNet]:
    model = small_trained_model()
    tensor_path = save_checkpoint(tmp_path / "model", model, META)
    return tensor_path, model


def rewrite_json(tensor_path: Path, change) -> Path:
    json_path = tensor_path.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    change(meta)
    json_path.write_text(json.dumps(meta))
    return json_path


def refused(path, *names: Path, match: str | None = None) -> str:
    """Loading must raise CheckpointError whose message names each given file."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    for name in names:
        assert str(name) in message, message
    if match is not None:
        assert match in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_outputs_and_metadata(saved):
    tensor_path, model = saved
    json_path = tensor_path.with_suffix(".json")
    assert tensor_path.name == "model.safetensors" and json_path.exists()
    assert not list(tensor_path.parent.glob("*.tmp"))  # written atomically
    bundle = load_checkpoint(tensor_path)
    assert not bundle.model.training
    x = torch.rand(2, 3, 48, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = torch.sigmoid(model(x)), torch.sigmoid(bundle.model(x))
    # large weight tensors are stored in float16
    assert torch.allclose(got, expected, atol=2e-3, rtol=0)
    # metadata survives, with the architecture and the hash recorded
    meta = bundle.metadata
    for key, value in META.items():
        assert meta[key] == value
    assert meta["format"] == FORMAT_NAME
    assert meta["architecture"] == {"name": "grunet", **model.config.to_dict()}
    assert meta["sha256"] == sha256(tensor_path) == bundle.sha256
    assert bundle.trained and bundle.mpp == 0.5 and bundle.threshold == 0.45
    assert bundle.model.config == model.config
    assert str(tensor_path) in bundle.source and "sha256" in bundle.status_line


def test_round_trip_keeps_buffers_exactly(saved):
    tensor_path, model = saved
    bundle = load_checkpoint(tensor_path.with_suffix(""))  # the bare name also works
    loaded = bundle.model.state_dict()
    for name, value in model.state_dict().items():
        if "running" in name or name.endswith("num_batches_tracked") or name == "attention.text_prior":
            assert torch.equal(loaded[name], value), name
    stored = load_file(str(tensor_path))
    assert any(v.dtype == torch.float16 for v in stored.values())
    assert stored["attention.text_prior"].dtype == torch.float32


def test_full_precision_round_trip_is_exact(tmp_path):
    model = small_trained_model(seed=3)
    tensor_path = save_checkpoint(tmp_path / "full.json", model, META, half=False)
    bundle = load_checkpoint(tmp_path / "full.json")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), model(x))
    assert all(v.dtype != torch.float16 for v in load_file(str(tensor_path)).values())


# ---------------------------------------------------------------------------------------------
# Refusals


def test_random_bytes_with_valid_looking_json(saved):
    tensor_path, _ = saved
    tensor_path.write_bytes(os.urandom(4096))
    rewrite_json(tensor_path, lambda m: m.update(sha256=sha256(tensor_path)))  # hash matches: parsing must refuse
    refused(tensor_path, tensor_path, match="not a valid safetensors file")


def test_json_that_is_not_json(saved):
    tensor_path, _ = saved
    json_path = tensor_path.with_suffix(".json")
    json_path.write_text("{format: wsi-grunet-checkpoint,")
    refused(tensor_path, json_path, match="not a valid checkpoint metadata file")


def test_binary_json_file(saved):
    tensor_path, _ = saved
    json_path = tensor_path.with_suffix(".json")
    json_path.write_bytes(b"\xff\xfe\x00\x80" * 16)
    refused(tensor_path, json_path)


def test_json_with_wrong_format(saved):
    tensor_path, _ = saved
    json_path = rewrite_json(tensor_path, lambda m: m.update(format="pytorch-state-dict"))
    refused(tensor_path, json_path, match="not a wsi-grunet checkpoint")


def test_json_that_is_a_list(saved):
    tensor_path, _ = saved
    json_path = tensor_path.with_suffix(".json")
    json_path.write_text("[1, 2, 3]")
    refused(tensor_path, json_path)


@pytest.mark.parametrize("key", ["mpp", "architecture", "trained", "format_version"])
def test_json_with_missing_keys(saved, key):
    tensor_path, _ = saved
    json_path = rewrite_json(tensor_path, lambda m: m.pop(key))
    refused(tensor_path, json_path, match=key)


@pytest.mark.parametrize(
    "change",
    [
        {"format_version": 99},
        {"format_version": "1"},
        {"mpp": "half a micron"},
        {"mpp": 0},
        {"threshold": None},
        {"architecture": "grunet"},
        {"architecture": {"name": "unet", "base_filters": 4}},
        {"architecture": {"name": "grunet", "base_filters": 4, "attention_width": 8, "depth": 5}},
        {"architecture": {"name": "grunet", "base_filters": "four", "attention_width": 8}},
        {"architecture": {"name": "grunet", "base_filters": 4, "attention_width": 8, "gate_mode": "max"}},
    ],
    ids=[
        "newer-version",
        "version-string",
        "mpp-text",
        "mpp-zero",
        "threshold-null",
        "arch-string",
        "arch-unknown",
        "arch-extra-key",
        "arch-bad-width",
        "arch-bad-mode",
    ],
)
def test_json_with_bad_values(saved, change):
    tensor_path, _ = saved
    json_path = rewrite_json(tensor_path, lambda m: m.update(change))
    refused(tensor_path, json_path)


def test_tensor_file_whose_hash_differs(saved):
    tensor_path, model = saved
    # a valid safetensors file, but not the one the JSON describes
    save_file({k: v.contiguous() for k, v in small_trained_model(seed=9).state_dict().items()}, str(tensor_path))
    refused(tensor_path, tensor_path, match="SHA-256")
    # the hash check can be switched off explicitly, and then the other file loads
    bundle = load_checkpoint(tensor_path, verify_hash=False)
    assert not torch.equal(bundle.model.head.weight, model.head.weight)


def test_tensors_of_another_architecture(saved):
    tensor_path, _ = saved
    rewrite_json(tensor_path, lambda m: m["architecture"].update(base_filters=8))
    refused(tensor_path, tensor_path, match="shape")


def test_tensors_missing_from_file(saved):
    tensor_path, _ = saved
    tensors = load_file(str(tensor_path))
    del tensors["head.weight"]
    save_file(tensors, str(tensor_path))
    rewrite_json(tensor_path, lambda m: m.update(sha256=sha256(tensor_path)))
    refused(tensor_path, tensor_path, match="head.weight")


def test_missing_tensor_file(saved):
    tensor_path, _ = saved
    tensor_path.unlink()
    refused(tensor_path, tensor_path, match="missing")


def test_missing_json_file(saved):
    tensor_path, _ = saved
    json_path = tensor_path.with_suffix(".json")
    json_path.unlink()
    refused(tensor_path, json_path, match="missing")


class _TouchOnUnpickle:
    """Unpickling this object creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_renamed_safetensors_is_refused_without_running_it(saved, tmp_path):
    tensor_path, _ = saved
    marker = tmp_path / "payload-ran"
    # control: the payload does run when unpickled
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(control)))
    assert control.exists()

    tensor_path.write_bytes(pickle.dumps({"head.weight": _TouchOnUnpickle(marker)}))
    rewrite_json(tensor_path, lambda m: m.update(sha256=sha256(tensor_path)))
    refused(tensor_path, tensor_path)
    with pytest.raises(CheckpointError):
        load_checkpoint(tensor_path, verify_hash=False)
    assert not marker.exists()


def test_torch_save_file_renamed_safetensors_is_refused(saved, tmp_path):
    tensor_path, model = saved
    marker = tmp_path / "payload-ran"
    torch.save({"state": model.state_dict(), "payload": _TouchOnUnpickle(marker)}, tensor_path)
    rewrite_json(tensor_path, lambda m: m.update(sha256=sha256(tensor_path)))
    refused(tensor_path, tensor_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Packaged weights and fallbacks


@pytest.fixture(scope="module")
def packaged():
    path = packaged_weights()
    assert path is not None, f"no packaged weights in {PACKAGED_DIR}"
    return path, load_checkpoint(path)


def test_packaged_weights_load_and_describe_themselves(packaged):
    path, bundle = packaged
    assert path.parent == PACKAGED_DIR and path.name == "grunet_default.safetensors"
    assert bundle.trained is True
    assert bundle.mpp == 0.5
    assert 0.0 < bundle.threshold < 1.0
    params = PostprocessParams.from_dict(bundle.metadata["postprocess"])
    assert params.threshold == bundle.threshold
    assert bundle.metadata["sha256"] == sha256(path) == bundle.sha256
    assert bundle.model.config == GRUNetConfig(
        **{k: v for k, v in bundle.metadata["architecture"].items() if k != "name"}
    )
    assert "UNTRAINED" not in bundle.status_line
    assert bundle.metadata["training"]["data"]  # the training data are recorded


def test_resolve_weights_defaults_to_packaged(packaged):
    path, bundle = packaged
    resolved = resolve_weights(None)
    assert resolved.source == str(path) and resolved.sha256 == bundle.sha256 and resolved.trained


def test_resolve_weights_with_a_path(saved):
    tensor_path, _ = saved
    assert resolve_weights(str(tensor_path)).sha256 == sha256(tensor_path)
    with pytest.raises(CheckpointError):
        resolve_weights(str(tensor_path.parent / "absent.safetensors"))


def test_untrained_bundle_says_so():
    bundle = untrained_bundle(GRUNetConfig(**SMALL))
    assert not bundle.trained
    assert "UNTRAINED" in bundle.status_line
    assert bundle.mpp == 0.5 and bundle.sha256 is None
    assert not bundle.model.training
    # the same seed gives the same random model
    again = untrained_bundle(GRUNetConfig(**SMALL))
    assert torch.equal(again.model.head.weight, bundle.model.head.weight)


def test_dots_in_a_checkpoint_name_are_kept(tmp_path):
    assert checkpoint_paths(tmp_path / "grunet_v1.5") == (
        tmp_path / "grunet_v1.5.safetensors",
        tmp_path / "grunet_v1.5.json",
    )
    assert checkpoint_paths(tmp_path / "grunet_v1.5.json")[0] == tmp_path / "grunet_v1.5.safetensors"
    # two runs whose names differ after a dot never share files
    model = GRUNet(GRUNetConfig(base_filters=4, attention_width=8)).eval()
    for name in ("run.a", "run.b"):
        save_checkpoint(
            tmp_path / name, model, {"mpp": 0.5, "patch_size": 256, "threshold": 0.5, "trained": False, "name": name}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run.a.json",
        "run.a.safetensors",
        "run.b.json",
        "run.b.safetensors",
    ]
    assert load_checkpoint(tmp_path / "run.a").metadata["name"] == "run.a"
