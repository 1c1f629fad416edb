"""Side by side on one slide: TIAToolbox's SemanticSegmentor running GRU-Net (adapter) vs `wsi-grunet run`.

Same weights, same tiles (the run defaults: 1152 px read, 896 px kept, 0.5 um/px), same CPU precision (bf16 autocast,
channels-last, where the CPU has native bf16) on this machine. Each side runs as its own subprocess: TIAToolbox
in .venv-tiatoolbox (``bash benchmarks/setup_tiatoolbox_env.sh``), wsi-grunet in the current environment.
Reported: wall time of each command and their ratio, peak memory summed over each process tree (psutil,
sampled every 0.2 s: RSS of the process and all its children), and the Dice of the two nucleus foreground
masks (probability > 0.5) at model resolution. Each side's output is read for that comparison only after its
process has ended, so neither peak includes it. TIAToolbox's side stops at the probability map (semantic
segmentation); wsi-grunet's includes instances, GeoJSON and Parquet, which TIAToolbox's SemanticSegmentor
does not make.

    python benchmarks/compare_tiatoolbox.py --slide ../shared/slides/CMU-1-Small-Region.svs \
        --out benchmarks/results/tiatoolbox_cmu1_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_grunet.config import DEFAULT_HALO, DEFAULT_TILE_SIZE

ROOT = Path(__file__).resolve().parent.parent
TIA_PYTHON = ROOT / ".venv-tiatoolbox" / "bin" / "python"


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds and the peak process-tree memory (RSS and PSS sums, sampled every 0.2 s)."""
    from process_memory import run_measured  # benchmarks/ is on sys.path when run as a script

    measured = run_measured(cmd, cwd=ROOT, env=env, log=log, interval=0.2)
    if measured["code"]:
        sys.exit(f"error: {cmd[:3]} exited {measured['code']}; see {log}:\n{log.read_text()[-3000:]}")
    return {
        "wall_s": round(measured["wall_s"], 2),
        "peak_rss_tree_gb": round(measured["peak_rss_bytes"] / 1e9, 3),
        "peak_pss_tree_gb": round(measured["peak_pss_bytes"] / 1e9, 3),
        "command": " ".join(cmd),
    }


def tiatoolbox_side(args: argparse.Namespace) -> None:
    """Inside .venv-tiatoolbox: SemanticSegmentor on the slide; its output's path and the engine time
    go to ``--side-out`` (JSON)."""
    import torch
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor

    from wsi_grunet.interop.tiatoolbox_model import GRUNetTIAModel
    from wsi_grunet.model.predictor import cpu_has_native_bf16

    torch.set_num_threads(os.cpu_count() or 1)
    fast = cpu_has_native_bf16()
    model = GRUNetTIAModel.from_weights(
        args.weights, patch=args.patch, halo=args.halo, amp="bf16" if fast else "fp32", channels_last=fast
    )
    engine = SemanticSegmentor(model=model, batch_size=1, num_workers=0, device="cpu", verbose=False)
    # The output stays on disk for the parent to read after this process has ended, so the peak memory
    # measured here is the engine's, not that of loading a whole slide's probabilities to compare them.
    start = time.perf_counter()
    saved = engine.run(
        [Path(args.slide)],
        patch_mode=False,
        ioconfig=model.ioconfig,
        save_dir=Path(args.side_out).parent / "tia_output",
        output_type="zarr",
        auto_get_mask=True,
        return_probabilities=True,
        overwrite=True,
    )
    engine_s = time.perf_counter() - start
    path = saved[Path(args.slide)] if isinstance(saved, dict) else saved
    Path(args.side_out).write_text(
        json.dumps(
            {
                "engine_s": round(engine_s, 2),
                "output": str(path),
                "amp": model.amp,
                "channels_last": model.channels_last,
                "tiatoolbox_tissue_mask": True,
            }
        )
    )


