"""CPU forward time and peak memory of the full-width GRU-Net per precision/layout path and tile size.

Each (path, tile size) runs in a fresh subprocess, so the peak resident memory (ru_maxrss) belongs
to that configuration alone. Per-pixel figures divide by the tile's *core* (tile - 2 * halo), the
pixels a tile contributes to the slide, so they include the halo overhead.

    python benchmarks/cpu_inference.py --out benchmarks/results/cpu_inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PATHS = {  # name: (amp, channels_last)
    "nchw_fp32": ("fp32", False),
    "cl_fp32": ("fp32", True),
    "nchw_bf16": ("bf16", False),
    "cl_bf16": ("bf16", True),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(path: str, tile: int, repeats: int) -> dict:
    """One configuration, in this process: warm-up pass (sets the peak), then timed passes."""
    import numpy as np
    import torch

    from wsi_grunet.model.checkpoint import load_checkpoint, packaged_weights
    from wsi_grunet.model.predictor import Predictor

    amp, channels_last = PATHS[path]
    predictor = Predictor(load_checkpoint(packaged_weights()), device="cpu", amp=amp, channels_last=channels_last)
    tiles = np.random.default_rng(0).integers(0, 256, (1, tile, tile, 3), dtype=np.uint8)
    before_mb = _rss_mb()
    start = time.perf_counter()
    predictor.predict(tiles)
    first_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict(tiles)
        times.append(time.perf_counter() - start)
    return {
        "path": path,
        "tile": tile,
        "first_s": first_s,
        "times_s": times,
        "median_s": float(np.median(times)),
        "min_s": float(min(times)),
        "rss_before_forward_mb": before_mb,
        "peak_rss_mb": peak_mb,
        "forward_extra_mb": peak_mb - before_mb,
        "describe": predictor.describe(),
        "torch_threads": torch.get_num_threads(),
    }


def interleaved(configs: list[tuple[str, int]], rounds: int, halo: int) -> list[dict]:
    """Time every configuration once per round, in turn, in one process: on a shared machine the
    load then falls on all of them alike, and the minimum over rounds is the least disturbed."""
    import numpy as np

    from wsi_grunet.model.checkpoint import load_checkpoint, packaged_weights
    from wsi_grunet.model.predictor import Predictor

    predictors = {}
    for path in sorted({p for p, _ in configs}):
        amp, channels_last = PATHS[path]
        # a model of its own per predictor: a predictor converts its model's memory layout in place
        predictors[path] = Predictor(
            load_checkpoint(packaged_weights()), device="cpu", amp=amp, channels_last=channels_last
        )
    inputs = {t: np.random.default_rng(0).integers(0, 256, (1, t, t, 3), dtype=np.uint8) for _, t in configs}
    for path, tile in configs:  # warm-up
        predictors[path].predict(inputs[tile])
    times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for config in configs:
            start = time.perf_counter()
            predictors[config[0]].predict(inputs[config[1]])
            times[config].append(time.perf_counter() - start)
    rows = []
    for (path, tile), values in times.items():
        core = tile - 2 * halo
        rows.append(
            {
                "path": path,
                "tile": tile,
                "core": core,
                "halo": halo,
                "times_s": values,
                "min_s": min(values),
                "median_s": float(np.median(values)),
                "min_s_per_mpx_core": min(values) / (core * core / 1e6),
                "describe": predictors[path].describe(),
                "loadavg_per_round": loads,
            }
        )
        print(
            f"{path:10s} {tile:5d}  min {min(values):7.2f} s  median {np.median(values):7.2f} s  "
            f"{rows[-1]['min_s_per_mpx_core']:6.2f} s/Mpx(core)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the warm-up (min and median kept)")
    parser.add_argument("--paths-at-512", nargs="+", default=list(PATHS), help="paths timed at 512 px")
    parser.add_argument(
        "--sweep-paths", nargs="+", default=["cl_bf16", "cl_fp32"], help="paths timed at every --tiles size"
    )
    parser.add_argument("--tiles", nargs="+", type=int, default=[512, 768, 1152, 1536])
    parser.add_argument("--one", nargs=2, metavar=("PATH", "TILE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleaved",
        type=int,
        metavar="ROUNDS",
        help="time the configurations in turn for ROUNDS rounds in one process (no memory figures)",
    )
    args = parser.parse_args()
    if args.interleaved:
        configs = [(p, 512) for p in args.paths_at_512]
        configs += [(p, t) for p in args.sweep_paths for t in args.tiles if (p, t) not in configs]
        rows = interleaved(configs, args.interleaved, args.halo)
        _write(
            args.out,
            {
                "command": "python benchmarks/cpu_inference.py " + " ".join(sys.argv[1:]),
                "machine": _machine(),
                "model": "packaged full-width GRU-Net",
                "rows": rows,
            },
        )
        return
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return

    jobs = [(p, 512) for p in args.paths_at_512]
    jobs += [(p, t) for p in args.sweep_paths for t in args.tiles if (p, t) not in jobs]
    rows = []
    for path, tile in jobs:
        load = os.getloadavg()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--repeats",
                str(args.repeats),
                "--one",
                path,
                str(tile),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        core = tile - 2 * args.halo
        row.update(
            {
                "halo": args.halo,
                "core": core,
                "loadavg_before": load,
                "s_per_mpx_core": row["median_s"] / (core * core / 1e6),
                "min_s_per_mpx_core": row["min_s"] / (core * core / 1e6),
                "peak_mb_per_mpx_tile": row["forward_extra_mb"] / (tile * tile / 1e6),
            }
        )
        rows.append(row)
        print(
            f"{path:10s} {tile:5d}  {row['median_s']:7.2f} s  {row['s_per_mpx_core']:6.2f} s/Mpx(core)  "
            f"peak {row['peak_rss_mb']:7.0f} MB (+{row['forward_extra_mb']:.0f})",
            flush=True,
        )
    _write(
        args.out,
        {
            "command": "python benchmarks/cpu_inference.py " + " ".join(sys.argv[1:]),
            "machine": _machine(),
            "model": "packaged full-width GRU-Net",
            "rows": rows,
        },
    )


def _machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores_available": len(os.sched_getaffinity(0)),
        "note": "shared machine: other processes ran at the same time (see the load averages)",
    }


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
