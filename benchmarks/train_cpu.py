"""Measure GRU-Net training speed on this machine (CPU fast path), then size a training run.

Times ``--steps`` optimiser steps (after one warm-up step) of the configured batch and crop, from
the packaged weights, with the loop's own augmentation and speed settings, plus one validation
pass over the select images. Prints one JSON line: seconds per step, per validation, and how many
steps fit into ``--minutes`` with a validation every ``--val-every`` steps.

Usage: python benchmarks/train_cpu.py --data DIR... [--batch 8] [--crop 256] [--steps 3]
       [--minutes 30] [--val-every 50] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from wsi_grunet.config import load_train_config, parse_override
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.train.loop import (
    CropSampler,
    augment_colour,
    initial_model,
    load_training_data,
    resolve_speed,
    segmentation_loss,
    validate,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [{"batch_size": args.batch, "crop": args.crop, "init_weights": "packaged"}]
    cfg = load_train_config(None, overrides + [parse_override(text) for text in args.set])
    speed = resolve_speed(cfg)
    if speed.threads:
        torch.set_num_threads(speed.threads)
    data = load_training_data([Path(d) for d in args.data], cfg)
    model, init = initial_model(cfg)
    model = model.to(speed.device).train()
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = CropSampler(data.train, cfg.crop, speed.device, cfg.aux_distance_head)
    times = []
    for step in range(args.steps + 1):
        start = time.monotonic()
        images, fg, dist = sampler.sample(cfg.batch_size, generator)
        images = augment_colour(images, cfg, generator)
        if speed.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with speed.autocast():
            logits = model(images)
        loss = segmentation_loss(logits, fg, dist, cfg.distance_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step includes oneDNN's kernel selection
            times.append(time.monotonic() - start)
    params = PostprocessParams.from_dict(init["postprocess"]) if init["postprocess"] else PostprocessParams()
    start = time.monotonic()
    scores = validate(model, data.select, speed, cfg.mpp, params)
    val_seconds = time.monotonic() - start
    step_seconds = sorted(times)[len(times) // 2]
    per_block = step_seconds * args.val_every + val_seconds
    steps = int(args.minutes * 60 / per_block * args.val_every)
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
                "torch": torch.__version__,
                "speed": speed.to_dict(),
                "batch": cfg.batch_size,
                "crop": cfg.crop,
                "step_seconds": times,
                "median_step_seconds": step_seconds,
                "validation_seconds": val_seconds,
                "select_images": len(data.select),
                "select_scores": {k: scores[k] for k in ("aji", "dice", "soft_dice")},
                "steps_in_budget": steps,
                "minutes": args.minutes,
                "val_every": args.val_every,
            }
        )
    )


if __name__ == "__main__":
    main()
