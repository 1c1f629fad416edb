"""CLI: segment round trip at another pixel size, evaluate, info, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import synthetic_rgb, write_synthetic_slide

from wsi_grunet.cli import main
from wsi_grunet.config import ConfigError, load_config, parse_override
from wsi_grunet.model.checkpoint import load_checkpoint, save_checkpoint
from wsi_grunet.model.grunet import GRUNet, GRUNetConfig
from wsi_grunet.model.predictor import Predictor
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.segment import segment_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    save_checkpoint(out, GRUNet(GRUNetConfig(base_filters=4, attention_width=8)).eval(),
                    {"mpp": 0.5, "patch_size": 256, "threshold": 0.5, "trained": False})
    return out


def test_segment_round_trip_at_another_mpp(tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rgb, _ = synthetic_rgb(300, 220, mpp=0.25, seed=1)
    Image.fromarray(rgb).save(images / "a.png")
    out = tmp_path / "labels"
    assert main(["segment", str(images), "--out", str(out), "--mpp", "0.25", "--weights", str(tiny),
                 "--device", "cpu", "--save-probability", "--quiet"]) == 0
    labels = np.asarray(Image.open(out / "a.png"))
    assert labels.shape == (220, 300) and labels.dtype == np.uint16
    assert np.asarray(Image.open(out / "a_prob.png")).shape == (220, 300)
    # The same image given at the model's own pixel size is not resampled: the label maps differ in size.
    bundle = load_checkpoint(tiny)
    same, _ = segment_image(Predictor(bundle, "cpu"), rgb, 0.5, PostprocessParams(threshold=0.45))
    assert same.shape == (220, 300)
    half, prob = segment_image(Predictor(bundle, "cpu"), rgb, 0.25, PostprocessParams(threshold=0.45))
    assert half.shape == (220, 300) and prob.shape == (220, 300)


def test_evaluate_command_writes_json(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    labels = np.zeros((32, 32), np.uint16)
    labels[4:12, 4:12] = 1
    labels[20:28, 20:28] = 2
    Image.fromarray(labels).save(truth / "x.png")
    moved = np.roll(labels, 2, axis=1)
    Image.fromarray(moved).save(pred / "x.png")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    # Each 8x8 square shifted by 2 columns: IoU 48/80 = 0.6 > 0.5, so DQ 1, SQ 0.6, PQ 0.6, AJI 96/160.
    assert result["images"]["x"]["pq"] == pytest.approx(0.6)
    assert result["images"]["x"]["aji"] == pytest.approx(96 / 160)


def test_info_prints_levels(shared_dir, capsys):
    assert main(["info", str(shared_dir / "slides" / "CMU-1-Small-Region.svs")]) == 0
    printed = capsys.readouterr().out
    assert "0.499" in printed and "2220" in printed


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  tile_sise: 512\n")
    with pytest.raises(ConfigError, match="tile_sise"):
        load_config(bad)
    with pytest.raises(ConfigError, match="multiples of 16"):
        load_config(None, [parse_override("tiling.halo=10")])
    assert load_config(None, [parse_override("tiling.tile_size=512")]).tiling.core == 512 - 2 * 64


def test_run_with_bad_config_exits_nonzero(tmp_path, caplog):
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 64, 64, mpp=0.5, levels=1)
    assert main(["run", str(slide), "--out", str(tmp_path / "o"), "--set", "tiling.nope=1", "--quiet"]) != 0
    assert "nope" in caplog.text
