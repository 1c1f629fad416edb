"""Command line: ``wsi-grunet run | info | segment | train | evaluate``. Parses, then calls the API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, WsiGrunetError

log = logging.getLogger("wsi_grunet")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UntrainedFilter(logging.Filter):
    """Prefix every log line when the model is untrained, so no output is mistaken for a result."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[UNTRAINED MODEL] {record.msg}"
        return True


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr
    )


def _mark_untrained(bundle) -> None:
    if not bundle.trained:
        for handler in logging.getLogger().handlers:
            handler.addFilter(UntrainedFilter())


def _overrides(args: argparse.Namespace) -> list[dict]:
    from .config import parse_override

    mapping = {
        "weights": ("model", "weights"),
        "device": ("model", "device"),
        "batch_size": ("model", "batch_size"),
        "amp": ("model", "amp"),
        "mpp": ("slide", "mpp"),
        "tile_size": ("tiling", "tile_size"),
        "halo": ("tiling", "halo"),
        "workers": ("cluster", "workers"),
        "scheduler": ("cluster", "scheduler"),
        "cluster": ("cluster", "kind"),
    }
    out = [parse_override(text) for text in getattr(args, "set", None) or []]
    for name, (section, key) in mapping.items():
        value = getattr(args, name, None)
        if value is not None:
            out.append({section: {key: value}})
    if getattr(args, "overwrite", False):
        out.append({"output": {"overwrite": True}})
    if getattr(args, "no_tissue_detection", False):
        out.append({"tissue": {"enabled": False}})
    if getattr(args, "outputs", None) is not None:  # --outputs geojson,parquet -> output.formats
        out.append({"output": {"formats": [part.strip() for part in args.outputs.split(",") if part.strip()]}})
    return out


def _check_device(cfg) -> None:
    """A device that cannot be used is a configuration error, raised before any slide is read."""
    if cfg.model.backend == "driver" and cfg.model.weights != "null-model":  # "workers": the model runs elsewhere
        from .model.predictor import choose_device

        choose_device(cfg.model.device)


