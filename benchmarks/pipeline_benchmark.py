"""Where a slide's time goes: model-only rate, end-to-end rate, time per stage, model busy share and
peak memory summed over every process of the run (driver + Dask workers), in one run on one slide.

    python benchmarks/pipeline_benchmark.py SLIDE [--weights null-model] [--device cpu] [--workers 2]
        [--tile-size 1152] [--copies N] [--json benchmarks/results/NAME.json] [-- extra `wsi-grunet run` arguments]

The end-to-end run is the real command line (`wsi-grunet run`) in a subprocess; its report.json gives
the stage timings. The model-only rate is measured in this process on tiles read from the same slide,
with the same model, device, dtype and batch size. `--weights null-model` replaces the network by a
colour-deconvolution stand-in, so the non-model ceiling of the pipeline is measured on any machine.
`--copies N` runs one cohort of N copies of the slide (hard links), so the processes start once for all of them.
The model's CPU seconds are its thread's own for a one-thread model (the null model), else its wall
time times its threads; the CPU seconds of everything else give model pixels per CPU-second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from process_memory import run_measured  # benchmarks/ is on sys.path when run as a script


def model_only(slide: Path, weights: str | None, options_overrides: list[dict], n_batches: int) -> dict:
    """Tiles per second of the predictor alone on real tiles of the slide (after one warm-up batch)."""
    from wsi_grunet.config import load_config
    from wsi_grunet.inference import make_predictor
    from wsi_grunet.model.checkpoint import resolve_weights
    from wsi_grunet.plan import plan_slide
    from wsi_grunet.tile_work import read_tile

    cfg = load_config(None, options_overrides)
    bundle = resolve_weights(weights)
    plan, _, _ = plan_slide(slide, slide.stem, cfg, bundle.mpp)
    tiles = plan.tiles_to_run() or plan.all_tiles()
    predictor = make_predictor(bundle, cfg.model)
    batch = cfg.model.batch_size if predictor.device.type == "cuda" else 1
    images = np.stack([read_tile(plan.reader_args(), tiles[k % len(tiles)]) for k in range(batch)])
    predictor.predict(images)  # warm-up (cudnn autotuning, allocator)
    start = time.perf_counter()
    for _ in range(n_batches):
        predictor.predict(images)
    seconds = time.perf_counter() - start
    read_start = time.perf_counter()
    for tile in tiles[: min(len(tiles), 16)]:
        read_tile(plan.reader_args(), tile)
    read_s = (time.perf_counter() - read_start) / min(len(tiles), 16)
    return {
        "tiles_per_s": n_batches * batch / seconds,
        "batch": batch,
        "predictor": predictor.describe(),
        "read_decode_s_per_tile_1proc": read_s,
    }


def model_cpu_s(timings: dict, inference: dict) -> float:
    """CPU seconds of the model in the driver: a one-thread model's are measured (its thread's CPU time);
    a multi-threaded one's are bounded by its wall time times its threads."""
    threads = inference.get("threads", 1)
    if threads == 1 and "inference_cpu_s" in timings:
        return float(timings["inference_cpu_s"])
    return float(timings.get("inference_s", 0.0)) * threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path)
    parser.add_argument("--weights", default=None, help="checkpoint path, 'null-model' or omitted for the packaged")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--model-batches", type=int, default=3)
    parser.add_argument("--skip-model-only", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="run one cohort of this many copies of the slide (hard links): start-up is paid once, as on a node that runs "
        "many slides (per-slide figures then sum over the copies)",
    )
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1 :]  # more `wsi-grunet run` arguments, after --

    overrides: list[dict] = [{"model": {"device": args.device, "weights": args.weights}}]
    if args.tile_size:
        overrides.append({"tiling": {"tile_size": args.tile_size}})
    result: dict = {
        "slide": str(args.slide),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
    }
    with tempfile.TemporaryDirectory(prefix="wsi-grunet-bench-") as tmp:
        out = Path(tmp) / "results"
        target = args.slide
        if args.copies > 1:
            target = Path(tmp) / "slides"
            target.mkdir()
            for k in range(args.copies):  # hard links: symbolic links to one file are one slide to the run
                copy = target / f"copy{k}{args.slide.suffix}"
                try:
                    os.link(args.slide.resolve(), copy)
                except OSError:  # another file system
                    shutil.copyfile(args.slide, copy)
        cmd = [
            sys.executable,
            "-m",
            "wsi_grunet.cli",
            "run",
            str(target),
            "--out",
            str(out),
            "--quiet",
            "--device",
            args.device,
            "--workers",
            str(args.workers),
            *args.extra,
        ]
        if args.weights:
            cmd += ["--weights", args.weights]
        if args.tile_size:
            cmd += ["--tile-size", str(args.tile_size)]
        measured = run_measured(cmd)
        wall, code = measured["wall_s"], measured["code"]
        peak_rss, peak_pss = measured["peak_rss_bytes"], measured["peak_pss_bytes"]
        reports = sorted(out.rglob("report.json"))
        if code != 0 or not reports:
            print(f"the run failed (exit code {code})", file=sys.stderr)
            return 1
        all_reports = [json.loads(path.read_text()) for path in reports]
        if len(all_reports) != args.copies:
            print(f"{len(all_reports)} slide reports, expected {args.copies}", file=sys.stderr)
            return 1
        report = all_reports[0]
    timings = report["timings"]
    counts = {"nuclei": sum(r["counts"]["nuclei"] for r in all_reports)}
    tiles = sum(r["counts"]["tiles_with_tissue"] for r in all_reports)
    model_cpu = sum(model_cpu_s(r["timings"], r["model"]["inference"]) for r in all_reports)
    tile = report["plan"]["tile_size"]
    core = tile - 2 * report["plan"]["halo"]
    mpp = report["model"]["mpp"]
    model_px = tiles * tile * tile
    tissue_mm2 = tiles * (core * mpp / 1000) ** 2
    e2e = {
        "command": " ".join(cmd[1:]),
        "copies": args.copies,
        "wall_s": wall,
        "tiles": tiles,
        "nuclei": counts["nuclei"],
        "tiles_per_s": tiles / wall,
        "model_mpx_per_s": model_px / wall / 1e6,
        "model_mpx_per_s_per_core": model_px / wall / 1e6 / (os.cpu_count() or 1),
        "tissue_mm2_per_s": tissue_mm2 / wall,
        # Everything but the model, per CPU-second: what CPU cores next to a GPU must sustain.
        "cpu_s_all_processes": measured["cpu_s"],
        "model_cpu_s": model_cpu,
        "model_mpx_per_cpu_s_outside_model": model_px / 1e6 / max(measured["cpu_s"] - model_cpu, 1e-9),
        "nuclei_per_s": counts["nuclei"] / wall,
        "peak_rss_gb_all_processes": peak_rss / 1e9,
        "peak_pss_gb_all_processes": peak_pss / 1e9,
        "model_busy_share_of_tile_phase": timings.get("inference_s", 0.0) / timings["tiles_s"],
        "model_busy_share_of_wall": sum(r["timings"].get("inference_s", 0.0) for r in all_reports) / wall,
        # With --copies: the first copy's stages (its tile phase is the one the busy share above refers to).
        "stages_s": {
            key: timings.get(key)
            for key in (
                "plan_s",
                "tiles_s",
                "inference_s",
                "read_wait_s",
                "postprocess_task_s",
                "labels_s",
                "pyramid_s",
                "vectors_s",
                "preview_s",
                "finish_s",
                "total_s",
            )
        },
        "inference": report["model"]["inference"],
    }
    result["end_to_end"] = e2e
    if not args.skip_model_only:
        mo = model_only(args.slide, args.weights, overrides, args.model_batches)
        result["model_only"] = mo
        result["end_to_end_over_model_only"] = e2e["tiles_per_s"] / mo["tiles_per_s"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
