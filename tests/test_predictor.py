"""Predictor: per-device speed settings, option checking and test-time augmentation (untrained small
GRU-Nets on CPU; the equivariance checks hold for any weights)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsi_grunet.config import ModelOptions
from wsi_grunet.errors import ConfigError
from wsi_grunet.model.checkpoint import untrained_bundle
from wsi_grunet.model.grunet import GRUNetConfig
from wsi_grunet.model.predictor import (
    TTA_TRANSFORMS,
    Predictor,
    Transform,
    available_cores,
    cpu_has_native_bf16,
)

SMALL = {"base_filters": 4, "attention_width": 8}


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield


def _bundle(**extra):
    return untrained_bundle(GRUNetConfig(**SMALL, **extra), seed=0)


def _tiles(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def _apply_np(transform: Transform, array: np.ndarray, channels: bool) -> np.ndarray:
    """The transform on numpy arrays: NHWC images (channels=True) or NHW maps."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if channels:
        return np.ascontiguousarray(transform.apply(tensor.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy())
    return transform.apply(tensor).numpy()


def _reference(bundle, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = bundle.model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255)
    return torch.sigmoid(logits).numpy()


def test_cpuinfo_flags_decide_native_bf16(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # a cap would decide instead (next test)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    without = tmp_path / "b"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    arm = tmp_path / "c"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu_has_native_bf16(with_bf16) is True
    assert cpu_has_native_bf16(without) is False
    assert cpu_has_native_bf16(arm) is True
    assert cpu_has_native_bf16(tmp_path / "missing") is False


def test_an_isa_cap_below_bf16_means_no_native_bf16(tmp_path, monkeypatch):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert cpu_has_native_bf16(with_bf16) is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_native_bf16(with_bf16) is True
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    assert cpu_has_native_bf16(with_bf16) is False


def test_auto_settings_on_cpu_follow_the_hardware():
    predictor = Predictor(_bundle(), device="cpu", threads=1)
    info = predictor.describe()
    native = cpu_has_native_bf16()
    assert info["device"] == "cpu" and info["layout"] == "channels_last"
    assert info["amp"] == ("bf16" if native else "fp32")
    assert info["dtype"] == ("bfloat16" if native else "float32")
    assert info["tta"] == "none" and info["tta_passes"] == 1 and info["threads"] == 1
    assert torch.get_num_threads() == 1


def test_threads_default_to_the_cores_this_process_may_use():
    before = torch.get_num_threads()
    try:
        predictor = Predictor(_bundle(), device="cpu", amp="fp32")
        assert predictor.describe()["threads"] == available_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_forced_fp32_nchw_equals_the_plain_model():
    bundle = _bundle()
    tiles = _tiles(2, 32, 48)
    predictor = Predictor(bundle, device="cpu", amp="fp32", channels_last=False, threads=1)
    assert predictor.describe()["layout"] == "nchw" and predictor.describe()["amp"] == "fp32"
    result = predictor.predict(tiles)
    assert set(result) == {"prob"} and result["prob"].dtype == np.float32 and result["prob"].shape == (2, 32, 48)
    np.testing.assert_allclose(result["prob"], _reference(bundle, tiles)[:, 0], atol=1e-6)


def test_fast_paths_stay_close_to_fp32():
    bundle = _bundle()
    tiles = _tiles(1, 64, 64, seed=3)
    reference = Predictor(bundle, device="cpu", amp="fp32", channels_last=False, threads=1).predict(tiles)["prob"]
    fp32_cl = Predictor(bundle, device="cpu", amp="fp32", channels_last=True, threads=1).predict(tiles)["prob"]
    np.testing.assert_allclose(fp32_cl, reference, atol=1e-5)
    bf16 = Predictor(bundle, device="cpu", amp="bf16", channels_last=True, threads=1).predict(tiles)["prob"]
    assert np.abs(bf16 - reference).max() < 0.05  # bf16 keeps 8 mantissa bits
    assert bf16.dtype == np.float32


def test_from_options_reads_model_options():
    bundle = _bundle()
    predictor = Predictor.from_options(bundle, ModelOptions(device="cpu"))
    assert predictor.device.type == "cpu"
    options = SimpleNamespace(device="cpu", amp="fp32", channels_last="false", tta="flips", threads=1, batch_size=4)
    info = Predictor.from_options(bundle, options).describe()
    assert (info["amp"], info["layout"], info["tta"], info["tta_passes"], info["threads"]) == (
        "fp32",
        "nchw",
        "flips",
        4,
        1,
    )
    assert Predictor.from_options(bundle, SimpleNamespace(device="cpu", tta="auto", threads=1)).tta == "none"


@pytest.mark.parametrize(
    ("name", "value", "setting"),
    [
        ("amp", "half", "model.amp"),
        ("channels_last", "maybe", "model.channels_last"),
        ("tta", "rot8", "model.tta"),
        ("threads", 0, "model.threads"),
    ],
)
def test_bad_options_name_the_setting(name, value, setting):
    with pytest.raises(ConfigError, match=setting):
        Predictor(_bundle(), device="cpu", **{name: value})


def test_bad_tiles_are_refused():
    predictor = Predictor(_bundle(), device="cpu", threads=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        predictor.predict(_tiles(1, 24, 32))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((1, 32, 32, 3), np.float32))


def test_transforms_form_the_dihedral_group():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    seen = set()
    for transform in TTA_TRANSFORMS["dihedral"]:
        moved = transform.apply(image)
        assert torch.equal(transform.undo(moved), image)
        seen.add(tuple(moved.flatten().tolist()) + tuple(moved.shape))
    assert len(seen) == 8
    assert {t.name for t in TTA_TRANSFORMS["flips"]} == {"rot0", "rot0+hflip", "rot180+hflip", "rot180"}
    up_down = TTA_TRANSFORMS["flips"][2].apply(image)
    assert torch.equal(up_down, torch.flip(image, dims=(-2,)))


def test_tta_is_the_mean_of_the_undone_passes():
    bundle = _bundle()
    tiles = _tiles(1, 32, 48, seed=5)
    plain = Predictor(bundle, device="cpu", amp="fp32", threads=1)
    passes = [_undo_np(t, plain.predict(_apply_np(t, tiles, True))["prob"]) for t in TTA_TRANSFORMS["rot4"]]
    expected = np.mean(passes, axis=0)
    got = Predictor(bundle, device="cpu", amp="fp32", tta="rot4", threads=1).predict(tiles)["prob"]
    assert got.shape == (1, 32, 48)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - plain.predict(tiles)["prob"]).max() > 1e-4  # the untrained model is not symmetric


def _undo_np(transform: Transform, maps: np.ndarray) -> np.ndarray:
    return transform.undo(torch.from_numpy(np.ascontiguousarray(maps))).numpy()


@pytest.mark.parametrize("mode", ["flips", "rot4", "dihedral"])
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_tta_output_is_equivariant(mode, amp):
    """predict(g x) == g predict(x) for every g of the mode's group, on a non-square tile: a
    transformed tile gives the transformed output, so stitching does not depend on the tiling."""
    predictor = Predictor(_bundle(aux_distance_head=True), device="cpu", amp=amp, tta=mode, threads=1)
    tiles = _tiles(2, 32, 48, seed=11)
    base = predictor.predict(tiles)
    assert base["prob"].shape == base["distance"].shape == (2, 32, 48)
    for transform in TTA_TRANSFORMS[mode]:
        moved = predictor.predict(_apply_np(transform, tiles, True))
        for key in ("prob", "distance"):
            np.testing.assert_allclose(moved[key], _apply_np(transform, base[key], False), atol=2e-6)


def test_without_tta_the_untrained_model_is_not_equivariant():
    """Control for the test above: the equivariance comes from the TTA, not from the model."""
    predictor = Predictor(_bundle(), device="cpu", amp="fp32", tta="none", threads=1)
    tiles = _tiles(1, 32, 48, seed=11)
    turn = Transform(1)
    moved = predictor.predict(_apply_np(turn, tiles, True))["prob"]
    assert np.abs(moved - _apply_np(turn, predictor.predict(tiles)["prob"], False)).max() > 1e-4


_HEAP_SCRIPT = """
import os, sys
import numpy as np
from wsi_grunet.model.cpu_heap import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = resident_mb()
block = np.ones(256 * 2**20, np.uint8)  # 256 MB: far above glibc's largest mmap threshold
del block
print(resident_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retained_heap_keeps_a_freed_large_block_for_the_next_pass():
    """glibc's default maps a 256 MB block and unmaps it on free (the next pass faults in fresh
    pages); once freed memory is retained, the block stays in the heap for the next allocation."""
    kept = {}
    for mode in ("default", "retain"):
        run = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True, text=True, check=True)
        kept[mode] = float(run.stdout.split()[-1])
    assert kept["default"] < 16, kept
    assert kept["retain"] > 240, kept


def test_cpu_predictor_keeps_freed_memory():
    assert Predictor(_bundle(), "cpu", threads=1).describe()["heap_retained"] is sys.platform.startswith("linux")


def test_auto_tta_depends_on_workload_on_cpu():
    """Slides on a CPU run one pass (the model dominates the run time); annotated images get the flips."""
    assert Predictor(_bundle(), "cpu", tta="auto", threads=1).tta == "none"
    images = Predictor(_bundle(), "cpu", tta="auto", threads=1, workload="images")
    assert images.tta == "flips" and len(images.transforms) == 4
    assert Predictor(_bundle(), "cpu", tta="rot4", threads=1, workload="images").tta == "rot4"  # explicit wins


def test_retain_heap_false_leaves_the_allocator_alone():
    script = (
        "from wsi_grunet.config import load_config\n"
        "from wsi_grunet.model.checkpoint import untrained_bundle\n"
        "from wsi_grunet.model.grunet import GRUNetConfig\n"
        "from wsi_grunet.model.predictor import Predictor\n"
        "cfg = load_config(None, [{'model': {'retain_heap': False, 'device': 'cpu', 'threads': 1}}])\n"
        "bundle = untrained_bundle(GRUNetConfig(base_filters=4, attention_width=8), seed=0)\n"
        "print(Predictor.from_options(bundle, cfg.model).describe()['heap_retained'])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.split()[-1] == "False"