def cmd_run(args: argparse.Namespace) -> int:
    from .cluster import open_client
    from .cohort import run_cohort
    from .config import load_config
    from .model.checkpoint import resolve_weights
    from .slide.discovery import find_slides

    for noisy in ("distributed", "bokeh", "tornado"):  # distributed configures its loggers on import
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cfg = load_config(args.config, _overrides(args))
    _check_device(cfg)
    paths = [Path(p) for p in args.slides]
    if args.example:
        from .examples import example_slide

        paths.append(example_slide())
    if not paths:
        log.error("give slide files or folders, or --example for the packaged example slide")
        return EXIT_USAGE
    slides = find_slides(paths)  # unique output names, DICOM series once
    if not slides:
        log.error("no slide files found in %s", ", ".join(str(p) for p in paths))
        return EXIT_USAGE
    bundle = resolve_weights(cfg.model.weights)
    _mark_untrained(bundle)
    # local workers, a running scheduler, or SLURM jobs; closed (jobs cancelled) on any exit, SIGTERM included
    with open_client(cfg) as client:
        results = run_cohort(slides, Path(args.out), cfg, bundle, client, progress=not args.quiet)
    failed = [r for r in results if r.status == "failed"]
    busy = sum(r.status == "busy" for r in results)
    print(
        f"\n{len(results)} slide(s): {sum(r.status == 'ok' for r in results)} done, "
        f"{sum(r.status == 'skipped' for r in results)} skipped (already finished), {len(failed)} failed"
        + (f", {busy} busy (another run is working on them)" if busy else "")
    )
    for r in results:
        line = f"  {r.status:8s} {r.slide}"
        line += f"  ({r.nuclei} nuclei, {r.tiles} tiles, {r.seconds:.1f} s)" if r.status == "ok" else ""
        print(line + (f"\n           {r.error}" if r.error else ""))
    if not bundle.trained:
        print(f"WARNING: {bundle.status_line}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .config import load_config
    from .model.checkpoint import resolve_weights
    from .slide.discovery import find_slides
    from .slide.reader import describe, inspect_slide

    cfg = load_config(args.config, _overrides(args))
    bundle = resolve_weights(cfg.model.weights)
    for entry in find_slides([Path(p) for p in args.slides]):
        print(describe(inspect_slide(entry.path), model_mpp=bundle.mpp, mpp_override=cfg.slide.mpp))
        print(f"Output name: {entry.name}")
        print()
    print(f"model: {bundle.status_line}")
    return EXIT_OK


def _segment_images(cfg, images: str, out: str, image_mpp: float, save_probability: bool, quiet: bool) -> int:
    from .model.checkpoint import resolve_weights
    from .model.predictor import Predictor
    from .pipeline import postprocess_params
    from .segment import segment_folder

    bundle = resolve_weights(cfg.model.weights)
    _mark_untrained(bundle)
    predictor = Predictor.from_options(bundle, cfg.model, workload="images")
    batch_size = cfg.model.batch_size if predictor.device.type == "cuda" else 1
    results = segment_folder(
        Path(images),
        Path(out),
        image_mpp,
        bundle,
        postprocess_params(bundle, cfg),
        predictor,
        save_probability=save_probability,
        progress=not quiet,
        tile_size=cfg.tiling.tile_size,
        halo=cfg.tiling.halo,
        batch_size=batch_size,
    )
    failed = [r for r in results if r["status"] != "ok"]
    for r in failed:
        print(f"failed: {r['error']}")
    print(
        f"{len(results) - len(failed)} image(s) segmented into {out}, {len(failed)} failed; model: {bundle.status_line}"
    )
    return EXIT_FAILED if failed else EXIT_OK


def cmd_segment(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, _overrides(args))
    _check_device(cfg)
    return _segment_images(cfg, args.images, args.out, args.image_mpp, args.save_probability, args.quiet)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_train_config, parse_override
    from .model.checkpoint import checkpoint_paths
    from .train.loop import read_run_arguments, train

    if args.resume:
        given = [f"--{name}" for name in ("data", "out", "config", "set") if getattr(args, name)]
        if given:
            raise ConfigError(f"--resume continues a run with its own arguments; leave out {', '.join(given)}")
        out = Path(args.resume)
        arguments = read_run_arguments(out)
        cfg = load_train_config(None, [arguments["config"]])
        folders, labels_dir, data_mpp = [Path(d) for d in arguments["data"]], arguments["labels_dir"], arguments["mpp"]
    else:
        if not args.data or not args.out:
            raise ConfigError("train needs --data and --out (or --resume OUT to continue a run)")
        out = Path(args.out)
        cfg = load_train_config(args.config, [parse_override(text) for text in args.set or []])
        folders, labels_dir, data_mpp = [Path(d) for d in args.data], args.labels_dir, args.data_mpp
    info = train(folders, out, cfg, labels_dir=labels_dir, mpp=data_mpp, progress=not args.quiet)
    print(
        f"trained {info['step']} steps in {info['minutes']:.1f} min; best validation {cfg.select_by} "
        f"{info['best']:.4f} at step {info.get('best_step')} ({cfg.validation_split} validation images); "
        f"checkpoint {checkpoint_paths(out)[0]}"
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from .config import load_config
    from .evaluate.evaluate import evaluate_dirs, format_table, write_json

    if args.images is None and args.pred is None:
        log.error("give --pred DIR (label images) or --images DIR to predict on the fly")
        return EXIT_USAGE
    if args.images is not None and args.image_mpp is None:
        log.error("--images needs --mpp (the images' microns per pixel)")
        return EXIT_USAGE
    cfg = load_config(args.config, _overrides(args))
    if args.images is not None:
        _check_device(cfg)
    with tempfile.TemporaryDirectory(prefix="wsi-grunet-eval-") as tmp:
        pred, prob = args.pred, args.prob
        if args.images is not None:
            if _segment_images(cfg, args.images, tmp, args.image_mpp, True, args.quiet) != EXIT_OK:
                return EXIT_FAILED
            pred, prob = tmp, tmp
        result = evaluate_dirs(Path(pred), Path(args.truth), Path(prob) if prob else None)
    print(format_table(result))
    if args.out:
        write_json(result, Path(args.out))
        print(f"metrics written to {args.out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from .interop.tiatoolbox_store import export_results
    except ImportError as exc:  # TIAToolbox lives in its own environment
        log.error("export --to tiatoolbox-store: %s", exc)
        return EXIT_FAILED
    for result in export_results(Path(args.results), Path(args.out) if args.out else None):
        print(f"{result.slide_dir}: {result.annotations} nuclei -> {result.store}")
    return EXIT_OK


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/default.yaml), merged over the defaults")
    p.add_argument("--set", nargs="+", metavar="SECTION.KEY=VALUE", help="override any config value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-grunet",
        description="Whole-slide nucleus segmentation with GRU-Net: masks as OME-Zarr, nuclei as QuPath GeoJSON.",
    )
    parser.add_argument("--version", action="version", version=f"wsi-grunet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model: bool = True) -> None:
        p.add_argument("--quiet", action="store_true", help="only warnings and the summary; no progress bars")
        if model:
            p.add_argument("--config", help="YAML config (see configs/default.yaml), merged over the defaults")
            p.add_argument(
                "--weights",
                help="checkpoint (.safetensors + .json); default: the packaged weights; 'untrained' for a random model",
            )
            p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
            p.add_argument("--set", nargs="+", metavar="SECTION.KEY=VALUE", help="override any config value")

    run = sub.add_parser(
        "run",
        help="segment nuclei in whole slides",
        description="Segment nuclei in every slide given (files, or folders searched for slide files). "
        "Writes <out>/<name>/ (name: the slide's path under the folder given, without its suffix) with "
        "<leaf>.ome.zarr, nuclei.geojson.gz, nuclei.parquet, report.json and preview.png, plus cohort.csv, "
        "run_summary.json and index.html in <out>. Exit code 1 when any slide failed.",
    )
    run.add_argument("slides", nargs="*", metavar="SLIDES", help="slide files or folders")
    run.add_argument(
        "--example",
        action="store_true",
        help="also run the example slide shipped with wsi-grunet (CMU-1-Small-Region.svs, CC0)",
    )
    run.add_argument(
        "--outputs",
        metavar="FORMATS",
        help="comma-separated outputs to write, of zarr,geojson,parquet,preview (default: all)",
    )
    run.add_argument("--out", required=True, help="output folder")
    common(run)
    run.add_argument("--mpp", type=float, help="slide microns per pixel, 0.1-2 (overrides the slide's own value)")
    run.add_argument("--tile-size", type=int, help="model pixels per tile, halo included (multiple of 16)")
    run.add_argument(
        "--halo",
        type=int,
        help="context pixels on each tile side (multiple of 16; the default 128 is the network's context)",
    )
    run.add_argument("--batch-size", type=int, help="tiles per forward pass")
    run.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="autocast precision (fp32: none; auto: bf16 on CUDA and on CPUs with native bf16)",
    )
    run.add_argument("--workers", type=int, help="CPU worker processes of the local Dask cluster")
    run.add_argument(
        "--scheduler", help="address of a running Dask scheduler (tcp://host:8786) instead of a local cluster"
    )
    run.add_argument(
        "--cluster",
        choices=["local", "slurm"],
        help="where the Dask workers run: local processes, or SLURM jobs (settings under slurm: in the "
        "config, see configs/cluster/slurm.yaml)",
    )
    run.add_argument("--overwrite", action="store_true", help="redo slides whose finished results exist")
    run.add_argument("--no-tissue-detection", action="store_true", help="process every tile, glass included")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="print what the slide reader sees")
    info.add_argument("slides", nargs="+", metavar="SLIDE")
    info.add_argument("--mpp", type=float, help="microns per pixel to assume")
    info.add_argument("--weights", help="checkpoint whose resolution to plan for")
    _config_options(info)
    info.set_defaults(func=cmd_info)

    seg = sub.add_parser(
        "segment",
        help="segment nuclei in ordinary image files (tif, png, jpg)",
        description="Writes <out>/<image-stem>.png: uint16 instance labels (0 = background) at the input's size.",
    )
    seg.add_argument("images", help="an image file or a folder of images")
    seg.add_argument("--out", required=True)
    seg.add_argument("--mpp", dest="image_mpp", type=float, required=True, help="microns per pixel of the images")
    seg.add_argument("--save-probability", action="store_true", help="also write <stem>_prob.png (uint8)")
    common(seg)
    seg.set_defaults(func=cmd_segment)

    tr = sub.add_parser(
        "train",
        help="train GRU-Net on annotated tiles",
        description="Trains on folders with images/ and instance labels (labels_instance/, "
        "masks_instance_filled/ or --labels-dir). Keeps the checkpoint with the best "
        "score on the select validation images (select_by: AJI by default; the starting weights compete "
        "too); the resumable state is saved beside it, so rerunning with the same --out continues the run.",
    )
    tr.add_argument("--data", nargs="+", help="dataset folders")
    tr.add_argument("--out", help="checkpoint path (writes .safetensors and .json)")
    tr.add_argument("--resume", metavar="OUT", help="continue the run at OUT with the arguments it was started with")
    tr.add_argument("--config", help="YAML training config (see configs/train.yaml)")
    tr.add_argument("--labels-dir", help="name of the label folder inside each dataset folder")
    tr.add_argument("--mpp", dest="data_mpp", type=float, help="microns per pixel of the training images")
    tr.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override training config values")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="Dice, AJI, AJI+, DQ/SQ/PQ against ground truth")
    ev.add_argument("--pred", help="folder of predicted label images")
    ev.add_argument("--images", help="folder of images to segment first (needs --mpp)")
    ev.add_argument("--truth", required=True, help="folder of ground-truth label images (same stems)")
    ev.add_argument("--prob", help="folder with <stem>_prob.png maps (for soft Dice)")
    ev.add_argument("--mpp", dest="image_mpp", type=float, help="microns per pixel of --images")
    ev.add_argument("--weights")
    ev.add_argument("--device")
    ev.add_argument("--out", help="write metrics as JSON here")
    ev.add_argument("--quiet", action="store_true")
    _config_options(ev)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="convert finished results for other tools (TIAToolbox SQLiteStore)")
    ex.add_argument("results", help="results folder of `run` (all its slides) or one slide folder")
    ex.add_argument("--to", required=True, choices=["tiatoolbox-store"], help="target format")
    ex.add_argument("--out", help="store file (one slide only); default <slide folder>/nuclei.db")
    ex.add_argument("--quiet", action="store_true")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help / --version)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except ConfigError as exc:  # names the setting, the value and what is allowed
        log.error("%s", exc)
        return EXIT_USAGE
    except WsiGrunetError as exc:
        log.error("%s", exc)
        return EXIT_USAGE if args.command != "run" else EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted; unfinished outputs were not moved into place")
        return 130


if __name__ == "__main__":
    sys.exit(main())
