"""Time GRU-Net training steps on this machine, in several model forms side by side, then size a run.

Each form named in ``--forms`` gets its own model (from the packaged weights), optimiser and batch
stream (the same seed, so the same batches); their steps are timed in turn, one step of each form per
round, so that a machine whose speed drifts affects every form alike. The step is the training
loop's own (``TrainingRun.step``: sampling, augmentation, forward, loss, backward, optimiser).

Forms: ``published`` (the published layout, every CDRB input repeated as written), ``form`` (the
training form: CDRB inputs read once, GdAM's heads as one conv), ``freezeK`` (the training form with the
first K levels frozen), ``freezeK+attention`` (also GdAM frozen).

Prints one JSON object: the machine and its CPU flags, each form's step times and median, one
validation pass over the select images, and how many steps of the fastest form fit in ``--minutes``
with a validation every ``--val-every`` steps.

With ``--learn``, whether the forms learn alike: after the timed rounds every form keeps stepping (the
same batches, in turn) to ``--rounds`` steps in all, and its losses and a validation of all held-out
images per dataset are reported side by side.

Usage: python benchmarks/train_cpu.py --data DIR... [--forms published,form,freeze1+attention] [--batch 8]
       [--crop 256] [--rounds 4] [--minutes 30] [--val-every 250] [--set KEY=VALUE ...] [--out JSON]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from wsi_grunet.config import load_train_config, parse_override
from wsi_grunet.model.training_form import TrainingGRUNet
from wsi_grunet.postprocess import PostprocessParams
from wsi_grunet.train.loop import TrainingRun, load_training_data, start_training_run, validate


def cpu_description() -> dict[str, object]:
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wanted = sorted(f for f in (flags.group(1).split() if flags else []) if re.match(r"avx2|fma|avx512|amx", f))
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "flags": wanted,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def run_in_form(run: TrainingRun, form: str) -> TrainingRun:
    """``run`` with its model in ``form`` and a fresh optimiser over that form's parameters."""
    if form == "form":
        return run
    if form == "published":
        model = run.model.published_model().to(run.speed.device).train()
        if run.speed.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        params = list(model.parameters())
    elif form.startswith("freeze"):
        levels, _, attention = form[6:].partition("+")
        published = run.model.published_model().to(run.speed.device).train()
        model = TrainingGRUNet(published, int(levels), freeze_attention=attention == "attention")
        if run.speed.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        params = model.trainable_parameters()
    else:
        raise SystemExit(f"--forms: unknown form {form!r} (published, form, freezeK, freezeK+attention)")
    optimizer = torch.optim.AdamW(params, lr=run.cfg.lr, weight_decay=run.cfg.weight_decay)
    return dataclasses.replace(run, model=model, optimizer=optimizer)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--forms", default="published,form,freeze1,freeze1+attention")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps of each form (after one warm-up step)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--learn", action="store_true", help="also validate every form after its steps")
    parser.add_argument("--time-rounds", type=int, help="rounds timed (default: all of --rounds)")
    args = parser.parse_args()
    overrides = [{"batch_size": args.batch, "crop": args.crop, "init_weights": "packaged"}]
    cfg = load_train_config(None, overrides + [parse_override(text) for text in args.set])
    data = load_training_data([Path(d) for d in args.data], cfg)
    forms = args.forms.split(",")
    runs = {}
    for form in forms:
        run, init = start_training_run(cfg, data)  # each form: the same weights, seed and batches
        runs[form] = run_in_form(run, form)
    times: dict[str, list[float]] = {form: [] for form in forms}
    losses: dict[str, list[float]] = {form: [] for form in forms}
    timed = args.time_rounds or args.rounds
    for round_ in range(args.rounds + 1):
        for form in forms:
            start = time.monotonic()
            losses[form].append(runs[form].step(cfg.lr))
            if 0 < round_ <= timed:  # the first step includes oneDNN's kernel selection
                times[form].append(time.monotonic() - start)
    medians = {form: sorted(t)[len(t) // 2] for form, t in times.items()}
    fastest = min(medians, key=lambda form: medians[form])
    params = PostprocessParams.from_dict(init["postprocess"]) if init["postprocess"] else PostprocessParams()
    start = time.monotonic()
    scores = validate(runs[fastest].model, data.select, runs[fastest].speed, cfg.mpp, params)
    val_seconds = time.monotonic() - start
    per_block = medians[fastest] * args.val_every + val_seconds
    learned = None
    if args.learn:
        learned = {
            form: {
                "losses": losses[form],
                "validation": {
                    k: v
                    for k, v in validate(runs[form].model, data.val, runs[form].speed, cfg.mpp, params).items()
                    if k in ("aji", "dice", "soft_dice", "datasets")
                },
            }
            for form in forms
        }
    result = {
        "machine": cpu_description(),
        "torch": torch.__version__,
        "speed": runs[fastest].speed.to_dict(),
        "batch": cfg.batch_size,
        "crop": cfg.crop,
        "step_seconds": times,
        "median_step_seconds": medians,
        "speed_up_over_published": {f: medians["published"] / m for f, m in medians.items()}
        if "published" in medians
        else None,
        "validation_seconds": val_seconds,
        "select_images": len(data.select),
        "select_scores": {k: scores[k] for k in ("aji", "dice", "soft_dice")},
        "fastest": fastest,
        "steps_in_budget": int(args.minutes * 60 / per_block * args.val_every),
        "minutes": args.minutes,
        "val_every": args.val_every,
        "learned": learned,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
