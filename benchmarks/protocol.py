"""The selection protocol in one command: may a candidate replace the packaged default?

Scores the default and each candidate on all validation images of every dataset (20 with MoNuSeg,
TNBC and CPM-15: none of them trained on), under the protocol users get from ``segment`` and
``evaluate`` (nuclei found at each image's own resolution, TTA flips), prints the per-dataset table
with each paired difference and its 95% bootstrap interval, and the verdict of
``wsi_grunet.evaluate.protocol`` (adopt only when no dataset loses beyond its noise and the worst
dataset or the mean of datasets wins; among adoptable candidates the best in the worst case).

A candidate is ``WEIGHTS`` (a checkpoint path or ``packaged``) with optional post-processing
overrides after ``@``: ``packaged@threshold=0.5,relief_levels=1`` or ``lane/candidate@threshold=0.5``.

``--cross-check PARAM=V1,V2,... --principled V`` tunes one post-processing value of the first candidate
the protocol's way: the value best on each half of the images (select / report, configs/datasets.yaml)
must agree and beat the principled value on both halves, or the principled value stands.

Usage:
  python benchmarks/protocol.py --data DIR... --candidate SPEC [--candidate SPEC ...]
      [--default packaged] [--tta flips] [--out RESULT.json]
  python benchmarks/protocol.py --data DIR... --candidate SPEC --cross-check threshold=0.3,0.4,0.5 --principled 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_split import protocol_items, weights_path  # noqa: E402
from train_cpu import cpu_description  # noqa: E402

from wsi_grunet.config import load_train_config  # noqa: E402
from wsi_grunet.evaluate.metrics import pair_counts  # noqa: E402
from wsi_grunet.evaluate.protocol import cross_check, format_verdict, preferred, verdict, verdict_to_dict  # noqa: E402
from wsi_grunet.model.checkpoint import load_checkpoint  # noqa: E402
from wsi_grunet.postprocess import PostprocessParams, label_nuclei  # noqa: E402
from wsi_grunet.train.loop import load_training_data  # noqa: E402


def parse_spec(text: str) -> tuple[str, dict[str, float]]:
    weights, _, overrides = text.partition("@")
    values = {}
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--candidate {text}: {item!r} is not KEY=VALUE")
        values[key.strip()] = float(value)
    return weights, values


def score(args: argparse.Namespace, spec: str, samples: list) -> dict[str, Any]:
    """Per-image Dice, AJI and PQ of ``spec`` on ``samples`` (maps cached per weights and TTA)."""
    weights, overrides = parse_spec(spec)
    bundle = load_checkpoint(weights_path(weights))
    params = PostprocessParams.from_dict(bundle.metadata.get("postprocess") or {}).with_overrides(**overrides)
    start = time.monotonic()
    per_image = {}
    for item in protocol_items(args, bundle, f"input+{args.tta}", samples, Path(args.cache)):
        labels = label_nuclei(item.prob, item.mpp, params, item.distance)
        metrics = pair_counts(item.truth, labels, item.prob, params.threshold).metrics()
        per_image[f"{item.dataset}/{item.name}"] = {
            "dataset": item.dataset,
            **{k: float(metrics[k]) for k in ("dice", "aji", "pq")},
        }
    return {
        "spec": spec,
        "sha256": bundle.sha256,
        "params": params.to_dict(),
        "seconds": time.monotonic() - start,
        "images": per_image,
    }


def run_cross_check(args: argparse.Namespace, samples: list) -> None:
    parameter, _, values_text = args.cross_check.partition("=")
    values = [float(v) for v in values_text.split(",")]
    if args.principled is None or args.principled not in values:
        raise SystemExit("--cross-check needs --principled V with V among the values tried")
    base = args.candidate[0]
    joiner = "," if "@" in base else "@"
    per_value = {v: score(args, f"{base}{joiner}{parameter}={v}", samples)["images"] for v in values}
    halves = {f"{s.dataset}/{s.name}": s.split for s in samples}
    check = cross_check(parameter, args.principled, per_value, halves)
    for half, by_value in check.scores.items():
        print(f"{half:8s} " + "  ".join(f"{parameter} {v:g}: {score:.4f}" for v, score in by_value.items()))
    print(f"chosen {parameter} {check.chosen:g}: {check.reason}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": cpu_description(),
            "candidate": base,
            "parameter": parameter,
            "principled": args.principled,
            "scores": {h: {str(v): x for v, x in d.items()} for h, d in check.scores.items()},
            "best": check.best,
            "chosen": check.chosen,
            "reason": check.reason,
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="dataset folders (names as in configs/datasets.yaml)")
    parser.add_argument("--default", default="packaged", help="what candidates are judged against")
    parser.add_argument("--candidate", action="append", required=True, metavar="SPEC")
    parser.add_argument("--tta", default="flips", help="TTA of the predictor (none, flips, rot4, dihedral)")
    parser.add_argument("--cache", default=".scratch/eval_maps", help="probability maps per weights and TTA")
    parser.add_argument("--out", help="write every per-image score and verdict as JSON here")
    parser.add_argument("--cross-check", metavar="PARAM=V1,V2,...", help="tune one value on both halves")
    parser.add_argument("--principled", type=float, help="the value --cross-check falls back to")
    args = parser.parse_args()
    args.protocol = f"input+{args.tta}"
    default_bundle = load_checkpoint(weights_path(parse_spec(args.default)[0]))
    data = load_training_data([Path(d) for d in args.data], load_train_config(None, [{"mpp": default_bundle.mpp}]))
    samples = data.val  # every validation image: select and report alike
    if args.cross_check:
        run_cross_check(args, samples)
        return
    default = score(args, args.default, samples)
    results, verdicts = {}, {}
    for spec in args.candidate:
        results[spec] = score(args, spec, samples)
        verdicts[spec] = verdict(default["images"], results[spec]["images"])
        print(format_verdict(spec, verdicts[spec]))
        print()
    choice = preferred(verdicts)
    print(f"preferred: {choice or 'none (keep the default)'}")
    if args.out:
        out = {
            "machine": cpu_description(),
            "protocol": args.protocol,
            "images": len(samples),
            "default": default,
            "candidates": [{**results[s], "verdict": verdict_to_dict(verdicts[s])} for s in args.candidate],
            "preferred": choice,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
