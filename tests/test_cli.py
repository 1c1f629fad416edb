"""CLI: segment round trip at another pixel size, evaluate, info, and user mistakes (bad settings,
devices, options) answered with a message naming the setting and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_grunet.cli import EXIT_USAGE, main
from wsi_grunet.config import ConfigError
from wsi_grunet.model.checkpoint import load_checkpoint
from wsi_grunet.model.predictor import Predictor, choose_device
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.segment import segment_image

from synthetic import synthetic_rgb, write_synthetic_slide


@pytest.fixture
def slide(tmp_path) -> Path:
    path = tmp_path / "s.svs"
    write_synthetic_slide(path, 64, 64, mpp=0.5, levels=1)
    return path


def test_segment_round_trip_at_another_mpp(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rgb, _ = synthetic_rgb(300, 220, mpp=0.25, seed=1)
    Image.fromarray(rgb).save(images / "a.png")
    out = tmp_path / "labels"
    assert (
        main(
            [
                "segment",
                str(images),
                "--out",
                str(out),
                "--mpp",
                "0.25",
                "--weights",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--save-probability",
                "--quiet",
            ]
        )
        == 0
    )
    labels = np.asarray(Image.open(out / "a.png"))
    assert labels.shape == (220, 300) and labels.dtype == np.uint16
    assert np.asarray(Image.open(out / "a_prob.png")).shape == (220, 300)
    # The same image given at the model's own pixel size is not resampled: the label maps differ in size.
    bundle = load_checkpoint(tiny_checkpoint)
    same, _ = segment_image(Predictor(bundle, "cpu"), rgb, 0.5, PostprocessParams(threshold=0.45))
    assert same.shape == (220, 300)
    half, prob = segment_image(Predictor(bundle, "cpu"), rgb, 0.25, PostprocessParams(threshold=0.45))
    assert half.shape == (220, 300) and prob.shape == (220, 300)


def test_segment_honours_the_tiling_settings(tiny_checkpoint, tmp_path):
    """tiling.tile_size/halo from --set and from --config reach the tiled prediction of `segment`."""
    images = tmp_path / "images"
    images.mkdir()
    rgb, _ = synthetic_rgb(200, 160, mpp=0.5, seed=3)
    Image.fromarray(rgb).save(images / "a.png")
    common = [
        "--mpp",
        "0.5",
        "--weights",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--save-probability",
        "--quiet",
        "--set",
        "model.amp=fp32",
        "model.tta=none",  # images get the flips by default; the expected map below is one pass
    ]
    assert main(["segment", str(images), "--out", str(tmp_path / "one"), *common]) == 0  # one 1152-pixel tile
    small = ["tiling.tile_size=64", "tiling.halo=16", "output.chunk=32"]
    assert main(["segment", str(images), "--out", str(tmp_path / "tiled"), *common, *small]) == 0
    config = tmp_path / "tiles.yaml"
    config.write_text("tiling:\n  tile_size: 64\n  halo: 16\noutput:\n  chunk: 32\n")
    assert main(["segment", str(images), "--out", str(tmp_path / "file"), "--config", str(config), *common]) == 0

    def prob(folder: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / folder / "a_prob.png")).astype(np.int16)

    bundle = load_checkpoint(tiny_checkpoint)
    _, expected = segment_image(
        Predictor(bundle, "cpu", amp="fp32"), rgb, 0.5, PostprocessParams(), tile_size=64, halo=16
    )
    assert np.abs(prob("tiled") - np.round(expected * 255)).max() <= 1
    assert np.array_equal(prob("tiled"), prob("file"))
    # a 16-pixel halo is far narrower than the model's receptive field: tiles of 64 px change the maps
    assert np.abs(prob("tiled") - prob("one")).max() > 10


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
    # --config and --set are accepted (and checked) by evaluate too
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  device: cpu\n")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(pred),
                "--truth",
                str(truth),
                "--config",
                str(config),
                "--set",
                "model.amp=fp32",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--set", "model.amp=fp33", "--quiet"])
        == EXIT_USAGE
    )


def test_info_prints_levels(shared_dir, capsys):
    assert main(["info", str(shared_dir / "slides" / "CMU-1-Small-Region.svs")]) == 0
    printed = capsys.readouterr().out
    assert "0.499" in printed and "2220" in printed


def test_info_takes_config_and_set(slide, tmp_path, capsys):
    assert main(["info", str(slide), "--set", "slide.mpp=0.25"]) == 0
    with_set = capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("slide:\n  mpp: 0.25\n")
    assert main(["info", str(slide), "--config", str(config)]) == 0
    assert capsys.readouterr().out == with_set
    assert main(["info", str(slide)]) == 0
    plain = capsys.readouterr().out
    assert "overridden with --mpp 0.25 um/px" in with_set and "model image 32 x 32 px" in with_set
    assert "overridden" not in plain and "model image 64 x 64 px" in plain


def test_run_with_bad_config_exits_with_usage_code(slide, tmp_path, caplog):
    out = tmp_path / "o"
    assert main(["run", str(slide), "--out", str(out), "--set", "tiling.nope=1", "--quiet"]) == EXIT_USAGE
    assert "unknown key(s) tiling.nope; known keys of tiling: tile_size, halo" in caplog.text
    assert not out.exists(), "nothing is written for a configuration error"


def test_run_with_amp_fp32_unfused_runs_and_records_it(slide, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        main(
            [
                "run",
                str(slide),
                "--out",
                str(out),
                "--weights",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--workers",
                "1",
                "--quiet",
                "--set",
                "model.amp=fp32",
                "model.tta=none",
                "model.fuse=false",
                "tiling.tile_size=256",
                "tiling.halo=64",
                "output.chunk=128",
            ]
        )
        == 0
    )
    report = json.loads((out / "s" / "report.json").read_text())
    assert report["config"]["model"]["amp"] == "fp32"
    assert report["config"]["model"]["fuse"] is False and report["model"]["inference"]["fused"] is False
    assert "WARNING: UNTRAINED GRU-Net (random weights)" in capsys.readouterr().out
    assert report["config"]["tiling"] == {"tile_size": 256, "halo": 64}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "model.device: 'gpu' is not a device; allowed: auto, cpu, cuda or cuda:N"),
        (["--set", "cluster.workers=0"], "cluster.workers: 0 is out of range; allowed: an integer >= 1"),
        (["--workers", "0"], "cluster.workers: 0 is out of range; allowed: an integer >= 1 (set on the command line)"),
        (
            ["--set", "output.chunk=0"],
            "output.chunk: 0 is out of range; allowed: an integer >= 16 and a multiple of 16",
        ),
        (["--set", "model.amp=fp33"], "model.amp: 'fp33' is not one of auto, bf16, fp16, fp32"),
        (["--tile-size", "576", "--set", "output.chunk=128"], "output.chunk: 128 does not divide the tile core 320"),
        (["--set", "slurm.jobs_max=0"], "slurm.jobs_max: 0 is out of range"),
        (["--set", "model.amp"], "--set 'model.amp' must look like section.key=value"),
    ],
)
def test_run_rejects_bad_settings_before_touching_slides(args, message, tmp_path, caplog):
    missing = tmp_path / "no-such-slide.svs"  # never looked at: the settings are checked first
    out = tmp_path / "o"
    assert main(["run", str(missing), "--out", str(out), "--quiet", *args]) == EXIT_USAGE
    assert message in caplog.text
    assert "no slide files found" not in caplog.text and not out.exists()


def test_cuda_requested_without_cuda_is_a_config_error(slide, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the missing-CUDA message cannot be produced")
    assert main(["run", str(slide), "--out", str(tmp_path / "o"), "--device", "cuda", "--quiet"]) == EXIT_USAGE
    assert "model.device: 'cuda' needs CUDA, which is not available here" in caplog.text
    assert "allowed here: auto or cpu" in caplog.text
    with pytest.raises(ConfigError, match="^device: 'cuda:0' needs CUDA"):
        choose_device("cuda:0", key="device")


def test_choose_device_names_the_allowed_values():
    assert choose_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:0:1", "cpu:0"):
        with pytest.raises(ConfigError, match=rf"^model\.device: '{bad}' is not a device; allowed: auto, cpu, cuda or"):
            choose_device(bad)


def test_train_rejects_a_misspelt_schedule(tmp_path, caplog):
    config = tmp_path / "train.yaml"
    config.write_text("schedule: cosin\n")
    args = ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"), "--quiet"]
    assert main([*args, "--config", str(config)]) == EXIT_USAGE
    assert f"schedule: 'cosin' is not one of constant, cosine, step (set in {config})" in caplog.text
    assert main([*args, "--set", "step_gamma=2"]) == EXIT_USAGE
    assert "step_gamma: 2.0 is out of range; allowed: a number > 0 and <= 1" in caplog.text
    assert not (tmp_path / "m.safetensors").exists()


def test_argparse_errors_return_the_usage_code(capsys):
    assert main(["run", "x", "--out", "o", "--amp", "off"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --amp: invalid choice: 'off'" in err and "fp32" in err
    assert main(["--version"]) == 0


def test_installed_command_prints_no_traceback(tmp_path):
    """The console script itself, in a fresh process: a bad setting gives one clear line and exit code 2."""
    script = Path(sys.executable).with_name("wsi-grunet")
    assert script.exists(), f"the wsi-grunet console script is not installed beside {sys.executable}"
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  amp: off\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for args, message in [
        (
            ["run", str(tmp_path / "x.svs"), "--out", str(tmp_path / "o"), "--config", str(config)],
            f"model.amp: 'off' is not one of auto, bf16, fp16, fp32 (set in {config})",
        ),
        (["info", str(tmp_path / "x.svs"), "--set", "model.device=gpu"], "model.device: 'gpu' is not a device"),
        (
            ["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--mpp", "0.5", "--device", "cuda:7"],
            "model.device: 'cuda:7'",
        ),
    ]:
        done = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "Traceback" not in done.stderr and message in done.stderr, done.stderr
