"""Train GRU-Net variants side by side on one GPU, tune post-processing, pick the default weights.

Variants (same data, seed, recipe and wall-time budget):
  faithful   single sigmoid output (the published head) at 0.5 um/px
  aux        + distance-to-background head at 0.5 um/px
  aux_025    + distance head at 0.25 um/px (4x the pixels per slide area: the resolution check)
Selection: the highest validation AJI (mean over MoNuSeg and CPM-15 validation images) among the
0.5 um/px variants; the 0.25 um/px variant replaces it only if its AJI is higher by more than 0.03.

Usage: python benchmarks/train_variants.py --data DIR... --work DIR --out DIR --minutes 5.5
Writes: <out>/results.json, the chosen checkpoint (<out>/grunet_default.json and the tensor file
split into <out>/grunet_default.safetensors.part-*) and a model-only throughput benchmark.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "faithful": {"mpp": 0.5, "aux_distance_head": False},
    "aux": {"mpp": 0.5, "aux_distance_head": True},
    "aux_025": {"mpp": 0.25, "aux_distance_head": True},
}


def _train_one(name: str, folders: list[str], work: str, minutes: float, extra: dict) -> None:
    from wsi_grunet.config import load_train_config
    from wsi_grunet.train.loop import train

    cfg = load_train_config(None, [{**VARIANTS[name], "max_minutes": minutes, "max_steps": 100000, **extra}])
    info = train([Path(f) for f in folders], Path(work) / name / "model", cfg, progress=False)
    (Path(work) / name / "train_info.json").write_text(json.dumps(info, indent=2))


def _validation_items(name: str, folders: list[str], work: str):
    from wsi_grunet.config import load_train_config
    from wsi_grunet.model.checkpoint import load_checkpoint
    from wsi_grunet.model.predictor import Predictor, predict_image
    from wsi_grunet.train.loop import load_training_data
    from wsi_grunet.train.tune import ValidationItem

    bundle = load_checkpoint(Path(work) / name / "model")
    cfg = load_train_config(None, [{"mpp": bundle.mpp}])
    data = load_training_data([Path(f) for f in folders], cfg)
    predictor = Predictor(bundle, amp="bf16")
    items = []
    for sample in data.val:
        out = predict_image(predictor, sample.image)
        items.append(ValidationItem(sample.name, sample.dataset, sample.labels, out["prob"], out.get("distance")))
    return bundle, items


def _benchmark(model_dir: Path, seconds: float = 4.0) -> list[dict]:
    from wsi_grunet.model.checkpoint import load_checkpoint
    from wsi_grunet.model.predictor import Predictor

    rows = []
    for amp in ("bf16", "fp16"):
        for batch in (8, 16):
            for channels_last in (False, True):
                predictor = Predictor(load_checkpoint(model_dir), amp=amp, channels_last=channels_last)
                tiles = np.random.default_rng(0).integers(0, 255, (batch, 1152, 1152, 3), dtype=np.uint8)
                predictor.predict(tiles)
                torch.cuda.synchronize()
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    predictor.predict(tiles)
                    n += batch
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                rows.append(
                    {
                        "amp": amp,
                        "batch": batch,
                        "channels_last": channels_last,
                        "tile": 1152,
                        "tiles_per_s": n / elapsed,
                        "megapixels_per_s": n * 1152 * 1152 / elapsed / 1e6,
                    }
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=5.5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra train config key=value")
    parser.add_argument("--tune-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--split-mb", type=int, default=15)
    parser.add_argument("--skip-train", action="store_true", help="reuse checkpoints already in --work")
    args = parser.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_train_one, args=(n, args.data, args.work, args.minutes, extra)) for n in args.variants]
    for p in procs if not args.skip_train else []:
        p.start()
    for p in procs if not args.skip_train else []:
        p.join()
    from wsi_grunet.train.tune import tune_postprocess

    results = {"variants": {}}
    for name in args.variants:
        if not (work / name / "model.json").exists():
            results["variants"][name] = {"error": "training produced no checkpoint"}
            continue
        start = time.perf_counter()
        bundle, items = _validation_items(name, args.data, args.work)
        tuned = tune_postprocess(items, bundle.mpp, workers=args.tune_workers)
        info = json.loads((work / name / "train_info.json").read_text())
        results["variants"][name] = {
            "mpp": bundle.mpp,
            "aux_distance_head": bundle.model.config.aux_distance_head,
            "train": info,
            "best_params": tuned["best"]["params"],
            "summary": tuned["best"]["summary"],
            "per_image": tuned["best"]["images"],
            "grid": tuned["grid"],
            "tune_seconds": time.perf_counter() - start,
        }
        print(name, json.dumps(tuned["best"]["summary"]), flush=True)
    scored = {n: v["summary"]["objective"]["aji"] for n, v in results["variants"].items() if "summary" in v}
    half = {n: s for n, s in scored.items() if VARIANTS[n]["mpp"] == 0.5}
    chosen = max(half, key=half.get) if half else max(scored, key=scored.get)
    if "aux_025" in scored and scored["aux_025"] > scored[chosen] + 0.03:
        chosen = "aux_025"
    results["chosen"] = chosen
    results["rule"] = "highest objective AJI at 0.5 um/px; 0.25 um/px only if better by > 0.03"
    # Store the tuned post-processing and validation results with the chosen weights.
    meta_path = work / chosen / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["postprocess"] = results["variants"][chosen]["best_params"]
    meta["threshold"] = meta["postprocess"]["threshold"]
    meta["validation"] = {
        "summary": results["variants"][chosen]["summary"],
        "selection": {n: round(s, 4) for n, s in scored.items()},
    }
    (out / "grunet_default.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    blob = (work / chosen / "model.safetensors").read_bytes()
    step = args.split_mb * 1024 * 1024
    for i in range(0, len(blob), step):
        (out / f"grunet_default.safetensors.part-{i // step:02d}").write_bytes(blob[i : i + step])
    if torch.cuda.is_available():
        results["benchmark_model_only"] = _benchmark(work / chosen / "model")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("chosen", chosen, scored, flush=True)


if __name__ == "__main__":
    main()