def tiatoolbox_mask(output: str, rows_per_read: int = 1024) -> np.ndarray:
    """TIAToolbox's nucleus foreground (probability of class 1 > 0.5), read a band of rows at a time."""
    import zarr

    probabilities = zarr.open(output, mode="r")["probabilities"]
    height = probabilities.shape[0]
    return np.concatenate(
        [np.asarray(probabilities[y : y + rows_per_read, :, 1]) > 0.5 for y in range(0, height, rows_per_read)]
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    a, b = a[:h, :w], b[:h, :w]
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", required=True)
    parser.add_argument("--out", required=True, help="JSON report")
    parser.add_argument("--weights", default=None, help="checkpoint; default: the packaged weights")
    parser.add_argument("--patch", type=int, default=DEFAULT_TILE_SIZE)
    parser.add_argument("--halo", type=int, default=DEFAULT_HALO)
    parser.add_argument("--tiatoolbox-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiatoolbox_side:
        tiatoolbox_side(args)
        return
    if not TIA_PYTHON.exists():
        sys.exit(f"error: {TIA_PYTHON} absent; run `bash benchmarks/setup_tiatoolbox_env.sh` first")
    import zarr

    from wsi_grunet.slide.discovery import find_slides

    slide = Path(args.slide).resolve()
    name = find_slides([slide])[0].name
    with tempfile.TemporaryDirectory(prefix="compare-tia-") as tmp:
        work = Path(tmp)
        side_out = work / "tia_side.json"
        tia_cmd = [
            str(TIA_PYTHON),
            str(Path(__file__).resolve()),
            "--tiatoolbox-side",
            "--slide",
            str(slide),
            "--out",
            "-",
            "--side-out",
            str(side_out),
            "--patch",
            str(args.patch),
            "--halo",
            str(args.halo),
        ]
        if args.weights:
            tia_cmd += ["--weights", args.weights]
        tia = timed(tia_cmd, work / "tia.log")
        tia.update(json.loads(side_out.read_text()))
        tia_mask = tiatoolbox_mask(tia.pop("output"))
        tia["shape"] = list(tia_mask.shape)
        ours_cmd = [
            str(Path(sys.executable).with_name("wsi-grunet")),
            "run",
            str(slide),
            "--out",
            str(work / "res"),
            "--tile-size",
            str(args.patch),
            "--halo",
            str(args.halo),
            "--quiet",
        ]
        if args.weights:
            ours_cmd += ["--weights", args.weights]
        ours = timed(ours_cmd, work / "ours.log")
        slide_dir = work / "res" / name
        report = json.loads((slide_dir / "report.json").read_text())
        zarr_path = next(slide_dir.glob("*.ome.zarr"))
        prob = np.asarray(zarr.open_array(str(zarr_path / "0"), mode="r"))
        prob = prob[0] if prob.ndim == 3 else prob
        ours_mask = prob >= 128  # uint8 0-255 probability: > 0.5
        ours.update(
            {
                "shape": list(ours_mask.shape),
                "nuclei": report.get("counts", {}).get("nuclei"),
                "timings": report.get("timings"),
            }
        )
    result = {
        "slide": str(slide),
        "weights": args.weights or "packaged",
        "patch": args.patch,
        "halo": args.halo,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other work",
        "tiatoolbox": tia,
        "wsi_grunet": ours,
        "wall_time_ratio_tiatoolbox_over_wsi_grunet": round(tia["wall_s"] / ours["wall_s"], 3),
        "peak_memory_ratio_tiatoolbox_over_wsi_grunet": round(tia["peak_rss_tree_gb"] / ours["peak_rss_tree_gb"], 3),
        "peak_pss_ratio_tiatoolbox_over_wsi_grunet": round(tia["peak_pss_tree_gb"] / ours["peak_pss_tree_gb"], 3),
        "foreground_dice": round(dice(tia_mask, ours_mask), 4),
        "foreground_fraction": {
            "tiatoolbox": round(float(tia_mask.mean()), 4),
            "wsi_grunet": round(float(ours_mask.mean()), 4),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
